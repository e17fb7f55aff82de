"""DeeBERT's two training stages: what each one trains, and with which loss (paper section 3.1).

Loss of off-ramp i on a batch: L_i = CrossEntropy(y, f_i(x)).

    stage 1   trains: the embeddings, every layer, the last off-ramp f_n     loss: L_n
    stage 2   trains: the off-ramps f_1 .. f_{n-1}; all the rest is frozen   loss: L_1 + ... + L_{n-1}

Freezing in stage 2 keeps the last off-ramp exactly as good as plain fine-tuned BERT. `train.py` runs
the loop around these; they live here so that tests and benchmarks use the very same definitions.
`joint` (train.py --joint) is NOT the paper's method: one stage, everything trained on L_1 + ... + L_n,
kept to measure what the paper only argues in section 3.1 (that it would worsen the last off-ramp)."""

import torch
import torch.nn.functional as F


def stage1_parameters(model) -> list:
    """Stage 1 trains the embeddings, all n layers and the last off-ramp f_n."""
    return [*model.encoder.parameters(), *model.off_ramps[-1].parameters()]


def stage2_parameters(model) -> list:
    """Stage 2 trains the off-ramps f_1 .. f_{n-1}, nothing else."""
    return [p for ramp in model.off_ramps[:-1] for p in ramp.parameters()]


def stage1_loss(model, batch):
    """L_n: the last off-ramp's cross-entropy. Gradients flow through every layer into the embeddings."""
    hidden_states = model.encoder(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    logits = model.off_ramps[-1](hidden_states[-1], batch["attention_mask"])
    return F.cross_entropy(logits.float(), batch["labels"])


def stage2_loss(model, batch):
    """L_1 + ... + L_{n-1}: every other off-ramp's cross-entropy, on the frozen backbone's hidden states.

    Deviation: the authors leave the frozen backbone in train mode (dropout on). We run it in eval mode
    and without gradients: the off-ramps then learn from the very features they will see at inference,
    and no backward pass goes through the backbone, which makes stage 2 several times faster.
    """
    with torch.no_grad():
        hidden_states = model.encoder(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    losses = [F.cross_entropy(ramp(h, batch["attention_mask"]).float(), batch["labels"])
              for ramp, h in zip(model.off_ramps[:-1], hidden_states[:-1])]
    return sum(losses)


def joint_loss(model, batch):
    """L_1 + ... + L_n with gradients everywhere: every layer serves every off-ramp (not the paper's method)."""
    logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    return sum(F.cross_entropy(z.float(), batch["labels"]) for z in logits)


def joint_parameters(model) -> list:
    """Joint training trains everything."""
    return list(model.parameters())


STAGES = {
    "stage 1": (stage1_parameters, stage1_loss),
    "stage 2": (stage2_parameters, stage2_loss),
    "joint": (joint_parameters, joint_loss),
}


def prepare_stage(model, stage: str) -> tuple:
    """Freeze everything but the stage's parameters ("stage 1", "stage 2" or "joint") and set dropout as the stage
    wants it. Returns (the trainable parameters, the loss function)."""
    parameters_of, loss = STAGES[stage]
    trainable = parameters_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    model.train()
    if stage == "stage 2":
        model.encoder.eval()  # see stage2_loss: the frozen backbone runs as at inference
    return trainable, loss
