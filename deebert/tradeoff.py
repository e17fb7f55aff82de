"""Measuring DeeBERT's trade-off: quality against saved computation, for each threshold S (paper section 4).

Two measurements, as in the paper:

1. Quality and *expected* saving. The dev set goes once through every layer and every off-ramp
   (`full_pass`); for any S, each example's exit layer is then the first layer whose entropy is below S,
   and its prediction is that off-ramp's argmax (`sweep`). No S needs a second pass. The expected saving
   is 1 - sum_i i * N_i / (n * N): the fraction of layers not run.
2. *Measured* wall-clock saving (`measure_wall_clock`): true early exit, timed, against the full model
   (plain fine-tuned BERT: all layers and only the last off-ramp). The paper times at batch size 1; we also
   time larger batches (`early_exit_batch`), which the paper's code could not run.

The expected saving counts layers only; the measured one also pays for the embeddings, the off-ramps
run on the way (one per layer reached, against one for the full model) and, in a batch, the regrouping.
So measured / expected is usually somewhat below 1, and far below 1 for tiny models, where an off-ramp
costs about as much as a layer.

The paper's figure (accuracy against saving, one point per S) is `plot`; the numbers are `write_csv`.
"""

import csv
import math
import os
import statistics
import time
from pathlib import Path

import torch

from deebert.errors import DeeBertError
from deebert.exit import (check_threshold, early_exit, early_exit_batch, entropy, evaluating,
                          exit_layers_from_entropies, expected_saving, prepare_inputs)
from deebert.glue import compute_metrics
from deebert.tokenizer import batches as tokenized_batches  # a generator; `batches` below are lists

