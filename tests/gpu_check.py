"""The checks that need a GPU, in one script: everything a GPU user is told to run, in at most five minutes.

    python tests/gpu_check.py                        # on a machine with CUDA
    python tests/gpu_check.py --device cpu --quick   # the same script on the CPU (the test suite runs this)

Not part of `pytest` (CI has no GPU). Self-contained: no network, no GLUE folder, no checkpoint on disk. It writes
what it needs into a temporary folder (random BERTs of all-MiniLM-L6-v2's shape and of bert-base's, a synthetic
SST-2 and RTE in GLUE's format) and runs the real commands on them. Each check prints PASS, FAIL or SKIP with
its numbers; the script exits 1 if any check failed. On the CPU what needs a GPU says SKIP, and the rest runs.

1. parity       the encoder on CUDA in fp32, TF32 off, against the CPU
2. bf16 exits   early exit with bf16 weights takes fp32's decisions for every input away from S
3. training     both stages in this process under --amp auto: finite loss, weights moved, a bf16 matrix product
                recorded, fp32 master weights
4. infer.py     train.py on the GPU, then infer.py on one text, on --file, and --eval on a small dev set
5. benchmark    python tests/bench.py, every section
6. torchrun     two processes on two GPUs (NCCL), identical weights; SKIP with fewer GPUs
Then measured, not judged: bf16 forward of ours against transformers (sdpa) at batch 64 and 256 on bert-base's
shape; one stage-1 epoch of an RTE-sized task on bert-base's shape; batch-1 early exit at S = 0 against the full
model (on a GPU a batch-1 layer is launch-bound, so an off-ramp and its sync cost relatively more).
"""

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import train
from deebert.checkpoint import load_bert, load_deebert
from deebert.device import dtype_name, pick_device, use_tf32
from deebert.exit import early_exit_batch
from deebert.glue import Example, get_task, read_split
from deebert.stages import stage1_parameters, stage2_parameters
from deebert.timing import measure_wall_clock
from deebert.tokenizer import Tokenizer, batches

from conftest import tiny_deebert, write_glue, write_tiny_checkpoint

WORK = Path(tempfile.mkdtemp(prefix="deebert-gpu-check-"))
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522)
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=100)


