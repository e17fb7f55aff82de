"""DeeBERT at inference (paper section 3.2): classify texts with early exit, or measure the trade-off (section 4).

    python infer.py "a gripping, beautifully acted film" --S 0.4      one text (an SST-2 checkpoint)
    python infer.py "A man is eating." "Someone eats." --S 0.4        one pair (RTE, MNLI, ...)
    python infer.py --file inputs.txt --json --S 0.4                  one input per line, a tab inside a pair
    python infer.py --task rte --eval                                 the dev-set sweep over the paper's S, timed
    python infer.py --task sst-2 --eval --static runs/sst-2-k3        ... beside a static 3-layer model
    python infer.py --task sst-2 --eval --max_disagree 0.05           certify an S; then classify with --S auto

The checkpoint is --model, else runs/<task> for --task, else the newest runs/*: where train.py saves. S
defaults to 0 for texts: no early exit, exactly the fine-tuned BERT, unless you ask; the output says so.
`--eval` runs the dev set once through every layer and off-ramp, reads off every S and every exit rule
(deebert/tradeoff.py), times true early exit (deebert/timing.py), and writes tradeoff.csv, rules.csv and
tradeoff.png beside the checkpoint.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deebert import tradeoff
from deebert.checkpoint import resolve
from deebert.classify import classify, load
from deebert.device import PRECISIONS, dtype_name, pick_device, use_tf32
from deebert.errors import DeeBertError, Parser, number
from deebert.exit import check_threshold
from deebert.files import write_atomically
from deebert.glue import Task, find_data_dir, get_task, per_layer_metrics, read_split, unlabelled
from deebert.model import DeeBert
from deebert.plot import plot
from deebert.timing import measure_wall_clock, verdict
from deebert.tokenizer import Tokenizer, batches, by_length

RUNS_DIR = Path("runs")  # where train.py saves, as runs/<task>


def threshold(text):
    """argparse type of --S: "auto", or a number that the package's one check of S accepts."""
    try:
        return text if text == "auto" else check_threshold(text)
    except DeeBertError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> Parser:
    p = Parser(prog="infer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("texts", nargs="*", help="one text, or the two texts of a pair (premise, hypothesis)")
    add("--S", type=threshold, default=None,
        help="the entropy threshold, or auto: the S that --eval --max_disagree certified (default: 0, no early exit)")
    add("--model", help="fine-tuned checkpoint directory (default: runs/<task> with --task, else the newest runs/*)")
    add("--task", help="GLUE task (sst-2, rte, ...): picks runs/<task>; must match the checkpoint's (default: its own)")
    add("--file", help="inputs from PATH, one per line, a tab between the texts of a pair; - reads stdin "
                       "(default: none)")
    add("--batch_size", type=number(int, 1), default=32,
        help="inputs per batch with --file, sorted by length (default: %(default)s)")
    add("--json", action="store_true", help="print one JSON object per input (default: off)")
    add("--max_length", type=number(int, 1), default=128,
        help="longer inputs are truncated, and the output says so (default: %(default)s)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    add("--dtype", default="auto", choices=PRECISIONS,
        help="the weights' number format; auto: bf16 on a GPU that has it, else fp32 (default: %(default)s)")
    add("--threads", type=number(int, 1), help="CPU threads for torch (default: torch's choice)")
    e = p.add_argument_group("evaluation (--eval): the dev-set trade-off of paper section 4").add_argument
    e("--eval", action="store_true", help="sweep S on the task's dev set instead of classifying texts (default: off)")
    e("--thresholds", type=threshold, nargs="+", default=list(tradeoff.PAPER_THRESHOLDS),
      help="the S values of the sweep and the timing (default: the paper's)")
    e("--data_dir", help="the task's GLUE folder (default: $GLUE_DIR/<TASK>, then the download cache)")
    e("--split", default="dev", help="dev, or MNLI's dev_mismatched (default: %(default)s)")
    e("--max_eval_examples", type=number(int, 1), help="only the first N dev examples (default: all)")
    e("--eval_batch_size", type=number(int, 1), default=32,
      help="batch size of the full pass and of the batched timing (default: %(default)s)")
    e("--static", nargs="+", default=[], metavar="DIR",
      help="static models to compare with: checkpoints of train.py --layers K from the same BERT (default: none)")
    e("--no_timing", action="store_true", help="skip the wall-clock measurement (default: off)")
    e("--timing_examples", type=number(int, 1), default=100,
      help="time on the first N dev examples (default: %(default)s)")
    e("--timing_seconds", type=number(float, 1), default=30.0,
      help="time budget per batch size; rounds stop earlier once steady (default: %(default)s)")
    e("--max_drop", type=number(float, 0), default=1.0,
      help="report the largest S within this many points of the full model (default: %(default)s)")
    e("--max_disagree", type=number(float, 0, 1, open_ends=True),
      help="certify the largest S whose answers differ from the full model's on at most this fraction (default: off)")
    e("--delta", type=number(float, 0, 1, open_ends=True), default=0.1,
      help="the certificate may fail with at most this probability (default: %(default)s)")
    e("--calibration_file",
      help="calibrate on these texts (one per line, no labels) instead of half the dev set (default: none)")
    e("--out", help="folder for tradeoff.csv, rules.csv and tradeoff.png (default: the checkpoint directory)")
    return p


def say(args, *parts) -> None:
    """Informational lines: on stdout, except with --json, where stdout holds only the JSON objects."""
    print(*parts, file=sys.stderr if args.json else sys.stdout)


# ----------------------------------------------------------------------------------------------------
# The checkpoint and the inputs


@dataclass
class Loaded:
    """A fine-tuned checkpoint, loaded: what every path of this script works with."""

    directory: Path
    model: DeeBert
    tokenizer: Tokenizer
    task: Task


def find_checkpoint(model_arg, task_name) -> Path:
    """--model, else runs/<task>, else the runs/* whose config.json was written last (train.py's output)."""
    if model_arg:
        return resolve(model_arg)
    if task_name:
        candidate = RUNS_DIR / get_task(task_name).name
        if not (candidate / "config.json").is_file():
            raise DeeBertError(f"no checkpoint in {candidate}; train first (python train.py --task {task_name}) "
                               "or pass --model DIR")
        return candidate
    candidates = [d for d in RUNS_DIR.iterdir() if (d / "config.json").is_file()] if RUNS_DIR.is_dir() else []
    if not candidates:
        raise DeeBertError(f"no fine-tuned checkpoint under {RUNS_DIR}/; train first (python train.py --task rte) "
                           "or pass --model DIR")
    return max(candidates, key=lambda d: (d / "config.json").stat().st_mtime)


def load_checkpoint(args, directory: Path, task_name: str | None = None) -> Loaded:
    """The checkpoint on --device in --dtype, checked against the task asked for."""
    model, tokenizer = load(directory, args.device, args.dtype, args.max_length)  # no off-ramps: "fine-tune it first"
    if model.config.task is None and task_name is None:
        raise DeeBertError("the checkpoint's config.json names no task; pass --task (sst-2, rte, ...)")
    if model.config.task and task_name and get_task(task_name).name != get_task(model.config.task).name:
        raise DeeBertError(f"{directory} was fine-tuned on {model.config.task}, not {task_name}; "
                           "drop --task or pass another --model")
    return Loaded(directory, model, tokenizer, get_task(model.config.task or task_name))


def describe(loaded: Loaded) -> str:
    """The line that says which checkpoint runs, on what and in which number format."""
    parameter = next(loaded.model.parameters())
    return (f"checkpoint: {loaded.directory} (task {loaded.task.name}, {loaded.model.num_layers} layers, labels "
            f"{', '.join(loaded.model.config.labels)}; {parameter.device}, {dtype_name(parameter.dtype)})")


def as_pair(texts: list, task, where: str) -> str | tuple:
    """1 or 2 texts -> a text, or a (premise, hypothesis) pair, checked against the task's shape."""
    wanted = 2 if task.is_pair else 1
    if len(texts) != wanted:
        shape = "pairs (premise, hypothesis)" if task.is_pair else "single texts"
        tab = " separated by a tab" if "line" in where and task.is_pair else ""
        raise DeeBertError(f"{where}: {task.name} classifies {shape}; got {len(texts)} text(s), give {wanted}{tab}")
    for k, text in enumerate(texts, start=1):
        if not text.strip():
            which = f"text {k} of the pair" if task.is_pair else "the text"
            raise DeeBertError(f"{where}: {which} is empty; give a non-empty text")
    return tuple(texts) if task.is_pair else texts[0]


def read_inputs(file_arg: str, task, flag: str = "--file") -> list:
    """One input per line of `flag` PATH (or - for standard input); every bad line is named by its number."""
    if file_arg == "-":
        name, data = "standard input", sys.stdin.buffer.read()
    elif Path(file_arg).is_file():
        name, data = file_arg, Path(file_arg).read_bytes()
    else:
        raise DeeBertError(f"{flag} {file_arg} not found; pass a text file with one input per line, or - for stdin")
    lines = data.removeprefix(b"\xef\xbb\xbf").removesuffix(b"\n").split(b"\n")  # no byte-order mark, no last newline
    if lines == [b""]:
        raise DeeBertError(f"{name} holds no inputs; give one input per line")
    inputs = []
    for line_number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise DeeBertError(f"{name} line {line_number} is not UTF-8 text; save the file as UTF-8") from None
        inputs.append(as_pair(text.split("\t"), task, f"{name} line {line_number}"))
    return inputs


# ----------------------------------------------------------------------------------------------------
# Classifying texts


def certified_S(loaded: Loaded, args) -> float:
    """--S auto: the S that --eval --max_disagree wrote into results.json, with a word if the precision differs."""
    path = loaded.directory / "results.json"
    calibration = json.loads(path.read_text()).get("calibration") if path.is_file() else None
    if calibration is None:
        raise DeeBertError(f"--S auto: {loaded.directory} was never calibrated; run python infer.py --model "
                           f"{loaded.directory} --eval --max_disagree 0.05 first, or give a number")
    dtype = dtype_name(next(loaded.model.parameters()).dtype)
    certified_in = calibration.get("dtype", "fp32")  # checkpoints calibrated before the dtype was recorded: fp32
    if dtype != certified_in:
        say(args, f"note: S was certified in {certified_in} and this run is in {dtype}: the guarantee was made in "
                  "another precision, and near S the two may decide differently")
    return calibration["S"]


def print_one(prediction, n: int, args) -> None:
    print(f"label: {prediction.label} (probability {prediction.probability:.3f})")
    print(f"exit layer: {prediction.exit_layer} of {n}")
    print("entropy per layer: " + "  ".join(f"{i}: {e:.4f}" for i, e in enumerate(prediction.entropies, start=1)))
    if prediction.truncated:
        print(f"note: the input was longer than --max_length {args.max_length} tokens and was truncated")


def print_line(k: int, text, prediction, n: int, args) -> None:
    text = text if isinstance(text, str) else " | ".join(text)
    cut = f"  (truncated to {args.max_length} tokens)" if prediction.truncated else ""
    shown = text if len(text) <= 60 else text[:57] + "..."
    print(f"{k:>4}  {prediction.label}  p={prediction.probability:.3f}  exit {prediction.exit_layer}/{n}  "
          f"{shown}{cut}")


def print_json(text, prediction, n: int) -> None:
    texts = {"text": text} if isinstance(text, str) else {"text": text[0], "text_b": text[1]}
    print(json.dumps({**texts, "label": prediction.label, "probability": round(prediction.probability, 6),
                      "exit_layer": prediction.exit_layer, "num_layers": n, "truncated": prediction.truncated,
                      "entropies": [round(e, 6) for e in prediction.entropies]}, ensure_ascii=False))


def run_texts(args) -> None:
    if args.texts and args.file:
        raise DeeBertError("give texts on the command line or --file, not both")
    loaded = load_checkpoint(args, find_checkpoint(args.model, args.task), args.task)
    inputs = read_inputs(args.file, loaded.task) if args.file else [as_pair(args.texts, loaded.task, "input")]
    S = certified_S(loaded, args) if args.S == "auto" else args.S or 0.0
    n = loaded.model.num_layers
    C = len(loaded.model.config.labels)
    say(args, describe(loaded))
    say(args, f"S = {S:g}" + (" (calibrated)" if args.S == "auto" else ""))
    if args.S is None:
        say(args, "note: S = 0 means no early exit: every input runs all layers (the fine-tuned BERT); "
                  "pass --S 0.4 to exit early")
    if S > math.log(C):
        say(args, f"note: S = {S:g} is above ln {C} = {math.log(C):.3f}, the largest entropy {C} classes can have: "
                  "every input exits at layer 1")
    predictions = classify(loaded.model, loaded.tokenizer, inputs, S, args.batch_size)
    for k, (text, prediction) in enumerate(zip(inputs, predictions), start=1):
        if args.json:
            print_json(text, prediction, n)
        elif args.file:
            print_line(k, text, prediction, n, args)
        else:
            print_one(prediction, n, args)


# ----------------------------------------------------------------------------------------------------
# --eval: the trade-off on the dev set


def print_sweep(rows: list, task, n: int) -> None:
    metrics = "  ".join(f"{m:>9}" for m in task.metrics)
    print(f"{'S':>8}  {metrics}  avg exit layer  expected saving  drop (points)")
    for row in rows:
        S = "full" if row["S"] is None else f"{row['S']:g}"
        values = "  ".join(f"{100 * row[m]:>9.2f}" for m in task.metrics)
        print(f"{S:>8}  {values}  {row['avg_exit_layer']:>8.2f} / {n:<3}  {100 * row['expected_saving']:>14.1f}%  "
              f"{row['drop']:>13.2f}")


def print_rules(rules: dict, metric: str) -> None:
    """Each rule's best metric at an expected saving of at least 25, 40, 55%, and the mean over 0..60%."""
    print(f"\nexit rules, every threshold of each, from the same full pass: the best {metric} at an expected saving "
          "of at least")
    print(f"{'rule':>20}  " + "  ".join(f"{100 * x:>6.0f}%" for x in tradeoff.SAVINGS) + "  mean over 0-60%")
    for name, rule in rules.items():
        best = "  ".join("      -" if v is None else f"{100 * v:>7.2f}" for v in rule["at"].values())
        mean = "-" if rule["mean"] is None else f"{100 * rule['mean']:.2f}"
        print(f"{name:>20}  {best}  {mean:>15}")


def print_timing(timing: list) -> None:
    print(f"{'S':>8}  batch  {'measured saving':>17}  {'expected':>8}  measured/expected  rounds")
    for row in timing[1:]:
        what = row["static"] if "static" in row else f"{row['S']:g}"
        saving = f"{100 * row['measured_saving']:5.1f}% ± {100 * row['spread']:.1f}"
        print(f"{what:>8}  {row['batch_size']:>5}  {saving:>17}  {100 * row['expected_saving']:7.1f}%  "
              f"{verdict(row):>17}  {row['rounds']:>6}")


def held_out_report(name: str, S: float, logits, labels, task) -> str:
    full, at_S = tradeoff.sweep(logits, labels, task, [S])
    metric = task.main_metric
    disagree = float(tradeoff.disagreement(logits, S).float().mean())
    return (f"{name} S = {S:g} on the {len(logits)} dev examples it did not see: disagrees with the full model on "
            f"{100 * disagree:.2f}%, {metric} {100 * at_S[metric]:.2f} (full model {100 * full[metric]:.2f}), "
            f"expected saving {100 * at_S['expected_saving']:.1f}%")


def calibrate(args, loaded: Loaded, logits, labels, examples: list | None) -> None:
    """Certify S on half the dev set (or on `examples`, --calibration_file's), report it on the dev examples it did
    not see, and write it into results.json with the precision it was made in."""
    task, model, tokenizer = loaded.task, loaded.model, loaded.tokenizer
    by_drop = None  # with half the dev set: the S that --max_drop picks on that half, for comparison
    if examples:
        order = by_length(tokenizer, examples)
        cal_logits, _ = tradeoff.full_pass(model, batches(tokenizer, examples, args.eval_batch_size, order))
        test = torch.arange(len(logits))
        source = f"{len(examples)} unlabelled texts of {args.calibration_file}"
    else:
        order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(0))
        cal, test = order[: len(order) // 2], order[len(order) // 2 :]
        cal_logits = logits[cal]
        source = f"a random half of {task.folder} {args.split} ({len(cal)} examples)"
        by_drop = tradeoff.choose_S(tradeoff.sweep(logits[cal], labels[cal], task, args.thresholds), args.max_drop)
    result = tradeoff.certify_S(cal_logits, args.max_disagree, args.delta, args.thresholds)
    print(f"\ncertified on {source}: S = {result['S']:g} disagrees with the full model on at most "
          f"{100 * args.max_disagree:g}% of such inputs, with probability >= {1 - args.delta:g}")
    print(held_out_report("certified", result["S"], logits[test], labels[test], task))
    if by_drop is not None:
        name = f"--max_drop {args.max_drop:g}, chosen on the same half:"
        print(held_out_report(name, by_drop, logits[test], labels[test], task))
    path = loaded.directory / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    dtype = dtype_name(next(model.parameters()).dtype)
    results["calibration"] = {**result, "source": source, "dtype": dtype}
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote the certified S into {path}; use it with --S auto")


def load_static(args, loaded: Loaded) -> dict:
    """--static DIR ...: {name: model}, each a smaller model of the same task, from the same BERT."""
    static = {}
    for directory in args.static:
        smaller = load_checkpoint(args, resolve(directory), loaded.task.name).model
        config, mine = smaller.config, loaded.model.config
        if (config.hidden_size, config.vocab_size) != (mine.hidden_size, mine.vocab_size):
            raise DeeBertError(f"--static {directory} is not from the same BERT as {loaded.directory} (hidden size "
                               "or vocabulary differ); train it with train.py --layers K on the same --model")
        if smaller.num_layers >= loaded.model.num_layers:
            raise DeeBertError(f"--static {directory} has {smaller.num_layers} layers, not fewer than "
                               f"{loaded.model.num_layers}; pass checkpoints of train.py --layers K")
        static[f"static {Path(directory).name}"] = smaller
    return static


def time_exits(args, loaded: Loaded, examples, static: dict) -> dict:
    """{batch size: measure_wall_clock's rows} at batch 1 and --eval_batch_size, on the first --timing_examples
    sorted by length."""
    subset = examples[: args.timing_examples]
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"\nwall clock on {len(subset)} examples sorted by length: {next(model.parameters()).device}, "
          f"{dtype_name(next(model.parameters()).dtype)}, {torch.get_num_threads()} threads (full = all layers + "
          "the last off-ramp; saving = 1 - t / t(full), median of rounds ± half their interquartile range)")
    timing = {}
    for B in dict.fromkeys((1, args.eval_batch_size)):
        chunks = batches(tokenizer, subset, B, by_length(tokenizer, subset))
        timing[B] = measure_wall_clock(model, chunks, args.thresholds, static, budget_seconds=args.timing_seconds)
        print_timing(timing[B])
    return timing


