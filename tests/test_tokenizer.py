"""The tokenizer against transformers' BertTokenizerFast, and BERT's input conventions."""

import json

import pytest
import torch

from deebert.tokenizer import Tokenizer, wordpiece_from_vocab

transformers = pytest.importorskip("transformers")


def test_parity_with_bert_tokenizer_fast_on_rte_dev(minilm_dir, glue_dir):
    from deebert.glue import get_task, read_split

    examples = read_split(get_task("rte"), glue_dir / "RTE", "dev")
    assert len(examples) == 277
    ours = Tokenizer.from_dir(minilm_dir, max_length=128)
    theirs = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
    for start in range(0, len(examples), 32):
        chunk = examples[start : start + 32]
        a, b = [e.text_a for e in chunk], [e.text_b for e in chunk]
        mine = ours.encode(a, b)
        reference = theirs(a, b, truncation="longest_first", max_length=128, padding="longest", return_tensors="pt")
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            assert torch.equal(mine[key], reference[key]), (start, key)


def test_vocab_txt_alone_gives_the_same_ids_as_tokenizer_json(minilm_dir, tmp_path):
    (tmp_path / "vocab.txt").write_bytes((minilm_dir / "vocab.txt").read_bytes())
    from_json, from_vocab = Tokenizer.from_dir(minilm_dir), Tokenizer.from_dir(tmp_path)
    texts_a = ["Héllo, WORLD! Tokenizers split “unbelievable” words.", "短い 文"]
    texts_b = ["A second sentence.", "and another one, much longer than the first one here"]
    for args in ((texts_a,), (texts_a, texts_b)):
        x, y = from_json.encode(*args), from_vocab.encode(*args)
        assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))


def test_pairs_get_cls_sep_and_token_types(tiny_checkpoint):
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    assert tokenizer.tokens("The cat sat", "a dog runs") == \
        ["[CLS]", "the", "cat", "sat", "[SEP]", "a", "dog", "runs", "[SEP]"]
    batch = tokenizer.encode(["the cat sat"], ["a dog runs"])
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]


def test_dynamic_padding_and_masks(tiny_checkpoint):
    batch = Tokenizer.from_dir(tiny_checkpoint).encode(["the cat", "the cat sat on the mat"])
    assert batch["input_ids"].shape == (2, 8)  # the longest: [CLS] + 6 words + [SEP]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    assert batch["input_ids"][0, 4:].tolist() == [0, 0, 0, 0]  # [PAD] has id 0


def test_truncation_longest_first_and_flagged(tiny_checkpoint):
    tokenizer = Tokenizer.from_dir(tiny_checkpoint, max_length=8)
    batch = tokenizer.encode(["the cat sat on the mat", "the cat"], ["a dog", "a dog"])
    assert batch["input_ids"].shape[1] == 8
    assert batch["truncated"].tolist() == [True, False]
    # longest first: the long first text loses tokens, the short second text keeps both of its words
    assert tokenizer.tokens("the cat sat on the mat", "a dog")[-4:] == ["[SEP]", "a", "dog", "[SEP]"]


def test_fixed_padding_in_tokenizer_json_is_not_inherited(minilm_dir):
    settings = json.loads((minilm_dir / "tokenizer.json").read_text())["padding"]
    assert settings["strategy"] == {"Fixed": 128}  # the file pads to 128 ...
    batch = Tokenizer.from_dir(minilm_dir).encode(["a short one"])
    assert batch["input_ids"].shape == (1, 5)  # ... we pad only to the longest input


def test_lowercase_follows_the_checkpoint(tiny_checkpoint):
    cased = wordpiece_from_vocab(tiny_checkpoint / "vocab.txt", lowercase=False)
    assert cased.encode("The").tokens == ["[CLS]", "[UNK]", "[SEP]"]
    uncased = wordpiece_from_vocab(tiny_checkpoint / "vocab.txt", lowercase=True)
    assert uncased.encode("The").tokens == ["[CLS]", "the", "[SEP]"]


def test_by_length_orders_inputs_by_their_real_tokens(tiny_checkpoint):
    """Padding must not count: the backend pads every encode_batch to its longest input."""
    from deebert.glue import Example
    from deebert.tokenizer import batches, by_length
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    examples = [Example(text, None, None) for text in ["the cat sat on the mat", "a dog", "the man eats food"]]
    order = by_length(tokenizer, examples)
    assert order == [1, 2, 0]
    shapes = [tuple(b["input_ids"].shape) for b in batches(tokenizer, examples, 2, order)]
    assert shapes == [(2, 6), (1, 8)]  # "a dog" with "the man eats food", then the longest alone