def run(command: list, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def last_line(done) -> str:
    return (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1][-300:]


def parity(device, shape) -> tuple:
    if device.type != "cuda":
        return "SKIP", "no GPU: nothing to compare the CPU with"
    directory = write_tiny_checkpoint(WORK / "parity", bert_base_naming=False, positions=512, **shape)
    cpu, gpu = load_bert(directory), load_bert(directory).to(device)
    input_ids = torch.randint(5, shape["vocab_size"], (8, 128))
    mask = (torch.arange(128)[None] < torch.randint(8, 129, (8, 1))).long()
    use_tf32(device, False)  # exact fp32 products for the comparison; TF32 is the default everywhere else
    try:
        with torch.no_grad():
            a = cpu(input_ids, attention_mask=mask)[0][-1]
            b = gpu(input_ids.to(device), attention_mask=mask.to(device))[0][-1].cpu()
    finally:
        use_tf32(device, True)
    difference = float((a - b).abs().max())
    verdict = "PASS" if difference < 1e-4 else "FAIL"
    return verdict, f"max |CPU - CUDA| = {difference:.2e} over 8 x 128 tokens (limit 1e-4, TF32 off)"


def bf16_exits(device) -> tuple:
    model = tiny_deebert(WORK / "exit-model").to(device)  # 3 layers, entropies spread over (0, ln 2)
    input_ids = torch.randint(5, 25, (512, 20), device=device)
    S = 0.4
    fp32 = early_exit_batch(model, input_ids, S=S)
    bf16 = early_exit_batch(model.to(torch.bfloat16), input_ids, S=S)
    far = ((fp32.entropies - S).abs().nan_to_num(1.0) > 0.02).all(dim=1)  # never within 0.02 of S
    agree = (fp32.exit_layers == bf16.exit_layers)[far]
    worst = float((fp32.entropies - bf16.entropies).abs().nan_to_num(0).max())
    verdict = "PASS" if bool(agree.all()) and int(far.sum()) > 200 else "FAIL"
    return verdict, f"{int(agree.sum())}/{int(far.sum())} inputs away from S agree; largest entropy gap {worst:.1e}"


def bf16_products(model) -> tuple:
    """Forward hooks on every linear layer that record the dtype of what it computed."""
    seen = set()
    handles = [m.register_forward_hook(lambda m, i, output: seen.add(output.dtype))
               for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return seen, handles


def training(device, shape, glue) -> tuple:
    model_dir = write_tiny_checkpoint(WORK / "train-bert", bert_base_naming=False, positions=512, **shape)
    args = train.parse_args(["--task", "sst-2", "--model", str(model_dir), "--data_dir", str(glue / "SST-2"),
                             "--batch_size", "16", "--epochs", "1", "--stage2_learning_rate", "1e-3",
                             "--max_length", "32", "--device", str(device)])  # --amp auto, the default
    run = train.Run(args)
    model = load_deebert(model_dir, labels=["negative", "positive"]).to(device)
    tokenizer = Tokenizer.from_dir(model_dir, max_length=32)
    examples = read_split(get_task("sst-2"), glue / "SST-2", "train")
    seen, handles = bf16_products(model)
    notes, ok = [], True
    for stage, parameters_of in (("stage 1", stage1_parameters), ("stage 2", stage2_parameters)):
        before = [p.detach().clone() for p in parameters_of(model)]
        stats = train.train_stage(stage, model, examples, tokenizer, args, run)
        moved = all(not torch.equal(b, p) for b, p in zip(before, parameters_of(model)) if b.dim() == 2)
        ok &= math.isfinite(stats["mean_loss"]) and moved
        notes.append(f"{stage}: loss {stats['mean_loss']:.3f}, {stats['examples_per_second']:.0f} examples/s, "
                     f"matrices moved: {moved}")
    for handle in handles:
        handle.remove()
    master = {p.dtype for p in model.parameters()}
    ok &= master == {torch.float32} and (torch.bfloat16 in seen) == (run.amp == torch.bfloat16)
    notes.append(f"--amp auto = {dtype_name(run.amp)}, products in {sorted(map(dtype_name, seen))}, "
                 f"master weights {sorted(map(dtype_name, master))}")
    return ("PASS" if ok else "FAIL"), "; ".join(notes)


def infer_commands(device, shape, glue) -> tuple:
    model_dir = write_tiny_checkpoint(WORK / "infer-bert", bert_base_naming=False, positions=512, **shape)
    run_dir = WORK / "runs" / "sst-2"
    trained = run(["train.py", "--task", "sst-2", "--model", model_dir, "--data_dir", glue / "SST-2", "--output_dir",
                   run_dir, "--batch_size", "16", "--epochs", "1", "--device", device])
    if trained.returncode != 0:
        return "FAIL", f"train.py: {last_line(trained)}"
    inputs = WORK / "inputs.txt"
    inputs.write_text("a good movie\nthe dog is bad\nnot very good\n")
    commands = {
        "one text": ["infer.py", "a good movie", "--S", "0.4", "--model", run_dir, "--device", device],
        "--file": ["infer.py", "--file", inputs, "--json", "--S", "0.4", "--model", run_dir, "--device", device],
        "--eval": ["infer.py", "--eval", "--model", run_dir, "--data_dir", glue / "SST-2", "--max_eval_examples",
                   "64", "--timing_examples", "32", "--timing_seconds", "1", "--device", device],
    }
    notes = []
    for name, command in commands.items():
        done = run(command)
        if done.returncode != 0:
            return "FAIL", f"{name}: {last_line(done)}"
        notes.append(f"{name}: {len(done.stdout.splitlines())} lines")
    checkpoint_line = next(line for line in run(commands["one text"]).stdout.splitlines() if "checkpoint:" in line)
    return "PASS", "; ".join(notes) + f"; {checkpoint_line.split(';')[-1].strip(' )')}"


def benchmark(device, shape, glue) -> tuple:
    model_dir = write_tiny_checkpoint(WORK / "bench-bert", bert_base_naming=False, positions=512, **shape)
    checkpoint = WORK / "runs" / "sst-2"
    if not (checkpoint / "config.json").is_file():
        return "SKIP", "no checkpoint: check 4 failed before it trained one"
    done = run(["tests/bench.py", "--quick", "--device", device, "--model", model_dir, "--checkpoint", checkpoint,
                "--data_dir", glue], timeout=300)
    print(done.stdout)
    sections = [line.strip() for line in done.stdout.splitlines() if line.strip() in
                ("1. forward", "2. exit", "3. train", "4. load", "5. gpu")]
    ok = done.returncode == 0 and len(sections) == 5 and "Traceback" not in done.stderr
    return ("PASS" if ok else "FAIL"), f"{len(sections)} sections ran" if ok else last_line(done)


def torchrun(device, shape, glue) -> tuple:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return "SKIP", f"{count} GPU(s) here; this check needs two"
    weights = WORK / "ddp-weights"
    weights.mkdir()
    model_dir = write_tiny_checkpoint(WORK / "ddp-bert", bert_base_naming=False, positions=512, **shape)
    done = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/helpers/ddp_worker.py",
                weights, "--task", "sst-2", "--model", model_dir, "--data_dir", glue / "SST-2", "--output_dir",
                WORK / "ddp-run", "--batch_size", "8", "--epochs", "1", "--max_length", "32", "--device", "cuda"])
    if done.returncode != 0:
        return "FAIL", last_line(done)
    rank0, rank1 = (torch.load(weights / f"rank{r}.pt", map_location="cpu") for r in (0, 1))
    same = all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    return ("PASS" if same else "FAIL"), "both ranks end with identical weights" if same else "the weights differ"


