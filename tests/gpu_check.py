"""The checks that need a GPU, in one script: `python tests/gpu_check.py` on a machine with CUDA (under 10 minutes).

Not part of `pytest` (CI has no GPU). Every check prints PASS, FAIL or SKIP with its reason, and the script
exits 1 if any check failed, 2 if there is no GPU at all; nothing is skipped without saying so.

1. parity: the encoder on CUDA in fp32 against the CPU (all-MiniLM-L6-v2 when installed, else a tiny random BERT)
2. bf16: early exit in bf16 takes the fp32 decisions for every input whose entropies stay away from S
3. training: one step of each stage with --amp bf16 (train.py on a tiny synthetic task), float32 master weights
4. torchrun: two processes on two GPUs (NCCL), identical weights; said to be skipped with fewer than two GPUs
5. bench: python bench.py --device cuda --quick --sections forward,gpu
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import minilm_path, tiny_deebert, write_glue, write_tiny_checkpoint  # noqa: E402
from deebert.checkpoint import load_bert, load_deebert  # noqa: E402
from deebert.exit import early_exit_batch  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="deebert-gpu-check-"))
CHECKS = []


def check(name):
    def register(function):
        CHECKS.append((name, function))
        return function
    return register


def run_all() -> list:
    outcomes = []
    for name, function in CHECKS:
        started = time.perf_counter()
        try:
            outcome, detail = function()
        except Exception as err:  # a check that crashes is a failure, with its reason
            outcome, detail = "FAIL", f"{type(err).__name__}: {err}"
        outcomes.append(outcome)
        print(f"{outcome:4}  {name}: {detail}  ({time.perf_counter() - started:.1f} s)", flush=True)
    return outcomes


@check("1. parity of the encoder, CUDA fp32 against the CPU")
def parity():
    directory = minilm_path() or write_tiny_checkpoint(WORK / "tiny")
    cpu, gpu = load_bert(directory), load_bert(directory).cuda()
    input_ids = torch.randint(1000 if minilm_path() else 5, 2000 if minilm_path() else 30, (8, 64))
    mask = (torch.arange(64)[None] < torch.randint(8, 65, (8, 1))).long()
    with torch.no_grad():
        a = cpu(input_ids, attention_mask=mask)[0][-1]
        b = gpu(input_ids.cuda(), attention_mask=mask.cuda())[0][-1].cpu()
    difference = float((a - b).abs().max())
    return ("PASS" if difference < 1e-3 else "FAIL"), f"max |CPU - CUDA| = {difference:.2e} on {directory.name} (limit 1e-3, TF32 off)"


@check("2. bf16 early exit takes fp32's decisions away from S")
def bf16_decisions():
    model = tiny_deebert(WORK / "tiny-exit").cuda()
    input_ids = torch.randint(5, 30, (256, 20), device="cuda")
    S = 0.4
    fp32 = early_exit_batch(model, input_ids, S=S)
    bf16 = early_exit_batch(model.to(torch.bfloat16), input_ids, S=S)
    far = ((fp32.entropies - S).abs().nan_to_num(1.0) > 0.02).all(dim=1)  # never within 0.02 of S
    agree = (fp32.exit_layers == bf16.exit_layers)[far]
    worst = float((fp32.entropies - bf16.entropies).abs().nan_to_num(0).max())
    ok = bool(agree.all()) and int(far.sum()) > 100
    return ("PASS" if ok else "FAIL"), f"{int(agree.sum())}/{int(far.sum())} inputs away from S agree; max entropy difference {worst:.1e}"


@check("3. one --amp bf16 step of each stage")
def amp_training():
    data = write_glue(WORK / "glue", n_train=16, n_dev=8) / "SST-2"
    command = [sys.executable, "train.py", "--task", "sst-2", "--model", str(write_tiny_checkpoint(WORK / "tiny-train")),
               "--data_dir", str(data), "--output_dir", str(WORK / "amp-run"), "--batch_size", "16", "--epochs", "1",
               "--max_length", "32", "--device", "cuda", "--amp", "bf16"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return "FAIL", done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
    dtypes = {p.dtype for p in load_deebert(WORK / "amp-run").parameters()}
    ok = "stage 2 done" in done.stdout and dtypes == {torch.float32}
    return ("PASS" if ok else "FAIL"), f"both stages ran; saved weights {sorted(map(str, dtypes))}"


@check("4. torchrun on two GPUs (NCCL)")
def two_gpus():
    if torch.cuda.device_count() < 2:
        return "SKIP", f"{torch.cuda.device_count()} GPU(s) here; this check needs two"
    data = write_glue(WORK / "glue-ddp", n_train=64, n_dev=8) / "SST-2"
    weights = WORK / "ddp-weights"
    weights.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "tests/helpers/ddp_worker.py", str(weights), "--task", "sst-2", "--model",
               str(write_tiny_checkpoint(WORK / "tiny-ddp")), "--data_dir", str(data), "--output_dir", str(WORK / "ddp-run"),
               "--batch_size", "8", "--epochs", "1", "--max_length", "32", "--device", "cuda"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return "FAIL", (done.stderr.strip().splitlines() or ["no output"])[-1]
    rank0, rank1 = (torch.load(weights / f"rank{r}.pt", map_location="cpu") for r in (0, 1))
    same = all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    return ("PASS" if same else "FAIL"), "both ranks end with identical weights" if same else "the ranks' weights differ"


@check("5. the benchmark on CUDA")
def bench():
    model = minilm_path() or write_tiny_checkpoint(WORK / "tiny-bench", positions=512)
    command = [sys.executable, "bench.py", "--device", "cuda", "--quick", "--sections", "forward,gpu", "--model", str(model)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(done.stdout)
    return ("PASS" if done.returncode == 0 else "FAIL"), f"exit code {done.returncode} {done.stderr.strip()[-300:]}"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; run this on a machine with CUDA")
        sys.exit(2)
    print(f"GPU: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, torch {torch.__version__}")
    results = run_all()
    print(f"summary: {results.count('PASS')} passed, {results.count('FAIL')} failed, {results.count('SKIP')} skipped")
    sys.exit(1 if "FAIL" in results else 0)