PAPER_THRESHOLDS = (0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")

# ----------------------------------------------------------------------------------------------------
# Batches


def encode_batches(tokenizer, examples, batch_size: int) -> list[dict]:
    """GLUE Examples -> a list of tokenized batches, each padded to its own longest member (dynamic padding).

    Each batch is the tokenizer's dict ("input_ids", "token_type_ids", "attention_mask": (B, T);
    "truncated": (B,)) plus "labels": (B,). A list, not a generator: the timing runs over it many times,
    and tokenizing up front keeps tokenization out of the timings.
    """
    if batch_size < 1:
        raise DeeBertError(f"batch size {batch_size} must be at least 1")
    return list(tokenized_batches(tokenizer, examples, batch_size))


def _model_inputs(model, batch) -> tuple:
    """(input_ids, token_type_ids, attention_mask) of a batch, on the model's device."""
    return prepare_inputs(model, *(batch.get(name) for name in MODEL_INPUTS))


# ----------------------------------------------------------------------------------------------------
# 1. One full pass, then every S for free


@torch.inference_mode()
def full_pass(model, batches) -> tuple:
    """Every layer and every off-ramp on every example: (logits (N, n, C) float32 on the CPU, labels (N,))."""
    all_logits, all_labels = [], []
    with evaluating(model):
        for batch in batches:
            per_layer = model(*_model_inputs(model, batch))  # n tensors (B, C)
            all_logits.append(torch.stack(per_layer, dim=1).float().cpu())  # n x (B, C) -> (B, n, C)
            all_labels.append(batch["labels"].cpu())
    if not all_logits:
        raise DeeBertError("full_pass got no batches; pass at least one example")
    return torch.cat(all_logits), torch.cat(all_labels)


def predictions_at_exit(all_logits, exit_layers) -> torch.Tensor:
    """(N, n, C) logits and (N,) 1-based exit layers -> (N,) class ids: each example's argmax where it exits."""
    rows = torch.arange(all_logits.shape[0])
    return all_logits[rows, exit_layers - 1].argmax(dim=-1)  # (N, n, C) -> (N, C) -> (N,)


def _row(S, task, all_logits, labels, exit_layers) -> dict:
    predictions = predictions_at_exit(all_logits, exit_layers)
    metrics = compute_metrics(task, predictions.numpy(), labels.numpy())  # main metric first
    return {"S": S, **metrics, "avg_exit_layer": float(exit_layers.float().mean()),
            "expected_saving": expected_saving(exit_layers, all_logits.shape[1])}


def sweep(all_logits, labels, task, S_values=PAPER_THRESHOLDS) -> list[dict]:
    """One row per S: the task's metrics at each example's exit layer, average exit layer, expected saving.

    The first row is the full model (S None: all layers, the last off-ramp; saving 0); S = 0 gives the
    same numbers. Every row also has "drop": how far its main metric is below the full model's, in
    percentage points (metric * 100). For example a row {"S": 0.3, "accuracy": 0.71, "avg_exit_layer": 7.9,
    "expected_saving": 0.34, "drop": 1.4}.
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
    """The largest S whose main metric stays within `max_drop` points of the full model; None if none does."""
    within = [row["S"] for row in rows if row["S"] is not None and row["drop"] <= max_drop + 1e-9]
    return max(within, default=None)


# ----------------------------------------------------------------------------------------------------
# 2. Wall clock: true early exit against the full model


@torch.inference_mode()
def full_model_logits(model, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
    """Plain fine-tuned BERT, the baseline the paper times against: every layer, only the LAST off-ramp.

    (model(...) would also run the n - 1 lower off-ramps, which a plain BERT classifier does not have.)
    """
    input_ids, token_type_ids, attention_mask = prepare_inputs(model, input_ids, token_type_ids, attention_mask)
    with evaluating(model):
        hidden = model.encoder(input_ids, token_type_ids, attention_mask)[-1]  # (B, T, H) of layer n
        return model.off_ramps[-1](hidden, attention_mask)  # (B, C)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock


def _seconds(run, batches, device) -> float:
    """Wall-clock seconds of run(batch) over all batches."""
    _synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    _synchronize(device)
    return time.perf_counter() - start


def _exit_runner(model, S: float, exit_layers: list):
    """run(batch) for true early exit at S, recording the exit layers; early_exit at batch 1, else batched."""
    def run(batch):
        inputs = _model_inputs(model, batch)
        if inputs[0].shape[0] == 1:
            exit_layers.append(early_exit(model, *inputs, S=S).exit_layer)
        else:
            exit_layers.extend(early_exit_batch(model, *inputs, S=S).exit_layers.tolist())
    return run


def measure_wall_clock(model, batches, S_values=PAPER_THRESHOLDS, repeats: int = 3, warmup: int = 3) -> list[dict]:
    """Time true early exit at each S against the full model on the same batches.

    `batches` from `encode_batches` (batch size 1 times `early_exit`, larger ones `early_exit_batch`).
    The full model and every S take turns, `repeats` rounds, and each keeps its median: a disturbance
    from another process falls on one round of all of them alike, not on one S.
    One row per S: seconds, measured saving 1 - t(S) / t(full), expected saving from the exit layers of
    that very run, and their ratio; the first row is the full model itself (S None).
    """
    if not batches:
        raise DeeBertError("measure_wall_clock got no batches; pass at least one example")
    device, n = next(model.parameters()).device, model.num_layers
    batch_size = max(batch["input_ids"].shape[0] for batch in batches)
    N = sum(batch["input_ids"].shape[0] for batch in batches)

    def full(batch):
        full_model_logits(model, *_model_inputs(model, batch))

    exit_layers = {S: [] for S in S_values}
    runners = {None: full, **{S: _exit_runner(model, check_threshold(S), exit_layers[S]) for S in S_values}}
    for batch in batches[:warmup]:  # first calls allocate memory and pick kernels: keep them out of the clock
        full(batch)
        _exit_runner(model, 0.0, [])(batch)
    samples = {S: [] for S in runners}
    for _ in range(repeats):
        for S, run in runners.items():
            samples[S].append(_seconds(run, batches, device))
    full_seconds = statistics.median(samples[None])
    rows = [{"S": None, "batch_size": batch_size, "seconds": full_seconds, "measured_saving": 0.0,
             "expected_saving": 0.0, "ratio": None}]
    for S in S_values:
        seconds = statistics.median(samples[S])
        expected = expected_saving(exit_layers[S][:N], n)  # every round exits at the same layers: take the first
        measured = 1.0 - seconds / full_seconds
        rows.append({"S": S, "batch_size": batch_size, "seconds": seconds, "measured_saving": measured,
                     "expected_saving": expected, "ratio": measured / expected if expected > 0 else None})
    return rows


# ----------------------------------------------------------------------------------------------------
# Writing the results: CSV always, the PNG when matplotlib is installed


def _replace_atomically(write, path) -> Path:
    """write(temporary_path), then rename it onto `path`: readers see the old file or the new, never half.

    The temporary file sits beside `path` (same folder: os.replace is then one atomic rename) and keeps the
    target's suffix, so writers that go by the name (matplotlib) still know the format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _csv_value(value):
    return "" if value is None else value


def write_csv(rows: list[dict], path) -> Path:
    """Rows -> CSV with a header: every key that any row has, in first-seen order; S None is written "full"."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(temporary):
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                values = {key: _csv_value(row.get(key)) for key in columns}
                values["S"] = "full" if row.get("S") is None else row["S"]
                writer.writerow(values)

    return _replace_atomically(write, path)


def plot(rows: list[dict], path, metric: str | None = None) -> Path | None:
    """The paper's figure: the main metric (%) against the expected saving (%), one point per S, labelled.

    `metric` defaults to the first metric of the rows (the task's main one, as `sweep` orders them).
    Returns the path, or None when matplotlib is not installed (the caller tells the user; the CSV has it all).
    """
    try:
        from matplotlib.figure import Figure  # optional, and no pyplot: no GUI backend, no global state
    except ImportError:
        return None
    metric = metric or list(rows[0])[1]
    points = [row for row in rows if row["S"] is not None]
    full = next((row for row in rows if row["S"] is None), None)
    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    x = [100 * row["expected_saving"] for row in points]
    y = [100 * row[metric] for row in points]
    axes.plot(x, y, "o-")
    for row, xi, yi in zip(points, x, y):
        axes.annotate(f"{row['S']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if full is not None:
        axes.axhline(100 * full[metric], linestyle="--", color="grey", linewidth=1, label="full model")
        axes.legend(loc="lower left")
    axes.set_xlabel("expected saving of layers (%)")
    axes.set_ylabel(f"{metric} (%)")
    axes.set_title("DeeBERT: quality against saving, one point per threshold S")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _replace_atomically(lambda temporary: figure.savefig(temporary, format="png"), path)
