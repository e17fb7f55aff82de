"""DeeBERT at inference (paper section 3.2): classify texts with early exit, or measure the trade-off (section 4).

    python infer.py "a gripping, beautifully acted film" --S 0.4      one text (an SST-2 checkpoint)
    python infer.py "A man is eating." "Someone eats." --S 0.4        one pair (RTE, MNLI, ...)
    python infer.py --file inputs.txt --json --S 0.4                  one input per line, a tab inside a pair
    python infer.py --task rte --eval                                 the dev-set sweep over the paper's S, timed
    python infer.py --task sst-2 --eval --max_disagree 0.05           certify an S; then classify with --S auto

The checkpoint is --model, else runs/<task> for --task, else the newest runs/*: where train.py saves. S
defaults to 0 for texts: no early exit, exactly the fine-tuned BERT, unless you ask; the output says so.
A thin script over the package (deebert.exit holds the loop, deebert.tradeoff the measurements).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from deebert.checkpoint import load_deebert, resolve
from deebert.device import DTYPES, pick_device, pick_dtype
from deebert.errors import DeeBertError
from deebert.exit import check_threshold, exit_many, full_pass
from deebert.files import write_atomically
from deebert.glue import Example, find_data_dir, get_task, per_layer_metrics, read_split
from deebert.tokenizer import Tokenizer, batches, by_length, check_max_length
from deebert.tradeoff import PAPER_THRESHOLDS, certify_S, choose_S, disagreement, measure_wall_clock, sweep, write_csv
from figures import plot

RUNS_DIR = Path("runs")  # where train.py saves, as runs/<task>

# ----------------------------------------------------------------------------------------------------
# Command line


def threshold(text):
    """argparse type of --S: "auto", or a number that the package's one check of S accepts."""
    try:
        return text if text == "auto" else check_threshold(text)
    except DeeBertError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def number(kind=float, low=0.0, high=math.inf, open_ends=False):
    """argparse type: a `kind` number in [low, high] ((low, high) with open_ends); NaN is refused too."""
    def parse(text):
        value = kind(text)  # argparse turns a ValueError into "invalid float value: 'abc'"
        if not (low < value < high if open_ends else low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} must lie in {'(' if open_ends else '['}{low:g}, {high:g}{')' if open_ends else ']'}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message: "invalid int value: 'x'"
    return parse


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives the project's one line `error: ...` and exit code 2, no usage dump."""

    def error(self, message):
        print(f"error: {message}; see python infer.py --help", file=sys.stderr)
        sys.exit(2)


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("texts", nargs="*", help="one text, or the two texts of a pair (premise, hypothesis)")
    add("--S", type=threshold, nargs="+", default=None,
        help="entropy threshold(s), or auto: the S that --eval --max_disagree certified (default: 0, no early exit, "
             f"for texts; the paper's {' '.join(map(str, PAPER_THRESHOLDS))} for --eval)")
    add("--model", help="fine-tuned checkpoint directory (default: runs/<task> with --task, else the newest runs/*)")
    add("--task", help="GLUE task (sst-2, rte, ...): picks runs/<task>; must match the checkpoint's (default: the checkpoint's)")
    add("--file", help="inputs from PATH, one per line, a tab between the texts of a pair; - reads stdin (default: none)")
    add("--batch_size", type=number(int, 1), default=32, help="inputs per batch with --file, sorted by length (default: %(default)s)")
    add("--json", action="store_true", help="print one JSON object per input (default: off)")
    add("--max_length", type=number(int, 1), default=128, help="longer inputs are truncated, and the output says so (default: %(default)s)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    add("--dtype", default="fp32", choices=list(DTYPES), help="bf16 and fp16 need a GPU (default: %(default)s)")
    add("--threads", type=number(int, 1), help="CPU threads for torch; the README says which is steadiest (default: torch's choice)")
    e = p.add_argument_group("evaluation (--eval): the dev-set trade-off of paper section 4").add_argument
    e("--eval", action="store_true", help="sweep S on the task's dev set instead of classifying texts (default: off)")
    e("--data_dir", help="the task's GLUE folder (default: $GLUE_DIR/<TASK>, then the download cache)")
    e("--split", default="dev", help="dev, or MNLI's dev_mismatched (default: %(default)s)")
    e("--max_eval_examples", type=number(int, 1), help="only the first N dev examples (default: all)")
    e("--eval_batch_size", type=number(int, 1), default=32, help="batch size of the full pass and of the batched timing (default: %(default)s)")
    e("--no_timing", action="store_true", help="skip the wall-clock measurement (default: off)")
    e("--timing_examples", type=number(int, 1), default=100, help="time on the first N dev examples (default: %(default)s)")
    e("--timing_seconds", type=number(float, 1), default=30.0, help="time budget per batch size; rounds stop earlier once steady (default: %(default)s)")
    e("--max_drop", type=number(float, 0), default=1.0, help="report the largest S within this many points of the full model (default: %(default)s)")
    e("--max_disagree", type=number(float, 0, 1, open_ends=True), help="certify the largest S whose answers differ from the full model's on at most this fraction (default: off)")
    e("--delta", type=number(float, 0, 1, open_ends=True), default=0.1, help="the certificate may fail with at most this probability (default: %(default)s)")
    e("--calibration_file", help="calibrate on these texts (one per line, no labels) instead of half the dev set (default: none)")
    e("--out", help="folder for tradeoff.csv and tradeoff.png (default: the checkpoint directory)")
    return p


def say(args, *parts) -> None:
    """Informational lines: on stdout, except with --json, where stdout holds only the JSON objects."""
    print(*parts, file=sys.stderr if args.json else sys.stdout)


def find_checkpoint(model_arg, task_name) -> Path:
    """--model, else runs/<task>, else the runs/* whose config.json was written last (train.py's output)."""
    if model_arg:
        return resolve(model_arg)
    if task_name:
        candidate = RUNS_DIR / get_task(task_name).name
        if not (candidate / "config.json").is_file():
            raise DeeBertError(f"no checkpoint in {candidate}; train first (python train.py --task {task_name}) or pass --model DIR")
        return candidate
    candidates = [d for d in RUNS_DIR.iterdir() if (d / "config.json").is_file()] if RUNS_DIR.is_dir() else []
    if not candidates:
        raise DeeBertError(f"no fine-tuned checkpoint under {RUNS_DIR}/; train first (python train.py --task rte) or pass --model DIR")
    return max(candidates, key=lambda d: (d / "config.json").stat().st_mtime)


def load(args):
    """(model, tokenizer, task, checkpoint directory), on the chosen device and dtype, in eval mode."""
    checkpoint = find_checkpoint(args.model, args.task)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = load_deebert(checkpoint, dtype=dtype).to(device)  # a plain BERT: "has no off-ramps; fine-tune it first"
    config = model.config
    if config.task is None and args.task is None:
        raise DeeBertError("the checkpoint's config.json names no task; pass --task (sst-2, rte, ...)")
    if config.task and args.task and get_task(args.task).name != get_task(config.task).name:
        raise DeeBertError(f"the checkpoint was fine-tuned on {config.task}, not {args.task}; drop --task or pass another --model")
    task = get_task(config.task or args.task)
    check_max_length(args.max_length, config.max_position_embeddings)
    say(args, f"checkpoint: {checkpoint} (task {task.name}, {model.num_layers} layers, "
              f"labels {', '.join(config.labels)}; {device}, {args.dtype})")
    return model, Tokenizer.from_dir(checkpoint, max_length=args.max_length), task, checkpoint


def as_example(texts: list, task, where: str) -> Example:
    """1 or 2 texts -> an unlabelled Example, checked against the task's shape."""
    wanted = 2 if task.is_pair else 1
    if len(texts) != wanted:
        shape = "pairs (premise, hypothesis)" if task.is_pair else "single texts"
        raise DeeBertError(f"{where}: {task.name} classifies {shape}; got {len(texts)} text(s), give {wanted}"
                           + (" separated by a tab" if "line" in where and task.is_pair else ""))
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            which = f"text {number} of the pair" if task.is_pair else "the text"
            raise DeeBertError(f"{where}: {which} is empty; give a non-empty text")
    return Example(texts[0], texts[1] if task.is_pair else None, None)


def read_examples(file_arg: str, task) -> list:
    """One Example per line of --file PATH (or - for standard input); every bad line is named by its number."""
    if file_arg == "-":
        name, data = "standard input", sys.stdin.buffer.read()
    elif Path(file_arg).is_file():
        name, data = file_arg, Path(file_arg).read_bytes()
    else:
        raise DeeBertError(f"--file {file_arg} not found; pass a text file with one input per line, or - for stdin")
    lines = data.removeprefix(b"\xef\xbb\xbf").removesuffix(b"\n").split(b"\n")  # no byte-order mark, no last newline
    if lines == [b""]:
        raise DeeBertError(f"{name} holds no inputs; give one input per line")
    examples = []
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise DeeBertError(f"{name} line {number} is not UTF-8 text; save the file as UTF-8") from None
        examples.append(as_example(text.split("\t"), task, f"{name} line {number}"))
    return examples


def classify(model, tokenizer, examples: list, S: float, batch_size: int) -> list:
    """Examples -> one dict per example, in their order: probabilities, exit layer, entropies of the layers run."""
    results = [None] * len(examples)
    chunks = list(batches(tokenizer, examples, batch_size, by_length(tokenizer, examples)))
    for batch, out in zip(chunks, exit_many(model, chunks, S)):
        for k, index in enumerate(batch["index"].tolist()):
            probability, best = out.probabilities[k].max(dim=-1)
            results[index] = {"label": model.config.labels[best], "probability": round(float(probability), 6),
                              "exit_layer": int(out.exit_layers[k]), "truncated": bool(batch["truncated"][k]),
                              "entropies": [round(e, 6) for e in out.entropies[k].tolist() if not math.isnan(e)]}
    return results


def print_one(result: dict, n: int, args) -> None:
    print(f"label: {result['label']} (probability {result['probability']:.3f})")
    print(f"exit layer: {result['exit_layer']} of {n}")
    print("entropy per layer: " + "  ".join(f"{i}: {e:.4f}" for i, e in enumerate(result["entropies"], start=1)))
    if result["truncated"]:
        print(f"note: the input was longer than --max_length {args.max_length} tokens and was truncated")


def print_line(number: int, example: Example, result: dict, n: int, args) -> None:
    text = example.text_a if example.text_b is None else f"{example.text_a} | {example.text_b}"
    cut = f"  (truncated to {args.max_length} tokens)" if result["truncated"] else ""
    shown = text if len(text) <= 60 else text[:57] + "..."
    print(f"{number:>4}  {result['label']}  p={result['probability']:.3f}  exit {result['exit_layer']}/{n}  {shown}{cut}")


def print_json(number: int, example: Example, result: dict, n: int, args) -> None:
    texts = {"text": example.text_a, **({"text_b": example.text_b} if example.text_b is not None else {})}
    print(json.dumps({**texts, **result, "num_layers": n}, ensure_ascii=False))


def run_texts(args) -> None:
    if args.S is not None and len(args.S) > 1:
        raise DeeBertError(f"give one --S to classify texts, not {len(args.S)}; several thresholds go with --eval")
    if args.texts and args.file:
        raise DeeBertError("give texts on the command line or --file, not both")
    model, tokenizer, task, checkpoint = load(args)
    S = 0.0 if args.S is None else args.S[0]
    if S == "auto":
        results = json.loads((checkpoint / "results.json").read_text()) if (checkpoint / "results.json").is_file() else {}
        if "calibration" not in results:
            raise DeeBertError(f"--S auto: {checkpoint} was never calibrated; run python infer.py --model {checkpoint} "
                               "--eval --max_disagree 0.05 first, or give a number")
        S = results["calibration"]["S"]
    examples = read_examples(args.file, task) if args.file else [as_example(args.texts, task, "input")]
    C = len(model.config.labels)
    say(args, f"S = {S:g}" + (" (calibrated)" if args.S == ["auto"] else ""))
    if args.S is None:
        say(args, "note: S = 0 means no early exit: every input runs all layers (the fine-tuned BERT); pass --S 0.4 to exit early")
    if S > math.log(C):
        say(args, f"note: S = {S:g} is above ln {C} = {math.log(C):.3f}, the largest entropy {C} classes can have: "
                  "every input exits at layer 1")
    results = classify(model, tokenizer, examples, S, args.batch_size)
    printer = print_json if args.json else print_line if args.file else lambda _, __, r, n, a: print_one(r, n, a)
    for number, (example, result) in enumerate(zip(examples, results), start=1):
        printer(number, example, result, model.num_layers, args)


# ----------------------------------------------------------------------------------------------------
# Evaluating: the sweep, the certified S, the wall clock, the CSV and the figure


def print_sweep(rows: list, task, n: int) -> None:
    print(f"{'S':>8}  " + "  ".join(f"{m:>9}" for m in task.metrics) + "  avg exit layer  expected saving  drop (points)")
    for row in rows:
        S = "full" if row["S"] is None else f"{row['S']:g}"
        values = "  ".join(f"{100 * row[m]:>9.2f}" for m in task.metrics)
        print(f"{S:>8}  {values}  {row['avg_exit_layer']:>8.2f} / {n:<3}  {100 * row['expected_saving']:>14.1f}%  {row['drop']:>13.2f}")


def print_timing(timing: list) -> None:
    print(f"{'S':>8}  batch  {'measured saving':>17}  {'expected':>8}  measured/expected  rounds")
    for row in timing[1:]:
        saving = f"{100 * row['measured_saving']:5.1f}% ± {100 * row['spread']:.1f}"
        noise = abs(row["measured_saving"]) <= row["spread"]  # not told apart from no saving at all
        ratio = "within noise" if noise else "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{row['S']:>8g}  {row['batch_size']:>5}  {saving:>17}  {100 * row['expected_saving']:7.1f}%  {ratio:>17}  {row['rounds']:>6}")


