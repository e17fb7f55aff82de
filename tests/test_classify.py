"""deebert/classify.py: the one-call use (load, classify), and the one place that picks the loop for a batch."""

import math

import pytest
import torch
from test_exit import one_input, random_batch

from deebert.classify import Prediction, classify, exit_batch, load
from deebert.errors import DeeBertError
from deebert.exit import early_exit

from conftest import fine_tuned

TEXTS = ["the cat sat on the mat", "a very bad movie", "not good", "the man runs", "dog", "a good good movie .",
         "the woman eats food", "very very good"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fine_tuned(tmp_path_factory.mktemp("classify"), "sst-2", ("negative", "positive"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(checkpoint, device="cpu", max_length=32)


def test_load_gives_a_model_in_eval_mode_and_its_tokenizer(loaded):
    model, tokenizer = loaded
    assert not model.training and model.config.labels == ["negative", "positive"]
    assert tokenizer.max_length == 32


def test_load_refuses_more_tokens_than_the_model_has_positions(checkpoint):
    with pytest.raises(DeeBertError, match="--max_length 128 must lie in 8..64"):
        load(checkpoint, device="cpu", max_length=128)


def test_classify_answers_in_the_inputs_order_as_one_at_a_time(loaded):
    """Sorted by length and batched inside; each answer is the paper's loop on that text alone."""
    model, tokenizer = loaded
    together = classify(model, tokenizer, TEXTS, S=0.4, batch_size=3)
    for text, prediction in zip(TEXTS, together):
        alone = classify(model, tokenizer, [text], S=0.4)[0]
        assert isinstance(prediction, Prediction) and prediction.label in ("negative", "positive")
        assert (prediction.label, prediction.exit_layer) == (alone.label, alone.exit_layer)
        assert prediction.probability == pytest.approx(alone.probability, abs=1e-5)
        assert len(prediction.entropies) == prediction.exit_layer and not prediction.truncated
    assert len({p.exit_layer for p in together}) >= 2  # S = 0.4 splits these texts


def test_S_zero_runs_every_layer_and_a_huge_S_exits_at_the_first(loaded):
    model, tokenizer = loaded
    assert {p.exit_layer for p in classify(model, tokenizer, TEXTS, S=0.0)} == {model.num_layers}
    assert {p.exit_layer for p in classify(model, tokenizer, TEXTS, S=math.inf)} == {1}


def test_pairs_are_classified_as_pairs(tmp_path):
    model, tokenizer = load(fine_tuned(tmp_path, "rte", ("entailment", "not_entailment")), "cpu", max_length=32)
    predictions = classify(model, tokenizer, [("a man eats food", "a man eats"), ("the dog runs", "a cat")], S=0.3)
    assert [p.label in ("entailment", "not_entailment") for p in predictions] == [True, True]


def test_exit_batch_takes_the_papers_loop_for_one_input_and_answers_on_the_cpu(loaded):
    """A batch of one runs early_exit; a larger one early_exit_batch; both come back on the CPU, NaN-padded."""
    model, _ = loaded
    batch = random_batch(20)
    names = ("input_ids", "token_type_ids", "attention_mask")
    together = exit_batch(model, {k: batch[k] for k in names}, S=0.4)
    for k in range(20):
        alone = exit_batch(model, dict(zip(names, one_input(batch, k))), S=0.4)
        paper = early_exit(model, *one_input(batch, k), S=0.4)
        assert int(alone.exit_layers[0]) == paper.exit_layer == int(together.exit_layers[k])
        assert alone.entropies.shape == (1, model.num_layers)
        assert alone.entropies[0, paper.exit_layer:].isnan().all()
    for result in (together, alone):
        assert {t.device.type for t in (result.logits, result.exit_layers, result.entropies)} == {"cpu"}
        assert result.exit_layers.dtype == torch.long
