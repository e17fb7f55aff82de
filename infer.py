"""DeeBERT at inference: classify texts with early exit, or measure the speed/quality trade-off on a dev set.

Follows the paper's section 2 ("Inference": stop at the first off-ramp whose entropy is below S) and
section 4 (the trade-off: quality and saving for each S). A thin script over the package:
deebert.exit holds the loop, deebert.tradeoff the measurements; nothing in deebert/ imports this file.

    python infer.py "a gripping, beautifully acted film" --S 0.4           one text (SST-2 checkpoint)
    python infer.py "A man is eating." "Someone eats." --S 0.4             one pair (RTE, MNLI, ...)
    python infer.py --file inputs.txt --json --S 0.4                       one input per line, tab inside a pair
    python infer.py --task rte --eval                                      the dev-set sweep over the paper's S

The checkpoint is `--model`, else runs/<task> for `--task`, else the newest runs/* with a config.json:
where train.py saves. S defaults to 0 for texts: no early exit, exactly the fine-tuned BERT, so nobody
gets a faster, less accurate model without asking for it; the output says so.
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
from deebert.exit import early_exit, early_exit_batch
from deebert.glue import find_data_dir, get_task, read_split
from deebert.tokenizer import Tokenizer
from deebert.tradeoff import (PAPER_THRESHOLDS, choose_S, encode_batches, full_pass, measure_wall_clock, plot,
                              sweep, write_csv)

RUNS_DIR = Path("runs")  # where train.py saves, as runs/<task>
MIN_MAX_LENGTH = 8  # [CLS] a [SEP] b [SEP] plus a little text; below this the tokenizer cannot cut a pair

# ----------------------------------------------------------------------------------------------------
# Command line


def threshold(text: str) -> float:
    """argparse type for --S: a number >= 0 (NaN and negatives refused: the authors' S = -1 disabled exiting)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number; give thresholds such as --S 0.4 (texts go before the options)"
        ) from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a threshold >= 0; S = 0 is the full model, larger S exits earlier")
    return value


def points(text: str) -> float:
    """argparse type for --max_drop: percentage points, a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of points >= 0; e.g. --max_drop 1.0")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives the project's one line `error: ...` and exit code 2, no usage dump."""

    def error(self, message):
        print(f"error: {message}; see python infer.py --help", file=sys.stderr)
        sys.exit(2)


