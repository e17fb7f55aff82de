"""Your DeeBERT: fill in the functions, one step at a time (see README.md in this folder).

Each step is checked against the package's own code, on a tiny random DeeBERT:

    python -m pytest -q tutorial/exercises/check.py -k step1      # then step2, ..., step7

Shapes: B batch, T tokens, H hidden size, C classes, n layers, N examples.
The answers are in solutions.py; try first.
"""

import torch
import torch.nn.functional as F

from deebert.exit import BatchExitResult, ExitResult
from deebert.model import attention_mask_for

# ----------------------------------------------------------------------------------------------------
# Step 1: entropy


def entropy(logits):
    """-sum_c p_c ln p_c over the last dim, p = softmax(logits): (..., C) -> (...), float32, in nats.

    entropy(torch.zeros(2)) = ln 2 = 0.6931 (uniform: the least confident);
    entropy(torch.tensor([2.0, 0.0])) = 0.3653; entropy(torch.tensor([1e4, 0.0])) = 0.0, not NaN.
    A batch (B, C) gives (B,), and (N, n, C) gives (N, n): one entropy per row, over its own C classes.
    """
    raise NotImplementedError("step 1: write entropy(logits), -sum p ln p over the last dim")


# ----------------------------------------------------------------------------------------------------
# Step 2: the loop of Algorithm 1, for one input


def early_exit(model, input_ids, token_type_ids, attention_mask, S):
    """ONE input (tensors (1, T)) up to the first layer whose off-ramp has entropy < S: an ExitResult.

    The pieces: model.encoder.embeddings(input_ids, token_type_ids) -> (1, T, H);
    model.encoder.layers[i](h, mask) with mask = attention_mask_for(attention_mask);
    model.off_ramps[i](h, attention_mask) -> (1, C) logits. (i is 0-based here, 1-based in the paper.)
    Return ExitResult(logits (C,), exit_layer (1-based int), entropies (a list of floats, one per layer
    that ran)). Strictly entropy < S; no layer after the exit may run. The model is in eval mode.
    """
    raise NotImplementedError("step 2: write early_exit, the loop of Algorithm 1 for one input")


# ----------------------------------------------------------------------------------------------------
# Step 3: exit layers for any S, from one full pass


def entropy_exits(all_logits, S):
    """(N, n, C) logits of every off-ramp -> (N,) 1-based exit layers: the first layer with entropy < S, else n.

    For logits whose entropies are [[0.6, 0.2, 0.1]]: S = 0.3 -> tensor([2]);
    S = 0.05 -> tensor([3]) (nobody confident: the last layer answers).
    """
    raise NotImplementedError("step 3: write entropy_exits, the first layer with entropy < S")


# ----------------------------------------------------------------------------------------------------
# Step 4: the expected saving


def expected_saving(exit_layers, num_layers):
    """1 - sum_i i * N_i / (n * N): the fraction of layer computations saved, a float.

    N_i of the N examples exit at layer i. expected_saving([1, 2, 3, 3], 3) = 1 - 9/12 = 0.25;
    0.0 when every example runs every layer (S = 0).
    """
    raise NotImplementedError("step 4: write expected_saving, 1 - (sum of exit layers) / (n N)")


# ----------------------------------------------------------------------------------------------------
# Step 5: a batch, by compaction


def early_exit_batch(model, input_ids, token_type_ids, attention_mask, S):
    """A batch (B, T) with the decisions early_exit takes for each example alone: a BatchExitResult.

    After each layer the examples that exit write their answer at their original position and leave;
    only the others go on to the next layer (no layer may run on an example that has exited).
    Return BatchExitResult(logits (B, C), exit_layers (B,) long 1-based, entropies (B, n) float32 with
    NaN for the layers an example never reached).
    """
    raise NotImplementedError("step 5: write early_exit_batch, where exited examples leave the batch")


# ----------------------------------------------------------------------------------------------------
# Step 6: the second training stage (section 3.1)


def stage2_parameters(model):
    """The parameters stage 2 trains, as a list: the off-ramps that stage 1 did not train (model.off_ramps)."""
    raise NotImplementedError("step 6: write stage2_parameters, what stage 2 trains")


def stage2_loss(model, batch):
    """Stage 2's loss on a batch {"input_ids", "token_type_ids", "attention_mask", "labels"}: a scalar tensor.

    The pieces: model.encoder(input_ids, token_type_ids, attention_mask) -> a list of n hidden states (B, T, H);
    model.off_ramps[i](hidden, attention_mask) -> (B, C) logits; F.cross_entropy(logits, labels) -> L_i.
    """
    raise NotImplementedError("step 6: write stage2_loss, the loss of paper section 3.1's second stage")


# ----------------------------------------------------------------------------------------------------
# Step 7: another exit rule, patience (PABEE)


def patience_exits(all_logits, t):
    """(N, n, C) logits -> (N,) 1-based exit layers, by PABEE's rule.

    A counter grows by one each time an off-ramp's prediction (argmax) equals the previous off-ramp's, and falls
    back to 0 otherwise; an example exits at the first layer where the counter reaches t, else at the last layer.
    """
    raise NotImplementedError("step 7: write patience_exits, PABEE's patience rule")
