"""Text -> token ids, token types and attention masks: BERT's WordPiece, on the `tokenizers` package.

Normalise (clean, optionally lower-case, strip accents), split on whitespace and punctuation, then split each
word into the longest vocabulary pieces ("playing" -> "play", "##ing"). A sentence becomes `[CLS] a [SEP]`
(token types 0), a pair `[CLS] a [SEP] b [SEP]` (types 0..0 1..1). Batches are padded to their longest member
(attention mask 1 on tokens, 0 on padding), never to a `tokenizer.json`'s fixed length; inputs over `max_length`
are cut, the longer text of a pair first.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from deebert.errors import DeeBertError

MIN_MAX_LENGTH = 8  # [CLS] a [SEP] b [SEP] and a few tokens of text; below 4 tokenizers would not truncate at all


class Tokenizer:
    def __init__(self, backend: HFTokenizer, max_length: int = 128):
        for token in ("[CLS]", "[SEP]", "[PAD]"):
            if backend.token_to_id(token) is None:
                raise DeeBertError(f"the tokenizer has no {token} token; it is not a BERT tokenizer")
        check_max_length(max_length)
        self.backend = backend
        self.pad_id = backend.token_to_id("[PAD]")
        self.max_length = max_length
        self.backend.enable_truncation(max_length, strategy="longest_first")
        self.backend.enable_padding(pad_id=self.pad_id, pad_token="[PAD]")  # no length: pad to the longest

    @classmethod
    def from_dir(cls, directory, max_length: int = 128) -> "Tokenizer":
        """From `tokenizer.json` if the checkpoint has one, else build BERT's WordPiece from `vocab.txt`."""
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            return cls(HFTokenizer.from_file(str(directory / "tokenizer.json")), max_length)
        if (directory / "vocab.txt").is_file():
            return cls(wordpiece_from_vocab(directory / "vocab.txt", is_uncased(directory)), max_length)
        raise DeeBertError(f"{directory} has neither tokenizer.json nor vocab.txt; pass a BERT checkpoint directory")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, texts_a: list, texts_b: list | None = None) -> dict:
        """Texts (and second texts of pairs) -> {"input_ids", "token_type_ids", "attention_mask"}: (B, T) each,
        and "truncated": (B,) booleans, True where an input was longer than max_length and was cut."""
        encodings = self.backend.encode_batch(list(texts_a) if texts_b is None else list(zip(texts_a, texts_b)))
        return {
            "input_ids": torch.tensor([e.ids for e in encodings]),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings]),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings]),
            "truncated": torch.tensor([len(e.overflowing) > 0 for e in encodings]),
        }

    def tokens(self, text: str, text_b: str | None = None) -> list:
        """The WordPiece tokens of one input, special tokens included: for reading, not for the model."""
        return self.backend.encode(text, text_b).tokens

    def save(self, directory) -> None:
        """Write tokenizer.json (our settings: no fixed padding) and vocab.txt."""
        self.backend.save(str(directory / "tokenizer.json"))
        vocab = sorted(self.backend.get_vocab().items(), key=lambda item: item[1])
        (directory / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")


def check_max_length(max_length: int, max_positions: int | None = None) -> None:
    """The one check of --max_length: room for a pair's special tokens, and no more than the model's positions
    (which only the model knows: the tokenizer checks the minimum alone)."""
    if max_length < MIN_MAX_LENGTH or (max_positions is not None and max_length > max_positions):
        limit = f"lie in {MIN_MAX_LENGTH}..{max_positions}" if max_positions else f"be at least {MIN_MAX_LENGTH}"
        model = f"; the model has {max_positions} positions" if max_positions else ""
        raise DeeBertError(f"--max_length {max_length} must {limit} (room for [CLS] a [SEP] b [SEP]{model})")


def is_uncased(directory: Path) -> bool:
    """Whether the checkpoint lower-cases its input: tokenizer_config.json says, else True (uncased BERT)."""
    config = directory / "tokenizer_config.json"
    return not config.is_file() or bool(json.loads(config.read_text(encoding="utf-8")).get("do_lower_case", True))


def wordpiece_from_vocab(vocab_file: Path, lowercase: bool = True) -> HFTokenizer:
    """BERT's tokenizer, assembled from its parts: the pipeline a tokenizer.json describes."""
    vocab = {}
    for index, token in enumerate(Path(vocab_file).read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(token, index)  # a token listed twice keeps its first id
    if "[UNK]" not in vocab:
        raise DeeBertError(f"{vocab_file} has no [UNK] token; it is not a BERT vocab.txt")
    tokenizer = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)  # cleans too; strips accents if lowercase
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",  # ":1" = token type 1, segment B
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def by_length(tokenizer: Tokenizer, examples: list) -> list:
    """Indices of `examples` from the shortest input to the longest (in tokens). Batches cut in this order
    carry little padding, which every layer would otherwise compute on (tests/bench.py measures what it saves)."""
    pairs = [e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples]
    lengths = [sum(encoding.attention_mask) for encoding in tokenizer.backend.encode_batch(pairs)]  # w/o padding
    return sorted(range(len(examples)), key=lengths.__getitem__)


def batches(tokenizer: Tokenizer, examples: list, batch_size: int, order=None):
    """Examples (anything with .text_a, .text_b, .label) -> batches of tensors, dynamically padded, in
    `order` (indices into `examples`; default: as they come). Each batch is `Tokenizer.encode`'s dict plus
    "index" (B,), the examples' positions in `examples`, and "labels" (B,) when the examples have labels."""
    order = list(range(len(examples)) if order is None else order)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        chunk = [examples[i] for i in index]
        texts_b = [e.text_b for e in chunk] if chunk[0].text_b is not None else None
        batch = tokenizer.encode([e.text_a for e in chunk], texts_b)
        batch["index"] = torch.tensor(index)
        if chunk[0].label is not None:
            batch["labels"] = torch.tensor([e.label for e in chunk])
        yield batch