def build_parser() -> Parser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="*", help="one text, or the two texts of a pair (premise, hypothesis)")
    parser.add_argument("--S", type=threshold, nargs="+", default=None,
                        help="entropy threshold(s) (default: 0, no early exit, for texts; "
                             f"the paper's {' '.join(map(str, PAPER_THRESHOLDS))} for --eval)")
    parser.add_argument("--model", default=None, help="fine-tuned checkpoint directory (default: runs/<task> "
                        "with --task, else the runs/* whose config.json is newest)")
    parser.add_argument("--task", default=None, help="GLUE task (sst-2, rte, ...): picks runs/<task>; must match "
                        "the checkpoint's own task (default: the checkpoint's)")
    parser.add_argument("--file", default=None, help="read inputs from PATH, one per line, a tab between the "
                        "texts of a pair; '-' reads standard input (default: none)")
    parser.add_argument("--batch_size", type=positive_int, default=32,
                        help="inputs per early_exit_batch call with --file (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per input (default: off)")
    parser.add_argument("--max_length", type=positive_int, default=128,
                        help="longer inputs are truncated, and the output says so (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="bf16 and fp16 need a GPU (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch; 1 is often fastest on a busy machine (default: torch's choice)")
    evaluation = parser.add_argument_group("evaluation (--eval): the dev-set trade-off of paper section 4")
    evaluation.add_argument("--eval", action="store_true",
                            help="sweep S on the task's dev set instead of classifying texts (default: off)")
    evaluation.add_argument("--data_dir", default=None,
                            help="the task's GLUE folder (default: $GLUE_DIR/<TASK>, then the download cache)")
    evaluation.add_argument("--split", default="dev", help="dev, or MNLI's dev_mismatched (default: %(default)s)")
    evaluation.add_argument("--max_eval_examples", type=positive_int, default=None,
                            help="only the first N dev examples (default: all)")
    evaluation.add_argument("--eval_batch_size", type=positive_int, default=32,
                            help="batch size of the full pass and of the batched timing (default: %(default)s)")
    evaluation.add_argument("--no_timing", action="store_true", help="skip the wall-clock measurement (default: off)")
    evaluation.add_argument("--timing_examples", type=positive_int, default=100,
                            help="time on the first N dev examples (default: %(default)s)")
    evaluation.add_argument("--timing_repeats", type=positive_int, default=3, help="rounds in which the full model "
                            "and every S take turns; each keeps its median (default: %(default)s)")
    evaluation.add_argument("--max_drop", type=points, default=1.0, help="report the largest S within this many "
                            "points of the full model's main metric (default: %(default)s)")
    evaluation.add_argument("--out", default=None,
                            help="folder for tradeoff.csv and tradeoff.png (default: the checkpoint directory)")
    return parser


def say(args, *parts) -> None:
    """Informational lines: on stdout, except with --json, where stdout holds only the JSON objects."""
    print(*parts, file=sys.stderr if args.json else sys.stdout)


# ----------------------------------------------------------------------------------------------------
# The checkpoint


def find_checkpoint(model_arg, task_name) -> Path:
    """--model, else runs/<task>, else the runs/* whose config.json was written last (train.py's output)."""
    if model_arg:
        return resolve(model_arg)  # a local directory (runs/rtee is a missing one, not a hub id), or a hub id
    if task_name:
        candidate = RUNS_DIR / get_task(task_name).name
        if not (candidate / "config.json").is_file():
            raise DeeBertError(f"no checkpoint in {candidate}; train first (python train.py --task {task_name}) "
                               f"or pass --model DIR")
        return candidate
    candidates = [d for d in RUNS_DIR.iterdir() if (d / "config.json").is_file()] if RUNS_DIR.is_dir() else []
    if not candidates:
        raise DeeBertError(f"no fine-tuned checkpoint under {RUNS_DIR}/; train first (python train.py --task rte) "
                           f"or pass --model DIR")
    return max(candidates, key=lambda d: (d / "config.json").stat().st_mtime)


def checkpoint_task(config, task_name):
    """The task the checkpoint was fine-tuned on; --task must agree with it."""
    if config.task is None and task_name is None:
        raise DeeBertError("the checkpoint's config.json names no task; pass --task (sst-2, rte, ...)")
    if config.task is not None and task_name is not None and get_task(task_name).name != get_task(config.task).name:
        raise DeeBertError(f"the checkpoint was fine-tuned on {config.task}, not {task_name}; "
                           f"drop --task or pass another --model")
    return get_task(config.task or task_name)


def load(args):
    """(model, tokenizer, task, checkpoint directory), on the chosen device and dtype, in eval mode."""
    checkpoint = find_checkpoint(args.model, args.task)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = load_deebert(checkpoint)  # a plain BERT: "has no off-ramps; fine-tune it first"
    task = checkpoint_task(model.config, args.task)
    if not MIN_MAX_LENGTH <= args.max_length <= model.config.max_position_embeddings:
        raise DeeBertError(f"--max_length {args.max_length} must lie in {MIN_MAX_LENGTH}.."
                           f"{model.config.max_position_embeddings} (the checkpoint's max_position_embeddings)")
    tokenizer = Tokenizer.from_dir(checkpoint, max_length=args.max_length)
    model = model.to(device=device, dtype=dtype).eval()
    say(args, f"checkpoint: {checkpoint} (task {task.name}, {model.num_layers} layers, "
              f"labels {', '.join(label_names(model, task))}; {device}, {args.dtype})")
    return model, tokenizer, task, checkpoint


def label_names(model, task) -> list:
    return list(model.config.labels) or list(task.labels)


# ----------------------------------------------------------------------------------------------------
# The inputs: texts on the command line, or one per line of a file


def check_texts(texts: list, task, where: str, separator: str = "") -> tuple:
    """A list of 1 or 2 texts -> (text_a, text_b or None), checked against the task's shape.

    `where` says where the texts came from, `separator` how a file separates the two texts of a pair.
    """
    if task.is_pair and len(texts) != 2:
        raise DeeBertError(f"{where}: {task.name} classifies pairs (premise, hypothesis); got {len(texts)} text(s), "
                           f"give two{separator}")
    if not task.is_pair and len(texts) != 1:
        raise DeeBertError(f"{where}: {task.name} classifies single texts; got {len(texts)}{separator}, give one")
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            which = f"text {number} of the pair" if task.is_pair else "the text"
            raise DeeBertError(f"{where}: {which} is empty; give a non-empty text")
    return texts[0], texts[1] if task.is_pair else None


def read_lines(file_arg: str) -> tuple:
    """(name for messages, lines) of --file PATH or --file - (standard input)."""
    if file_arg == "-":
        return "standard input", sys.stdin.read().removeprefix("\ufeff").split("\n")
    path = Path(file_arg)
    if not path.is_file():
        raise DeeBertError(f"--file {file_arg} not found; pass a text file with one input per line, or - for stdin")
    try:
        return str(path), path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError:
        raise DeeBertError(f"--file {file_arg} is not UTF-8 text; save it as UTF-8") from None


def file_inputs(file_arg: str, task) -> list:
    """One (text_a, text_b) per line; a line with the wrong number of tab fields, or empty, is an error."""
    name, lines = read_lines(file_arg)
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    if not lines:
        raise DeeBertError(f"{name} holds no inputs; give one input per line")
    return [check_texts(line.removesuffix("\r").split("\t"), task, f"{name} line {number}", " separated by a tab")
            for number, line in enumerate(lines, start=1)]


# ----------------------------------------------------------------------------------------------------
# Classifying


def classify(model, tokenizer, inputs: list, S: float, batch_size: int) -> list:
    """[(text_a, text_b)] -> one dict per input: probabilities, exit layer, entropies (one per layer run), truncated."""
    results = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        texts_b = [b for _, b in chunk] if chunk[0][1] is not None else None
        batch = tokenizer.encode([a for a, _ in chunk], texts_b)
        results += classify_batch(model, batch, S)
    return results


def classify_batch(model, batch, S: float) -> list:
    inputs = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    if inputs[0].shape[0] == 1:  # one input: the paper's loop itself
        one = early_exit(model, *inputs, S=S)
        return [{"probabilities": one.probabilities.tolist(), "exit_layer": one.exit_layer,
                 "entropies": one.entropies, "truncated": bool(batch["truncated"][0])}]
    many = early_exit_batch(model, *inputs, S=S)
    return [{"probabilities": probabilities, "exit_layer": exit_layer,
             "entropies": [e for e in entropies if not math.isnan(e)], "truncated": truncated}
            for probabilities, exit_layer, entropies, truncated in zip(
                many.probabilities.tolist(), many.exit_layers.tolist(), many.entropies.tolist(),
                batch["truncated"].tolist())]


def as_json(text_pair: tuple, result: dict, labels: list, num_layers: int) -> str:
    probabilities = result["probabilities"]
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    record = {"text": text_pair[0]}
    if text_pair[1] is not None:
        record["text_b"] = text_pair[1]
    record.update(label=labels[best], probability=round(probabilities[best], 6), exit_layer=result["exit_layer"],
                  num_layers=num_layers, entropies=[round(e, 6) for e in result["entropies"]],
                  truncated=result["truncated"])
    return json.dumps(record, ensure_ascii=False)


def print_one(result: dict, labels: list, num_layers: int, max_length: int) -> None:
    probabilities = result["probabilities"]
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    print(f"label: {labels[best]} (probability {probabilities[best]:.3f})")
    print(f"exit layer: {result['exit_layer']} of {num_layers}")
    print("entropy per layer: " + "  ".join(f"{i}: {e:.4f}" for i, e in enumerate(result["entropies"], start=1)))
    if result["truncated"]:
        print(f"note: the input was longer than --max_length {max_length} tokens and was truncated")


def print_many(text_pairs: list, results: list, labels: list, num_layers: int, max_length: int) -> None:
    for number, (pair, result) in enumerate(zip(text_pairs, results), start=1):
        probabilities = result["probabilities"]
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        text = pair[0] if pair[1] is None else f"{pair[0]} | {pair[1]}"
        shown = text if len(text) <= 60 else text[:57] + "..."
        cut = f"  (truncated to {max_length} tokens)" if result["truncated"] else ""
        exit_layer = f"exit {result['exit_layer']}/{num_layers}"
        print(f"{number:>4}  {labels[best]}  p={probabilities[best]:.3f}  {exit_layer}  {shown}{cut}")


def threshold_notes(args, S: float, num_classes: int, explicit: bool) -> None:
    say(args, f"S = {S:g}")
    if not explicit:
        say(args, "note: S = 0 means no early exit: every input runs all layers (the fine-tuned BERT); "
                  "pass --S 0.4 to exit early")
    if S > math.log(num_classes):
        say(args, f"note: S = {S:g} is above ln {num_classes} = {math.log(num_classes):.3f}, the largest entropy "
                  f"{num_classes} classes can have: every input exits at layer 1")


def run_texts(args) -> None:
    if args.S is not None and len(args.S) > 1:
        raise DeeBertError(f"give one --S to classify texts, not {len(args.S)}; several thresholds go with --eval")
    if args.texts and args.file:
        raise DeeBertError("give texts on the command line or --file, not both")
    S = args.S[0] if args.S else 0.0
    model, tokenizer, task, _ = load(args)
    if args.file:
        inputs, batch_size = file_inputs(args.file, task), args.batch_size
    else:
        inputs, batch_size = [check_texts(args.texts, task, "input")], 1
    labels, n = label_names(model, task), model.num_layers
    threshold_notes(args, S, len(labels), explicit=args.S is not None)
    results = classify(model, tokenizer, inputs, S, batch_size)
    if args.json:
        for pair, result in zip(inputs, results):
            print(as_json(pair, result, labels, n))
    elif len(inputs) == 1 and not args.file:
        print_one(results[0], labels, n, args.max_length)
    else:
        print_many(inputs, results, labels, n, args.max_length)


# ----------------------------------------------------------------------------------------------------
# Evaluating: the dev-set sweep, the wall clock, the CSV and the figure


def print_sweep(rows: list, task, num_layers: int) -> None:
    metrics = list(task.metrics)
    print(f"{'S':>8}  " + "  ".join(f"{m:>9}" for m in metrics) + "  avg exit layer  expected saving  drop (points)")
    for row in rows:
        S = "full" if row["S"] is None else f"{row['S']:g}"
        values = "  ".join(f"{100 * row[m]:>9.2f}" for m in metrics)
        print(f"{S:>8}  {values}  {row['avg_exit_layer']:>8.2f} / {num_layers:<3}  {100 * row['expected_saving']:>14.1f}%"
              f"  {row['drop']:>13.2f}")


def print_timing(rows: list) -> None:
    print(f"{'S':>8}  {'batch':>5}  {'seconds':>9}  {'measured saving':>15}  {'expected saving':>15}  measured/expected")
    for row in rows:
        S = "full" if row["S"] is None else f"{row['S']:g}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{S:>8}  {row['batch_size']:>5}  {row['seconds']:>9.3f}  {100 * row['measured_saving']:>14.1f}%"
              f"  {100 * row['expected_saving']:>14.1f}%  {ratio:>17}")


def time_and_merge(args, model, tokenizer, examples, S_values, rows) -> None:
    """Wall clock at batch 1 and at --eval_batch_size; the seconds and savings join the sweep's rows."""
    subset = examples[:args.timing_examples]
    device = next(model.parameters()).device
    print(f"\nwall clock on {len(subset)} examples: {device}, {args.dtype}, {torch.get_num_threads()} torch threads "
          f"(full = all layers + the last off-ramp; measured saving = 1 - t(S) / t(full))")
    for batch_size in dict.fromkeys((1, args.eval_batch_size)):
        timing = measure_wall_clock(model, encode_batches(tokenizer, subset, batch_size), S_values,
                                    repeats=args.timing_repeats)
        print_timing(timing)
        for row, timed in zip(rows, timing):
            row[f"seconds_batch{batch_size}"] = timed["seconds"]
            row[f"measured_saving_batch{batch_size}"] = timed["measured_saving"]


def run_eval(args) -> None:
    if args.texts or args.file:
        raise DeeBertError("--eval reads the dev set; drop the texts and --file (or drop --eval)")
    model, tokenizer, task, checkpoint = load(args)
    S_values = args.S if args.S is not None else PAPER_THRESHOLDS
    examples = read_split(task, find_data_dir(task, args.data_dir), args.split)[:args.max_eval_examples]
    batches = encode_batches(tokenizer, examples, args.eval_batch_size)
    truncated = sum(int(batch["truncated"].sum()) for batch in batches)
    if truncated:
        print(f"note: {truncated} of {len(examples)} {args.split} inputs were longer than {args.max_length} tokens "
              f"and were truncated")
    start = time.perf_counter()
    all_logits, labels = full_pass(model, batches)
    print(f"{task.folder} {args.split}: {len(examples)} examples through all {model.num_layers} layers and off-ramps "
          f"in {time.perf_counter() - start:.1f} s\n")
    rows = sweep(all_logits, labels, task, S_values)
    print_sweep(rows, task, model.num_layers)
    if not args.no_timing:
        time_and_merge(args, model, tokenizer, examples, S_values, rows)
    write_outputs(args, rows, task, Path(args.out) if args.out else checkpoint)
    best = choose_S(rows, args.max_drop)
    points = "point" if args.max_drop == 1 else "points"
    print(f"largest S within {args.max_drop:g} {points} of the full model's {task.main_metric}: "
          + ("none" if best is None else f"{best:g}"))


def write_outputs(args, rows: list, task, out: Path) -> None:
    print(f"\nwrote {write_csv(rows, out / 'tradeoff.csv')}")
    png = plot(rows, out / "tradeoff.png", metric=task.main_metric)
    print(f"wrote {png}" if png else "tradeoff.png skipped: matplotlib is not installed (pip install matplotlib)")


# ----------------------------------------------------------------------------------------------------


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
