"""Solutions to the exercises: DeeBERT's inference (Xin et al. 2020, section 3.2, Algorithm 1), its expected
saving (section 4.3), the second training stage (section 3.1) and one later exit rule (PABEE), written to be read.

deebert/ does the same with more care (thresholds checked, one-line errors); these are the plain versions.
Check them with

    DEEBERT_EXERCISE=solutions python -m pytest -q tutorial/exercises/check.py

Shapes: B batch, T tokens, H hidden size, C classes, n layers, N examples.
"""

import torch
import torch.nn.functional as F

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
# Step 3: exit layers for any S, from one full pass


def entropy_exits(all_logits, S):
    """(N, n, C) logits of every off-ramp -> (N,) 1-based exit layers: the first layer with entropy < S, else n."""
    below = entropy(all_logits).double() < S  # (N, n, C) -> (N, n): confident enough at that layer?
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
    B = input_ids.shape[0]
    n = model.num_layers
    logits = torch.empty(B, model.config.num_labels)
    exit_layers = torch.full((B,), n)
    entropies = torch.full((B, n), float("nan"))  # NaN: a layer the example never reached
    running = torch.arange(B)  # the original positions of the examples still running
    h = model.encoder.embeddings(input_ids, token_type_ids)  # (B, T) -> (B, T, H)
    for i in range(1, n + 1):
        h = model.encoder.layers[i - 1](h, attention_mask_for(attention_mask))  # (b, T, H)
        z = model.off_ramps[i - 1](h, attention_mask)  # (b, T, H) -> (b, C)
        e = entropy(z)  # (b, C) -> (b,)
        entropies[running, i - 1] = e
        exits = e.double() < S  # (b,): compared in float64, as early_exit's Python floats are
        if i == n:
            exits[:] = True  # the last off-ramp answers for everyone still running
        logits[running[exits]] = z[exits]  # back to their original positions
        exit_layers[running[exits]] = i
        stays = ~exits
        if not stays.any():
            break
        # (b, T, H) -> (b', T, H): only the examples that stay go on to layer i + 1
        h, attention_mask, running = h[stays], attention_mask[stays], running[stays]
    return BatchExitResult(logits, exit_layers, entropies)


# ----------------------------------------------------------------------------------------------------
# Step 6: the second training stage (section 3.1)


def stage2_parameters(model):
    """What stage 2 trains: the off-ramps f_1 .. f_{n-1}. The last off-ramp and the backbone are stage 1's."""
    return [p for ramp in model.off_ramps[:-1] for p in ramp.parameters()]


def stage2_loss(model, batch):
    """L_1 + ... + L_{n-1}: the sum of the lower off-ramps' cross-entropies on the frozen backbone's hidden states."""
    with torch.no_grad():  # the backbone is frozen: no gradient may reach it
        hidden_states = model.encoder(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    losses = [F.cross_entropy(ramp(h, batch["attention_mask"]), batch["labels"])
              for ramp, h in zip(model.off_ramps[:-1], hidden_states[:-1])]  # n - 1 losses: not the last off-ramp
    return sum(losses)  # the paper sums them


# ----------------------------------------------------------------------------------------------------
# Step 7: another exit rule, patience (PABEE)


def patience_exits(all_logits, t):
    """(N, n, C) logits -> (N,) 1-based exit layers: exit once t + 1 off-ramps in a row predict the same class.

    PABEE's counter: it grows by one each time an off-ramp's prediction equals the previous off-ramp's, and falls
    back to 0 otherwise; exit at the first layer where it reaches t (t = 0: layer 1), else at the last layer n.
    """
    predictions = all_logits.argmax(dim=-1)  # (N, n, C) -> (N, n)
    N, n = predictions.shape
    exit_layers = torch.full((N,), n)
    for k in range(N):
        counter = 0
        for i in range(1, n + 1):  # layer i is predictions[k, i - 1]
            if i > 1:
                counter = counter + 1 if predictions[k, i - 1] == predictions[k, i - 2] else 0
            if counter >= t:
                exit_layers[k] = i
                break
    return exit_layers
