"""deebert/device.py: --device and --dtype, and the contract for batches, held on every path that moves one.

The contract: only the model's inputs, (B, T) tensors, go to the device; a batch's "index" and "labels" stay on the
CPU, where they index CPU tensors (a training batch's labels go too, once, for the loss). On a GPU a moved index
crashed the full pass ("indices should be either on cpu or on the same device"). Every path moves tensors through
`to_device`, so recording what it is given shows what would reach a GPU.
"""

import bench
import pytest
import torch

import train
from deebert import device as device_module
from deebert.checkpoint import load_deebert
from deebert.classify import classify
from deebert.device import model_inputs, pick_dtype
from deebert.errors import DeeBertError
from deebert.glue import get_task, read_split
from deebert.timing import measure_wall_clock
from deebert.tokenizer import Tokenizer, batches
from deebert.tradeoff import full_pass

from conftest import fine_tuned, write_glue

CPU = torch.device("cpu")


def test_auto_is_fp32_on_the_cpu_and_16_bits_need_a_gpu():
    assert pick_dtype("auto", CPU) == torch.float32 and pick_dtype("fp32", CPU) == torch.float32
    for name in ("bf16", "fp16"):
        with pytest.raises(DeeBertError, match=f"--amp {name} needs a GPU"):
            pick_dtype(name, CPU, flag="--amp")


def test_model_inputs_are_the_three_inputs_and_no_mask_when_nothing_is_padded(tiny_checkpoint):
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    padded = {**tokenizer.encode(["the cat", "the cat sat on the mat"]), "index": torch.tensor([0, 1])}
    inputs = model_inputs(padded, CPU)
    assert list(inputs) == ["input_ids", "token_type_ids", "attention_mask"]
    assert torch.equal(inputs["attention_mask"], padded["attention_mask"])
    assert model_inputs(tokenizer.encode(["the cat", "a dog"]), CPU)["attention_mask"] is None  # the same length
    assert model_inputs({"input_ids": padded["input_ids"]}, CPU)["token_type_ids"] is None


@pytest.fixture
def moved(monkeypatch) -> list:
    """Every tensor any path hands to `to_device`, in order."""
    record = []
    to_device = device_module.to_device

    def recording(tensor, device):
        if tensor is not None:
            record.append(tensor)
        return to_device(tensor, device)

    monkeypatch.setattr(device_module, "to_device", recording)
    monkeypatch.setattr(train, "to_device", recording)
    monkeypatch.setattr(bench, "to_device", recording)
    return record


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    glue = write_glue(root / "glue", n_train=24, n_dev=12)
    checkpoint = fine_tuned(root, "sst-2", ("negative", "positive"))
    tokenizer = Tokenizer.from_dir(checkpoint, max_length=32)
    examples = read_split(get_task("sst-2"), glue / "SST-2", "dev")
    return {"glue": glue, "checkpoint": checkpoint, "model": load_deebert(checkpoint), "tokenizer": tokenizer,
            "examples": examples, "pretrained": root / "pretrained"}


def only_inputs(record: list) -> bool:
    return len(record) > 0 and all(t.dim() == 2 for t in record)  # (B, T): never an index or labels, (B,)


def test_the_full_pass_moves_only_the_models_inputs(setup, moved):
    logits, labels = full_pass(setup["model"], batches(setup["tokenizer"], setup["examples"], 5))
    assert only_inputs(moved) and labels.tolist() == [e.label for e in setup["examples"]]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_early_exit_moves_only_the_models_inputs(setup, moved, batch_size):
    classify(setup["model"], setup["tokenizer"], [e.text_a for e in setup["examples"]], S=0.4, batch_size=batch_size)
    assert only_inputs(moved)
    moved.clear()
    measure_wall_clock(setup["model"], batches(setup["tokenizer"], setup["examples"], batch_size), [0.4],
                       budget_seconds=0.01, min_rounds=1, max_rounds=1)
    assert only_inputs(moved)


def test_the_benchmarks_exit_and_train_sections_move_only_what_the_model_needs(setup, moved):
    args = bench.parse_args(["--quick", "--threads", "1", "--model", str(setup["pretrained"]), "--checkpoint",
                             str(setup["checkpoint"]), "--data_dir", str(setup["glue"])])
    bench.bench_exit(args, CPU)
    assert only_inputs(moved)
    moved.clear()
    bench.bench_train(args, CPU, None)
    inputs, labels = [t for t in moved if t.dim() == 2], [t for t in moved if t.dim() == 1]
    assert len(inputs) > 0 and len(labels) == 1  # the training batch's labels, once, for the loss


def test_a_training_step_moves_the_inputs_and_the_labels_but_never_the_index(setup, moved):
    args = train.parse_args(["--task", "sst-2", "--model", str(setup["pretrained"]), "--data_dir",
                             str(setup["glue"]), "--batch_size", "8", "--epochs", "1", "--max_length", "32"])
    run = train.Run(args)
    model = load_deebert(setup["pretrained"], labels=["negative", "positive"])
    train_examples = read_split(get_task("sst-2"), setup["glue"] / "SST-2", "train")
    stats = train.train_stage("stage 1", model, train_examples, setup["tokenizer"], args, run)
    labels = [t for t in moved if t.dim() == 1]
    assert len(labels) == stats["steps"] == 3 and all(t.dim() in (1, 2) for t in moved)
    assert all(t.dtype == torch.long and len(t) == 8 for t in labels)  # the labels of each step, not an index