def held_out_report(name: str, S: float, logits, labels, task) -> str:
    full, at_S = sweep(logits, labels, task, [S])
    metric, disagree = task.main_metric, float(disagreement(logits, S).float().mean())
    return (f"{name} S = {S:g} on the {len(logits)} dev examples it did not see: disagrees with the full model on "
            f"{100 * disagree:.2f}%, {metric} {100 * at_S[metric]:.2f} (full model {100 * full[metric]:.2f}), "
            f"expected saving {100 * at_S['expected_saving']:.1f}%")


def calibrate(args, model, tokenizer, task, checkpoint, examples, logits, labels, S_values) -> None:
    """Certify S on half the dev set (or --calibration_file) and report it on the dev examples it did not see."""
    if args.calibration_file:
        calibration = read_examples(args.calibration_file, task)
        cal_logits, _ = full_pass(model, batches(tokenizer, calibration, args.eval_batch_size, by_length(tokenizer, calibration)))
        test, source = torch.arange(len(examples)), f"{len(calibration)} unlabelled texts of {args.calibration_file}"
    else:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))
        cal, test = order[: len(order) // 2], order[len(order) // 2 :]
        cal_logits, source = logits[cal], f"a random half of {task.folder} {args.split} ({len(cal)} examples)"
        by_drop = choose_S(sweep(logits[cal], labels[cal], task, S_values), args.max_drop)
    result = certify_S(cal_logits, args.max_disagree, args.delta, S_values)
    print(f"\ncertified on {source}: S = {result['S']:g} disagrees with the full model on at most "
          f"{100 * args.max_disagree:g}% of such inputs, with probability >= {1 - args.delta:g}")
    print(held_out_report("certified", result["S"], logits[test], labels[test], task))
    if not args.calibration_file and by_drop is not None:
        print(held_out_report(f"--max_drop {args.max_drop:g}, chosen on the same half:", by_drop, logits[test], labels[test], task))
    path = checkpoint / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["calibration"] = {**result, "source": source}
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote the certified S into {path}; use it with --S auto")


def run_eval(args) -> None:
    if args.texts or args.file:
        raise DeeBertError("--eval reads the dev set; drop the texts and --file (or drop --eval)")
    if args.S and "auto" in args.S:
        raise DeeBertError("--eval sweeps numbers; --S auto is for classifying texts")
    model, tokenizer, task, checkpoint = load(args)
    S_values = args.S or PAPER_THRESHOLDS
    examples = read_split(task, find_data_dir(task, args.data_dir), args.split)[: args.max_eval_examples]
    start = time.perf_counter()
    logits, labels = full_pass(model, batches(tokenizer, examples, args.eval_batch_size, by_length(tokenizer, examples)))
    print(f"{task.folder} {args.split}: {len(examples)} examples through all {model.num_layers} layers and off-ramps "
          f"in {time.perf_counter() - start:.1f} s\n")
    rows = sweep(logits, labels, task, S_values)
    print_sweep(rows, task, model.num_layers)
    if args.max_disagree:
        calibrate(args, model, tokenizer, task, checkpoint, examples, logits, labels, S_values)
    timing = []
    if not args.no_timing:
        subset = examples[: args.timing_examples]
        print(f"\nwall clock on {len(subset)} examples sorted by length: {next(model.parameters()).device}, {args.dtype}, "
              f"{torch.get_num_threads()} threads (full = all layers + the last off-ramp; saving = 1 - t(S) / t(full), "
              "median of rounds ± half their interquartile range)")
        for B in dict.fromkeys((1, args.eval_batch_size)):
            rows_B = measure_wall_clock(model, batches(tokenizer, subset, B, by_length(tokenizer, subset)), S_values,
                                        budget_seconds=args.timing_seconds)
            print_timing(rows_B)
            timing += rows_B
            for row, timed in zip(rows, rows_B):
                row.update({f"{key}_batch{B}": timed[key] for key in ("measured_saving", "spread", "expected_saving", "seconds")})
    out = Path(args.out) if args.out else checkpoint
    print(f"\nwrote {write_csv(rows, out / 'tradeoff.csv')}")
    png = plot(out / "tradeoff.png", rows, task.main_metric, {"off-ramps": per_layer_metrics(task, logits, labels)}, timing)
    print(f"wrote {png}" if png else "tradeoff.png skipped: matplotlib is not installed (pip install matplotlib)")
    best = choose_S(rows, args.max_drop)
    print(f"largest S within {args.max_drop:g} point{'s' * (args.max_drop != 1)} of the full model's {task.main_metric}: "
          + ("none" if best is None else f"{best:g}"))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.eval:
            run_eval(args)
        elif args.texts or args.file:
            run_texts(args)
        else:
            raise DeeBertError("nothing to do: give a text, a pair of texts, --file PATH, or --eval")
    except DeeBertError as error:
        print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
