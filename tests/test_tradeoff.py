"""deebert/tradeoff.py: the full pass, the exit rules against plain loops, the sweep on hand-made logits,
choosing and certifying S, the files; and deebert/plot.py, which draws them."""

import csv
import math

import pytest
import torch
from test_exit import batch_inputs, random_batch

from deebert import plot
from deebert.errors import DeeBertError
from deebert.exit import early_exit_batch, entropy
from deebert.glue import get_task, per_layer_metrics
from deebert.tradeoff import (
    binomial_tail,
    certify_S,
    choose_S,
    compare_rules,
    disagreement,
    entropy_exits,
    expected_saving,
    first_layer_where,
    full_pass,
    max_probability_exits,
    patience_exits,
    pcee_exits,
    predictions_at_exit,
    run_lengths,
    static_point,
    sweep,
    write_csv,
)

from conftest import tiny_deebert

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
    columns = ["S", "accuracy", "avg_exit_layer", "expected_saving", "exits_per_layer", "drop", "seconds_batch1"]
    assert list(read[0]) == columns
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
    timing = [{"S": S, "batch_size": 1, "measured_saving": 0.1, "spread": 0.01, "expected_saving": 0.12}
              for S in (0.3, 0.7)]
    per_layer = {"stage 2": per_layer_metrics(SST2, HAND_LOGITS, HAND_LABELS)}
    rules = compare_rules(HAND_LOGITS, HAND_LABELS, SST2, [static_point(SST2, HAND_LOGITS[:, :1], HAND_LABELS, 3)])
    path = plot.plot(tmp_path / "tradeoff.png", rows, "accuracy", per_layer, timing, rules, majority=0.5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["tradeoff.png"]


def test_labels_that_land_on_one_spot_are_merged():
    """S = 0, 0.001 and 0.01 all keep every example to layer 3 here: one label, not three printed over each other."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    axes = Figure().add_subplot()
    plot.draw_tradeoff(axes, sweep(HAND_LOGITS[[2]], HAND_LABELS[[2]], SST2, [0, 0.001, 0.01, 0.7]), "accuracy")
    assert [t.get_text() for t in axes.texts] == ["S=0, 0.001, 0.01", "S=0.7"]


def test_plot_without_matplotlib_returns_none(tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "new_figure", lambda **size: None)  # as if matplotlib were not installed
    rows = sweep(HAND_LOGITS, HAND_LABELS, SST2, [0])
    assert plot.plot(tmp_path / "tradeoff.png", rows, "accuracy", {}) is None
    assert not (tmp_path / "tradeoff.png").exists()


def test_the_exits_panels_leave_out_the_thresholds_where_everyone_exits_together():
    rows = sweep(HAND_LOGITS, HAND_LABELS, SST2, [0, 0.001, 0.01, 0.3, 0.7])  # 0 and 0.001: all at layer 3
    assert [row["S"] for row in plot.telling_exits(rows)] == [0.001, 0.01, 0.3]  # 0.7 > ln 2: all at layer 1


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
    S_values = [0.1, 0.2, 0.3, 0.32, 0.34, 0.35, 0.36, 0.37, 0.38, 0.4, 0.5, 0.6]  # fine where the rate crosses 5%
    population = synthetic_logits(200_000, generator)  # the "true" disagreement rate of each S
    true_rate = {S: float(disagreement(population, S).float().mean()) for S in S_values}
    assert true_rate[0.2] == 0.0 and true_rate[0.35] < 0.05 < true_rate[0.38]  # the grid crosses epsilon
    epsilon, delta, draws = 0.05, 0.1, 300
    violations = 0
    chosen = set()
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
# The full pass, and the expected saving


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_deebert(tmp_path_factory.mktemp("tradeoff") / "tiny")


def full_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(model(*batch_inputs(batch)), dim=1)  # n x (B, C) -> (B, n, C)


def test_full_pass_returns_rows_in_the_examples_order(model):
    """Batches cut in any order (here: longest first) come back in the examples' own order."""
    batch = random_batch(12)
    names = ("input_ids", "token_type_ids", "attention_mask")
    order = batch["lengths"].argsort(descending=True)
    chunks = [{**{k: batch[k][order[i:i + 4]] for k in names}, "index": order[i:i + 4]} for i in range(0, 12, 4)]
    logits, labels = full_pass(model, chunks)
    torch.testing.assert_close(logits, full_logits(model, batch), atol=1e-5, rtol=0)
    assert logits.device.type == "cpu" and logits.dtype == torch.float32
    assert (labels == -1).all()  # no labels given


def test_entropy_exits_match_the_loop(model):
    """The layer counts read off a full pass are exactly what early exit runs."""
    batch = random_batch()
    all_logits = full_logits(model, batch)
    for S in (0.0, 0.1, 0.3, 0.5, 0.7):
        loop = early_exit_batch(model, *batch_inputs(batch), S=S).exit_layers
        assert torch.equal(entropy_exits(all_logits, S), loop)


def test_expected_saving_by_hand():
    assert expected_saving([1, 2, 3, 3], 3) == pytest.approx(1 - 9 / 12)  # 0.25, not the used 0.75
    assert expected_saving(torch.tensor([12] * 5), 12) == 0.0  # S = 0: nothing saved
    assert expected_saving([1] * 4, 12) == pytest.approx(11 / 12)


def test_expected_saving_refuses_impossible_layers():
    with pytest.raises(DeeBertError, match="one or more of 1..3"):
        expected_saving([0, 1], 3)
    with pytest.raises(DeeBertError, match="one or more of 1..3"):
        expected_saving([], 3)


# ----------------------------------------------------------------------------------------------------
# Exit rules: by hand, and against a plain loop over examples and layers


def test_first_layer_where_and_run_lengths_by_hand():
    flags = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    assert first_layer_where(flags).tolist() == [2, 3, 1]  # none: the last layer answers
    assert run_lengths(torch.tensor([[True, True, False, True]])).tolist() == [[1, 2, 0, 1]]


def test_each_rule_on_hand_made_logits():
    # entropies per layer: [0.0005, 0.0005, 0.0005], [0.692, 0.18, 0.0005], [0.692, 0.692, 0.67], [0.692, 0.0005, ..]
    assert entropy_exits(HAND_LOGITS, 0.3).tolist() == [1, 2, 3, 2]
    # top probabilities: [1.0, ...], [0.52, 0.95, 1.0], [0.52, 0.52, 0.62], [0.52, 1.0, 1.0]
    assert max_probability_exits(HAND_LOGITS, 0.9).tolist() == [1, 2, 3, 2]
    assert max_probability_exits(HAND_LOGITS, 0.99).tolist() == [1, 3, 3, 2]
    # argmax per layer: [0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]
    assert patience_exits(HAND_LOGITS, 0).tolist() == [1, 1, 1, 1]  # t = 0: layer 1, nothing to wait for
    assert patience_exits(HAND_LOGITS, 1).tolist() == [2, 2, 2, 3]  # two in a row agree
    assert patience_exits(HAND_LOGITS, 2).tolist() == [3, 3, 3, 3]  # three in a row, or the last layer
    # entropy below 0.3 two layers in a row: [yes from 2], [layers 2, 3: exit 3], [never], [layers 2, 3]
    assert pcee_exits(HAND_LOGITS, 0.3, t=2).tolist() == [2, 3, 3, 3]
    assert torch.equal(pcee_exits(HAND_LOGITS, 0.3, t=1), entropy_exits(HAND_LOGITS, 0.3))  # t = 1: the paper's


def plain_exits(all_logits, wants_exit) -> list:
    """The loop each rule describes, one example and one layer at a time: wants_exit(history) -> bool."""
    exits = []
    for logits in all_logits:  # (n, C)
        n = len(logits)
        exits.append(next((i for i in range(1, n + 1) if wants_exit(logits[:i])), n))
    return exits


def patience_loop(history, t) -> bool:  # PABEE's counter, as its paper writes it
    counter = 0
    for i in range(1, len(history)):
        counter = counter + 1 if history[i].argmax() == history[i - 1].argmax() else 0
    return counter >= t


def pcee_loop(history, S, t) -> bool:  # the last t layers all below S
    return len(history) >= t and all(entropy(z).item() < S for z in history[-t:])


@pytest.mark.parametrize("C", [2, 3])
def test_each_rule_equals_a_plain_loop_on_random_logits(C):
    generator = torch.Generator().manual_seed(C)
    all_logits = 3 * torch.randn(300, 6, C, generator=generator)  # (N, n, C)
    for S in (0.05, 0.3, 0.6):
        assert entropy_exits(all_logits, S).tolist() == plain_exits(all_logits, lambda h: entropy(h[-1]).item() < S)
        assert pcee_exits(all_logits, S, 2).tolist() == plain_exits(all_logits, lambda h: pcee_loop(h, S, 2))
    for tau in (0.6, 0.9, 0.99):
        expected = plain_exits(all_logits, lambda h: h[-1].softmax(-1).max().item() >= tau)
        assert max_probability_exits(all_logits, tau).tolist() == expected
    for t in range(8):
        assert patience_exits(all_logits, t).tolist() == plain_exits(all_logits, lambda h: patience_loop(h, t))


def test_patience_one_is_the_first_layer_that_agrees_with_the_one_before():
    generator = torch.Generator().manual_seed(7)
    all_logits = torch.randn(500, 6, 3, generator=generator)
    predictions = all_logits.argmax(-1)  # (N, n)
    expected = [next((i + 1 for i in range(1, 6) if p[i] == p[i - 1]), 6) for p in predictions.tolist()]
    assert patience_exits(all_logits, 1).tolist() == expected
    assert patience_exits(all_logits, 0).tolist() == [1] * 500  # t = 0: the first layer
    assert patience_exits(all_logits, 6).tolist() == [6] * 500  # t >= n: never patient enough, the last layer
    assert min(patience_exits(all_logits, 2).tolist()) == 3  # the earliest exit is layer t + 1


def matched_tau(S: float) -> float:
    """The top probability p of two classes at which the entropy -p ln p - (1-p) ln(1-p) equals S."""
    low, high = 0.5, 1.0
    for _ in range(100):
        middle = (low + high) / 2
        entropy_there = -middle * math.log(middle) - (1 - middle) * math.log(1 - middle)
        low, high = (middle, high) if entropy_there > S else (low, middle)
    return high


def test_two_classes_make_entropy_and_max_probability_one_rule_and_three_part_them():
    """With C = 2 the entropy is a decreasing function of the top probability alone, so entropy < S is top >= tau
    at the matching tau. With C = 3 the rest of the distribution counts too: the rules take other exits."""
    generator = torch.Generator().manual_seed(3)
    two = 3 * torch.randn(2000, 6, 2, generator=generator)
    for S in (0.1, 0.3, 0.5):
        tau = matched_tau(S)
        away = ((two.softmax(-1).amax(-1) - tau).abs() > 1e-4).all(dim=1)  # no layer within rounding of the boundary
        assert away.sum() > 1900
        assert torch.equal(entropy_exits(two[away], S), max_probability_exits(two[away], tau))
    # three classes, the same top probability 0.6: [0.6, 0.4, 0] is surer by entropy than [0.6, 0.2, 0.2]
    three = torch.tensor([[0.6, 0.4, 1e-9], [0.6, 0.2, 0.2]]).log()[:, None, :].expand(2, 2, 3)  # (N=2, n=2, C=3)
    assert entropy(three[:, 0]).tolist() == pytest.approx([0.673, 0.950], abs=1e-3)
    assert entropy_exits(three, 0.8).tolist() == [1, 2] and max_probability_exits(three, 0.6).tolist() == [1, 1]


def test_compare_rules_takes_the_best_score_at_each_saving():
    rules = compare_rules(HAND_LOGITS, HAND_LABELS, SST2, [static_point(SST2, HAND_LOGITS[:, :2], HAND_LABELS, 3)])
    assert list(rules) == ["entropy", "max probability", "patience", "PCEE (t = 2)", "static"]
    entropy_rule = rules["entropy"]
    assert len(entropy_rule["points"]) == 71 and entropy_rule["points"][30]["threshold"] == 0.3
    # entropy: S >= 0.001 saves 25% at accuracy 1.0 (exits 1, 3, 3, 2); S in 0.18..0.67 saves 33.3% at 0.75;
    # S >= 0.7 saves 66.7% at 0.5. The best at a saving of at least 25, 40, 55%: 1.0, 0.5, 0.5
    assert entropy_rule["at"] == {0.25: 1.0, 0.40: 0.5, 0.55: 0.5}
    static = rules["static"]["points"][0]  # the first 2 of 3 layers: predictions 0, 0, 0, 1
    assert static == {"rule": "static", "threshold": 2, "accuracy": 0.75, "avg_exit_layer": 2.0,
                      "expected_saving": pytest.approx(1 / 3)}
    assert rules["static"]["at"] == {0.25: 0.75, 0.40: None, 0.55: None} and rules["static"]["mean"] is None
    curve = [max(p["accuracy"] for p in entropy_rule["points"] if p["expected_saving"] >= x / 100 - 1e-12)
             for x in range(61)]
    assert entropy_rule["mean"] == pytest.approx(sum(curve) / 61)
