"""A checkpoint's `config.json` as a small dataclass.

The field names are the checkpoint's own (Hugging Face's BERT `config.json`), so reading a config is
`BertConfig(**json)` after dropping the keys we do not use. The defaults are bert-base-uncased.
DeeBERT adds three fields of its own, which a fine-tuned checkpoint saved by `train.py` carries:
the task, its label names and the off-ramp pooling.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from deebert.errors import DeeBertError

REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # BERT's GELU is the exact (erf) one, not the tanh approximation
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # DeeBERT's own fields: absent from a pretrained checkpoint, written by train.py.
    task: str | None = None
    labels: list = field(default_factory=list)  # label names, in class-id order
    off_ramp_pooling: str = "cls"  # "cls" (the paper) or "mean" (see OffRamp in model.py)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise DeeBertError(
                f"config: hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}; fix config.json"
            )
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise DeeBertError(f"config: hidden_act '{self.hidden_act}' is not supported; use gelu")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config.json") -> "BertConfig":
        missing = [name for name in REQUIRED_FIELDS if name not in values]
        if missing:
            raise DeeBertError(f"{source} is missing the field '{missing[0]}'; it is not a BERT config.json")
        model_type = values.get("model_type", "bert")
        if model_type != "bert":
            raise DeeBertError(f"{source} has model_type '{model_type}'; deebert loads BERT checkpoints only")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_file(cls, path) -> "BertConfig":
        path = Path(path)
        if not path.is_file():
            raise DeeBertError(f"{path} not found; pass a checkpoint directory that holds config.json")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DeeBertError(f"{path} is not valid JSON ({err}); re-download or fix the file") from None
        if not isinstance(values, dict):
            raise DeeBertError(f"{path} does not hold a JSON object; it is not a BERT config.json")
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict:
        """The checkpoint's form: BERT's fields plus ours, with the keys transformers needs to load it."""
        values = dataclasses.asdict(self)
        values.update(model_type="bert", architectures=["BertModel"])
        if self.labels:  # transformers reads these names for a classifier head
            values["id2label"] = {str(i): name for i, name in enumerate(self.labels)}
            values["label2id"] = {name: i for i, name in enumerate(self.labels)}
        return values
