"""Checks for the exercises, step by step. From the repository root:

    python -m pytest -q tutorial/exercises/check.py -k step1       # your exercise.py, step 1 only
    python -m pytest -q tutorial/exercises/check.py                # every step
    DEEBERT_EXERCISE=solutions python -m pytest -q tutorial/exercises/check.py   # the solutions instead

$DEEBERT_EXERCISE picks the file under test: a path, or a file name in this folder (default exercise.py).
Every check compares the file's functions with the package's own (deebert/exit.py, tradeoff.py, stages.py),
on hand-made logits and on a tiny random DeeBERT whose 50 random inputs exit at every layer. A check that
rejects a typical wrong answer says what the paper asks instead.
"""

import functools
import importlib.util
import math
import os
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import deebert.exit as package
from deebert import stages, tradeoff
from deebert.config import BertConfig
from deebert.exit import BatchExitResult, ExitResult
from deebert.model import DeeBert

HERE = Path(__file__).resolve().parent
FUNCTIONS = ("entropy", "early_exit", "entropy_exits", "expected_saving", "early_exit_batch", "stage2_parameters",
             "stage2_loss", "patience_exits")
N_LAYERS, N_INPUTS, VOCAB = 3, 50, 30
THRESHOLDS = (0.3, 0.4, 0.5)  # at each, the 50 random inputs exit at every layer
ABOVE_LN_2 = (math.log(2) + 1e-3, 5.0)  # an entropy over 2 classes is at most ln 2: always exit at layer 1
ABOVE_LN_2_IDS = ("ln2+0.001", "5.0")

# ----------------------------------------------------------------------------------------------------
# The file under test


def exercise_path() -> Path:
    """$DEEBERT_EXERCISE as a name in this folder ("solutions", "solutions.py"), or else as a path."""
    chosen = os.environ.get("DEEBERT_EXERCISE", "exercise.py")
    for path in (HERE / chosen, HERE / f"{chosen}.py", Path(chosen)):
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(f"DEEBERT_EXERCISE={chosen}: no such file here or in {HERE}")


def reported(function, file_name):
    """`function`, where a NotImplementedError becomes a short failure that shows its message."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except NotImplementedError as error:
            message = f"{file_name}: NotImplementedError: {error}"
        pytest.fail(message, pytrace=False)  # outside the except: no "during handling..." chain

    return call


@pytest.fixture(scope="module")
def exercise():
    """The functions of the file under test (loaded here, so a missing step fails only its checks)."""
    path = exercise_path()
    spec = importlib.util.spec_from_file_location(f"exercise_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return SimpleNamespace(**{name: reported(getattr(module, name), path.name) for name in FUNCTIONS})


# ----------------------------------------------------------------------------------------------------
# A tiny DeeBERT and random inputs


def tiny_deebert() -> DeeBert:
    """3 random layers (hidden 32, 2 classes) whose off-ramps' entropies spread over (0, ln 2).

    Larger word embeddings and attention weights make [CLS] depend on the input; larger off-ramp
    classifiers make them confident, the higher ones more so.
    """
    torch.manual_seed(2)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, labels=["no", "yes"])
    model = DeeBert(config)  # BERT's initialisation, done by the constructor
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight.mul_(50)
        for layer in model.encoder.layers:
            for linear in (layer.attention.query, layer.attention.key, layer.attention.value, layer.attention.output):
                linear.weight.mul_(10)
        for ramp, scale in zip(model.off_ramps, (100, 200, 300)):
            ramp.classifier.weight.mul_(scale)
    return model.eval()


def certain_deebert() -> DeeBert:
    """The tiny model whose first off-ramp always says [0, 1000]: entropy exactly 0, for every input."""
    model = tiny_deebert()
    with torch.no_grad():
        model.off_ramps[0].classifier.weight.zero_()
        model.off_ramps[0].classifier.bias.copy_(torch.tensor([0.0, 1000.0]))
    return model


def random_batch(size=N_INPUTS, seed=0) -> dict:
    """Right-padded random inputs of 3 to 20 tokens: [CLS] tokens... [SEP] [PAD]...; odd ones are pairs."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 21, (size,), generator=generator)  # (B,)
    T = int(lengths.max())
    positions = torch.arange(T)[None]  # (1, T)
    attention_mask = (positions < lengths[:, None]).long()  # (B, T): 1 token, 0 padding
    input_ids = torch.randint(5, VOCAB, (size, T), generator=generator)
    input_ids[:, 0] = 2  # [CLS]
    input_ids[torch.arange(size), lengths - 1] = 3  # [SEP]
    input_ids = input_ids * attention_mask  # [PAD] = 0 after the end
    second_segment = (positions >= lengths[:, None] // 2) & (torch.arange(size)[:, None] % 2 == 1)
    token_type_ids = second_segment.long() * attention_mask  # (B, T): 0 segment A, 1 segment B
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "lengths": lengths}


