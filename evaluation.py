"""`python infer.py --eval`: DeeBERT's trade-off on a GLUE dev set, as paper section 4 reports it.

One full pass gives every off-ramp's logits; `deebert.tradeoff` then reads off, for every S, the task's metric
and the expected saving (Table 1, Figure 2), certifies an S on held-out data (--max_disagree), and times true
early exit against the full model on the wall clock (Figure 3). Here those numbers are printed, written to
tradeoff.csv and drawn (figures.plot). infer.py parses the flags and loads the checkpoint; this is the rest.
"""

import json
import time
from pathlib import Path

import torch

from deebert.exit import full_pass
from deebert.files import write_atomically
from deebert.glue import find_data_dir, per_layer_metrics, read_split
from deebert.tokenizer import batches, by_length
from deebert.tradeoff import PAPER_THRESHOLDS, certify_S, choose_S, disagreement, measure_wall_clock, sweep, write_csv
from figures import plot


def print_sweep(rows: list, task, n: int) -> None:
    print(f"{'S':>8}  " + "  ".join(f"{m:>9}" for m in task.metrics) + "  avg exit layer  expected saving  drop (points)")
    for row in rows:
        S = "full" if row["S"] is None else f"{row['S']:g}"
        values = "  ".join(f"{100 * row[m]:>9.2f}" for m in task.metrics)
        print(f"{S:>8}  {values}  {row['avg_exit_layer']:>8.2f} / {n:<3}  {100 * row['expected_saving']:>14.1f}%  {row['drop']:>13.2f}")


def verdict(row: dict) -> str:
    """A measure_wall_clock row's measured / expected saving as text (bench.py prints it too)."""
    if abs(row["measured_saving"]) <= row["spread"]:
        return "within noise"  # not told apart from no saving at all
    if row["measured_saving"] < 0:
        return "slower"  # the off-ramps on the way cost more than the layers skipped: a cost, not a ratio
    return "-" if row["ratio"] is None else f"{row['ratio']:.2f}"


def print_timing(timing: list) -> None:
    print(f"{'S':>8}  batch  {'measured saving':>17}  {'expected':>8}  measured/expected  rounds")
    for row in timing[1:]:
        saving = f"{100 * row['measured_saving']:5.1f}% ± {100 * row['spread']:.1f}"
        print(f"{row['S']:>8g}  {row['batch_size']:>5}  {saving:>17}  {100 * row['expected_saving']:7.1f}%  {verdict(row):>17}  {row['rounds']:>6}")


def held_out_report(name: str, S: float, logits, labels, task) -> str:
    full, at_S = sweep(logits, labels, task, [S])
    metric, disagree = task.main_metric, float(disagreement(logits, S).float().mean())
    return (f"{name} S = {S:g} on the {len(logits)} dev examples it did not see: disagrees with the full model on "
            f"{100 * disagree:.2f}%, {metric} {100 * at_S[metric]:.2f} (full model {100 * full[metric]:.2f}), "
            f"expected saving {100 * at_S['expected_saving']:.1f}%")


def calibrate(args, model, tokenizer, task, checkpoint, examples, logits, labels, S_values, calibration) -> None:
    """Certify S on half the dev set (or --calibration_file) and report it on the dev examples it did not see."""
    by_drop = None  # with half the dev set: the S that --max_drop picks on that half, for comparison
    if calibration:  # infer.py read --calibration_file into examples
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
    if by_drop is not None:
        print(held_out_report(f"--max_drop {args.max_drop:g}, chosen on the same half:", by_drop, logits[test], labels[test], task))
    path = checkpoint / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["calibration"] = {**result, "source": source}
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote the certified S into {path}; use it with --S auto")


def run_eval(args, model, tokenizer, task, checkpoint, calibration=None) -> None:
    """The sweep over S on the dev set, the certified S, the wall clock; then tradeoff.csv and tradeoff.png."""
    S_values = args.S or PAPER_THRESHOLDS
    examples = read_split(task, find_data_dir(task, args.data_dir), args.split)[: args.max_eval_examples]
    start = time.perf_counter()
    logits, labels = full_pass(model, batches(tokenizer, examples, args.eval_batch_size, by_length(tokenizer, examples)))
    print(f"{task.folder} {args.split}: {len(examples)} examples through all {model.num_layers} layers and off-ramps "
          f"in {time.perf_counter() - start:.1f} s\n")
    rows = sweep(logits, labels, task, S_values)
    print_sweep(rows, task, model.num_layers)
    if args.max_disagree:
        calibrate(args, model, tokenizer, task, checkpoint, examples, logits, labels, S_values, calibration)
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
