"""Classify texts with early exit, in one call: what `python infer.py "text" --S 0.4` does.

    from deebert.classify import classify, load

    model, tokenizer = load("runs/sst-2")
    for p in classify(model, tokenizer, ["a gripping, beautifully acted film", "a dull, lifeless mess"], S=0.4):
        print(p.label, p.exit_layer, p.entropies)

Inputs are texts, or (premise, hypothesis) pairs for a pair task. They are sorted by length and cut into
batches, so that a batch carries little padding; a batch of one runs the paper's loop (`exit.early_exit`),
a larger one `exit.early_exit_batch`; the answers come back in the inputs' own order."""

import math
from dataclasses import dataclass

import torch

from deebert.checkpoint import load_deebert, resolve
from deebert.device import model_inputs, pick_device, pick_dtype
from deebert.exit import BatchExitResult, early_exit, early_exit_batch
from deebert.glue import unlabelled
from deebert.tokenizer import Tokenizer, batches, by_length, check_max_length


@dataclass
class Prediction:
    """One input's answer: the label of the off-ramp where it exited, and what each off-ramp on the way said."""

    label: str
    probability: float  # of that label, at the exit
    exit_layer: int  # 1-based, of n layers
    entropies: list  # one per layer that ran: len(entropies) == exit_layer
    truncated: bool  # longer than max_length tokens, and cut


def load(checkpoint, device: str = "auto", dtype: str = "auto", max_length: int = 128) -> tuple:
    """(model, tokenizer) of a checkpoint fine-tuned by train.py, on `device` (auto, cpu, cuda, cuda:N), its weights
    in `dtype` (fp32, or bf16/fp16 on a GPU; auto: bf16 on a GPU that has it), in eval mode."""
    directory = resolve(checkpoint)
    device = pick_device(device)
    model = load_deebert(directory, dtype=pick_dtype(dtype, device)).to(device)
    check_max_length(max_length, model.config.max_position_embeddings)
    return model, Tokenizer.from_dir(directory, max_length=max_length)


def exit_batch(model, inputs: dict, S: float) -> BatchExitResult:
    """Early exit on one batch of model inputs, the results on the CPU: the paper's one-input loop for a batch
    of one, the batched loop otherwise."""
    if inputs["input_ids"].shape[0] > 1:
        result = early_exit_batch(model, **inputs, S=S)
        return BatchExitResult(result.logits.cpu(), result.exit_layers.cpu(), result.entropies.cpu())
    one = early_exit(model, **inputs, S=S)
    entropies = one.entropies + [math.nan] * (model.num_layers - one.exit_layer)  # as the batched loop leaves them
    return BatchExitResult(one.logits[None].cpu(), torch.tensor([one.exit_layer]), torch.tensor([entropies]))


def classify(model, tokenizer, inputs: list, S: float = 0.0, batch_size: int = 32) -> list[Prediction]:
    """Texts, or (text_a, text_b) pairs, -> one Prediction each, in their order, with early exit at threshold S."""
    examples = unlabelled(inputs)
    device = next(model.parameters()).device
    predictions = [None] * len(examples)
    for batch in batches(tokenizer, examples, batch_size, by_length(tokenizer, examples)):
        result = exit_batch(model, model_inputs(batch, device), S)
        probabilities, best = result.logits.float().softmax(dim=-1).max(dim=-1)  # (B, C) -> (B,), (B,)
        for k, index in enumerate(batch["index"].tolist()):
            exit_layer = int(result.exit_layers[k])
            predictions[index] = Prediction(
                label=model.config.labels[int(best[k])],
                probability=float(probabilities[k]),
                exit_layer=exit_layer,
                entropies=result.entropies[k, :exit_layer].tolist(),
                truncated=bool(batch["truncated"][k]),
            )
    return predictions
