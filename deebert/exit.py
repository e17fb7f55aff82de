"""Early exit at inference: the per-layer entropy check of DeeBERT (Xin et al. 2020, section 3.2, Algorithm 1).

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
every example of a batch: those that exit leave the batch, the others go on (the authors' `if entropy < S`
fails on a batch of more than one). Both want the model in eval mode and their inputs on its device.

S = 0 never exits early (an entropy is never below 0): the full model. S > ln C always exits at layer 1
(an entropy over C classes is at most ln C). A negative S is refused, not silently "disabled".
What one full pass tells about every S at once lives in tradeoff.py."""

import math
from dataclasses import dataclass

import torch

from deebert.errors import DeeBertError
from deebert.model import attention_mask_for

# --- Entropy and the threshold --------------------------------------------------------------------


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum_c p_c ln p_c over the last dim, p = softmax(logits): (..., C) -> (...), in nats, float32.

    entropy([[0., 0.]]) = [ln 2 = 0.693] (uniform: the least confident), entropy([[1e4, 0.]]) = [0.].
    torch.special.entr(p) is -p ln p with the limit 0 at p = 0, so huge logits give no NaN (0 * -inf).
    Computed in float32 even for a bf16/fp16 model, so the comparison with S is not rounded to 3 digits.
    """
    p = logits.float().softmax(dim=-1)  # over the classes (the last dim), never over the batch
    return torch.special.entr(p).sum(dim=-1)


def check_threshold(S) -> float:
    """S as a float >= 0, or one line of DeeBertError (the authors' S = -1 silently disabled exiting)."""
    try:
        S = float(S)
    except (TypeError, ValueError):
        raise DeeBertError(f"threshold S = {S!r} is not a number; give thresholds such as 0.4") from None
    if math.isnan(S) or S < 0:
        raise DeeBertError(f"threshold S = {S} must be a number >= 0; S = 0 is the full model, larger S exits earlier")
    return S


def check_eval_mode(model) -> None:
    """Dropout would make every entropy random: early exit runs a model in eval mode only."""
    if model.training:
        raise DeeBertError("the model is in training mode (dropout on); call model.eval() before early exit")


# --- One input: the loop of the paper -------------------------------------------------------------


@dataclass
class ExitResult:
    """Where one input left the model, and what the off-ramp there said."""

    logits: torch.Tensor  # (C,) of the off-ramp that answered
    exit_layer: int  # 1-based: 1 is the first transformer layer, n the last
    entropies: list  # one float per layer that ran: len(entropies) == exit_layer


@torch.inference_mode()
def early_exit(model, input_ids, token_type_ids=None, attention_mask=None, S: float = 0.0) -> ExitResult:
    """Run ONE input (tensors of shape (1, T)) up to the first layer whose off-ramp has entropy below S.
    The layers after the exit are never computed."""
    if input_ids.shape[0] != 1:
        raise DeeBertError(f"early_exit takes one input, got a batch of {input_ids.shape[0]}; use early_exit_batch")
    S = check_threshold(S)
    check_eval_mode(model)
    mask = attention_mask_for(attention_mask)  # (1, 1, 1, T), or None when nothing is padded
    h = model.encoder.embeddings(input_ids, token_type_ids)  # (1, T, H)
    entropies = []
    for i in range(1, model.num_layers + 1):
        h = model.encoder.layers[i - 1](h, mask)  # (1, T, H)
        z = model.off_ramps[i - 1](h, attention_mask)  # (1, C): logits of off-ramp i
        entropies.append(entropy(z).item())  # a Python float: compared with S in double precision
        if entropies[-1] < S:  # confident enough: exit here
            return ExitResult(z[0], i, entropies)
    return ExitResult(z[0], model.num_layers, entropies)


# --- A batch: the same decision per example; the examples that exit leave the batch ---------------


@dataclass
class BatchExitResult:
    """Where each example of a batch left the model."""

    logits: torch.Tensor  # (B, C) float32, each row from the off-ramp where that example exited
    exit_layers: torch.Tensor  # (B,) long, 1-based
    entropies: torch.Tensor  # (B, n) float32; NaN for the layers an example never reached


@torch.inference_mode()
def early_exit_batch(model, input_ids, token_type_ids=None, attention_mask=None, S: float = 0.0) -> BatchExitResult:
    """Early exit for a batch (B, T), with exactly the per-example decisions of `early_exit`.

    At each layer only the examples still running go through the layer and its off-ramp. Those that
    exit write their logits and exit layer into the outputs, at their original position; the rest form a
    smaller batch for the next layer. No layer runs on an example that has exited.
    Results agree with `early_exit` on each example alone up to float rounding (padding changes the order
    of a few additions): ~1e-6 in float32, so an entropy within ~1e-6 of S could fall either way; in bf16
    the two differ by up to ~6e-3 (measured), and near S they may decide differently.
    """
    S = check_threshold(S)
    check_eval_mode(model)
    B = input_ids.shape[0]
    n = model.num_layers
    device = input_ids.device
    logits = torch.empty(B, model.config.num_labels, device=device)
    exit_layers = torch.full((B,), n, dtype=torch.long, device=device)
    entropies = torch.full((B, n), math.nan, device=device)
    running = torch.arange(B, device=device)  # the original positions of the examples still running
    h = model.encoder.embeddings(input_ids, token_type_ids)  # (B, T, H)
    for i in range(1, n + 1):
        h = model.encoder.layers[i - 1](h, attention_mask_for(attention_mask))  # (b, T, H)
        z = model.off_ramps[i - 1](h, attention_mask)  # (b, C): logits of off-ramp i
        e = entropy(z)  # (b,)
        entropies[running, i - 1] = e
        exits = e.double() < S if i < n else torch.ones_like(e, dtype=torch.bool)  # compared as early_exit does
        leaving = running[exits]  # the original positions of the examples that exit here
        logits[leaving] = z[exits].float()  # float32, as the entropies, whatever the model computes in
        exit_layers[leaving] = i
        stays = ~exits
        if not stays.any():
            break
        running, h = running[stays], h[stays]  # (b, T, H) -> (b', T, H): only those that stay go on
        if attention_mask is not None:
            attention_mask = attention_mask[stays]  # (b, T) -> (b', T)
    return BatchExitResult(logits, exit_layers, entropies)
