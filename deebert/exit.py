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
fails on a batch of more than one). `full_pass` runs every layer and off-ramp once; `exit_layers_from_entropies`
and `expected_saving` then read off where each example would exit for any S, and what that saves.

S = 0 never exits early (an entropy is never below 0): the full model. S > ln C always exits at layer 1
(an entropy over C classes is at most ln C). A negative S is refused, not silently "disabled"."""

import math
from contextlib import contextmanager
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


# --- Shared plumbing: evaluation mode, and a batch as the model's inputs --------------------------


@contextmanager
def evaluating(model):
    """Dropout off inside the block, then every module back in its mode (a forgotten model.eval() would make
    every entropy random). Only modules in training mode are switched, so stage 2's mixed modes survive."""
    training = [module for module in model.modules() if module.training]
    for module in training:
        module.training = False
    try:
        yield model
    finally:
        for module in training:
            module.training = True


def model_inputs(model, batch: dict) -> tuple:
    """A batch (the tokenizer's dict, or just {"input_ids": ...}) -> (input_ids, token_type_ids, attention_mask),
    each (B, T) on the model's device; absent ones default to segment A and no padding (kept as a mask of
    ones: mean-pooling off-ramps average over it)."""
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise DeeBertError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}; add a batch dim")
    device = next(model.parameters()).device
    token_type_ids = batch.get("token_type_ids")
    attention_mask = batch.get("attention_mask")
    token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    return input_ids.to(device), token_type_ids.to(device), attention_mask.to(device)


