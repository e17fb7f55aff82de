"""The two training loops on a tiny random BERT and a synthetic task: learning, freezing, seeds, DDP, errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from deebert.checkpoint import load_deebert
from deebert.errors import DeeBertError
from deebert.glue import Example, get_task, read_split
from deebert.stages import stage1_parameters, stage2_parameters
from deebert.tokenizer import Tokenizer, batches

from conftest import write_glue

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(tiny_checkpoint, data_dir, output_dir, *extra):
    return ["--task", "sst-2", "--model", str(tiny_checkpoint), "--data_dir", str(data_dir),
            "--output_dir", str(output_dir), "--batch_size", "8", "--learning_rate", "3e-3",
            "--stage2_learning_rate", "3e-3", "--epochs", "3", "--stage2_epochs", "3", "--log_every", "1000",
            "--max_length", "16", *extra]


def test_a_tiny_model_learns_a_separable_task_through_both_stages(tiny_checkpoint, tmp_path, capsys):
    data = write_glue(tmp_path / "glue") / "SST-2"
    model, results = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "out"))
    accuracy = [layer["accuracy"] for layer in results["stage2"]["dev_per_layer"]]
    assert accuracy[-1] == 1.0 and min(accuracy) >= 0.9, accuracy  # every off-ramp learned it
    output = capsys.readouterr().out
    assert "stage 2 done" in output and "layer | accuracy" in output
    saved = tmp_path / "out"
    files = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "training_args.json", "results.json")
    for name in files:
        assert (saved / name).is_file(), name
    config = json.loads((saved / "config.json").read_text())
    assert config["task"] == "sst-2" and config["labels"] == ["negative", "positive"]
    # the saved checkpoint gives the trained model's logits
    again = load_deebert(saved).eval()
    batch = Tokenizer.from_dir(saved).encode(["good movie", "bad dog"])
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(**inputs), again(**inputs)))


def stage_setup(tiny_checkpoint, tmp_path):
    data = write_glue(tmp_path / "glue") / "SST-2"
    args = train.parse_args(tiny_args(tiny_checkpoint, data, tmp_path / "out"))
    torch.manual_seed(0)
    model = load_deebert(tiny_checkpoint, labels=["negative", "positive"])
    run = train.Run(args)
    tokenizer = Tokenizer.from_dir(tiny_checkpoint, max_length=16)
    examples = read_split(get_task("sst-2"), data, "train")
    return model, examples, tokenizer, args, run


def test_stage_2_leaves_every_stage_1_parameter_bit_identical(tiny_checkpoint, tmp_path):
    model, examples, tokenizer, args, run = stage_setup(tiny_checkpoint, tmp_path)
    train.train_stage("stage 1", model, examples, tokenizer, args, run)
    stage1 = {id(p) for p in stage1_parameters(model)}
    before = {name: p.clone() for name, p in model.named_parameters() if id(p) in stage1}
    ramps_before = [p.clone() for p in stage2_parameters(model)]
    train.train_stage("stage 2", model, examples, tokenizer, args, run)
    after = dict(model.named_parameters())
    assert len(before) == len(stage1) > 0
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert any(not torch.equal(a, b) for a, b in zip(ramps_before, stage2_parameters(model)))


def test_stage_1_moves_only_the_backbone_and_the_last_off_ramp(tiny_checkpoint, tmp_path):
    model, examples, tokenizer, args, run = stage_setup(tiny_checkpoint, tmp_path)
    ramps_before = [p.clone() for p in stage2_parameters(model)]
    backbone_before = [p.clone() for p in stage1_parameters(model)]
    train.train_stage("stage 1", model, examples, tokenizer, args, run)
    assert all(torch.equal(a, b) for a, b in zip(ramps_before, stage2_parameters(model)))
    moved = [not torch.equal(a, b) for a, b in zip(backbone_before, stage1_parameters(model))]
    assert len(moved) == len(list(model.encoder.parameters())) + 4 and all(moved)  # every layer, the embeddings, f_n


def test_joint_training_moves_everything_in_one_stage(tiny_checkpoint, tmp_path, capsys):
    """--joint, not the paper's method: one stage, every parameter trained on the sum of all off-ramp losses."""
    data = write_glue(tmp_path / "glue") / "SST-2"
    before = load_deebert(tiny_checkpoint, labels=["negative", "positive"]).state_dict()
    model, results = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "out", "--joint", "--epochs", "1"))
    assert list(results) == ["joint"] and "joint done" in capsys.readouterr().out
    after = model.state_dict()
    encoder = [k for k in after if k.startswith("encoder.layers.")]
    assert all(not torch.equal(before[k], after[k]) for k in encoder if k in before)
    assert all(not torch.equal(before[f"off_ramps.{i}.classifier.weight"], after[f"off_ramps.{i}.classifier.weight"])
               for i in range(model.num_layers - 1))


