"""Measuring DeeBERT's trade-off: quality against saved computation, for each threshold S (paper section 4).

1. Quality and *expected* saving (`sweep`): after one full pass (`exit.full_pass`), each example's exit
   layer for any S is its first layer with entropy below S, its prediction that off-ramp's argmax: no S needs
   a second pass. The expected saving, 1 - sum_i i * N_i / (n * N), is the fraction of layers not run (4.3).
2. A threshold with a guarantee (`certify_S`): the largest S whose early exits agree with the full model
   on all but a fraction epsilon of inputs like the calibration set, with probability at least 1 - delta.
3. *Measured* wall-clock saving (`measure_wall_clock`): true early exit against the full model (all layers, only
   the last off-ramp) on the same batches. It also pays for the off-ramps on the way and the embeddings, so measured
   / expected is below 1, the more so the fewer layers are skipped. `write_csv` keeps every number."""

import csv
import math
import statistics
import time

import torch

from deebert.errors import DeeBertError
from deebert.exit import (check_threshold, entropy, exit_layers_from_entropies, exit_many, expected_saving,
                          full_model_logits, full_pass, model_inputs)
from deebert.files import write_atomically
from deebert.glue import compute_metrics

PAPER_THRESHOLDS = (0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)

# --- 1. One full pass, then every S for free ------------------------------------------------------


def predictions_at_exit(all_logits, exit_layers) -> torch.Tensor:
    """(N, n, C) logits and (N,) 1-based exit layers -> (N,) class ids: each example's argmax where it exits."""
    rows = torch.arange(all_logits.shape[0])
    return all_logits[rows, exit_layers - 1].argmax(dim=-1)  # (N, n, C) -> (N, C) -> (N,)


def _row(S, task, all_logits, labels, exit_layers) -> dict:
    n = all_logits.shape[1]
    metrics = compute_metrics(task, predictions_at_exit(all_logits, exit_layers).numpy(), labels.numpy())
    return {"S": S, **metrics, "avg_exit_layer": float(exit_layers.float().mean()),
            "expected_saving": expected_saving(exit_layers, n),
            "exits_per_layer": torch.bincount(exit_layers, minlength=n + 1)[1:].tolist()}


def sweep(all_logits, labels, task, S_values=PAPER_THRESHOLDS) -> list[dict]:
    """One row per S: the task's metrics at each example's exit layer, average exit layer, expected saving,
    how many examples exit at each layer, and "drop": how far the main metric falls below the full model's,
    in percentage points. The first row is the full model (S None); S = 0 gives the same numbers."""
    n = all_logits.shape[1]
    entropies = entropy(all_logits)  # (N, n, C) -> (N, n)
    full = _row(None, task, all_logits, labels, torch.full((len(labels),), n))
    rows = [full] + [_row(check_threshold(S), task, all_logits, labels, exit_layers_from_entropies(entropies, S))
                     for S in S_values]
    for row in rows:
        row["drop"] = 100 * (full[task.main_metric] - row[task.main_metric])
    return rows


def choose_S(rows, max_drop: float = 1.0) -> float | None:
    """The largest S whose main metric stays within `max_drop` points of the full model; None if none does.
    Chosen on the very data it is scored on, this flatters itself: `certify_S` gives a real guarantee."""
    within = [row["S"] for row in rows if row["S"] is not None and row["drop"] <= max_drop + 1e-9]
    return max(within, default=None)


# --- 2. A threshold certified to agree with the full model ----------------------------------------


def disagreement(all_logits, S: float) -> torch.Tensor:
    """(N,) booleans: where early exit at S predicts another class than the full model (the last off-ramp)."""
    exit_layers = exit_layers_from_entropies(entropy(all_logits), S)
    return predictions_at_exit(all_logits, exit_layers) != all_logits[:, -1].argmax(dim=-1)