def _inputs(model, input_ids, token_type_ids, attention_mask) -> tuple:
    return model_inputs(model, {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask})


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
    The layers after the exit are never computed. Dropout is off inside (see `evaluating`)."""
    if input_ids.shape[0] != 1:
        raise DeeBertError(f"early_exit takes one input, got a batch of {input_ids.shape[0]}; use early_exit_batch")
    S = check_threshold(S)
    input_ids, token_type_ids, attention_mask = _inputs(model, input_ids, token_type_ids, attention_mask)
    n = model.num_layers
    with evaluating(model):
        mask = attention_mask_for(attention_mask)  # (1, 1, 1, T), or None when nothing is padded
        h = model.encoder.embeddings(input_ids, token_type_ids)  # (1, T, H)
        entropies = []
        for i in range(1, n + 1):
            h = model.encoder.layers[i - 1](h, mask)  # (1, T, H)
            z = model.off_ramps[i - 1](h, None if mask is None else attention_mask)  # (1, C): logits of off-ramp i
            e = entropy(z).item()  # a float32 value, as early_exit_batch compares
            entropies.append(e)
            if e < S:  # confident enough: exit here
                return ExitResult(z[0], i, entropies)
        return ExitResult(z[0], n, entropies)


# --- A batch: the same decision per example; the examples that exit leave the batch ---------------


@dataclass
class BatchExitResult:
    """Where each example of a batch left the model."""

    logits: torch.Tensor  # (B, C), each row from the off-ramp where that example exited
    exit_layers: torch.Tensor  # (B,) long, 1-based
    entropies: torch.Tensor  # (B, n) float32; NaN for the layers an example never reached


@torch.inference_mode()
def early_exit_batch(model, input_ids, token_type_ids=None, attention_mask=None, S: float = 0.0) -> BatchExitResult:
    """Early exit for a batch (B, T), with exactly the per-example decisions of `early_exit`.

    At each layer only the examples still running go through the layer and its off-ramp. Those that
    exit write their logits and exit layer into the outputs, at their original position; the rest are
    gathered into a smaller batch for the next layer, cut to the length of its longest example (with
    right padding, the columns past it are padding for everyone left). No layer runs on an exited example.
    Results agree with `early_exit` on each example alone up to float rounding (padding changes the order
    of a few additions): ~1e-6 in float32, so an entropy within ~1e-6 of S could fall either way; in bf16
    the two differ by up to ~6e-3 (measured), and near S they may decide differently.
    """
    S = check_threshold(S)
    input_ids, token_type_ids, attention_mask = _inputs(model, input_ids, token_type_ids, attention_mask)
    B, n, device = input_ids.shape[0], model.num_layers, input_ids.device
    logits = None  # (B, C), created at layer 1 in the off-ramps' output dtype (bf16 under autocast)
    exit_layers = torch.full((B,), n, dtype=torch.long, device=device)
    entropies = torch.full((B, n), float("nan"), device=device)
    with evaluating(model):
        active = torch.arange(B, device=device)  # original positions of the examples still running
        mask = attention_mask_for(attention_mask)  # (B, 1, 1, T), or None when nothing is padded
        h = model.encoder.embeddings(input_ids, token_type_ids)  # (B, T, H)
        for i in range(1, n + 1):
            h = model.encoder.layers[i - 1](h, mask)  # (b, T, H)
            z = model.off_ramps[i - 1](h, None if mask is None else attention_mask)  # (b, C)
            e = entropy(z)  # (b,)
            if logits is None:
                logits = torch.empty(B, z.shape[1], dtype=z.dtype, device=device)
            entropies[active, i - 1] = e
            stays = ~(e.double() < S) if i < n else torch.zeros_like(e, dtype=torch.bool)  # exit where e < S
            # The one host-device sync of the layer: how many stay, and the longest and shortest of them.
            lengths = attention_mask.sum(dim=1)  # (b,)
            counts = [stays.sum(), torch.where(stays, lengths, 0).max(), torch.where(stays, lengths, h.shape[1]).min()]
            n_stay, longest, shortest = torch.stack(counts).tolist()
            order = torch.argsort(stays.int(), stable=True)  # (b,): those that exit first, then those that stay
            leave, stay = order[: len(order) - n_stay], order[len(order) - n_stay :]
            logits[active[leave]] = z[leave]  # back to their original positions
            exit_layers[active[leave]] = i
            if n_stay == 0:
                break
            # (b, T, H) -> (b', T', H): the examples that stay, without the columns only padding fills
            h, attention_mask, active = h[stay, :longest], attention_mask[stay, :longest], active[stay]
            mask = None if shortest == longest else attention_mask.bool()[:, None, None, :]
    return BatchExitResult(logits, exit_layers, entropies)


# --- Every layer at once: the full model, and every off-ramp for the sweep ------------------------


@torch.inference_mode()
def full_model_logits(model, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
    """Plain fine-tuned BERT, the baseline the paper times against: every layer, only the LAST off-ramp: (B, C).
    (model(...) would also run the n - 1 lower off-ramps, which a plain BERT classifier does not have.)"""
    input_ids, token_type_ids, attention_mask = _inputs(model, input_ids, token_type_ids, attention_mask)
    with evaluating(model):
        hidden = model.encoder(input_ids, token_type_ids, attention_mask)[-1]  # (B, T, H) of layer n
        return model.off_ramps[-1](hidden, attention_mask)  # (B, C)


@torch.inference_mode()
def full_pass(model, batches) -> tuple:
    """Every layer and every off-ramp on every example: (logits (N, n, C) float32 on the CPU, labels (N,)), in the
    examples' own order (each batch's "index") however the batches were cut; labels -1 where there are none."""
    rows, all_logits, all_labels = [], [], []
    with evaluating(model):
        for batch in batches:
            per_layer = model(*model_inputs(model, batch))  # n tensors (B, C)
            all_logits.append(torch.stack(per_layer, dim=1).float().cpu())  # n x (B, C) -> (B, n, C)
            all_labels.append(batch.get("labels", torch.full((len(per_layer[0]),), -1)).cpu())
            rows.append(batch["index"])  # (B,): where these examples stand among all of them
    if not all_logits:
        raise DeeBertError("full_pass got no batches; pass at least one example")
    order = torch.cat(rows).argsort()  # batch order -> the examples' own order
    return torch.cat(all_logits)[order], torch.cat(all_labels)[order]


def exit_many(model, batches, S: float) -> list:
    """Early exit over many batches: the paper's one-input loop for a batch of one, else the batched loop.
    Returns one BatchExitResult per batch (a one-input result is wrapped as a batch of one)."""
    results = []
    for batch in batches:
        inputs = model_inputs(model, batch)
        if inputs[0].shape[0] > 1:
            results.append(early_exit_batch(model, *inputs, S=S))
            continue
        one = early_exit(model, *inputs, S=S)
        entropies = torch.tensor([one.entropies + [math.nan] * (model.num_layers - one.exit_layer)])  # (1, n)
        results.append(BatchExitResult(one.logits[None], torch.tensor([one.exit_layer]), entropies))
    return results


# --- From a full pass: where each example would exit, and what that saves -------------------------


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
    """The fraction of layer computations saved: 1 - sum_i i * N_i / (n * N) (paper section 4.3).

    N_i examples exit at layer i, out of N; sum_i i * N_i is simply the sum of the exit layers.
    expected_saving([1, 2, 3, 3], 3) = 1 - 9 / 12 = 0.25. 0 means nothing was saved (S = 0).
    (The authors' script printed the *used* fraction, 9 / 12 here, under this name.)
    """
    exit_layers = torch.as_tensor(exit_layers)
    if exit_layers.numel() == 0 or int(exit_layers.min()) < 1 or int(exit_layers.max()) > num_layers:
        raise DeeBertError(f"exit layers must be one or more of 1..{num_layers} (1-based); got {exit_layers.tolist()[:5]}")
    used_fraction = float(exit_layers.sum()) / (num_layers * exit_layers.numel())
    return 1.0 - used_fraction
