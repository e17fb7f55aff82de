"""deebert/tradeoff.py: the S sweep on hand-made logits, choosing and certifying S, the wall clock, the files."""

import csv
import math

import pytest
import torch

from conftest import tiny_deebert
from deebert.errors import DeeBertError
from deebert.exit import entropy
from deebert.glue import Example, get_task
from deebert.tokenizer import Tokenizer, batches
from deebert.glue import per_layer_metrics
from deebert.tradeoff import (binomial_tail, certify_S, choose_S, disagreement, measure_wall_clock,
                              predictions_at_exit, sweep, write_csv)
import figures
from deebert import tradeoff
from figures import plot

SST2 = get_task("sst-2")

# Four examples, three layers, two classes. Logits [10, 0] are confident (entropy 0.0005),
# [0.1, 0] unsure (0.692), [3, 0] fairly confident (0.18), [0.5, 0] unsure (0.67). Labels 0, 1, 0, 1.
SURE_0, SURE_1, UNSURE_0, FAIRLY_0, SLIGHTLY_0 = [10.0, 0.0], [0.0, 10.0], [0.1, 0.0], [3.0, 0.0], [0.5, 0.0]
HAND_LOGITS = torch.tensor([
    [SURE_0, SURE_0, SURE_0],  # label 0: right and sure from layer 1
    [UNSURE_0, FAIRLY_0, SURE_1],  # label 1: fairly sure and WRONG at layer 2, right at layer 3
    [UNSURE_0, UNSURE_0, SLIGHTLY_0],  # label 0: unsure everywhere, right at the end
    [UNSURE_0, SURE_1, SURE_1],  # label 1: right and sure from layer 2
])  # (N=4, n=3, C=2)
HAND_LABELS = torch.tensor([0, 1, 0, 1])


def test_the_hand_made_entropies_are_what_the_comments_say():
    H = entropy(HAND_LOGITS)
    assert H[0, 0] < 0.001 and 0.69 < H[1, 0] < math.log(2) and 0.1 < H[1, 1] < 0.2 and 0.6 < H[2, 2] < 0.68


def test_sweep_on_hand_made_logits():
    rows = sweep(HAND_LOGITS, HAND_LABELS, SST2, [0, 0.01, 0.3, 0.7])
    by_S = {row["S"]: row for row in rows}
    assert list(rows[0]) == ["S", "accuracy", "avg_exit_layer", "expected_saving", "exits_per_layer", "drop"]
    assert by_S[None] == {"S": None, "accuracy": 1.0, "avg_exit_layer": 3.0, "expected_saving": 0.0,
                          "exits_per_layer": [0, 0, 4], "drop": 0.0}
    assert by_S[0] == {**by_S[None], "S": 0}  # S = 0 is the full model
    # S = 0.01: examples 0 and 3 leave early, both right: exits 1, 3, 3, 2
    assert by_S[0.01]["accuracy"] == 1.0 and by_S[0.01]["avg_exit_layer"] == 2.25
    assert by_S[0.01]["expected_saving"] == pytest.approx(1 - 9 / 12)
    # S = 0.3: example 1 also leaves, at layer 2, wrongly: exits 1, 2, 3, 2
    assert by_S[0.3]["accuracy"] == 0.75 and by_S[0.3]["drop"] == pytest.approx(25.0)
    assert by_S[0.3]["expected_saving"] == pytest.approx(1 - 8 / 12) and by_S[0.3]["exits_per_layer"] == [1, 2, 1]
    # S = 0.7 > ln 2: everyone answers at layer 1, where examples 1 and 3 are wrong
    assert by_S[0.7]["accuracy"] == 0.5 and by_S[0.7]["avg_exit_layer"] == 1.0
    assert by_S[0.7]["expected_saving"] == pytest.approx(2 / 3)


def test_predictions_at_exit_take_each_examples_own_layer():
    assert predictions_at_exit(HAND_LOGITS, torch.tensor([1, 2, 3, 2])).tolist() == [0, 0, 0, 1]


def test_sweep_reports_every_metric_of_the_task():
    rows = sweep(HAND_LOGITS, HAND_LABELS, get_task("mrpc"), [0.3])
    assert list(rows[1])[:3] == ["S", "f1", "accuracy"]  # the main metric first
    assert rows[1]["f1"] == pytest.approx(2 / 3)  # predictions 0, 0, 0, 1 against 0, 1, 0, 1


