"""Solutions to the early-exit exercises: DeeBERT's inference (Xin et al. 2020, section 3.2, Algorithm 1)
and its expected saving (section 4.3), written to be read.

deebert/exit.py does the same with more care (thresholds validated, dropout switched off for you,
padding columns trimmed, bf16); these are the plain versions. Check them with

    DEEBERT_EXERCISE=solutions python -m pytest -q tutorial/exercises/check.py

Shapes: B batch, T tokens, H hidden size, C classes, n layers, N examples.
"""

import torch

from deebert.exit import BatchExitResult, ExitResult
from deebert.model import attention_mask_for

# ----------------------------------------------------------------------------------------------------
# Step 1: entropy


def entropy(logits):
    """-sum_c p_c ln p_c over the last dim, p = softmax(logits): (..., C) -> (...), float32, in nats."""
    p = logits.float().softmax(dim=-1)  # (..., C): probabilities over the classes, in float32
    # torch.special.entr(p) is -p ln p, and 0 where p = 0: no 0 * ln 0 = 0 * -inf = NaN for huge logits.
    return torch.special.entr(p).sum(dim=-1)  # (..., C) -> (...)


# ----------------------------------------------------------------------------------------------------
# Step 2: the loop of Algorithm 1, for one input


@torch.no_grad()
def early_exit(model, input_ids, token_type_ids, attention_mask, S):
    """ONE input (tensors (1, T)) up to the first layer whose off-ramp has entropy < S: an ExitResult."""
    n = model.num_layers
    mask = attention_mask_for(attention_mask)  # (1, T) -> (1, 1, 1, T) for attention; None without padding
    h = model.encoder.embeddings(input_ids, token_type_ids)  # (1, T) -> (1, T, H)
    entropies = []
    for i in range(1, n + 1):  # 1-based like the paper; the ModuleLists are 0-based
        h = model.encoder.layers[i - 1](h, mask)  # (1, T, H)
        z = model.off_ramps[i - 1](h, attention_mask)  # (1, T, H) -> (1, C): the logits of off-ramp i
        e = entropy(z).item()  # (1,) -> a float
        entropies.append(e)
        if e < S:  # confident enough: exit here
            return ExitResult(z[0], i, entropies)
    return ExitResult(z[0], n, entropies)  # nobody was confident: the last off-ramp answers


# ----------------------------------------------------------------------------------------------------
# Step 3: exit layers from the entropies of every off-ramp


def exit_layers_from_entropies(entropies, S):
    """(N, n) entropies -> (N,) 1-based exit layers: the first layer with entropy < S, else n."""
    below = torch.as_tensor(entropies).double() < S  # (N, n): confident enough at that layer?
    below[:, -1] = True  # the last off-ramp answers whatever its entropy
    first = below.int().argmax(dim=1)  # (N, n) -> (N,): argmax returns the FIRST maximum, 0-based
    return first + 1  # 1-based layers


# ----------------------------------------------------------------------------------------------------
# Step 4: the expected saving


def expected_saving(exit_layers, num_layers):
    """1 - sum_i i * N_i / (n * N): the fraction of layer computations saved (0 for the full model)."""
    exit_layers = torch.as_tensor(exit_layers)  # (N,)
    layers_run = float(exit_layers.sum())  # sum_i i * N_i: the sum of the exit layers
    layers_of_the_full_model = num_layers * exit_layers.numel()  # n * N
    used_fraction = layers_run / layers_of_the_full_model
    return 1.0 - used_fraction


# ----------------------------------------------------------------------------------------------------
# Step 5: a batch, by compaction


@torch.no_grad()
def early_exit_batch(model, input_ids, token_type_ids, attention_mask, S):
    """A batch (B, T) with the decisions early_exit takes for each example alone: a BatchExitResult.

    After each layer the examples that exit write their answer at their original position and leave;
    only the others go on to the next layer.
    """
    B, n, device = input_ids.shape[0], model.num_layers, input_ids.device
    logits = None  # (B, C), made once the first off-ramp tells us C
    exit_layers = torch.full((B,), n, dtype=torch.long, device=device)
    entropies = torch.full((B, n), float("nan"), device=device)  # NaN: a layer the example never reached
    active = torch.arange(B, device=device)  # original positions of the examples still running
    h = model.encoder.embeddings(input_ids, token_type_ids)  # (B, T) -> (B, T, H)
    for i in range(1, n + 1):
        mask = attention_mask_for(attention_mask)  # (b, T) -> (b, 1, 1, T), or None without padding
        h = model.encoder.layers[i - 1](h, mask)  # (b, T, H)
        z = model.off_ramps[i - 1](h, attention_mask)  # (b, T, H) -> (b, C)
        e = entropy(z)  # (b, C) -> (b,)
        if logits is None:
            logits = torch.empty(B, z.shape[1], dtype=z.dtype, device=device)
        entropies[active, i - 1] = e
        exits = e.double() < S  # (b,): compared in float64, as early_exit's Python floats are
        if i == n:
            exits[:] = True  # the last off-ramp answers for everyone still running
        logits[active[exits]] = z[exits]  # back to their original positions
        exit_layers[active[exits]] = i
        stay = ~exits
        if not stay.any():
            break
        # (b, T, H) -> (b', T, H): only the examples that stay go on to layer i + 1
        h, attention_mask, active = h[stay], attention_mask[stay], active[stay]
    return BatchExitResult(logits, exit_layers, entropies)
