"""Loading and saving checkpoints: naming variants, clear errors, atomic saves, round trips."""

import json

import pytest
import torch

from deebert import checkpoint, safetensors
from deebert.checkpoint import load_bert, load_deebert, module_name, save_checkpoint
from deebert.config import BertConfig
from deebert.errors import DeeBertError
from deebert.tokenizer import Tokenizer


@pytest.mark.parametrize("theirs, ours", [
    ("bert.embeddings.LayerNorm.gamma", "encoder.embeddings.norm.weight"),
    ("embeddings.LayerNorm.bias", "encoder.embeddings.norm.bias"),
    ("bert.encoder.layer.11.attention.self.query.weight", "encoder.layers.11.attention.query.weight"),
    ("encoder.layer.0.attention.output.LayerNorm.beta", "encoder.layers.0.attention_norm.bias"),
    ("encoder.layer.3.output.dense.weight", "encoder.layers.3.output.weight"),
    ("bert.pooler.dense.bias", "pooler.dense.bias"),
    ("embeddings.position_ids", ""),
    ("cls.predictions.transform.dense.weight", ""),
    ("bert.encoder.layer.0.crossattention.weight", None),
])
def test_checkpoint_names_map_onto_ours(theirs, ours):
    assert module_name(theirs) == ours


def test_every_off_ramp_pooler_starts_as_the_pretrained_pooler(tiny_checkpoint):
    model = load_deebert(tiny_checkpoint, labels=["no", "yes"])
    pooler = load_bert(tiny_checkpoint).pooler.dense.weight
    for ramp in model.off_ramps:
        assert torch.equal(ramp.pooler.weight, pooler)
        first = model.off_ramps[0]
        assert ramp.pooler.weight.data_ptr() != first.pooler.weight.data_ptr() or ramp is first
    assert all(p.requires_grad and not p.is_meta for p in model.parameters())


def test_save_then_load_gives_identical_logits(tiny_checkpoint, tmp_path):
    torch.manual_seed(0)
    model = load_deebert(tiny_checkpoint, labels=["no", "yes"], pooling="mean").eval()
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    save_checkpoint(model, tokenizer, tmp_path / "out", extra_json={"results.json": {"x": 1}})
    again = load_deebert(tmp_path / "out").eval()
    assert again.config.labels == ["no", "yes"] and again.config.off_ramp_pooling == "mean"
    batch = tokenizer.encode(["the cat sat on the mat", "a dog"])
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        for before, after in zip(model(**inputs), again(**inputs)):
            assert torch.equal(before, after)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"x": 1}


