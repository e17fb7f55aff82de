"""Measuring DeeBERT's trade-off: quality against saved computation, for each threshold S (paper section 4).

1. Quality and *expected* saving (`sweep`): after one full pass (`exit.full_pass`: every layer and
   off-ramp on every example), each example's exit layer for any S is the first layer whose entropy is
   below S, and its prediction is that off-ramp's argmax. No S needs a second pass. The expected saving is
   1 - sum_i i * N_i / (n * N), the fraction of layers not run (section 4.3).
2. *Measured* wall-clock saving (`measure_wall_clock`): true early exit, timed against the full model
   (plain fine-tuned BERT: all layers and only the last off-ramp) on the same batches. The paper times
   one input at a time; we also time batches, which the paper's code could not run.
3. A threshold with a guarantee (`certify_S`): the largest S whose early exits agree with the full model
   on all but a fraction epsilon of inputs like the calibration set, with probability at least 1 - delta.

The expected saving counts layers only; the measured one also pays for the embeddings and for the
off-ramps on the way (one per layer reached, against one for the full model): measured / expected is
usually a little below 1. `write_csv` keeps every number, `plot` draws the paper's Figures 2, 3, 4 and 6.
"""

import csv
import math
import statistics
import time

import torch

from deebert.errors import DeeBertError
from deebert.exit import (check_threshold, entropy, exit_layers_from_entropies, exit_many, expected_saving,
                          full_model_logits, model_inputs)
from deebert.files import write_atomically
from deebert.glue import compute_metrics

PAPER_THRESHOLDS = (0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)

# ----------------------------------------------------------------------------------------------------
# 1. One full pass, then every S for free


def predictions_at_exit(all_logits, exit_layers) -> torch.Tensor:
    """(N, n, C) logits and (N,) 1-based exit layers -> (N,) class ids: each example's argmax where it exits."""
    rows = torch.arange(all_logits.shape[0])
    return all_logits[rows, exit_layers - 1].argmax(dim=-1)  # (N, n, C) -> (N, C) -> (N,)


def per_layer_metrics(all_logits, labels, task) -> list[dict]:
    """The task's metrics of every off-ramp, as if each were the only exit (the paper's Figure 4)."""
    return [compute_metrics(task, all_logits[:, i].argmax(-1).numpy(), labels.numpy()) for i in range(all_logits.shape[1])]


def _row(S, task, all_logits, labels, exit_layers) -> dict:
    n = all_logits.shape[1]
    metrics = compute_metrics(task, predictions_at_exit(all_logits, exit_layers).numpy(), labels.numpy())
    return {"S": S, **metrics, "avg_exit_layer": float(exit_layers.float().mean()),
            "expected_saving": expected_saving(exit_layers, n),
            "exits_per_layer": torch.bincount(exit_layers, minlength=n + 1)[1:].tolist()}


