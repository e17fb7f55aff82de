"""A checkpoint's `config.json` (Hugging Face's BERT format) as a small dataclass, in the file's own names.

Reading a config is `BertConfig(**json)` less the keys we do not use; the defaults are bert-base-uncased's.
DeeBERT adds three fields, which a checkpoint fine-tuned by `train.py` carries: task, labels, pooling.
"""

import json
from dataclasses import asdict, dataclass, field, fields
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
    task: str | None = None  # DeeBERT's own fields from here: absent from a pretrained checkpoint
    labels: list = field(default_factory=list)  # label names, in class-id order
    off_ramp_pooling: str = "cls"  # "cls" (the paper) or "mean" (see OffRamp in model.py)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise DeeBertError(f"config: hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                               f"{self.num_attention_heads}; fix config.json")
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
        if values.get("model_type", "bert") != "bert":
            raise DeeBertError(f"{source} has model_type '{values['model_type']}'; deebert loads BERT checkpoints only")
        if values.get("position_embedding_type", "absolute") != "absolute":
            raise DeeBertError(f"{source} has position_embedding_type '{values['position_embedding_type']}'; "
                               "deebert's BERT has learned absolute positions only")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_file(cls, path) -> "BertConfig":
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (FileNotFoundError, IsADirectoryError):
            raise DeeBertError(f"{path} not found; pass a checkpoint directory that holds config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DeeBertError(f"{path} is not valid JSON ({err}); re-download or fix the file") from None
        if not isinstance(values, dict):
            raise DeeBertError(f"{path} does not hold a JSON object; it is not a BERT config.json")
        return cls.from_dict(values, str(path))

    def to_dict(self) -> dict:
        """The checkpoint's form: BERT's fields plus ours, with the keys transformers needs to load it. With [CLS]
        off-ramps the last one is BERT's own classifier head, which checkpoint.py saves for transformers too."""
        head = self.labels and self.off_ramp_pooling == "cls"
        architecture = "BertForSequenceClassification" if head else "BertModel"
        values = {**asdict(self), "model_type": "bert", "architectures": [architecture]}
        if self.labels:  # transformers reads these names for a classifier head
            values["id2label"] = {str(i): name for i, name in enumerate(self.labels)}
            values["label2id"] = {name: i for i, name in enumerate(self.labels)}
        return values
