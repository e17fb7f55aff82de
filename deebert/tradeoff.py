"""DeeBERT's trade-off from one full pass: quality against saved layers, for any threshold (paper section 4).

`full_pass` runs every layer and every off-ramp once on every example: (N, n, C) logits. An exit rule reads
only those logits, so each example's exit layer for any threshold, its prediction there, and what that saves
follow without running the model again:

1. exit rules (`entropy_exits` is the paper's; the others came after it), and the expected saving
   1 - sum_i i * N_i / (n * N), the fraction of layers not run (section 4.3);
2. the sweep over S (`sweep`: Table 1 and Figure 2), and every rule over its own grid (`compare_rules`);
3. a threshold with a guarantee (`certify_S`, beyond the paper): the largest S whose early exits agree with
   the full model on all but a fraction epsilon of inputs like the calibration set, with probability >= 1 - delta.

These layer counts are exact for what early exit runs: the loops of exit.py take the same decisions
(tests/test_tradeoff.py). Wall-clock time is timing.py's."""

import csv
import math

import torch

from deebert.device import model_inputs
from deebert.errors import DeeBertError
from deebert.exit import check_eval_mode, check_threshold, entropy
from deebert.files import write_atomically
from deebert.glue import compute_metrics

PAPER_THRESHOLDS = (0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@torch.inference_mode()
def full_pass(model, batches) -> tuple:
    """Every layer and every off-ramp on every example: (logits (N, n, C) float32 on the CPU, labels (N,)), in the
    examples' own order (each batch's "index") however the batches were cut; labels -1 where there are none."""
    check_eval_mode(model)
    device = next(model.parameters()).device
    rows, all_logits, all_labels = [], [], []
    for batch in batches:
        per_layer = model(**model_inputs(batch, device))  # n tensors (B, C)
        all_logits.append(torch.stack(per_layer, dim=1).float().cpu())  # n x (B, C) -> (B, n, C)
        all_labels.append(batch.get("labels", torch.full((len(batch["index"]),), -1)))
        rows.append(batch["index"])  # (B,): where these examples stand among all of them
    if not all_logits:
        raise DeeBertError("full_pass got no batches; pass at least one example")
    order = torch.cat(rows).argsort()  # batch order -> the examples' own order
    return torch.cat(all_logits)[order], torch.cat(all_labels)[order]


# --- 1. Exit rules: (N, n, C) logits and a threshold in, (N,) 1-based exit layers out -----------------


def first_layer_where(flags) -> torch.Tensor:
    """(N, n) booleans -> (N,) 1-based index of the first True of each row; n where there is none (the last
    off-ramp answers whatever it says). first_layer_where([[False, True, True]]) -> [2]."""
    flags = torch.as_tensor(flags).clone()
    flags[:, -1] = True
    return flags.int().argmax(dim=1) + 1  # argmax returns the FIRST maximum


def run_lengths(flags) -> torch.Tensor:
    """(N, n) booleans -> (N, n): how many Trues in a row end at each layer. [[T, T, F, T]] -> [[1, 2, 0, 1]]."""
    runs = []
    run = torch.zeros(len(flags), dtype=torch.long)
    for column in flags.T:
        run = (run + 1) * column  # one more True in a row, or back to 0
        runs.append(run)
    return torch.stack(runs, dim=1)


def entropy_exits(all_logits, S: float) -> torch.Tensor:
    """The paper's rule: exit at the first layer i with entropy(softmax(z_i)) < S.
    Compared in double precision, as the loops of exit.py compare, so the two take the same decisions."""
    return first_layer_where(entropy(all_logits).double() < check_threshold(S))


def max_probability_exits(all_logits, tau: float) -> torch.Tensor:
    """Maximum softmax probability (Schwartz et al., ACL 2020): exit at the first layer with max_c p_c >= tau.
    With two classes this is the entropy rule: entropy is then a decreasing function of max_c p_c alone."""
    top = all_logits.float().softmax(dim=-1).amax(dim=-1)  # (N, n, C) -> (N, n)
    return first_layer_where(top.double() >= tau)


def patience_exits(all_logits, t: int) -> torch.Tensor:
    """Patience (PABEE, Zhou et al., NeurIPS 2020): a counter grows by one each time an off-ramp's argmax equals the
    previous off-ramp's and resets to 0 otherwise; exit when it reaches t. So t + 1 off-ramps in a row agree, the
    earliest exit is layer t + 1, t = 0 exits at layer 1, and t >= n reaches the last layer."""
    predictions = all_logits.argmax(dim=-1)  # (N, n)
    agrees = torch.zeros_like(predictions, dtype=torch.bool)  # off-ramp 1 has no previous one to agree with
    agrees[:, 1:] = predictions[:, 1:] == predictions[:, :-1]
    return first_layer_where(run_lengths(agrees) >= t)


def pcee_exits(all_logits, S: float, t: int = 2) -> torch.Tensor:
    """Patience on confidence (PCEE-BERT, Findings of NAACL 2022): exit at the first layer that ends a run of t layers
    in a row with entropy < S. t = 1 is the paper's rule."""
    return first_layer_where(run_lengths(entropy(all_logits).double() < check_threshold(S)) >= t)


def expected_saving(exit_layers, num_layers: int) -> float:
    """The fraction of layer computations saved: 1 - sum_i i * N_i / (n * N) (paper section 4.3).

    N_i examples exit at layer i, out of N; sum_i i * N_i is simply the sum of the exit layers.
    expected_saving([1, 2, 3, 3], 3) = 1 - 9 / 12 = 0.25. 0 means nothing was saved (S = 0).
    (The authors' script printed the *used* fraction, 9 / 12 here, under this name.)
    """
    exit_layers = torch.as_tensor(exit_layers)
    if exit_layers.numel() == 0 or int(exit_layers.min()) < 1 or int(exit_layers.max()) > num_layers:
        raise DeeBertError(f"exit layers must be one or more of 1..{num_layers} (1-based); "
                           f"got {exit_layers.tolist()[:5]}")
    used_fraction = float(exit_layers.sum()) / (num_layers * exit_layers.numel())
    return 1.0 - used_fraction


def predictions_at_exit(all_logits, exit_layers) -> torch.Tensor:
    """(N, n, C) logits and (N,) 1-based exit layers -> (N,) class ids: each example's argmax where it exits."""
    rows = torch.arange(all_logits.shape[0])
    return all_logits[rows, exit_layers - 1].argmax(dim=-1)  # (N, n, C) -> (N, C) -> (N,)


# --- 2. The sweep over S, and every rule over its grid ------------------------------------------------


def score(task, all_logits, labels, exit_layers) -> dict:
    """The task's metrics where each example exits, the average exit layer, the expected saving and how many
    examples exit at each layer."""
    n = all_logits.shape[1]
    metrics = compute_metrics(task, predictions_at_exit(all_logits, exit_layers).numpy(), labels.numpy())
    return {
        **metrics,
        "avg_exit_layer": float(exit_layers.float().mean()),
        "expected_saving": expected_saving(exit_layers, n),
        "exits_per_layer": torch.bincount(exit_layers, minlength=n + 1)[1:].tolist(),
    }


def sweep(all_logits, labels, task, S_values=PAPER_THRESHOLDS) -> list[dict]:
    """One row per S of the paper's rule: `score` at each S, and "drop": how far the main metric falls below the
    full model's, in percentage points. The first row is the full model (S None); S = 0 gives the same numbers."""
    N, n = all_logits.shape[:2]
    full = {"S": None, **score(task, all_logits, labels, torch.full((N,), n))}
    rows = [full] + [{"S": check_threshold(S), **score(task, all_logits, labels, entropy_exits(all_logits, S))}
                     for S in S_values]
    for row in rows:
        row["drop"] = 100 * (full[task.main_metric] - row[task.main_metric])
    return rows


def choose_S(rows, max_drop: float = 1.0) -> float | None:
    """The largest S whose main metric stays within `max_drop` points of the full model; None if none does.
    Chosen on the very data it is scored on, this flatters itself: `certify_S` gives a real guarantee."""
    within = [row["S"] for row in rows if row["S"] is not None and row["drop"] <= max_drop + 1e-9]
    return max(within, default=None)


def rule_grids(num_layers: int) -> dict:
    """Each exit rule with the thresholds it is swept over: {name: (exits(all_logits, threshold), thresholds)}."""
    S_grid = [k / 100 for k in range(71)]  # 0, 0.01, ..., 0.7
    return {
        "entropy": (entropy_exits, S_grid),
        "max probability": (max_probability_exits, [0.5 + k * 0.005 for k in range(101)]),  # 0.5, ..., 1
        "patience": (patience_exits, list(range(num_layers))),  # t = 0, ..., n - 1
        "PCEE (t = 2)": (pcee_exits, S_grid),
    }


SAVINGS = (0.25, 0.40, 0.55)  # where the rules are compared: the best score at an expected saving of at least this
ENVELOPE_SAVINGS = [k / 100 for k in range(61)]  # and the mean of that best over 0%, 1%, ..., 60%


def envelope(points: list[dict], metric: str, saving: float) -> float | None:
    """The upper envelope of (expected saving, metric) points: the best metric among the points that save at least
    `saving`; None where none does."""
    return max((p[metric] for p in points if p["expected_saving"] >= saving - 1e-12), default=None)


def compare_rules(all_logits, labels, task, static: list | None = None) -> dict:
    """Every exit rule over its grid, from the same full pass: {rule: {"points": [one row per threshold],
    "at": {saving: best metric}, "mean": the envelope's mean over 0..60%}}. `static`: rows of static models
    (smaller models that always run K layers), compared in the same way."""
    metric = task.main_metric
    n = all_logits.shape[1]
    points = {name: [{"rule": name, "threshold": t, **score(task, all_logits, labels, exits(all_logits, t))}
                     for t in thresholds]
              for name, (exits, thresholds) in rule_grids(n).items()}
    if static:
        points["static"] = static
    summary = {}
    for name, rows in points.items():
        curve = [envelope(rows, metric, x) for x in ENVELOPE_SAVINGS]
        summary[name] = {"points": rows, "at": {x: envelope(rows, metric, x) for x in SAVINGS},
                         "mean": None if None in curve else sum(curve) / len(curve)}
    return summary


def static_point(task, all_logits, labels, num_layers: int) -> dict:
    """A static model that always runs all its K layers, as a point beside the rules': the metrics of its last
    off-ramp, at the saving 1 - K/n it has against the n-layer model. (N, K, C) logits of its full pass."""
    K = all_logits.shape[1]
    metrics = compute_metrics(task, all_logits[:, -1].argmax(dim=-1).numpy(), labels.numpy())
    return {"rule": "static", "threshold": K, **metrics, "avg_exit_layer": float(K),
            "expected_saving": 1 - K / num_layers}


# --- 3. A threshold certified to agree with the full model --------------------------------------------


def disagreement(all_logits, S: float) -> torch.Tensor:
    """(N,) booleans: where early exit at S predicts another class than the full model (the last off-ramp)."""
    return predictions_at_exit(all_logits, entropy_exits(all_logits, S)) != all_logits[:, -1].argmax(dim=-1)


def binomial_tail(k: int, N: int, p: float) -> float:
    """P[Binomial(N, p) <= k], summed in log space: binomial_tail(0, 10, 0.5) = 0.5 ** 10."""
    log_terms = [
        math.lgamma(N + 1) - math.lgamma(j + 1) - math.lgamma(N - j + 1) + j * math.log(p) + (N - j) * math.log1p(-p)
        for j in range(k + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def certify_S(all_logits, epsilon: float, delta: float, S_values=PAPER_THRESHOLDS) -> dict:
    """The largest S whose disagreement with the full model is at most `epsilon`, with probability >= 1 - delta.

    For each S the calibration set shows k disagreements in N examples. Were the true rate above epsilon,
    k or fewer would occur with probability at most P[Binomial(N, epsilon) <= k]: when that p-value is
    <= delta, S is certified. The S are tested from small to large and the first failure stops the test
    (fixed-sequence testing, as in Learn then Test): a bad S can only be certified if the first bad S in
    that order is, which happens with probability <= delta, so no correction for the many S is needed.
    S = 0 is the full model itself and always holds. Valid for new data drawn like the calibration set;
    labels are not needed, and under a shift of domain nothing is promised. Not in the paper.
    """
    if not (0 < epsilon < 1 and 0 < delta < 1):
        raise DeeBertError(f"epsilon {epsilon} and delta {delta} must lie strictly between 0 and 1")
    N = all_logits.shape[0]
    needed = math.ceil(math.log(delta) / math.log1p(-epsilon))  # even 0 disagreements need this many examples
    if N < needed:
        raise DeeBertError(f"{N} calibration examples cannot certify a disagreement of at most {epsilon:g} at "
                           f"delta {delta:g}; that needs at least {needed} examples")
    best = 0.0
    tested = []
    for S in sorted(check_threshold(S) for S in S_values):
        k = int(disagreement(all_logits, S).sum())
        p_value = binomial_tail(k, N, epsilon)
        tested.append({"S": S, "disagreements": k, "p_value": p_value})
        if p_value > delta:
            break
        best = S
    return {"S": best, "epsilon": epsilon, "delta": delta, "examples": N, "tested": tested}


# --- Every number in a CSV ----------------------------------------------------------------------------


def write_csv(rows: list[dict], path):
    """Rows -> CSV with a header: every key any row has, in first-seen order; S None is "full", lists "3 1 0"."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(key, value):
        if key == "S" and value is None:
            return "full"
        if isinstance(value, list):
            return " ".join(map(str, value))
        return "" if value is None else value

    def write(temporary):
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([cell(key, row.get(key)) for key in columns] for row in rows)

    return write_atomically(path, write)