# ----------------------------------------------------------------------------------------------------
# Measured, not judged


def forward_throughput(device, shape) -> tuple:
    if device.type != "cuda":
        return "SKIP", "the GPU section of the benchmark needs a GPU"
    model_dir = write_tiny_checkpoint(WORK / "base-bert", bert_base_naming=False, positions=512, **shape)
    done = run(["tests/bench.py", "--sections", "gpu", "--model", model_dir, "--gpu_batch_sizes", "64", "256",
                "--device", device], timeout=300)
    print(done.stdout)
    return ("PASS" if done.returncode == 0 else "FAIL"), "the table above" if done.returncode == 0 else last_line(done)


def rte_like(count: int, generator) -> list:
    """`count` RTE-shaped pairs of random words: premises of 30 to 80 tokens, hypotheses of 6 to 16."""
    def words(low, high):
        length = int(torch.randint(low, high, (1,), generator=generator))
        return " ".join(f"w{int(k)}" for k in torch.randint(0, 20000, (length,), generator=generator))
    return [Example(words(30, 80), words(6, 16), k % 2) for k in range(count)]


def rte_epoch(device, shape, count: int) -> tuple:
    model_dir = WORK / "base-bert"
    if not (model_dir / "config.json").is_file():
        model_dir = write_tiny_checkpoint(model_dir, bert_base_naming=False, positions=512, **shape)
    args = train.parse_args(["--task", "rte", "--model", str(model_dir), "--epochs", "1", "--device", str(device)])
    run_ = train.Run(args)
    model = load_deebert(model_dir, labels=["entailment", "not_entailment"]).to(device)
    tokenizer = Tokenizer.from_dir(model_dir, max_length=128)
    examples = rte_like(count, torch.Generator().manual_seed(0))
    stats = train.train_stage("stage 1", model, examples, tokenizer, args, run_)
    return "PASS", (f"{count} pairs, batch {args.batch_size}, {dtype_name(run_.amp)}: "
                    f"{stats['seconds']:.1f} s, {stats['examples_per_second']:.0f} examples/s")


def batch_one_latency(device, shape, count: int) -> tuple:
    model_dir = WORK / "base-bert"
    if not (model_dir / "config.json").is_file():
        model_dir = write_tiny_checkpoint(model_dir, bert_base_naming=False, positions=512, **shape)
    model = load_deebert(model_dir, labels=["0", "1"]).to(device).eval()
    tokenizer = Tokenizer.from_dir(model_dir, max_length=128)
    examples = rte_like(count, torch.Generator().manual_seed(1))
    rows = measure_wall_clock(model, batches(tokenizer, examples, 1), [0.0], budget_seconds=20)
    full, exit_0 = rows
    return "PASS", (f"{count} pairs one at a time: full model {1000 * full['seconds'] / count:.2f} ms each; the exit "
                    f"loop at S = 0 takes {1 - exit_0['measured_saving']:.2f} x the full model's time "
                    f"(± {exit_0['spread']:.2f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tests/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script itself")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few examples: the script runs, no more")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; run this on a machine with CUDA, or pass --device cpu")
        return 2
    device = pick_device(args.device)
    minilm, base = (TINY, TINY) if args.quick else (MINILM, BERT_BASE)
    glue = write_glue(WORK / "glue", n_train=256, n_dev=64)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; scratch folder {WORK}", flush=True)
    checks = {
        "1. parity of the encoder, CUDA fp32 against the CPU": lambda: parity(device, minilm),
        "2. bf16 early exit takes fp32's decisions away from S": lambda: bf16_exits(device),
        "3. both stages under --amp auto": lambda: training(device, minilm, glue),
        "4. infer.py: one text, --file, --eval": lambda: infer_commands(device, minilm, glue),
        "5. the benchmark, every section": lambda: benchmark(device, minilm, glue),
        "6. torchrun on two GPUs (NCCL)": lambda: torchrun(device, minilm, glue),
        "7. bf16 forward against transformers, bert-base shape": lambda: forward_throughput(device, base),
        "8. one stage-1 epoch of an RTE-sized task, bert-base shape": lambda: rte_epoch(device, base,
                                                                                          64 if args.quick else 2490),
        "9. batch-1 early exit at S = 0 against the full model": lambda: batch_one_latency(device, base,
                                                                                          8 if args.quick else 50),
    }
    outcomes = []
    for title, check in checks.items():
        started = time.perf_counter()
        try:
            outcome, detail = check()
        except Exception as err:  # a check that crashes is a failure, with its reason
            outcome, detail = "FAIL", f"{type(err).__name__}: {err}"
        outcomes.append(outcome)
        print(f"{outcome:4}  {title}: {detail}  ({time.perf_counter() - started:.1f} s)", flush=True)
    print(f"summary: {outcomes.count('PASS')} passed, {outcomes.count('FAIL')} failed, "
          f"{outcomes.count('SKIP')} skipped")
    return 1 if "FAIL" in outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
