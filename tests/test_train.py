"""The two training loops on a tiny random BERT and a synthetic task: learning, freezing, seeds, DDP, errors."""

import json
import os
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

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["good", "very good", "good movie", "a good cat", "the dog is good", "good good"]
BAD = ["bad", "not bad movie", "bad dog", "the cat is bad", "a bad mat", "very bad"]


def write_sst2_like(folder: Path, n_train=96, n_dev=24):
    """A separable task in SST-2's format: label 1 when the sentence says 'good'."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [f"{(GOOD if i % 2 else BAD)[i % 6]} {['', 'the mat', 'on the mat', 'sat'][i % 4]}\t{i % 2}" for i in range(n)]
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


def tiny_args(tiny_checkpoint, data_dir, output_dir, *extra):
    return ["--task", "sst-2", "--model", str(tiny_checkpoint), "--data_dir", str(data_dir),
            "--output_dir", str(output_dir), "--batch_size", "8", "--learning_rate", "3e-3",
            "--stage2_learning_rate", "3e-3", "--epochs", "3", "--stage2_epochs", "3", "--log_every", "1000",
            "--max_length", "16", *extra]


def test_a_tiny_model_learns_a_separable_task_through_both_stages(tiny_checkpoint, tmp_path, capsys):
    data = write_sst2_like(tmp_path / "SST-2")
    model, results = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "out"))
    accuracy = [layer["accuracy"] for layer in results["stage2"]["dev_per_layer"]]
    assert accuracy[-1] == 1.0 and min(accuracy) >= 0.9, accuracy  # every off-ramp learned it
    output = capsys.readouterr().out
    assert "stage 2 done" in output and "layer | accuracy" in output
    saved = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "training_args.json", "results.json"):
        assert (saved / name).is_file(), name
    config = json.loads((saved / "config.json").read_text())
    assert config["task"] == "sst-2" and config["labels"] == ["0", "1"]
    # the saved checkpoint gives the trained model's logits
    again = load_deebert(saved).eval()
    batch = Tokenizer.from_dir(saved).encode(["good movie", "bad dog"])
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(**inputs), again(**inputs)))


def stage_setup(tiny_checkpoint, tmp_path):
    data = write_sst2_like(tmp_path / "SST-2")
    args = train.parse_args(tiny_args(tiny_checkpoint, data, tmp_path / "out"))
    torch.manual_seed(0)
    model = load_deebert(tiny_checkpoint, labels=["0", "1"])
    run = train.Run(args)
    run.tokenizer = Tokenizer.from_dir(tiny_checkpoint, max_length=16)
    examples = read_split(get_task("sst-2"), data, "train")
    return model, examples, args, run


def test_stage_2_leaves_every_stage_1_parameter_bit_identical(tiny_checkpoint, tmp_path):
    model, examples, args, run = stage_setup(tiny_checkpoint, tmp_path)
    train.train_stage(1, model, examples, args, run)
    stage1 = {id(p) for p in stage1_parameters(model)}
    before = {name: p.clone() for name, p in model.named_parameters() if id(p) in stage1}
    ramps_before = [p.clone() for p in stage2_parameters(model)]
    train.train_stage(2, model, examples, args, run)
    after = dict(model.named_parameters())
    assert len(before) == len(stage1) > 0
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert any(not torch.equal(a, b) for a, b in zip(ramps_before, stage2_parameters(model)))


def test_stage_1_moves_only_the_backbone_and_the_last_off_ramp(tiny_checkpoint, tmp_path):
    model, examples, args, run = stage_setup(tiny_checkpoint, tmp_path)
    ramps_before = [p.clone() for p in stage2_parameters(model)]
    backbone_before = [p.clone() for p in stage1_parameters(model)]
    train.train_stage(1, model, examples, args, run)
    assert all(torch.equal(a, b) for a, b in zip(ramps_before, stage2_parameters(model)))
    assert all(not torch.equal(a, b) for a, b in zip(backbone_before[-4:], stage1_parameters(model)[-4:]))


def test_the_same_seed_gives_the_same_weights(tiny_checkpoint, tmp_path):
    data = write_sst2_like(tmp_path / "SST-2")
    first, _ = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "a", "--epochs", "1", "--stage2_epochs", "1"))
    second, _ = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "b", "--epochs", "1", "--stage2_epochs", "1"))
    third, _ = train.main(tiny_args(tiny_checkpoint, data, tmp_path / "c", "--epochs", "1", "--stage2_epochs", "1", "--seed", "7"))
    a, b, c = first.state_dict(), second.state_dict(), third.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_linear_schedule_warms_up_then_decays_to_zero():
    factor = train.linear_schedule(0.25, total_steps=8)
    assert [round(factor(s), 3) for s in range(9)] == [0.5, 1.0, 1.0, 0.833, 0.667, 0.5, 0.333, 0.167, 0.0]


def test_two_processes_with_ddp_hold_identical_weights(tiny_checkpoint, tmp_path):
    data = write_sst2_like(tmp_path / "SST-2", n_train=64, n_dev=8)
    weights = tmp_path / "weights"
    weights.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "helpers" / "ddp_worker.py"), str(weights),
               *tiny_args(tiny_checkpoint, data, tmp_path / "out", "--epochs", "1", "--stage2_epochs", "1", "--device", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stage 2 done") == 1  # only rank 0 prints
    rank0, rank1 = torch.load(weights / "rank0.pt"), torch.load(weights / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = load_deebert(tmp_path / "out")
    assert all(torch.equal(saved.state_dict()[k], rank0[k]) for k in rank0)


@pytest.mark.parametrize("change, needle", [
    ({"--task": "wnli"}, "unknown GLUE task .wnli.; choose one of: sst-2"),
    ({"--batch_size": "0"}, "--batch_size must be at least 1"),
    ({"--max_length": "65"}, "exceeds the model's 64 positions"),
    ({"--learning_rate": "-1"}, "--learning_rate must be a positive number"),
    ({"--data_dir": "MISSING"}, "--data_dir"),
])
def test_bad_arguments_fail_before_training(tiny_checkpoint, tmp_path, change, needle):
    data = write_sst2_like(tmp_path / "SST-2")
    argv = tiny_args(tiny_checkpoint, data, tmp_path / "out")
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = value if value != "MISSING" else str(tmp_path / "nowhere")
    with pytest.raises(DeeBertError, match=needle):
        train.main(argv)
    assert not (tmp_path / "out").exists()


def test_an_empty_split_and_a_bad_label(tiny_checkpoint, tmp_path):
    data = write_sst2_like(tmp_path / "SST-2")
    (data / "train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DeeBertError, match="no examples|empty"):
        train.main(tiny_args(tiny_checkpoint, data, tmp_path / "out"))
    (data / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t7\n")
    with pytest.raises(DeeBertError, match="line 3"):
        train.main(tiny_args(tiny_checkpoint, data, tmp_path / "out"))


def test_errors_print_one_line_and_never_overwrite(tiny_checkpoint, tmp_path):
    data = write_sst2_like(tmp_path / "SST-2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    not_bert = tmp_path / "not-bert"
    not_bert.mkdir()
    (not_bert / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    for argv in (tiny_args(tiny_checkpoint, data, out),  # non-empty output dir
                 tiny_args(not_bert, data, tmp_path / "out2")):  # not a BERT checkpoint
        done = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_batches_pad_each_batch_to_its_own_longest(tiny_checkpoint):
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    examples = [Example("the cat", None, 0), Example("the cat sat on the mat", None, 1)]
    shapes = [b["input_ids"].shape for b in batches(tokenizer, examples, batch_size=1)]
    assert shapes == [(1, 4), (1, 8)]