def test_saved_backbone_loads_in_transformers(tiny_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = load_deebert(tiny_checkpoint, labels=["no", "yes"]).eval()
    save_checkpoint(model, Tokenizer.from_dir(tiny_checkpoint), tmp_path / "out")
    reference = transformers.BertModel.from_pretrained(str(tmp_path / "out")).eval()
    input_ids = torch.tensor([[2, 7, 8, 9, 3]])
    with torch.no_grad():
        hidden = model.encoder(input_ids)[-1]
        theirs = reference(input_ids=input_ids)
        pooled = torch.tanh(model.off_ramps[-1].pooler(hidden[:, 0]))
    assert (hidden - theirs.last_hidden_state).abs().max() < 1e-5
    assert (pooled - theirs.pooler_output).abs().max() < 1e-5  # its pooler is the last off-ramp's


def test_an_interrupted_save_leaves_the_old_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    model = load_deebert(tiny_checkpoint, labels=["no", "yes"])
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    out = save_checkpoint(model, tokenizer, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.safetensors, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tokenizer, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-bert"]  # no staging folder left


def test_a_non_empty_output_dir_needs_overwrite(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    model = load_deebert(tiny_checkpoint, labels=["no", "yes"])
    with pytest.raises(DeeBertError, match="--overwrite"):
        save_checkpoint(model, Tokenizer.from_dir(tiny_checkpoint), tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def edit_config(directory, **changes):
    path = directory / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del values[key]
    path.write_text(json.dumps(values))


def edit_weights(directory, drop=None, add=None):
    path = directory / "model.safetensors"
    tensors = {k: v.clone() for k, v in safetensors.load_file(path).items()}
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    safetensors.save_file(tensors, path)


@pytest.mark.parametrize("breakage, needle", [
    (lambda d: (d / "config.json").unlink(), "config.json not found"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors not found"),
    (lambda d: edit_config(d, num_attention_heads=None), "missing the field 'num_attention_heads'"),
    (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
    (lambda d: edit_config(d, model_type="gpt2"), "BERT checkpoints only"),
    (lambda d: edit_config(d, intermediate_size=48), "has shape"),
    (lambda d: edit_weights(d, drop="bert.encoder.layer.1.output.dense.weight"), "encoder.layer.1.output.dense.weight"),
    (lambda d: edit_weights(d, add={"bert.encoder.layer.0.crossattention.weight": torch.zeros(2)}), "crossattention"),
    (lambda d: edit_config(d, num_hidden_layers=2), "unexpected tensor 'encoder.layer.2"),
])
def test_broken_checkpoints_raise_one_line_errors(tiny_checkpoint, breakage, needle):
    breakage(tiny_checkpoint)
    with pytest.raises(DeeBertError) as err:
        load_deebert(tiny_checkpoint, labels=["no", "yes"])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_pretrained_checkpoint_without_labels_is_refused(tiny_checkpoint):
    with pytest.raises(DeeBertError, match="no off-ramps; fine-tune it first"):
        load_deebert(tiny_checkpoint)


def test_a_missing_directory_and_an_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(DeeBertError, match="not found"):
        load_deebert(str(tmp_path / "absent"), labels=["a", "b"])
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DeeBertError, match="pass a local checkpoint directory"):
        load_deebert("some-org/some-bert", labels=["a", "b"])


def test_config_round_trips_with_the_checkpoints_own_field_names(minilm_dir):
    config = BertConfig.from_file(minilm_dir / "config.json")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 6, 12)
    assert BertConfig.from_dict(config.to_dict()) == config


# ----------------------------------------------------------------------------------------------------
# What transformers sees in a saved checkpoint


def trained_like(tiny_checkpoint, pooling: str):
    """A DeeBERT whose off-ramps are no longer the pretrained pooler (as after training), with its tokenizer."""
    torch.manual_seed(0)
    model = load_deebert(tiny_checkpoint, labels=["no", "yes"], pooling=pooling)
    with torch.no_grad():
        for p in model.off_ramps.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval(), Tokenizer.from_dir(tiny_checkpoint)


def test_a_cls_checkpoint_is_bert_for_sequence_classification_in_transformers(tiny_checkpoint, tmp_path):
    """Its last off-ramp is saved as BERT's head too, so transformers' classifier gives the full model's logits
    (and a user who loads it there gets plain fine-tuned BERT, not a freshly initialised head)."""
    transformers = pytest.importorskip("transformers")
    model, tokenizer = trained_like(tiny_checkpoint, "cls")
    saved = save_checkpoint(model, tokenizer, tmp_path / "run")
    theirs = transformers.BertForSequenceClassification.from_pretrained(str(saved), attn_implementation="eager")
    batch = tokenizer.encode(["the cat sat on the mat", "a bad movie"])
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(**inputs).logits, model(**inputs)[-1], atol=1e-5, rtol=0)
    assert theirs.config.id2label == {0: "no", 1: "yes"}


def test_a_mean_pooled_checkpoint_claims_no_cls_pooler_or_head(tiny_checkpoint, tmp_path):
    """transformers' pooler and head read [CLS], which a mean-pooling off-ramp never read: none is written."""
    model, tokenizer = trained_like(tiny_checkpoint, "mean")
    saved = save_checkpoint(model, tokenizer, tmp_path / "run")
    names = safetensors.load_file(saved / "model.safetensors")
    assert not any(name.startswith(("pooler.", "classifier.")) for name in names)
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["BertModel"]
    again = load_deebert(saved).eval()
    batch = tokenizer.encode(["the cat sat", "a bad movie on the mat"])
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(**inputs), again(**inputs)))


def test_a_checkpoint_saved_before_the_head_was_written_still_loads(tiny_checkpoint, tmp_path):
    model, tokenizer = trained_like(tiny_checkpoint, "cls")
    saved = save_checkpoint(model, tokenizer, tmp_path / "run")
    edit_weights(saved, drop="classifier.weight")
    edit_weights(saved, drop="classifier.bias")
    again = load_deebert(saved)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_relative_position_embeddings_are_refused_in_one_line(tiny_checkpoint):
    edit_config(tiny_checkpoint, position_embedding_type="relative_key")
    with pytest.raises(DeeBertError, match="position_embedding_type 'relative_key'") as err:
        load_bert(tiny_checkpoint)
    assert "\n" not in str(err.value)
    edit_config(tiny_checkpoint, position_embedding_type="absolute")
    load_bert(tiny_checkpoint)  # the default, written out


def test_a_model_built_directly_is_initialised_as_bert(tiny_checkpoint):
    """No checkpoint: every weight drawn from N(0, 0.02) by the constructor, none left at zero."""
    from deebert.model import DeeBert
    torch.manual_seed(0)
    model = DeeBert(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, labels=["a", "b"]))
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 2:
            assert 0.015 < float(p.detach().std()) < 0.025, name  # the embeddings too: not zeros
