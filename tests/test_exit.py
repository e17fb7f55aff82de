"""deebert/exit.py: entropy's textbook values, the per-layer loop, and batched exits equal to one-input exits.

The models are tiny random BERTs (3 layers, hidden 32) with random off-ramps whose classifier weights are
scaled up, so that their entropies spread over (0, ln 2) and inputs exit at every layer.
"""

import math

import pytest
import torch

from deebert.errors import DeeBertError
from deebert.exit import early_exit, early_exit_batch, entropy

from conftest import TINY_VOCAB, tiny_deebert

N_LAYERS = 3


def random_batch(size=100, min_length=3, max_length=20, seed=0) -> dict:
    """Right-padded random inputs of mixed lengths: [CLS] tokens... [SEP] [PAD]...; half of them pairs."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (size,), generator=generator)
    T = int(lengths.max())
    input_ids = torch.randint(5, len(TINY_VOCAB), (size, T), generator=generator)
    positions = torch.arange(T)[None]  # (1, T)
    attention_mask = (positions < lengths[:, None]).long()  # (B, T)
    input_ids[:, 0] = 2  # [CLS]
    input_ids[torch.arange(size), lengths - 1] = 3  # [SEP]
    input_ids = input_ids * attention_mask  # [PAD] = 0 after the end
    second_segment = (positions >= lengths[:, None] // 2) & (torch.arange(size)[:, None] % 2 == 1)
    token_type_ids = (second_segment.long() * attention_mask)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "lengths": lengths}


def one_input(batch, k) -> tuple:
    """Example k alone, without its padding: tensors (1, length)."""
    length = int(batch["lengths"][k])
    return tuple(batch[name][k:k + 1, :length] for name in ("input_ids", "token_type_ids", "attention_mask"))


def batch_inputs(batch) -> tuple:
    return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_deebert(tmp_path_factory.mktemp("cls") / "tiny")


@pytest.fixture(scope="module")
def mean_model(tmp_path_factory):
    return tiny_deebert(tmp_path_factory.mktemp("mean") / "tiny", pooling="mean")


@pytest.fixture(scope="module")
def batch():
    return random_batch()


# ----------------------------------------------------------------------------------------------------
# Entropy


@pytest.mark.parametrize("C", [2, 3])
def test_uniform_logits_have_entropy_ln_C(C):
    assert entropy(torch.zeros(C)).item() == pytest.approx(math.log(C), abs=1e-6)
    assert entropy(torch.full((C,), 7.5)).item() == pytest.approx(math.log(C), abs=1e-6)


def test_one_hot_logits_have_entropy_near_zero():
    assert entropy(torch.tensor([30.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-9)


def test_entropy_of_huge_or_infinite_logits_is_not_nan():
    logits = torch.tensor([[1e4, 0.0], [3e38, -3e38], [0.0, -math.inf], [1e4, 1e4]])
    values = entropy(logits)
    assert not values.isnan().any()
    assert values[:3].tolist() == [0.0, 0.0, 0.0]
    assert values[3].item() == pytest.approx(math.log(2))


def test_entropy_is_over_the_classes_not_the_batch():
    """castorini/DeeBERT #18: a softmax over the wrong dim mixes examples. Here (B=2, C=3) -> (2,)."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    values = entropy(logits)
    assert values.shape == (2,)
    assert values[0].item() == pytest.approx(math.log(3), abs=1e-6)
    assert values[1].item() == pytest.approx(entropy(logits[1]).item())
    assert values[1].item() < 0.01


def test_entropy_keeps_leading_dims():
    assert entropy(torch.zeros(5, 4, 2)).shape == (5, 4)


@pytest.mark.parametrize("S", [-1, -0.001, float("nan")])
def test_negative_or_nan_threshold_is_refused(model, S):
    input_ids = torch.tensor([[2, 7, 8, 3]])
    with pytest.raises(DeeBertError, match="must be a number >= 0"):
        early_exit(model, input_ids, S=S)
    with pytest.raises(DeeBertError, match="must be a number >= 0"):
        early_exit_batch(model, input_ids, S=S)


# ----------------------------------------------------------------------------------------------------
# The loop, one input


def test_S_zero_runs_every_layer(model, batch):
    for k in range(10):
        result = early_exit(model, *one_input(batch, k), S=0.0)
        assert result.exit_layer == N_LAYERS and len(result.entropies) == N_LAYERS
    result = early_exit_batch(model, *batch_inputs(batch), S=0.0)
    assert (result.exit_layers == N_LAYERS).all()
    assert not result.entropies.isnan().any()


@pytest.mark.parametrize("S", [math.log(2) + 1e-3, 5.0, math.inf])
def test_S_above_ln_C_exits_at_layer_1(model, batch, S):
    for k in range(10):
        result = early_exit(model, *one_input(batch, k), S=S)
        assert result.exit_layer == 1 and len(result.entropies) == 1
    result = early_exit_batch(model, *batch_inputs(batch), S=S)
    assert (result.exit_layers == 1).all()
    assert result.entropies[:, 1:].isnan().all()


def test_early_exit_logits_equal_that_off_ramps_in_a_full_pass(model, batch):
    seen_layers = set()
    for k in range(30):
        inputs = one_input(batch, k)
        result = early_exit(model, *inputs, S=0.4)
        with torch.no_grad():
            full = model(*inputs)  # n tensors (1, C): every off-ramp
        torch.testing.assert_close(result.logits, full[result.exit_layer - 1][0], atol=1e-6, rtol=0)
        assert result.entropies == pytest.approx([entropy(z).item() for z in full[:result.exit_layer]], abs=1e-6)
        assert int(result.logits.argmax()) == int(full[result.exit_layer - 1].argmax())
        seen_layers.add(result.exit_layer)
    assert len(seen_layers) >= 2  # the threshold really splits the inputs


