"""deebert/tradeoff.py: the S sweep on hand-made logits, choosing S, the full pass, the wall clock, the files."""

import csv
import math
import sys

import pytest
import torch

from conftest import tiny_deebert
from deebert.errors import DeeBertError
from deebert.exit import entropy
from deebert.glue import Example, get_task
from deebert.tokenizer import Tokenizer
from deebert.tradeoff import (choose_S, encode_batches, full_model_logits, full_pass, measure_wall_clock, plot,
                              predictions_at_exit, sweep, write_csv)

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
    assert list(rows[0]) == ["S", "accuracy", "avg_exit_layer", "expected_saving", "drop"]
    assert by_S[None] == {"S": None, "accuracy": 1.0, "avg_exit_layer": 3.0, "expected_saving": 0.0, "drop": 0.0}
    assert by_S[0] == {**by_S[None], "S": 0}  # S = 0 is the full model
    # S = 0.01: examples 0 and 3 leave early, both right: exits 1, 3, 3, 2
    assert by_S[0.01]["accuracy"] == 1.0 and by_S[0.01]["avg_exit_layer"] == 2.25
    assert by_S[0.01]["expected_saving"] == pytest.approx(1 - 9 / 12)
    # S = 0.3: example 1 also leaves, at layer 2, wrongly: exits 1, 2, 3, 2
    assert by_S[0.3]["accuracy"] == 0.75 and by_S[0.3]["drop"] == pytest.approx(25.0)
    assert by_S[0.3]["expected_saving"] == pytest.approx(1 - 8 / 12)
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
    assert list(read[0]) == ["S", "accuracy", "avg_exit_layer", "expected_saving", "drop", "seconds_batch1"]
    assert [row["S"] for row in read] == ["full", "0.0", "0.3"]
    assert float(read[2]["accuracy"]) == 0.75 and read[1]["seconds_batch1"] == "0.5" and read[2]["seconds_batch1"] == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["tradeoff.csv"]  # no temporary file left


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = write_csv(sweep(HAND_LOGITS, HAND_LABELS, SST2, [0]), tmp_path / "tradeoff.csv")
    before = path.read_text()

    def fail(self, row):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerow", fail)
    with pytest.raises(OSError, match="disk full"):
        write_csv(sweep(HAND_LOGITS, HAND_LABELS, SST2, [0.3, 0.7]), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tradeoff.csv"]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot(sweep(HAND_LOGITS, HAND_LABELS, SST2, [0, 0.01, 0.3, 0.7]), tmp_path / "tradeoff.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["tradeoff.png"]


def test_plot_without_matplotlib_returns_none(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    assert plot(sweep(HAND_LOGITS, HAND_LABELS, SST2, [0]), tmp_path / "tradeoff.png") is None
    assert not (tmp_path / "tradeoff.png").exists()


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


def test_full_pass_gives_every_off_ramps_logits(tiny):
    model, tokenizer = tiny
    batches = encode_batches(tokenizer, examples(10), batch_size=4)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    all_logits, labels = full_pass(model, batches)
    assert all_logits.shape == (10, 3, 2) and labels.tolist() == [k % 2 for k in range(10)]
    with torch.no_grad():
        second = batches[1]
        per_layer = model(second["input_ids"], second["token_type_ids"], second["attention_mask"])
    torch.testing.assert_close(all_logits[4:8], torch.stack(per_layer, dim=1))


def test_full_model_logits_are_the_last_off_ramps(tiny):
    model, tokenizer = tiny
    batch = encode_batches(tokenizer, examples(5), batch_size=5)[0]
    inputs = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    with torch.no_grad():
        last = model(*inputs)[-1]
    torch.testing.assert_close(full_model_logits(model, *inputs), last)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_measure_wall_clock_rows(tiny, batch_size):
    model, tokenizer = tiny
    batches = encode_batches(tokenizer, examples(8), batch_size)
    rows = measure_wall_clock(model, batches, [0, 0.4, 1.0], warmup=1)
    assert [row["S"] for row in rows] == [None, 0, 0.4, 1.0]
    assert all(row["seconds"] > 0 and row["batch_size"] == batch_size for row in rows)
    assert rows[1]["expected_saving"] == 0.0 and rows[1]["ratio"] is None  # S = 0: no exit, nothing expected
    assert rows[3]["expected_saving"] == pytest.approx(2 / 3)  # S > ln 2: every input leaves at layer 1
    for row in rows[1:]:
        assert row["measured_saving"] == pytest.approx(1 - row["seconds"] / rows[0]["seconds"])


def test_measured_saving_agrees_with_the_layer_count_roughly(tiny):
    """At S > ln 2 only 1 of 3 layers runs: clearly faster than the full model, even for a tiny one."""
    model, tokenizer = tiny
    rows = measure_wall_clock(model, encode_batches(tokenizer, examples(16), 1), [1.0], repeats=3)
    assert rows[1]["measured_saving"] > 0.2
