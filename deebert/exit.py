"""Early exit at inference: the per-layer entropy check of DeeBERT (Xin et al. 2020, section 2, "Inference").

After every layer i, off-ramp i classifies; if its prediction is confident enough, that is, if the entropy
of its softmax is below the threshold S, the answer is taken there and the layers above are never run:

    h = embeddings(x)
    for i in 1..n:
        h = L_i(h)
        z = f_i(h)                      # logits of off-ramp i
        if entropy(softmax(z)) < S:     # confident enough: exit here
            return z, i
    return z, n

`early_exit` is that loop, line for line, for one input. `early_exit_batch` takes the same decision for
every example of a batch: the examples that exit leave the batch, the others go on to the next layer
(the existing implementations cannot do this; their `if entropy < S` fails on a batch of more than one).
`exit_layers_from_entropies` and `expected_saving` serve the cheap sweep of `tradeoff.py`: run every layer
once, then read off where each example would have exited for any S.

S = 0 never exits early (an entropy is never below 0): the full model. S > ln C always exits at layer 1
(an entropy over C classes is at most ln C). A negative S is refused, not silently "disabled".
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from deebert.errors import DeeBertError
from deebert.model import attention_mask_for

# ----------------------------------------------------------------------------------------------------
# Entropy and the threshold


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum_c p_c ln p_c over the last dim, p = softmax(logits): (..., C) -> (...), in nats, float32.

    entropy([[0., 0.]]) = [ln 2 = 0.693] (uniform: the least confident), entropy([[1e4, 0.]]) = [0.].
    torch.special.entr(p) is -p ln p with the limit 0 at p = 0, so huge logits give no NaN (0 * -inf).
    Computed in float32 even for a bf16/fp16 model, so the comparison with S is not rounded to 3 digits.
    """
    p = logits.float().softmax(dim=-1)  # over the classes (the last dim), never over the batch
    return torch.special.entr(p).sum(dim=-1)


def check_threshold(S: float) -> float:
    """S as a float, or a DeeBertError for a negative or NaN threshold (the authors' S = -1 silently disabled exiting)."""
    S = float(S)
    if math.isnan(S) or S < 0:
        raise DeeBertError(f"threshold S = {S} must be a number >= 0; S = 0 is the full model, larger S exits earlier")
    return S


# ----------------------------------------------------------------------------------------------------
# Shared plumbing: the model's device, evaluation mode, default inputs


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def evaluating(model):
    """Dropout off inside the block; afterwards every module is back in the mode it was in.

    The exit functions use this instead of asking the caller for model.eval(): a forgotten eval() would
    leave dropout on and make every entropy random. Only the modules in training mode are switched (and
    switched back), so a model already in eval mode pays nothing, and a model whose backbone is in eval
    mode while its off-ramps train (stage 2) stays exactly that way.
    """
    training = [module for module in model.modules() if module.training]
    for module in training:
        module.training = False
    try:
        yield model
    finally:
        for module in training:
            module.training = True


def prepare_inputs(model, input_ids, token_type_ids=None, attention_mask=None) -> tuple:
    """Fill the defaults (segment A everywhere, no padding) and move the (B, T) tensors to the model's device.

    The attention mask is kept even without padding: mean-pooling off-ramps average over it.
    """
    if input_ids.dim() != 2:
        raise DeeBertError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}; add a batch dim")
    device = model_device(model)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids.to(device), token_type_ids.to(device), attention_mask.to(device)


# ----------------------------------------------------------------------------------------------------
# One input: the loop of the paper


@dataclass
class ExitResult:
    """Where one input left the model, and what the off-ramp there said."""

    logits: torch.Tensor  # (C,) of the off-ramp that answered
    exit_layer: int  # 1-based: 1 is the first transformer layer, n the last
    entropies: list  # one float per layer that ran: len(entropies) == exit_layer

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.float().softmax(dim=-1)  # (C,)

    @property
    def label(self) -> int:
        return int(self.logits.argmax())


@torch.inference_mode()
def early_exit(model, input_ids, token_type_ids=None, attention_mask=None, S: float = 0.0) -> ExitResult:
    """Run ONE input (tensors of shape (1, T)) up to the first layer whose off-ramp has entropy below S.

    The layers after the exit are never computed. Dropout is off inside (see `evaluating`).
    """
    if input_ids.shape[0] != 1:
        raise DeeBertError(f"early_exit takes one input, got a batch of {input_ids.shape[0]}; use early_exit_batch")
    S = check_threshold(S)
    input_ids, token_type_ids, attention_mask = prepare_inputs(model, input_ids, token_type_ids, attention_mask)
    n = model.num_layers
    with evaluating(model):
        mask = attention_mask_for(attention_mask)  # (1, 1, 1, T), or None when nothing is padded
        h = model.encoder.embeddings(input_ids, token_type_ids)  # (1, T, H)
        entropies = []
        for i in range(1, n + 1):
            h = model.encoder.layers[i - 1](h, mask)  # (1, T, H)
            z = model.off_ramps[i - 1](h, attention_mask)  # (1, C): logits of off-ramp i
            e = entropy(z).item()  # a float32 value, as early_exit_batch compares
            entropies.append(e)
            if e < S:  # confident enough: exit here
                return ExitResult(z[0], i, entropies)
        return ExitResult(z[0], n, entropies)