def test_sweep_refuses_a_negative_threshold():
    with pytest.raises(DeeBertError, match=">= 0"):
        sweep(HAND_LOGITS, HAND_LABELS, SST2, [0.1, -1])


def test_choose_S_is_the_largest_S_within_the_allowed_drop():
    rows = sweep(HAND_LOGITS, HAND_LABELS, SST2, [0, 0.001, 0.01, 0.3, 0.7])
    assert choose_S(rows, max_drop=1.0) == 0.01
    assert choose_S(rows, max_drop=25.0) == 0.3
    assert choose_S(rows, max_drop=100.0) == 0.7
    assert choose_S(sweep(HAND_LOGITS, HAND_LABELS, SST2, [0.3, 0.7]), max_drop=1.0) is None


# ----------------------------------------------------------------------------------------------------
# The files


def test_write_csv_writes_every_column_and_full_for_the_full_model(tmp_path):
    rows = sweep(HAND_LOGITS, HAND_LABELS, SST2, [0, 0.3])
    rows[1]["seconds_batch1"] = 0.5  # a column only some rows have
    path = write_csv(rows, tmp_path / "out" / "tradeoff.csv")
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["S", "accuracy", "avg_exit_layer", "expected_saving", "exits_per_layer", "drop", "seconds_batch1"]
    assert [row["S"] for row in read] == ["full", "0.0", "0.3"] and read[2]["exits_per_layer"] == "1 2 1"
    assert float(read[2]["accuracy"]) == 0.75 and read[1]["seconds_batch1"] == "0.5" and read[2]["seconds_batch1"] == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["tradeoff.csv"]  # no temporary file left


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = write_csv(sweep(HAND_LOGITS, HAND_LABELS, SST2, [0]), tmp_path / "tradeoff.csv")
    before = path.read_text()

    def fail(f):
        f.write("half a line")
        raise OSError("disk full")

    monkeypatch.setattr(csv, "writer", fail)
    with pytest.raises(OSError, match="disk full"):
        write_csv(sweep(HAND_LOGITS, HAND_LABELS, SST2, [0.3, 0.7]), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tradeoff.csv"]


def test_plot_draws_the_papers_figures_into_one_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = sweep(HAND_LOGITS, HAND_LABELS, SST2, [0, 0.001, 0.01, 0.3, 0.7])
    timing = [{"S": S, "batch_size": 1, "measured_saving": 0.1, "spread": 0.01, "expected_saving": 0.12} for S in (0.3, 0.7)]
    per_layer = {"stage 2": per_layer_metrics(SST2, HAND_LOGITS, HAND_LABELS)}
    path = plot(tmp_path / "tradeoff.png", rows, "accuracy", per_layer, timing)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["tradeoff.png"]


def test_labels_that_land_on_one_spot_are_merged():
    """S = 0, 0.001 and 0.01 all keep every example to layer 3 here: one label, not three printed over each other."""
    from matplotlib.figure import Figure
    axes = Figure().add_subplot()
    figures.draw_tradeoff(axes, sweep(HAND_LOGITS[[2]], HAND_LABELS[[2]], SST2, [0, 0.001, 0.01, 0.7]), "accuracy")
    assert [t.get_text() for t in axes.texts] == ["S=0, 0.001, 0.01", "S=0.7"]


def test_plot_without_matplotlib_returns_none(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "new_figure", lambda **size: None)  # as if matplotlib were not installed
    assert plot(tmp_path / "tradeoff.png", sweep(HAND_LOGITS, HAND_LABELS, SST2, [0]), "accuracy") is None
    assert not (tmp_path / "tradeoff.png").exists()


# ----------------------------------------------------------------------------------------------------
# Certifying S: the guarantee is checked, not assumed


def test_binomial_tail_by_hand():
    assert binomial_tail(0, 10, 0.5) == pytest.approx(0.5 ** 10)
    assert binomial_tail(10, 10, 0.3) == pytest.approx(1.0)
    assert binomial_tail(1, 3, 0.5) == pytest.approx(4 / 8)


def synthetic_logits(N: int, generator) -> torch.Tensor:
    """(N, 2, 2): layer 1 is confident with probability ~ a uniform draw, and wrong (against layer 2) when its
    confidence u < 0.3: the disagreement at S is known exactly, P[entropy(u) < S and u < 0.3]."""
    u = torch.rand(N, generator=generator)  # how sure layer 1 is; its entropy falls as u grows
    margin = 8 * u  # logits [margin, 0]: entropy decreases in margin
    wrong = u < 0.3
    final = torch.where(wrong, 5.0, -5.0)  # the full model says class 1 where layer 1 (class 0) is wrong
    layer1 = torch.stack([margin, torch.zeros(N)], dim=1)
    layer2 = torch.stack([torch.zeros(N), final], dim=1)
    return torch.stack([layer1, layer2], dim=1)


def test_the_certified_S_violates_epsilon_in_at_most_about_delta_of_draws():
    generator = torch.Generator().manual_seed(0)
    S_values = [0.1, 0.2, 0.3, 0.32, 0.34, 0.35, 0.36, 0.37, 0.38, 0.4, 0.5, 0.6]  # fine steps where the rate crosses 5%
    population = synthetic_logits(200_000, generator)  # the "true" disagreement rate of each S
    true_rate = {S: float(disagreement(population, S).float().mean()) for S in S_values}
    assert true_rate[0.2] == 0.0 and true_rate[0.35] < 0.05 < true_rate[0.38]  # the grid crosses epsilon
    epsilon, delta, draws, violations, chosen = 0.05, 0.1, 300, 0, set()
    for _ in range(draws):
        result = certify_S(synthetic_logits(1000, generator), epsilon, delta, S_values)
        violations += result["S"] > 0 and true_rate[result["S"]] > epsilon
        chosen.add(result["S"])
    assert violations / draws <= delta + 0.03, violations  # the guarantee, with a little room for 300 draws
    assert len(chosen) > 1 and max(chosen) > 0  # and it is not vacuous: it certifies real thresholds


def test_certify_S_refuses_what_it_cannot_promise():
    logits = synthetic_logits(100, torch.Generator().manual_seed(1))
    with pytest.raises(DeeBertError, match="needs at least 230 examples"):
        certify_S(logits, epsilon=0.01, delta=0.1)
    for epsilon, delta in ((0, 0.1), (1.5, 0.1), (0.05, 0)):
        with pytest.raises(DeeBertError, match="strictly between 0 and 1"):
            certify_S(logits, epsilon, delta)


# ----------------------------------------------------------------------------------------------------
# On a tiny model: the full pass and the wall clock

WORDS = "the cat sat on a mat dog is good bad movie not very man woman eats food runs".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tradeoff") / "tiny"
    model = tiny_deebert(directory, labels=("0", "1"))
    return model, Tokenizer.from_dir(directory, max_length=32)


def examples(count: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (count,), generator=generator).tolist()
    words = torch.randint(0, len(WORDS), (count, 12), generator=generator).tolist()
    return [Example(" ".join(WORDS[w] for w in words[k][:lengths[k]]), None, k % 2) for k in range(count)]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_measure_wall_clock_rows(tiny, batch_size):
    model, tokenizer = tiny
    rows = measure_wall_clock(model, batches(tokenizer, examples(8), batch_size), [0, 0.4, 1.0], budget_seconds=0.1)
    assert [row["S"] for row in rows] == [None, 0, 0.4, 1.0]
    assert all(row["seconds"] > 0 and row["batch_size"] == batch_size and row["rounds"] >= 3 for row in rows)
    assert rows[1]["expected_saving"] == 0.0 and rows[1]["ratio"] is None  # S = 0: no exit, nothing expected
    assert rows[3]["expected_saving"] == pytest.approx(2 / 3)  # S > ln 2: every input leaves at layer 1
    assert all(row["spread"] >= 0 for row in rows)


def test_thresholds_with_the_same_exits_are_timed_once(tiny, monkeypatch):
    model, tokenizer = tiny
    timed, take_turns = [], tradeoff.take_turns
    monkeypatch.setattr(tradeoff, "take_turns", lambda runs, *rest: timed.append(list(runs)) or take_turns(runs, *rest))
    rows = measure_wall_clock(model, batches(tokenizer, examples(8), 4), [0, 1.0, 2.0], budget_seconds=0.1)
    assert timed == [[None, 0, 1.0]]  # above ln 2 every input exits at layer 1: S = 2 does S = 1's work
    assert rows[3]["seconds"] == rows[2]["seconds"] and rows[3]["measured_saving"] == rows[2]["measured_saving"]
