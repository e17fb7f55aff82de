"""Wall-clock time: true early exit against the full model, as the paper measures it (section 4.3, Figure 3).

The expected saving counts layers (tradeoff.py); the clock also pays for the off-ramps on the way and the
embeddings, so measured / expected stays below 1, the more so the fewer layers are skipped. To measure that
honestly on a busy machine, what is compared takes turns (`take_turns`): every batch runs the full model and
each threshold back to back, in reverse order every other round, so that whatever slows one slows all; a saving
is the median over rounds of 1 - t(S) / t(full), ± half the rounds' interquartile range. This is the project's
one clock: `infer.py --eval` and `tests/bench.py` both use it."""

import math
import statistics
import time

import torch

from deebert.classify import exit_batch
from deebert.device import model_inputs
from deebert.errors import DeeBertError
from deebert.tradeoff import entropy_exits, expected_saving, full_pass


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
    """{key: [seconds per round]} of runs[key](batch) over all `batches`. In a round every batch runs them all back
    to back, in reverse order every other round, so a busy machine slows all alike (timing one statement at a time,
    as torch.utils.benchmark does, lets the machine change between them). After `min_rounds`, rounds go on until
    each run's ratio to the first is precise (spread / sqrt(rounds) <= target) or `budget_seconds` is spent."""
    for run in runs.values():  # an untimed warm-up: a first call pays for allocations (AdamW's: for its state)
        run(batches[0])
    first, *others = runs
    seconds = {key: [] for key in runs}
    started = time.perf_counter()
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


@torch.inference_mode()
def full_model_logits(model, inputs: dict) -> torch.Tensor:
    """Plain fine-tuned BERT, the baseline the paper times against: every layer, only the LAST off-ramp: (B, C).
    (model(...) would also run the n - 1 lower off-ramps, which a plain BERT classifier does not have.)"""
    hidden = model.encoder(**inputs)[-1]  # (B, T, H) of layer n
    return model.off_ramps[-1](hidden, inputs.get("attention_mask"))  # (B, C)


def measure_wall_clock(model, batches, S_values, static: dict | None = None, budget_seconds: float = 30.0,
                       min_rounds: int = 3, max_rounds: int = 10, target: float = 0.005) -> list[dict]:
    """Time true early exit at each S, and each static model, against the full model on the same batches.

    One row per S, and per static model ({name: a smaller DeeBert, run whole}), after the full model's (S None):
    the measured saving (1 - the rounds' median of t / t(full)), its spread (half their IQR), the expected saving
    of these examples, their ratio. Batch 1 runs `early_exit`, larger batches `early_exit_batch` (`exit_batch`).
    S values under which every example exits at the same layers do the same work: each group is timed once."""
    batches = list(batches)
    if not batches:
        raise DeeBertError("measure_wall_clock got no batches; pass at least one example")
    device = next(model.parameters()).device
    n = model.num_layers
    S_values = list(dict.fromkeys(S_values))
    all_logits, _ = full_pass(model, batches)  # every S's exits from one pass, as tradeoff.sweep reads them
    exits = {S: entropy_exits(all_logits, S) for S in S_values}
    timed_as = {S: next(s for s in S_values if torch.equal(exits[s], exits[S])) for S in S_values}
    inputs = [model_inputs(batch, device) for batch in batches]  # copied once, before the clock
    runs = {None: lambda x: full_model_logits(model, x)}
    for S in dict.fromkeys(timed_as.values()):  # one S of each group
        runs[S] = lambda x, S=S: exit_batch(model, x, S)
    for name, smaller in (static or {}).items():
        runs[name] = lambda x, smaller=smaller: full_model_logits(smaller, x)
    seconds = take_turns(runs, inputs, device, min_rounds, max_rounds, budget_seconds, target)
    batch_size = max(len(batch["index"]) for batch in batches)

    def row(key, expected: float, **what) -> dict:
        savings = [1 - t / full for t, full in zip(seconds[key], seconds[None])]
        measured = statistics.median(savings)
        return {**what, "batch_size": batch_size, "seconds": statistics.median(seconds[key]),
                "measured_saving": measured, "spread": half_iqr(savings), "expected_saving": expected,
                "ratio": measured / expected if expected > 0 else None, "rounds": len(savings)}

    rows = [row(None, 0.0, S=None)]  # the full model first: its ratio to itself is 1, a saving of 0
    rows += [row(timed_as[S], expected_saving(exits[S], n), S=S) for S in S_values]
    rows += [row(name, 1 - smaller.num_layers / n, S=None, static=name) for name, smaller in (static or {}).items()]
    return rows


def verdict(row: dict) -> str:
    """A measure_wall_clock row's measured / expected saving as text, as infer.py --eval and the benchmark print it."""
    if abs(row["measured_saving"]) <= row["spread"]:
        return "within noise"  # not told apart from no saving at all
    if row["measured_saving"] < 0:
        return "slower"  # the off-ramps on the way cost more than the layers skipped: a cost, not a ratio
    return "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
