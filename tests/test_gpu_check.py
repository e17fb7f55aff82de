"""tests/gpu_check.py itself, on the CPU: the script a GPU machine runs must run to its end here too, every check
that needs no GPU passing and every other one saying SKIP with its reason (none may crash or fail)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_the_cpu_and_skips_only_what_needs_a_gpu():
    done = subprocess.run([sys.executable, "tests/gpu_check.py", "--device", "cpu", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(lines) == 9 and not any(line.startswith("FAIL") for line in lines), "\n".join(lines)
    skipped = [line.split(".")[0] for line in lines if line.startswith("SKIP")]
    assert skipped == ["SKIP  1", "SKIP  6", "SKIP  7"]  # parity with a GPU, two GPUs, the GPU benchmark