def inputs(batch) -> tuple:
    return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]


def one_input(batch, k) -> tuple:
    """Example k alone, without its padding: (B, T) -> (1, length), three times."""
    length = int(batch["lengths"][k])
    return tuple(tensor[k:k + 1, :length] for tensor in inputs(batch))


@contextmanager
def rows_run(model):
    """Counts the examples (rows) each layer and each off-ramp runs on, while the block runs."""
    counts = {"layers": [0] * N_LAYERS, "off_ramps": [0] * N_LAYERS}

    def counter(kind, i):
        def hook(module, args, output):
            counts[kind][i] += args[0].shape[0]  # hidden (b, T, H): b examples ran here
        return hook

    modules = {"layers": model.encoder.layers, "off_ramps": model.off_ramps}
    handles = [module.register_forward_hook(counter(kind, i))
               for kind, modules_of_kind in modules.items() for i, module in enumerate(modules_of_kind)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def rows_expected(exit_layers) -> list:
    """Layer i (and off-ramp i) must run on exactly the examples that exit at layer i or later."""
    exit_layers = torch.as_tensor(exit_layers)
    return [int((exit_layers >= i).sum()) for i in range(1, N_LAYERS + 1)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is much faster than several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_deebert()


@pytest.fixture(scope="module")
def certain_model():
    return certain_deebert()


@pytest.fixture(scope="module")
def batch():
    return random_batch()


# ----------------------------------------------------------------------------------------------------
# Step 1: entropy


@pytest.mark.parametrize("C", [2, 3])
def test_step1_uniform_logits_have_entropy_ln_C(exercise, C):
    assert exercise.entropy(torch.zeros(C)).item() == pytest.approx(math.log(C), abs=1e-6)
    assert exercise.entropy(torch.full((C,), 7.5)).item() == pytest.approx(math.log(C), abs=1e-6)


def test_step1_worked_examples(exercise):
    assert exercise.entropy(torch.tensor([2.0, 0.0])).item() == pytest.approx(0.3653, abs=1e-4)  # p = 0.881
    assert exercise.entropy(torch.tensor([30.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-9)


def test_step1_huge_logits_give_no_nan(exercise):
    values = exercise.entropy(torch.tensor([[1e4, 0.0], [0.0, 1e30], [-1e4, 1e4], [1e4, 1e4]]))
    assert not values.isnan().any(), f"NaN in {values}: 0 * ln 0 must count as 0"
    assert values.tolist() == pytest.approx([0.0, 0.0, 0.0, math.log(2)], abs=1e-6)


def test_step1_entropy_is_over_the_classes_not_the_batch(exercise):
    """(B=2, C=3) -> (2,): a softmax over the batch dim mixes the examples (castorini/DeeBERT #18)."""
    values = exercise.entropy(torch.tensor([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]]))
    assert values.shape == (2,)
    assert values.tolist() == pytest.approx([math.log(3), 0.0025], abs=1e-4)


def test_step1_keeps_leading_dims_and_answers_in_float32(exercise):
    assert exercise.entropy(torch.zeros(5, 4, 2)).shape == (5, 4)
    half = torch.tensor([[2.0, 0.0], [0.5, 0.25]], dtype=torch.bfloat16)
    values = exercise.entropy(half)
    assert values.dtype == torch.float32, "compute the softmax in float32 (logits.float())"
    torch.testing.assert_close(values, package.entropy(half), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(64, 3), (4, 64, 2), (5, 6, 7, 3)], ids=["2-D", "3-D", "4-D"])
def test_step1_matches_the_package_on_random_logits_of_any_rank(exercise, shape):
    """Chapter 7 feeds entropy (N, n, C) logits: the classes are the last dim whatever the rank. A dim that depends
    on the rank, or torch's old implicit dim (softmax without dim=), is right in 1-D and 2-D and wrong here."""
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 5
    torch.testing.assert_close(exercise.entropy(logits), package.entropy(logits), atol=1e-6, rtol=0,
                               msg="softmax over the classes, dim=-1, for logits of any rank")


# ----------------------------------------------------------------------------------------------------
# Step 2: the loop, for one input


def test_step2_returns_an_ExitResult(exercise, model, batch):
    result = exercise.early_exit(model, *one_input(batch, 0), S=0.4)
    assert isinstance(result, ExitResult), "return deebert.exit.ExitResult(logits, exit_layer, entropies)"
    assert result.logits.shape == (2,), "logits of ONE input: (C,), e.g. z[0]"
    assert isinstance(result.exit_layer, int) and 1 <= result.exit_layer <= N_LAYERS
    assert len(result.entropies) == result.exit_layer and all(type(e) is float for e in result.entropies), \
        "entropies: one float (tensor.item()) per layer that ran"


def test_step2_S_zero_never_exits_early(exercise, model, certain_model, batch):
    """An entropy is never below 0; not even the certain model's first off-ramp, entropy exactly 0, exits."""
    for net in (model, certain_model):
        for k in range(10):
            result = exercise.early_exit(net, *one_input(batch, k), S=0.0)
            assert result.exit_layer == N_LAYERS, "exit only where entropy < S, strictly"
            assert len(result.entropies) == N_LAYERS


@pytest.mark.parametrize("S", ABOVE_LN_2, ids=ABOVE_LN_2_IDS)
def test_step2_S_above_ln_C_exits_at_layer_1(exercise, model, batch, S):
    for k in range(10):
        result = exercise.early_exit(model, *one_input(batch, k), S=S)
        assert result.exit_layer == 1 and len(result.entropies) == 1


@pytest.mark.parametrize("S", THRESHOLDS)
def test_step2_matches_the_package(exercise, model, batch, S):
    for k in range(N_INPUTS):
        yours = exercise.early_exit(model, *one_input(batch, k), S=S)
        expected = package.early_exit(model, *one_input(batch, k), S=S)
        assert yours.exit_layer == expected.exit_layer, f"input {k}: entropies {expected.entropies}, S = {S}"
        torch.testing.assert_close(yours.logits, expected.logits, atol=1e-6, rtol=0)
        assert yours.entropies == pytest.approx(expected.entropies, abs=1e-6)


@pytest.mark.parametrize("S", THRESHOLDS)
def test_step2_no_layer_runs_after_the_exit(exercise, model, batch, S):
    exit_layers = [package.early_exit(model, *one_input(batch, k), S=S).exit_layer for k in range(N_INPUTS)]
    with rows_run(model) as counts:
        for k in range(N_INPUTS):
            exercise.early_exit(model, *one_input(batch, k), S=S)
    assert counts["layers"] == rows_expected(exit_layers), "examples run per layer: stop at the exit"
    assert counts["off_ramps"] == rows_expected(exit_layers), "examples run per off-ramp: stop at the exit"


# ----------------------------------------------------------------------------------------------------
# Step 3: exit layers for any S, from one full pass


def logits_with_entropies(entropies) -> torch.Tensor:
    """(N, n) entropies of two classes -> (N, n, 2) logits [m, 0] whose entropies they are (bisected on m)."""
    target = torch.as_tensor(entropies, dtype=torch.float64)
    low, high = torch.zeros_like(target), torch.full_like(target, 40.0)
    for _ in range(80):
        middle = (low + high) / 2
        too_unsure = package.entropy(torch.stack([middle, torch.zeros_like(middle)], dim=-1)).double() > target
        low, high = torch.where(too_unsure, middle, low), torch.where(too_unsure, high, middle)
    return torch.stack([high, torch.zeros_like(high)], dim=-1).float()


def test_step3_worked_examples(exercise):
    all_logits = logits_with_entropies([[0.6, 0.2, 0.1], [0.05, 0.65, 0.65], [0.6, 0.6, 0.6]])
    assert exercise.entropy_exits(all_logits, 0.3).tolist() == [2, 1, 3]  # 1-based
    assert exercise.entropy_exits(all_logits, 0.01).tolist() == [3, 3, 3]  # the last layer answers
    assert exercise.entropy_exits(all_logits, 0.0).tolist() == [3, 3, 3]
    assert exercise.entropy_exits(all_logits, 1.0).tolist() == [1, 1, 1]


def test_step3_an_entropy_of_exactly_S_does_not_exit(exercise):
    sure = torch.tensor([[[1e4, 0.0]] * 3])  # (1, 3, 2): entropy exactly 0 at every layer
    assert exercise.entropy_exits(sure, 0.0).tolist() == [3], "exit only where entropy < S, strictly"


def test_step3_matches_the_package_on_the_model(exercise, model, batch):
    with torch.no_grad():
        every_off_ramp = torch.stack(model(*inputs(batch)), dim=1)  # n x (B, C) -> (B, n, C)
    for S in (0.0, 0.1, 0.3, 0.5, 0.7):
        expected = tradeoff.entropy_exits(every_off_ramp, S).tolist()
        assert torch.as_tensor(exercise.entropy_exits(every_off_ramp, S)).tolist() == expected


# ----------------------------------------------------------------------------------------------------
# Step 4: the expected saving


def test_step4_worked_examples(exercise):
    assert exercise.expected_saving([1, 2, 3, 3], 3) == pytest.approx(0.25), "the saving, 1 - 9/12, not the used 9/12"
    assert exercise.expected_saving(torch.tensor([12] * 5), 12) == pytest.approx(0.0)  # S = 0: nothing saved
    assert exercise.expected_saving([1] * 4, 12) == pytest.approx(11 / 12)


@pytest.mark.parametrize("S", THRESHOLDS)
def test_step4_matches_the_package_on_the_model(exercise, model, batch, S):
    exit_layers = package.early_exit_batch(model, *inputs(batch), S=S).exit_layers
    expected = tradeoff.expected_saving(exit_layers, N_LAYERS)
    assert float(exercise.expected_saving(exit_layers, N_LAYERS)) == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------------------------------
# Step 5: a batch, by compaction


def test_step5_returns_a_BatchExitResult(exercise, model, batch):
    result = exercise.early_exit_batch(model, *inputs(batch), S=0.4)
    assert isinstance(result, BatchExitResult), "return deebert.exit.BatchExitResult(logits, exit_layers, entropies)"
    assert result.logits.shape == (N_INPUTS, 2) and result.exit_layers.shape == (N_INPUTS,)
    assert result.exit_layers.dtype == torch.long and result.entropies.shape == (N_INPUTS, N_LAYERS)


def test_step5_S_zero_runs_every_layer_and_S_above_ln_C_only_the_first(exercise, model, certain_model, batch):
    for net in (model, certain_model):
        assert exercise.early_exit_batch(net, *inputs(batch), S=0.0).exit_layers.tolist() == [N_LAYERS] * N_INPUTS
    for S in ABOVE_LN_2:
        assert exercise.early_exit_batch(model, *inputs(batch), S=S).exit_layers.tolist() == [1] * N_INPUTS


@pytest.mark.parametrize("S", THRESHOLDS)
def test_step5_matches_the_package(exercise, model, batch, S):
    yours = exercise.early_exit_batch(model, *inputs(batch), S=S)
    expected = package.early_exit_batch(model, *inputs(batch), S=S)
    assert yours.exit_layers.tolist() == expected.exit_layers.tolist()
    torch.testing.assert_close(yours.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(yours.entropies, expected.entropies, atol=1e-5, rtol=0, equal_nan=True,
                               msg="entropies (B, n): NaN for the layers an example never reached")


@pytest.mark.parametrize("S", THRESHOLDS)
def test_step5_no_layer_runs_after_an_exit(exercise, model, batch, S):
    exit_layers = package.early_exit_batch(model, *inputs(batch), S=S).exit_layers
    with rows_run(model) as counts:
        exercise.early_exit_batch(model, *inputs(batch), S=S)
    assert counts["layers"] == rows_expected(exit_layers), "examples run per layer: exited ones must leave the batch"
    assert counts["off_ramps"] == rows_expected(exit_layers), "examples run per off-ramp: exited ones must leave"


# ----------------------------------------------------------------------------------------------------
# Step 6: the second training stage (section 3.1)


def training_batch(batch, size: int = 16) -> dict:
    generator = torch.Generator().manual_seed(3)
    return {**{name: batch[name][:size] for name in ("input_ids", "token_type_ids", "attention_mask")},
            "labels": torch.randint(0, 2, (size,), generator=generator)}


def test_step6_trains_every_off_ramp_but_the_last_and_nothing_else(exercise, model):
    yours = {id(p) for p in exercise.stage2_parameters(model)}
    expected = {id(p) for p in stages.stage2_parameters(model)}
    last = {id(p) for p in model.off_ramps[-1].parameters()}
    assert not yours & last, ("stage 2 must not train the last off-ramp f_n: stage 1 trained it with the backbone, "
                              "and freezing it keeps the full model exactly plain fine-tuned BERT (paper 3.1)")
    backbone = {id(p) for p in model.encoder.parameters()}
    assert not yours & backbone, "stage 2 freezes the backbone: the embeddings and layers are stage 1's (paper 3.1)"
    assert yours == expected, "stage 2 trains f_1 .. f_{n-1}: every parameter of every off-ramp but the last"


def test_step6_the_loss_sums_the_lower_off_ramps_losses(exercise, model, batch):
    data = training_batch(batch)
    with torch.no_grad():
        yours = float(exercise.stage2_loss(model, data))
        expected = float(stages.stage2_loss(model, data))
        hidden = model.encoder(data["input_ids"], data["token_type_ids"], data["attention_mask"])
        last = float(torch.nn.functional.cross_entropy(model.off_ramps[-1](hidden[-1], data["attention_mask"]),
                                                       data["labels"]))
    n = model.num_layers
    assert yours != pytest.approx(expected / (n - 1), abs=1e-6), (
        "the paper sums the off-ramps' losses, L_1 + ... + L_{n-1}; a mean divides each off-ramp's gradient by "
        "n - 1, a learning rate n - 1 times smaller (paper 3.1)")
    assert yours != pytest.approx(expected + last, abs=1e-6), (
        "L_n is stage 1's loss: stage 2 sums L_1 .. L_{n-1}, without the last off-ramp's (paper 3.1)")
    assert yours == pytest.approx(expected, abs=1e-5), "stage 2's loss: L_1 + ... + L_{n-1}, each a cross-entropy"


def test_step6_no_gradient_reaches_the_encoder(exercise, model, batch):
    """Even with every parameter trainable, the loss must not send gradients into the frozen backbone."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    try:
        exercise.stage2_loss(model, training_batch(batch)).backward()
        reached = [name for name, p in model.encoder.named_parameters() if p.grad is not None]
        ramps = [p.grad for p in stages.stage2_parameters(model)]
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
    assert not reached, (f"gradients reached the encoder ({reached[0]}, ...): compute the hidden states under "
                         "torch.no_grad(); the backbone is frozen in stage 2, and this also skips its backward pass")
    assert all(g is not None for g in ramps), "every off-ramp f_1 .. f_{n-1} must get a gradient"


# ----------------------------------------------------------------------------------------------------
# Step 7: another exit rule, patience (PABEE)

# Predictions per layer (n = 4) and PABEE's counter after each: [0, 0, 0, 1] -> 0, 1, 2, 0; [1, 0, 0, 0] -> 0, 0, 1, 2
PREDICTIONS = torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 1]])
PATIENCE = ("patience t means t + 1 off-ramps in a row agree: the counter counts agreements with the PREVIOUS "
            "off-ramp and the example exits when it reaches t, so t = 0 exits at layer 1 and t = 1 never before "
            "layer 2; an off-by-one here exits one layer early or late")


def one_hot_logits(predictions) -> torch.Tensor:
    return torch.nn.functional.one_hot(predictions, 2).float() * 5  # (N, n) -> (N, n, 2)


def test_step7_worked_examples(exercise):
    all_logits = one_hot_logits(PREDICTIONS)
    assert exercise.patience_exits(all_logits, 0).tolist() == [1, 1, 1], f"t = 0: {PATIENCE}"
    assert exercise.patience_exits(all_logits, 1).tolist() == [2, 3, 4], f"t = 1: {PATIENCE}"
    assert exercise.patience_exits(all_logits, 2).tolist() == [3, 4, 4], f"t = 2: {PATIENCE}"
    assert exercise.patience_exits(all_logits, 4).tolist() == [4, 4, 4], f"t >= n: the last layer answers; {PATIENCE}"


def test_step7_matches_the_package_on_random_logits(exercise):
    all_logits = torch.randn(200, 6, 3, generator=torch.Generator().manual_seed(5))
    for t in range(7):
        expected = tradeoff.patience_exits(all_logits, t).tolist()
        assert torch.as_tensor(exercise.patience_exits(all_logits, t)).tolist() == expected, f"t = {t}: {PATIENCE}"
