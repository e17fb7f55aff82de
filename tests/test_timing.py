"""deebert/timing.py: the paired wall clock of early exit against the full model (and static models)."""

import pytest
import torch

from deebert import timing
from deebert.checkpoint import load_deebert
from deebert.glue import Example
from deebert.timing import full_model_logits, half_iqr, measure_wall_clock, verdict
from deebert.tokenizer import Tokenizer, batches

from conftest import tiny_deebert, write_tiny_checkpoint

WORDS = "the cat sat on a mat dog is good bad movie not very man woman eats food runs".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("timing") / "tiny"
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
    timed = []
    take_turns = timing.take_turns
    monkeypatch.setattr(timing, "take_turns", lambda runs, *rest: timed.append(list(runs)) or take_turns(runs, *rest))
    rows = measure_wall_clock(model, batches(tokenizer, examples(8), 4), [0, 1.0, 2.0], budget_seconds=0.1)
    assert timed == [[None, 0, 1.0]]  # above ln 2 every input exits at layer 1: S = 2 does S = 1's work
    assert rows[3]["seconds"] == rows[2]["seconds"] and rows[3]["measured_saving"] == rows[2]["measured_saving"]


def test_a_static_model_is_timed_beside_the_full_model(tiny, tmp_path):
    """A 2-layer model of the same BERT, timed in the same rounds; its expected saving is 1 - 2/3."""
    model, tokenizer = tiny
    pretrained = write_tiny_checkpoint(tmp_path / "bert")
    smaller = load_deebert(pretrained, labels=["0", "1"], num_layers=2).eval()
    rows = measure_wall_clock(model, batches(tokenizer, examples(8), 4), [0.4], {"static K=2": smaller},
                              budget_seconds=0.1)
    assert [row.get("static") for row in rows] == [None, None, "static K=2"]
    assert rows[2]["expected_saving"] == pytest.approx(1 / 3) and rows[2]["seconds"] > 0


def test_the_full_model_is_every_layer_and_the_last_off_ramp(tiny):
    model, tokenizer = tiny
    batch = next(batches(tokenizer, examples(6), 6))
    inputs = {key: batch[key] for key in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(full_model_logits(model, inputs), model(**inputs)[-1])


def test_half_iqr_and_the_verdict():
    assert half_iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == 1.0 and half_iqr([1.0]) == float("inf")
    row = {"expected_saving": 0.3, "ratio": 0.9, "spread": 0.01}
    assert verdict({**row, "measured_saving": 0.004}) == "within noise"
    assert verdict({**row, "measured_saving": 0.27}) == "0.90"
    assert verdict({**row, "measured_saving": -0.08, "ratio": -0.27}) == "slower"  # a cost, not a ratio