# ----------------------------------------------------------------------------------------------------
# A batch: the same decision per example; the examples that exit leave the batch


@dataclass
class BatchExitResult:
    """Where each example of a batch left the model."""

    logits: torch.Tensor  # (B, C), each row from the off-ramp where that example exited
    exit_layers: torch.Tensor  # (B,) long, 1-based
    entropies: torch.Tensor  # (B, n) float32; NaN for the layers an example never reached

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.float().softmax(dim=-1)  # (B, C)

    @property
    def labels(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)  # (B,)


def trim_padding(h, attention_mask) -> tuple:
    """Drop the trailing token columns that no example in the batch uses any more.

    After the longest examples exit, the rest may all be shorter: with right padding (BERT's), their
    padding columns at the end are dead weight in every remaining layer. (b, T, H) -> (b, T', H).
    """
    used = attention_mask.any(dim=0)  # (T,): True where at least one example has a token
    T_used = int(used.nonzero().max()) + 1  # one past the last used column
    return h[:, :T_used], attention_mask[:, :T_used]


@torch.inference_mode()
def early_exit_batch(model, input_ids, token_type_ids=None, attention_mask=None, S: float = 0.0) -> BatchExitResult:
    """Early exit for a batch (B, T), with exactly the per-example decisions of `early_exit`.

    At each layer only the examples still running go through the layer and its off-ramp. Those that
    exit write their logits and exit layer into the outputs, at their original position; the rest are
    gathered into a smaller batch for the next layer. No layer ever runs on an example that has exited.
    Results agree with `early_exit` on each example alone up to float rounding (padding changes the
    order of a few additions; ~1e-6), so an entropy within ~1e-6 of S could in principle fall either way.
    """
    S = check_threshold(S)
    input_ids, token_type_ids, attention_mask = prepare_inputs(model, input_ids, token_type_ids, attention_mask)
    B, n, device = input_ids.shape[0], model.num_layers, input_ids.device
    C, dtype = model.off_ramps[-1].classifier.out_features, model.off_ramps[-1].classifier.weight.dtype
    logits = torch.empty(B, C, dtype=dtype, device=device)  # every row is written when its example exits
    exit_layers = torch.full((B,), n, dtype=torch.long, device=device)
    entropies = torch.full((B, n), float("nan"), device=device)
    with evaluating(model):
        active = torch.arange(B, device=device)  # original positions of the examples still running
        h = model.encoder.embeddings(input_ids, token_type_ids)  # (B, T, H)
        for i in range(1, n + 1):
            mask = attention_mask_for(attention_mask)  # (b, 1, 1, T); None once no padding is left
            h = model.encoder.layers[i - 1](h, mask)  # (b, T, H)
            z = model.off_ramps[i - 1](h, attention_mask)  # (b, C)
            e = entropy(z)  # (b,)
            entropies[active, i - 1] = e
            exits = e.double() < S  # (b,): confident enough, exit here (in float64, as early_exit compares)
            if i == n:
                exits[:] = True  # the last off-ramp answers for everyone still running
            logits[active[exits]] = z[exits]  # back to the original positions
            exit_layers[active[exits]] = i
            if bool(exits.all()):  # nobody left: stop
                break
            if bool(exits.any()):  # some exited (else nothing to regroup): the rest go on, (b, T, H) -> (b', T, H)
                stay = ~exits
                h, attention_mask, active = h[stay], attention_mask[stay], active[stay]
                h, attention_mask = trim_padding(h, attention_mask)  # (b', T, H) -> (b', T', H)
    return BatchExitResult(logits, exit_layers, entropies)


# ----------------------------------------------------------------------------------------------------
# From a full pass: where each example would exit, and what that saves


def exit_layers_from_entropies(entropies, S: float) -> torch.Tensor:
    """(N, n) entropies of every off-ramp -> (N,) 1-based exit layers: the first layer with entropy < S, else n.

    Gives the same exit layers as the loop, without running it again for every S:
    exit_layers_from_entropies([[0.6, 0.2, 0.1]], S=0.3) -> [2]; with S=0.05 -> [3] (the last layer answers).
    """
    S = check_threshold(S)
    below = torch.as_tensor(entropies).double() < S  # (N, n), compared as the loops compare; NaN is never below
    below[:, -1] = True  # the last off-ramp answers whatever its entropy
    return below.int().argmax(dim=1) + 1  # argmax returns the FIRST maximum: the first confident layer


def expected_saving(exit_layers, num_layers: int) -> float:
    """The fraction of layer computations saved: 1 - sum_i i * N_i / (n * N) (paper section 4).

    N_i examples exit at layer i, out of N; sum_i i * N_i is simply the sum of the exit layers.
    expected_saving([1, 2, 3, 3], 3) = 1 - 9 / 12 = 0.25. 0 means nothing was saved (S = 0).
    (The authors' script printed the *used* fraction, 9 / 12 here, under this name.)
    """
    exit_layers = torch.as_tensor(exit_layers)
    if exit_layers.numel() == 0:
        raise DeeBertError("expected_saving got no exit layers; pass at least one example")
    if int(exit_layers.min()) < 1 or int(exit_layers.max()) > num_layers:
        raise DeeBertError(f"exit layers must lie in 1..{num_layers} (1-based); got {exit_layers.tolist()[:5]}...")
    used_fraction = float(exit_layers.sum()) / (num_layers * exit_layers.numel())
    return 1.0 - used_fraction