def run_eval(args, loaded: Loaded) -> None:
    """The sweep over S on the dev set, the exit rules, the certified S, the wall clock; the CSVs and the figure."""
    task, model, tokenizer, n = loaded.task, loaded.model, loaded.tokenizer, loaded.model.num_layers
    print(describe(loaded))
    static = load_static(args, loaded)
    calibration = args.calibration_file and unlabelled(read_inputs(args.calibration_file, task, "--calibration_file"))
    examples = read_split(task, find_data_dir(task, args.data_dir), args.split)[: args.max_eval_examples]
    order = by_length(tokenizer, examples)
    start = time.perf_counter()
    logits, labels = tradeoff.full_pass(model, batches(tokenizer, examples, args.eval_batch_size, order))
    print(f"{task.folder} {args.split}: {len(examples)} examples through all {n} layers and off-ramps "
          f"in {time.perf_counter() - start:.1f} s\n")
    rows = tradeoff.sweep(logits, labels, task, args.thresholds)
    print_sweep(rows, task, n)
    points = []
    for smaller in static.values():  # each static model's own full pass: its last off-ramp is its answer
        static_logits, _ = tradeoff.full_pass(smaller, batches(tokenizer, examples, args.eval_batch_size, order))
        points.append(tradeoff.static_point(task, static_logits, labels, n))
    rules = tradeoff.compare_rules(logits, labels, task, points)
    print_rules(rules, task.main_metric)
    if args.max_disagree:
        calibrate(args, loaded, logits, labels, calibration)
    timing = {} if args.no_timing else time_exits(args, loaded, examples, static)
    for B, timed in timing.items():  # each sweep row takes the timing of its own S, at each batch size
        for row in timed:
            if "static" not in row and row["S"] is not None:
                sweep_row = next(r for r in rows if r["S"] == row["S"])
                sweep_row.update({f"{key}_batch{B}": row[key]
                                  for key in ("measured_saving", "spread", "expected_saving", "seconds")})
    out = Path(args.out) if args.out else loaded.directory
    print(f"\nwrote {tradeoff.write_csv(rows, out / 'tradeoff.csv')}")
    print(f"wrote {tradeoff.write_csv([p for rule in rules.values() for p in rule['points']], out / 'rules.csv')}")
    majority = float(labels.bincount().max()) / len(labels)
    png = plot(out / "tradeoff.png", rows, task.main_metric, {"off-ramps": per_layer_metrics(task, logits, labels)},
               [row for timed in timing.values() for row in timed], rules, majority)
    print(f"wrote {png}" if png else "tradeoff.png skipped: matplotlib is not installed (pip install matplotlib)")
    best = tradeoff.choose_S(rows, args.max_drop)
    print(f"largest S within {args.max_drop:g} point{'s' * (args.max_drop != 1)} of the full model's "
          f"{task.main_metric}: " + ("none" if best is None else f"{best:g}"))


def main(argv=None) -> int:
    try:
        args = build_parser().parse_intermixed_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        use_tf32(pick_device(args.device))  # fp32 products in TF32 on a GPU (--dtype fp32 there); the CPU is as it was
        if args.eval:
            given = "texts" if args.texts else "--file" if args.file else "--S" if args.S is not None else None
            if given:
                raise DeeBertError(f"--eval sweeps --thresholds over the dev set; drop {given} (or drop --eval)")
            if args.calibration_file and not args.max_disagree:
                raise DeeBertError("--calibration_file calibrates --max_disagree; give --max_disagree 0.05 with it, "
                                   "or drop it")
            run_eval(args, load_checkpoint(args, find_checkpoint(args.model, args.task), args.task))
        elif args.texts or args.file:
            run_texts(args)
        else:
            raise DeeBertError("nothing to do: give a text, a pair of texts, --file PATH, or --eval")
    except DeeBertError as error:
        return error.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
