"""tests/bench.py (the benchmark, a tool beside the tests): every section's numbers have the right shape on the tiny
checkpoint, quickly.

Speed is never asserted (a test machine is shared and noisy); only structure: the sections are there, times are
positive, spreads and ratios finite where two rounds or more were timed. conftest's one_thread fixture runs every
test on one thread.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import bench
import pytest
import torch

from conftest import fine_tuned, write_glue

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_glue_no_runs_no_cuda(monkeypatch, tmp_path):
    """No real GLUE data, an empty GLUE cache, no runs/ folder here, and CUDA calls that fail loudly: the CPU path
    must never touch CUDA."""
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for name in ("synchronize", "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("the CPU path called torch.cuda"))


@pytest.fixture
def glue_root(tmp_path) -> Path:
    return write_glue(tmp_path / "glue", n_train=40, n_dev=12)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return fine_tuned(tmp_path / "fine-tuned")  # an SST-2 DeeBERT, saved as train.py saves one


@pytest.fixture
def transformers():
    module = pytest.importorskip("transformers")
    module.logging.set_verbosity_error()
    return module


def parse(*flags):
    return bench.parse_args(["--quick", "--threads", "1", *map(str, flags)])


def assert_stat(stat, rounds_timed=True):
    assert stat["median"] > 0
    assert 0 <= stat["spread"] < math.inf if rounds_timed else stat["spread"] == math.inf


# ----------------------------------------------------------------------------------------------------
# The sections, on the tiny checkpoints


def test_forward_section_against_transformers(tiny_checkpoint, transformers):
    result = bench.bench_forward(parse("--model", tiny_checkpoint), CPU, transformers)
    assert result["source"] == "built-in pairs"  # no GLUE here
    assert [(r["dtype"], r["batch_size"]) for r in result["rows"]] == [("fp32", 1), ("fp32", 32)]
    assert result["rows"][1]["tokens"] == 64  # padded to the tiny checkpoint's 64 positions, not 128
    for row in result["rows"]:
        for key in ("ours", "theirs", "ratio"):
            assert_stat(row[key])
        assert row["tflops"]["ours"] > 0 and row["peak_tflops"] is None  # no peak for a CPU
    assert result["max_abs_difference"] < 1e-5  # the same computation as transformers


def test_forward_section_ours_only_on_rte_dev(tiny_checkpoint, glue_root):
    result = bench.bench_forward(parse("--model", tiny_checkpoint, "--data_dir", glue_root), CPU, None)
    assert result["source"] == "RTE dev"
    assert all(set(row) >= {"ours"} and "theirs" not in row and "ratio" not in row for row in result["rows"])
    assert "max_abs_difference" not in result


def test_exit_section(checkpoint, glue_root):
    args = parse("--checkpoint", checkpoint, "--data_dir", glue_root, "--S", 0, 0.3, 1.0, "--examples", 12)
    result = bench.bench_exit(args, CPU, batch_size=4)
    assert (result["task"], result["examples"]) == ("sst-2", 12)
    columns = ["batch 1, data order", "batch 1, sorted", "batch 4, data order", "batch 4, sorted"]
    assert list(result["wall_clock"]) == columns
    for rows in result["wall_clock"].values():  # measure_wall_clock's rows: the full model, then each S
        assert [row["S"] for row in rows] == [None, 0.0, 0.3, 1.0] and rows[0]["seconds"] > 0
        assert rows[1]["expected_saving"] == 0  # S = 0 never exits early
        assert rows[3]["expected_saving"] == pytest.approx(2 / 3)  # S > ln 2: everyone at layer 1 of 3
        assert all(math.isfinite(row["measured_saving"]) and math.isfinite(row["spread"]) for row in rows)


def test_training_section(tiny_checkpoint, glue_root, transformers):
    result = bench.bench_train(parse("--model", tiny_checkpoint, "--data_dir", glue_root), CPU, transformers)
    assert result["source"] == "sst-2"  # SST-2 train first
    for key in ("ours", "theirs", "ratio"):
        assert_stat(result["stage_1"][key])
    assert_stat(result["stage_2"]["ours"])
    assert "theirs" not in result["stage_2"]


def test_training_without_data_uses_the_built_in_pairs(tiny_checkpoint):
    result = bench.bench_train(parse("--model", tiny_checkpoint), CPU, None)
    assert result["source"] == "built-in pairs, made-up labels"
    assert_stat(result["stage_1"]["ours"])
    assert_stat(result["stage_2"]["ours"])


# ----------------------------------------------------------------------------------------------------
# The command line


def test_the_quick_command_line_writes_every_section(tiny_checkpoint, checkpoint, glue_root, tmp_path, capsys):
    out = tmp_path / "out" / "bench.json"
    assert bench.main(["--quick", "--threads", "1", "--no_transformers", "--model", str(tiny_checkpoint),
                       "--checkpoint", str(checkpoint), "--data_dir", str(glue_root), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert list(results) == ["machine", "settings", "forward", "exit", "train", "load", "gpu"]
    for section in ("forward", "exit", "train", "load"):
        assert "skipped" not in results[section], results[section]
    assert results["gpu"] == {"skipped": "the device is cpu, not CUDA"}
    assert results["machine"]["transformers"] is None and results["settings"]["quick"] is True
    load = results["load"]  # --quick: one fresh process for ours, none for transformers
    assert list(load) == ["ours"] and load["ours"]["peak_growth_mb"]["median"] >= 0
    for key in ("seconds", "process_peak_mb"):
        assert_stat(load["ours"][key], rounds_timed=False)  # one process: no spread (infinite)
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # written atomically: no temporary left
    stdout = capsys.readouterr().out
    for heading in ("1. forward", "2. exit", "3. train", "4. load", "5. gpu", "below 1 we are faster"):
        assert heading in stdout


def test_the_default_checkpoint_is_runs_sst_2(tmp_path):
    fine_tuned(tmp_path / "runs")  # the working directory is tmp_path: runs/sst-2 is where train.py saves
    assert parse("--sections", "exit").checkpoint == "runs/sst-2"


def test_without_a_checkpoint_the_exit_section_says_how_to_make_one_and_the_gpu_section_skips(tiny_checkpoint, capsys):
    assert bench.main(["--quick", "--sections", "exit,gpu", "--device", "cpu", "--model", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "2. exit\n   skipped: no --checkpoint" in out and "python train.py" in out
    assert "5. gpu\n   skipped: the device is cpu, not CUDA" in out


@pytest.mark.parametrize("flags, message", [
    (["--model", "{tmp}/missing"], "not found"),
    (["--data_dir", "{tmp}/missing"], "--data_dir"),
    (["--sections", "forward,speed"], "--sections"),
    (["--threads", "0"], "argument --threads: 0 is outside [1, inf]"),
    (["--threads", "two"], "invalid int value"),
    (["--S", "-1"], "threshold S = -1.0 must be a number >= 0"),
    (["--speed"], "unrecognized arguments: --speed"),
    (["--device", "tpu"], "--device tpu"),
    (["--sections", "exit", "--checkpoint", "{tiny}"], "names no task"),  # a pretrained BERT is not fine-tuned
])
def test_bad_input_is_one_error_line_and_exit_code_2_before_any_work(flags, message, tiny_checkpoint, tmp_path, capsys):
    flags = [f.format(tmp=tmp_path, tiny=tiny_checkpoint) for f in flags]
    assert bench.main(["--quick", "--no_transformers", "--model", str(tiny_checkpoint), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""  # nothing ran


def test_from_the_shell_a_bad_flag_is_one_line_and_exit_code_2(tmp_path):
    command = [sys.executable, str(REPO / "tests" / "bench.py"), "--quick", "--model", str(tmp_path / "missing")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