def test_the_same_seed_gives_the_same_weights(tiny_checkpoint, tmp_path):
    data = write_glue(tmp_path / "glue") / "SST-2"
    first, _ = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "a", "--epochs", "1", "--stage2_epochs", "1"))
    second, _ = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "b", "--epochs", "1", "--stage2_epochs", "1"))
    third, _ = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "c", "--epochs", "1", "--stage2_epochs", "1",
                                    "--seed", "7"))
    a, b, c = first.state_dict(), second.state_dict(), third.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_the_learning_rate_warms_up_then_decays_to_zero():
    factors = [train.learning_rate_factor(step, warmup_steps=2, total_steps=8) for step in range(9)]
    assert [round(f, 3) for f in factors] == [0.5, 1.0, 1.0, 0.833, 0.667, 0.5, 0.333, 0.167, 0.0]


def test_layers_k_trains_the_first_k_layers_as_a_truncated_checkpoint_would(tiny_checkpoint, tmp_path):
    """The static baseline: --layers 2 is the same training as on a copy of the checkpoint cut to 2 layers."""
    from deebert import safetensors
    data = write_glue(tmp_path / "glue") / "SST-2"
    short = tmp_path / "two-layers"
    short.mkdir()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    (short / "vocab.txt").write_text((tiny_checkpoint / "vocab.txt").read_text())
    tensors = safetensors.load_file(tiny_checkpoint / "model.safetensors")
    safetensors.save_file({k: v for k, v in tensors.items() if ".layer.2." not in k}, short / "model.safetensors")
    quick = ("--epochs", "1", "--stage2_epochs", "1")
    cut, results = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "k2", "--layers", "2", *quick))
    reference, _ = train.main(tiny_args(short, data, tmp_path / "reference", *quick))
    assert cut.num_layers == 2 and len(results["stage1"]["dev_per_layer"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(cut.state_dict().values(), reference.state_dict().values()))
    assert load_deebert(tmp_path / "k2").num_layers == 2


@pytest.mark.parametrize("layers", ["0", "4"])
def test_layers_outside_1_to_n_is_one_line_of_error(tiny_checkpoint, tmp_path, layers):
    data = write_glue(tmp_path / "glue") / "SST-2"
    done = subprocess.run([sys.executable, "train.py", *tiny_args(tiny_checkpoint, data, tmp_path / "out"),
                           "--layers", layers], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "--layers" in done.stderr and "stage 1" not in done.stdout
    assert not (tmp_path / "out").exists()


def test_two_processes_with_ddp_hold_identical_weights(tiny_checkpoint, tmp_path):
    data = write_glue(tmp_path / "glue", n_train=64, n_dev=8) / "SST-2"
    weights = tmp_path / "weights"
    weights.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "helpers" / "ddp_worker.py"), str(weights),
               *tiny_args(tiny_checkpoint, data, tmp_path / "out", "--epochs", "1", "--stage2_epochs", "1",
                          "--device", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stage 2 done") == 1  # only rank 0 prints
    rank0, rank1 = torch.load(weights / "rank0.pt"), torch.load(weights / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = load_deebert(tmp_path / "out")
    assert all(torch.equal(saved.state_dict()[k], rank0[k]) for k in rank0)


@pytest.mark.parametrize("change, needle", [  # the flag (or value) at fault is named
    ({"--task": "wnli"}, "wnli"),
    ({"--batch_size": "0"}, "--batch_size"),
    ({"--max_length": "65"}, "--max_length 65"),
    ({"--learning_rate": "-1"}, "--learning_rate"),
    ({"--data_dir": "MISSING"}, "--data_dir"),
    ({"--warmup": "1.5"}, "--warmup"),
    ({"--epochs": "0"}, "--epochs"),
    ({"--stage2_epochs": "-1"}, "--stage2_epochs"),
    ({"--max_length": "4"}, "--max_length 4"),
    ({"--epochs": "nan"}, "--epochs"),
    ({"--bogus": "1"}, "--bogus"),
    ({"--layers": "4"}, "--layers 4"),
    ({"--amp": "bf16"}, "--amp bf16"),  # no GPU here
    ({"--batch_size": "1", "--device": "cuda:x"}, "--device cuda:x"),
    ({"--batch_size": "1", "--device": "cudafoo"}, "--device cudafoo"),
    ({"--batch_size": "1", "--device": "cuda:7"}, "--device cuda:7"),
])
def test_bad_arguments_fail_before_training(tiny_checkpoint, tmp_path, change, needle):
    data = write_glue(tmp_path / "glue") / "SST-2"
    argv = tiny_args(tiny_checkpoint, data, tmp_path / "out")
    for flag, value in change.items():
        if flag not in argv:
            argv += [flag, value]
        argv[argv.index(flag) + 1] = value if value != "MISSING" else str(tmp_path / "nowhere")
    with pytest.raises(DeeBertError, match=re.escape(needle)):
        train.main(argv)
    assert not (tmp_path / "out").exists()


def test_an_empty_split_and_a_bad_label(tiny_checkpoint, tmp_path):
    data = write_glue(tmp_path / "glue") / "SST-2"
    (data / "train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DeeBertError, match="has no data rows"):
        train.main(tiny_args(tiny_checkpoint, data, tmp_path / "out"))
    (data / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t7\n")
    with pytest.raises(DeeBertError, match="line 3"):
        train.main(tiny_args(tiny_checkpoint, data, tmp_path / "out"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_checkpoint_loads_and_trains_in_float32(tmp_path, dtype):
    """Many hub checkpoints are stored in fp16: the model must still be float32 throughout (master weights)."""
    from conftest import write_tiny_checkpoint
    half = write_tiny_checkpoint(tmp_path / "half", dtype=dtype)
    full = write_tiny_checkpoint(tmp_path / "full")
    model = load_deebert(half, labels=["negative", "positive"])
    reference = load_deebert(full, labels=["negative", "positive"])
    assert {p.dtype for p in model.parameters()} == {p.dtype for p in reference.parameters()} == {torch.float32}
    data = write_glue(tmp_path / "glue", n_train=16, n_dev=8) / "SST-2"
    _, results = train.main(tiny_args(half, data, tmp_path / "out", "--epochs", "0.5", "--stage2_epochs", "0.5"))
    assert results["stage1"]["steps"] == 1 and results["stage2"]["steps"] == 1


def test_torchrun_with_cuda_but_no_gpu_ends_in_one_error_line(tiny_checkpoint, tmp_path):
    """Every process refuses what one process refuses; only rank 0 says so."""
    data = write_glue(tmp_path / "glue", n_train=16, n_dev=8) / "SST-2"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               *tiny_args(tiny_checkpoint, data, tmp_path / "out", "--device", "cuda")]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=240)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]
    assert done.returncode != 0 and "stage 1" not in done.stdout
    assert errors == ["error: --device cuda asked for GPU 0, but torch sees 0 GPU(s); use --device cpu or auto"]


def test_errors_print_one_line_and_never_overwrite(tiny_checkpoint, tmp_path):
    data = write_glue(tmp_path / "glue") / "SST-2"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    not_bert = tmp_path / "not-bert"
    not_bert.mkdir()
    (not_bert / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    for argv in (tiny_args(tiny_checkpoint, data, out),  # non-empty output dir
                 tiny_args(not_bert, data, tmp_path / "out2")):  # not a BERT checkpoint
        command = [sys.executable, "train.py", *argv]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_batches_pad_each_batch_to_its_own_longest(tiny_checkpoint):
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    examples = [Example("the cat", None, 0), Example("the cat sat on the mat", None, 1)]
    shapes = [b["input_ids"].shape for b in batches(tokenizer, examples, batch_size=1)]
    assert shapes == [(1, 4), (1, 8)]


def test_one_layer_trains_stage_1_only(tiny_checkpoint, tmp_path, capsys):
    """--layers 1: the one off-ramp is the last, which stage 1 trains; stage 2 would have nothing to train."""
    data = write_glue(tmp_path / "glue") / "SST-2"
    model, results = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "k1", "--layers", "1", "--epochs", "1"))
    assert model.num_layers == 1 and list(results) == ["stage1"]
    assert "stage 2" not in capsys.readouterr().out
