"""DeeBERT at inference (paper section 3.2): classify texts with early exit, or measure the trade-off (section 4).

    python infer.py "a gripping, beautifully acted film" --S 0.4      one text (an SST-2 checkpoint)
    python infer.py "A man is eating." "Someone eats." --S 0.4        one pair (RTE, MNLI, ...)
    python infer.py --file inputs.txt --json --S 0.4                  one input per line, a tab inside a pair
    python infer.py --task rte --eval                                 the dev-set sweep over the paper's S, timed
    python infer.py --task sst-2 --eval --max_disagree 0.05           certify an S; then classify with --S auto

The checkpoint is --model, else runs/<task> for --task, else the newest runs/*: where train.py saves. S
defaults to 0 for texts: no early exit, exactly the fine-tuned BERT, unless you ask; the output says so.
A thin script over the package: deebert.exit holds the loop; --eval runs evaluation.py, over deebert.tradeoff.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import evaluation  # the --eval path: the dev-set sweep, the certified S, the wall clock
from deebert.checkpoint import load_deebert, resolve
from deebert.device import DTYPES, pick_device, pick_dtype
from deebert.errors import DeeBertError, Parser, number
from deebert.exit import check_threshold, exit_many
from deebert.glue import Example, get_task
from deebert.tokenizer import Tokenizer, batches, by_length, check_max_length
from deebert.tradeoff import PAPER_THRESHOLDS

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
    for k, text in enumerate(texts, start=1):
        if not text.strip():
            which = f"text {k} of the pair" if task.is_pair else "the text"
            raise DeeBertError(f"{where}: {which} is empty; give a non-empty text")
    return Example(texts[0], texts[1] if task.is_pair else None, None)


def read_examples(file_arg: str, task, flag: str = "--file") -> list:
    """One Example per line of `flag` PATH (or - for standard input); every bad line is named by its number."""
    if file_arg == "-":
        name, data = "standard input", sys.stdin.buffer.read()
    elif Path(file_arg).is_file():
        name, data = file_arg, Path(file_arg).read_bytes()
    else:
        raise DeeBertError(f"{flag} {file_arg} not found; pass a text file with one input per line, or - for stdin")
    lines = data.removeprefix(b"\xef\xbb\xbf").removesuffix(b"\n").split(b"\n")  # no byte-order mark, no last newline
    if lines == [b""]:
        raise DeeBertError(f"{name} holds no inputs; give one input per line")
    examples = []
    for line_number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise DeeBertError(f"{name} line {line_number} is not UTF-8 text; save the file as UTF-8") from None
        examples.append(as_example(text.split("\t"), task, f"{name} line {line_number}"))
    return examples


def classify(model, tokenizer, examples: list, S: float, batch_size: int) -> list:
    """Examples -> one dict per example, in their order: probabilities, exit layer, entropies of the layers run."""
    results = [None] * len(examples)
    chunks = list(batches(tokenizer, examples, batch_size, by_length(tokenizer, examples)))
    for batch, out in zip(chunks, exit_many(model, chunks, S)):
        for k, index in enumerate(batch["index"].tolist()):
            probability, best = out.logits[k].float().softmax(dim=-1).max(dim=-1)
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


def print_line(k: int, example: Example, result: dict, n: int, args) -> None:
    text = example.text_a if example.text_b is None else f"{example.text_a} | {example.text_b}"
    cut = f"  (truncated to {args.max_length} tokens)" if result["truncated"] else ""
    shown = text if len(text) <= 60 else text[:57] + "..."
    print(f"{k:>4}  {result['label']}  p={result['probability']:.3f}  exit {result['exit_layer']}/{n}  {shown}{cut}")


def print_json(k: int, example: Example, result: dict, n: int, args) -> None:
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
    for k, (example, result) in enumerate(zip(examples, results), start=1):
        printer(k, example, result, model.num_layers, args)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.eval:
            given = "texts" if args.texts else "--file" if args.file else "--S auto" if args.S and "auto" in args.S else None
            if given:
                raise DeeBertError(f"--eval sweeps numeric S over the dev set; drop {given} (or drop --eval)")
            if args.calibration_file and not args.max_disagree:
                raise DeeBertError("--calibration_file calibrates --max_disagree; give --max_disagree 0.05 with it, or drop it")
            model, tokenizer, task, checkpoint = load(args)
            calibration = read_examples(args.calibration_file, task, "--calibration_file") if args.calibration_file else None
            evaluation.run_eval(args, model, tokenizer, task, checkpoint, calibration)
        elif args.texts or args.file:
            run_texts(args)
        else:
            raise DeeBertError("nothing to do: give a text, a pair of texts, --file PATH, or --eval")
    except DeeBertError as error:
        return error.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