def binomial_tail(k: int, N: int, p: float) -> float:
    """P[Binomial(N, p) <= k], summed in log space: binomial_tail(0, 10, 0.5) = 0.5 ** 10."""
    terms = [math.lgamma(N + 1) - math.lgamma(j + 1) - math.lgamma(N - j + 1) + j * math.log(p) + (N - j) * math.log1p(-p)
             for j in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def certify_S(all_logits, epsilon: float, delta: float, S_values=PAPER_THRESHOLDS) -> dict:
    """The largest S whose disagreement with the full model is at most `epsilon`, with probability >= 1 - delta.

    For each S the calibration set shows k disagreements in N examples. Were the true rate above epsilon,
    k or fewer would occur with probability at most P[Binomial(N, epsilon) <= k]: when that p-value is
    <= delta, S is certified. The S are tested from small to large and the first failure stops the test
    (fixed-sequence testing, as in Learn then Test): a bad S can only be certified if the first bad S in
    that order is, which happens with probability <= delta, so no correction for the many S is needed.
    S = 0 is the full model itself and always holds. Valid for new data drawn like the calibration set;
    labels are not needed, and under a shift of domain nothing is promised.
    """
    if not (0 < epsilon < 1 and 0 < delta < 1):
        raise DeeBertError(f"epsilon {epsilon} and delta {delta} must lie strictly between 0 and 1")
    N = all_logits.shape[0]
    needed = math.ceil(math.log(delta) / math.log1p(-epsilon))  # even 0 disagreements need this many examples
    if N < needed:
        raise DeeBertError(f"{N} calibration examples cannot certify a disagreement of at most {epsilon:g} at "
                           f"delta {delta:g}; that needs at least {needed} examples")
    best, tested = 0.0, []
    for S in sorted(check_threshold(S) for S in S_values):
        k = int(disagreement(all_logits, S).sum())
        p_value = binomial_tail(k, N, epsilon)
        tested.append({"S": S, "disagreements": k, "p_value": p_value})
        if p_value > delta:
            break
        best = S
    return {"S": best, "epsilon": epsilon, "delta": delta, "examples": N, "tested": tested}


# --- 3. Wall clock: true early exit against the full model ----------------------------------------


def seconds_of(run, batch, device) -> float:
    """Wall-clock seconds of run(batch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock
    start = time.perf_counter()
    run(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def half_iqr(values: list) -> float:
    """Half the interquartile range: how far a typical round lies from the median."""
    if len(values) < 2:
        return math.inf
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / 2


def take_turns(runs: dict, batches: list, device, min_rounds: int, max_rounds: int, budget_seconds=0.0, target=0.0):
    """{key: [seconds per round]} of runs[key](batch) over all `batches`. In a round every batch runs them all back to
    back, in reverse order every other round, so a busy machine slows all alike (torch.utils.benchmark times one
    statement at a time; pairing them, batch by batch, is what keeps a ratio steady). After `min_rounds`, rounds go
    on until each run's ratio to the first is precise (spread / sqrt(rounds) <= target) or `budget_seconds` is spent."""
    for run in runs.values():  # an untimed warm-up: a first call pays for allocations (AdamW's: for its state)
        run(batches[0])
    first, *others = runs
    seconds, started = {key: [] for key in runs}, time.perf_counter()
    for round_ in range(max_rounds):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        totals = dict.fromkeys(runs, 0.0)
        for batch in batches:
            for key in order:
                totals[key] += seconds_of(runs[key], batch, device)
        for key in runs:
            seconds[key].append(totals[key])
        ratios = [[t / t_first for t, t_first in zip(seconds[key], seconds[first])] for key in others]
        precise = all(half_iqr(r) / math.sqrt(len(r)) <= target for r in ratios)
        if round_ + 1 >= min_rounds and (precise or time.perf_counter() - started > budget_seconds):
            break
    return seconds


def measure_wall_clock(model, batches, S_values=PAPER_THRESHOLDS, budget_seconds: float = 30.0,
                       min_rounds: int = 3, max_rounds: int = 10, target: float = 0.005) -> list[dict]:
    """Time true early exit at each S against the full model on the same batches (`take_turns`). A row per S, the full
    model (S None) first: measured saving, 1 - the rounds' median of t(S) / t(full), and its spread, half their IQR;
    the expected saving of these examples; their ratio. Batch 1 runs `early_exit`, larger batches `early_exit_batch`."""
    batches = list(batches)
    if not batches:
        raise DeeBertError("measure_wall_clock got no batches; pass at least one example")
    device, n, S_values = next(model.parameters()).device, model.num_layers, [check_threshold(S) for S in S_values]
    entropies = entropy(full_pass(model, batches)[0])  # (N, n): one pass gives every S's exits, as in `sweep`
    exits = {S: exit_layers_from_entropies(entropies, S) for S in S_values}
    # S values with the same exits on these examples do the very same work: each group is timed once, by its first S
    timed_as = {None: None, **{S: next(s for s in S_values if torch.equal(exits[s], exits[S])) for S in S_values}}
    runs = {None: lambda batch: full_model_logits(model, *model_inputs(model, batch))}
    for S in dict.fromkeys(S for S in timed_as.values() if S is not None):  # one S of each group
        runs[S] = lambda batch, S=S: exit_many(model, [batch], S)
    seconds = take_turns(runs, batches, device, min_rounds, max_rounds, budget_seconds, target)
    expected = {None: 0.0, **{S: expected_saving(exits[S], n) for S in S_values}}  # the full model skips no layer
    batch_size, rows = max(len(batch["input_ids"]) for batch in batches), []
    for S in [None, *S_values]:  # the full model first: its ratio to itself is 1, a saving of 0
        savings = [1 - t / full for t, full in zip(seconds[timed_as[S]], seconds[None])]
        measured, spread = statistics.median(savings), half_iqr(savings)
        rows.append({"S": S, "batch_size": batch_size, "seconds": statistics.median(seconds[timed_as[S]]),
                     "measured_saving": measured, "spread": spread, "expected_saving": expected[S],
                     "ratio": measured / expected[S] if expected[S] > 0 else None, "rounds": len(savings)})
    return rows


# --- Writing the results: every number in a CSV (the figures: figures.py) -------------------------


def write_csv(rows: list[dict], path):
    """Rows -> CSV with a header: every key any row has, in first-seen order; S None is "full", lists "3 1 0"."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(key, value):
        if key == "S" and value is None:
            return "full"
        return " ".join(map(str, value)) if isinstance(value, list) else ("" if value is None else value)

    def write(temporary):
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([cell(key, row.get(key)) for key in columns] for row in rows)

    return write_atomically(path, write)