def sweep(all_logits, labels, task, S_values=PAPER_THRESHOLDS) -> list[dict]:
    """One row per S: the task's metrics at each example's exit layer, average exit layer, expected saving,
    how many examples exit at each layer, and "drop": how far the main metric falls below the full model's,
    in percentage points. The first row is the full model (S None); S = 0 gives the same numbers.
    """
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

    Chosen on the very data it is scored on, this flatters itself: `certify_S` gives a real guarantee.
    """
    within = [row["S"] for row in rows if row["S"] is not None and row["drop"] <= max_drop + 1e-9]
    return max(within, default=None)


# ----------------------------------------------------------------------------------------------------
# 2. A threshold certified to agree with the full model


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


# ----------------------------------------------------------------------------------------------------
# 3. Wall clock: true early exit against the full model


def _seconds(run, batch, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock
    start = time.perf_counter()
    run(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _spread(values: list) -> float:
    """Half the interquartile range: how far a typical round lies from the median."""
    if len(values) < 2:
        return math.inf
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / 2


def measure_wall_clock(model, batches, S_values=PAPER_THRESHOLDS, budget_seconds: float = 30.0,
                       min_rounds: int = 3, max_rounds: int = 100, target: float = 0.005) -> list[dict]:
    """Time true early exit at each S against the full model, on the same batches, robustly to a busy machine.

    Within a round, every batch runs the full model and then each S back to back (the order reversed every
    other round), so a disturbance from another process falls on all of them alike; each round gives one
    ratio t(S) / t(full) per S. Rounds go on until the median's uncertainty (spread / sqrt(rounds)) is below
    `target` for every S, or the budget is spent. The saving reported is 1 - the median ratio, and its
    spread is half the interquartile range of the rounds. (torch.utils.benchmark times one statement at a
    time; pairing two statements batch by batch is what makes the ratio steady, hence this loop.)
    One row per S: measured saving, spread, expected saving of these very examples, and their ratio;
    the first row is the full model (S None). Batch size 1 times `early_exit`, larger ones `early_exit_batch`.
    """
    batches = list(batches)
    if not batches:
        raise DeeBertError("measure_wall_clock got no batches; pass at least one example")
    device, n = next(model.parameters()).device, model.num_layers
    runs = {None: lambda batch: full_model_logits(model, *model_inputs(model, batch))}
    runs.update({S: lambda batch, S=check_threshold(S): exit_many(model, [batch], S) for S in S_values})
    expected = {}
    for S in S_values:  # untimed: where each example exits, and a warm-up of every code path
        exit_layers = torch.cat([result.exit_layers for result in exit_many(model, batches, S)])
        expected[S] = expected_saving(exit_layers, n)
    seconds = {key: [] for key in runs}
    started = time.perf_counter()
    for round_ in range(max_rounds):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        totals = dict.fromkeys(runs, 0.0)
        for batch in batches:
            for key in order:
                totals[key] += _seconds(runs[key], batch, device)
        for key in runs:
            seconds[key].append(totals[key])
        ratios = [[t / full for t, full in zip(seconds[S], seconds[None])] for S in S_values]
        precise = all(_spread(r) / math.sqrt(len(r)) <= target for r in ratios)
        if round_ + 1 >= min_rounds and (precise or time.perf_counter() - started > budget_seconds):
            break
    batch_size = max(len(batch["input_ids"]) for batch in batches)
    rows = [{"S": None, "batch_size": batch_size, "seconds": statistics.median(seconds[None]), "measured_saving": 0.0,
             "spread": 0.0, "expected_saving": 0.0, "ratio": None, "rounds": len(seconds[None])}]
    for S, r in zip(S_values, ratios):
        savings = [1 - x for x in r]
        measured, spread = statistics.median(savings), _spread(savings)
        rows.append({"S": S, "batch_size": batch_size, "seconds": statistics.median(seconds[S]),
                     "measured_saving": measured, "spread": spread, "expected_saving": expected[S],
                     "ratio": measured / expected[S] if expected[S] > 0 else None, "rounds": len(savings)})
    return rows


def within_noise(row: dict) -> bool:
    """A measured saving no larger than its own spread: not distinguishable from no saving at all."""
    return abs(row["measured_saving"]) <= row["spread"]


# ----------------------------------------------------------------------------------------------------
# Writing the results: CSV always, the figure when matplotlib is installed


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


def draw_tradeoff(axes, rows: list[dict], metric: str) -> None:
    """Figure 2: the metric (%) against the expected saving (%), one point per S; S values that land on
    the same spot share one label, so the labels near S = 0 do not print over each other."""
    points = [row for row in rows if row["S"] is not None]
    x = [100 * row["expected_saving"] for row in points]
    y = [100 * row[metric] for row in points]
    axes.plot(x, y, "o-")
    labels = []  # [x, y, text]
    for row, xi, yi in zip(points, x, y):
        if labels and abs(labels[-1][0] - xi) < 4 and abs(labels[-1][1] - yi) < 1:
            labels[-1][2] += f", {row['S']:g}"
        else:
            labels.append([xi, yi, f"S={row['S']:g}"])
    for xi, yi, text in labels:
        axes.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    full = next(row for row in rows if row["S"] is None)
    axes.axhline(100 * full[metric], linestyle="--", color="grey", linewidth=1, label="full model")
    axes.legend(loc="lower left", fontsize=8)
    axes.set(xlabel="expected saving of layers (%)", ylabel=f"{metric} (%)", title="quality against saving")


def draw_measured(axes, timing: list[dict]) -> None:
    """Figure 3: the measured wall-clock saving against the expected one, with spreads; the diagonal is 1:1."""
    for batch_size in dict.fromkeys(row["batch_size"] for row in timing):
        points = [row for row in timing if row["batch_size"] == batch_size and row["S"] is not None]
        axes.errorbar([100 * r["expected_saving"] for r in points], [100 * r["measured_saving"] for r in points],
                      yerr=[100 * r["spread"] for r in points], fmt="o", capsize=2, label=f"batch {batch_size}")
    axes.axline((0, 0), slope=1, color="grey", linestyle="--", linewidth=1)
    axes.legend(fontsize=8)
    axes.set(xlabel="expected saving (%)", ylabel="measured saving (%)", title="wall clock against layer count")


def draw_per_layer(axes, per_layer: dict, metric: str) -> None:
    """Figure 4: each off-ramp's metric, for every {name: per-layer metrics} given (e.g. after each stage)."""
    for name, metrics in per_layer.items():
        axes.plot(range(1, len(metrics) + 1), [100 * m[metric] for m in metrics], "o-", label=name)
    axes.legend(fontsize=8)
    axes.set(xlabel="off-ramp (layer)", ylabel=f"{metric} (%)", title="each off-ramp alone")


def draw_exits(axes, rows: list[dict], count: int = 4) -> None:
    """Figure 6: how many examples exit at each layer, for a few S spread over the sweep."""
    points = [row for row in rows if row["S"]]
    picks = dict.fromkeys(round(k * (len(points) - 1) / max(1, count - 1)) for k in range(min(count, len(points))))
    shown = [points[k] for k in picks]
    width = 0.8 / max(1, len(shown))
    for k, row in enumerate(shown):
        layers = range(1, len(row["exits_per_layer"]) + 1)
        axes.bar([i + (k - (len(shown) - 1) / 2) * width for i in layers], row["exits_per_layer"], width,
                 label=f"S={row['S']:g}")
    axes.legend(fontsize=8)
    axes.set(xlabel="exit layer", ylabel="examples", title="where examples exit")


def plot(path, rows: list[dict], metric: str, per_layer: dict | None = None, timing: list[dict] | None = None):
    """The paper's figures in one PNG: 2 (trade-off), 3 (measured vs expected, when timed), 4 (each off-ramp),
    6 (exits per layer). Returns the path, or None when matplotlib is not installed (the CSV has it all)."""
    try:
        from matplotlib.figure import Figure  # optional, and no pyplot: no GUI backend, no global state
    except ImportError:
        return None
    panels = [lambda a: draw_tradeoff(a, rows, metric), lambda a: draw_exits(a, rows)]
    if per_layer:
        panels.append(lambda a: draw_per_layer(a, per_layer, metric))
    if timing:
        panels.append(lambda a: draw_measured(a, timing))
    figure = Figure(figsize=(11, 8 if len(panels) > 2 else 4), dpi=110)
    for k, draw in enumerate(panels, start=1):
        axes = figure.add_subplot(2 if len(panels) > 2 else 1, 2, k)
        draw(axes)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
