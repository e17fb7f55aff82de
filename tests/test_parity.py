"""Our encoder against `transformers.BertModel` on the same checkpoint: every layer and the pooler to 1e-5."""

import pytest
import torch

from deebert.checkpoint import load_bert
from deebert.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

PAIRS = [  # real sentence pairs of different lengths, so the batch is padded
    ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
     "Christopher Reeve had an accident."),
    ("Yet, we now are discovering that antibiotics are losing their effectiveness against illness.",
     "Bacteria is winning the war against antibiotics."),
    ("Cairo is now home to some 15 million people.", "15 million tonnes of rubbish are produced daily in Cairo."),
    ("A man is playing a guitar.", "A man plays an instrument on the stage while the crowd sings along loudly."),
]


def max_differences(model_dir, batch):
    ours = load_bert(model_dir)
    theirs = transformers.BertModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        hidden_states, pooled = ours(**inputs)
        reference = theirs(**inputs, output_hidden_states=True)
    assert len(hidden_states) == len(reference.hidden_states) - 1  # theirs also returns the embeddings
    layer_differences = [(h - r).abs().max().item() for h, r in zip(hidden_states, reference.hidden_states[1:])]
    return layer_differences, (pooled - reference.pooler_output).abs().max().item()


def test_parity_on_the_real_minilm_checkpoint(minilm_dir):
    batch = Tokenizer.from_dir(minilm_dir).encode([a for a, _ in PAIRS], [b for _, b in PAIRS])
    assert (batch["attention_mask"] == 0).any()  # padded
    layers, pooler = max_differences(minilm_dir, batch)
    assert len(layers) == 6
    assert max(layers) < 1e-5 and pooler < 1e-5, (layers, pooler)


def test_parity_on_a_random_bert_in_bert_base_naming(tiny_checkpoint):
    """bert. prefix, LayerNorm gamma/beta, cls.* heads and position_ids present, as bert-base-uncased has."""
    torch.manual_seed(0)
    input_ids = torch.randint(5, 30, (4, 11))
    attention_mask = torch.ones(4, 11, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[3, 4:] = 0
    token_type_ids = (torch.arange(11) > 5).long().expand(4, 11).contiguous()
    batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
    layers, pooler = max_differences(tiny_checkpoint, batch)
    assert len(layers) == 3
    assert max(layers) < 1e-5 and pooler < 1e-5, (layers, pooler)


def test_parity_holds_with_transformers_default_attention(minilm_dir):
    """transformers' default attention kernel (sdpa) too, not only the eager one used above."""
    ours = load_bert(minilm_dir)
    theirs = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    batch = Tokenizer.from_dir(minilm_dir).encode([a for a, _ in PAIRS], [b for _, b in PAIRS])
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        difference = (ours(**inputs)[0][-1] - theirs(**inputs).last_hidden_state).abs().max().item()
    assert difference < 1e-5