def test_early_exit_takes_one_input_only(model, batch):
    with pytest.raises(DeeBertError, match="early_exit_batch"):
        early_exit(model, *batch_inputs(batch), S=0.3)


def test_early_exit_refuses_a_model_in_training_mode(model, batch):
    """Dropout would make every entropy random: one line that says what to do, from both loops."""
    model.train()
    try:
        for loop, inputs in ((early_exit, one_input(batch, 0)), (early_exit_batch, batch_inputs(batch))):
            with pytest.raises(DeeBertError, match=r"training mode .*call model.eval\(\)"):
                loop(model, *inputs, S=0.3)
    finally:
        model.eval()


def test_a_float_attention_mask_decides_as_an_integer_one(model, batch):
    """A mask of 1.0 / 0.0, as some pipelines hand it over, is read as the same mask (it used to break the slicing)."""
    S = SPREADING_S["cls"]
    as_long = early_exit_batch(model, *batch_inputs(batch), S=S)
    ids, types, mask = batch_inputs(batch)
    as_float = early_exit_batch(model, ids, types, mask.float(), S=S)
    assert torch.equal(as_float.exit_layers, as_long.exit_layers)
    torch.testing.assert_close(as_float.logits, as_long.logits)
    ids, types, mask = one_input(batch, 0)
    assert early_exit(model, ids, types, mask.float(), S=S).exit_layer == int(as_long.exit_layers[0])


# ----------------------------------------------------------------------------------------------------
# Batches: the same decision per example


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("S", [0.0, 0.2, 0.4, 0.6, 0.65, 1.0])
def test_batched_exits_equal_one_input_exits(model, mean_model, batch, pooling, S):
    net = model if pooling == "cls" else mean_model
    batched = early_exit_batch(net, *batch_inputs(batch), S=S)
    assert batched.logits.shape == (100, 2) and batched.exit_layers.dtype == torch.long
    for k in range(100):
        alone = early_exit(net, *one_input(batch, k), S=S)
        assert int(batched.exit_layers[k]) == alone.exit_layer
        torch.testing.assert_close(batched.logits[k], alone.logits, atol=1e-5, rtol=0)
        ran = batched.entropies[k, :alone.exit_layer]
        assert ran.tolist() == pytest.approx(alone.entropies, abs=1e-5)
        assert batched.entropies[k, alone.exit_layer:].isnan().all()


SPREADING_S = {"cls": 0.4, "mean": 0.65}  # thresholds at which the random inputs exit at every layer


def test_the_threshold_spreads_the_random_inputs_over_every_layer(model, mean_model, batch):
    """Makes the test above meaningful: inputs of the same batch exit at different layers."""
    for net, S in ((model, SPREADING_S["cls"]), (mean_model, SPREADING_S["mean"])):
        exits = early_exit_batch(net, *batch_inputs(batch), S=S).exit_layers
        assert set(exits.tolist()) == {1, 2, 3}, torch.bincount(exits)


def record_layer_inputs(model) -> tuple:
    """Forward hooks on every layer that add up the examples (rows) it runs on and record what it sees."""
    rows, seen = [0] * model.num_layers, [[] for _ in range(model.num_layers)]

    def hook_for(i):
        def hook(module, inputs, output):
            hidden, mask = inputs  # (b, T, H), and (b, 1, 1, T) or None
            rows[i] += hidden.shape[0]
            seen[i].append((hidden.shape[1], mask is None))
        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(model.encoder.layers)]
    return rows, seen, handles


def remove(handles) -> None:
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("S", [0.2, 0.4, 0.6])
def test_no_layer_runs_after_an_exit(model, batch, S):
    """Layer i sees exactly the examples with exit layer >= i, in the loop and in the batch."""
    rows, _, handles = record_layer_inputs(model)
    try:
        exit_layers = torch.tensor([early_exit(model, *one_input(batch, k), S=S).exit_layer for k in range(100)])
        expected = [int((exit_layers >= i).sum()) for i in range(1, N_LAYERS + 1)]
        assert rows == expected
        rows[:] = [0] * N_LAYERS
        batched = early_exit_batch(model, *batch_inputs(batch), S=S)
        assert rows == expected
        assert torch.equal(batched.exit_layers, exit_layers)
    finally:
        remove(handles)


def test_under_bf16_autocast_the_batch_decides_as_one_input_does(model, batch):
    """Under autocast the logits come back in float32, and the decisions hold away from S."""
    S = SPREADING_S["cls"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batched = early_exit_batch(model, *batch_inputs(batch), S=S)
        alone = [early_exit(model, *one_input(batch, k), S=S) for k in range(100)]
    assert batched.logits.dtype == torch.float32
    # 16-bit rounding differs between a padded batch and one input: compare only away from S (see early_exit_batch)
    near_S = [(batched.entropies[k, :a.exit_layer].double() - S).abs().min() < 0.01 for k, a in enumerate(alone)]
    decided = [k for k in range(100) if not near_S[k]]
    assert len(decided) > 50
    assert all(int(batched.exit_layers[k]) == alone[k].exit_layer for k in decided)
    worst = max(abs(float(batched.entropies[k, j]) - e) for k, a in enumerate(alone) for j, e in enumerate(a.entropies))
    assert worst < 0.02, worst  # the 16-bit agreement the docstring states (~6e-3 measured on MiniLM)
