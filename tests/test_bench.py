"""deebert/bench.py: every section's numbers have the right shape, on the tiny checkpoint, quickly.

Speed is never asserted (a test machine is shared and noisy); only structure: the sections are there,
times are positive, medians lie between min and max, ratios are finite, and the expected saving is
exactly exit.expected_saving of the exit layers.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_deebert
from deebert import bench
from deebert.checkpoint import load_deebert, save_checkpoint
from deebert.config import BertConfig
from deebert.exit import entropy, exit_layers_from_entropies, expected_saving
from deebert.glue import get_task, read_split
from deebert.tokenizer import Tokenizer
from deebert.tradeoff import encode_batches, full_pass

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
DEV_SENTENCES = ["the cat sat on the mat .", "a very good movie !", "not a bad dog", "the man eats food",
                 "the woman runs", "a bad movie", "very very good", "the dog is not good , not at all ."]


@pytest.fixture(autouse=True)
def no_glue_and_no_cuda(monkeypatch, tmp_path):
    """No real GLUE data, an empty GLUE cache, and CUDA calls that fail loudly: the CPU path must never
    touch CUDA. (conftest's one_thread fixture runs every test on one thread.)"""
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("synchronize", "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("the CPU path called torch.cuda"))


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture
def glue_root(tmp_path) -> Path:
    """A GLUE root with only SST-2/dev.tsv, in GLUE's format (header; sentence TAB label)."""
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    rows = "".join(f"{text}\t{i % 2}\n" for i, text in enumerate(DEV_SENTENCES))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + rows)
    return folder.parent


@pytest.fixture
def fine_tuned(tmp_path) -> Path:
    """conftest's tiny DeeBERT (off-ramps of different confidence), saved as train.py saves an SST-2 checkpoint."""
    model = tiny_deebert(tmp_path / "tiny-deebert", labels=("0", "1"))
    model.config.task = "sst-2"
    return save_checkpoint(model, Tokenizer.from_dir(tmp_path / "tiny-deebert"), tmp_path / "fine-tuned")


def assert_stat(stat: dict):
    assert stat["runs"] >= 1
    assert 0 < stat["min"] <= stat["median"] <= stat["max"] < math.inf


def assert_ratio(value):
    assert value is not None and 0 < value < math.inf


# ----------------------------------------------------------------------------------------------------
# Small parts


def test_summarize_and_rate_on_a_worked_example():
    assert bench.summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3}
    assert bench.rate([0.5, 2.0], count=4) == {"median": 5.0, "min": 2.0, "max": 8.0, "runs": 2}  # examples/s
    assert bench.scaled([0.002, 0.004], 1000 / 2) == {"median": 1.5, "min": 1.0, "max": 2.0, "runs": 2}


def test_encoder_flops_of_bert_base_at_128_tokens():
    """The textbook count: 12 layers x (2 x 128 x 7.08M matrix weights + 4 x 128^2 x 768) = 22.3 GFLOP."""
    flops = bench.encoder_flops(BertConfig(), B=1, T=128)
    assert flops == 12 * (2 * 128 * (4 * 768 * 768 + 2 * 768 * 3072) + 4 * 128 * 128 * 768)
    assert 22.0e9 < flops < 22.5e9
    assert bench.encoder_flops(BertConfig(), B=8, T=128) == 8 * flops


def test_peak_tflops_from_the_table_or_the_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert bench.peak_tflops("cuda", "bf16", None) == 989.0
    assert bench.peak_tflops("cuda", "bf16", 500.0) == 500.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert bench.peak_tflops("cuda", "fp32", None) is None


def test_pad_to_pads_ids_types_and_mask_with_zeros():
    batch = {"input_ids": torch.tensor([[2, 7, 3]]), "token_type_ids": torch.tensor([[0, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1]])}
    padded = bench.pad_to(batch, 5)
    assert padded["input_ids"].tolist() == [[2, 7, 3, 0, 0]] and padded["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]


def test_the_gpu_section_is_skipped_on_the_cpu(tiny_checkpoint):
    assert "skipped" in bench.bench_gpu(tiny_checkpoint, None, CPU, None, [8], 1, 0, None)


def test_without_a_checkpoint_the_exit_section_says_how_to_make_one(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/sst-2 here
    args = bench.parse_args(["--quick", "--model", str(tiny_checkpoint)])
    result = bench.run_section("exit", args, CPU, None)
    assert "python train.py" in result["skipped"]


# ----------------------------------------------------------------------------------------------------
# The sections, on the tiny checkpoints


def test_forward_section(tiny_checkpoint, transformers):
    result = bench.bench_forward(tiny_checkpoint, None, CPU, bench.import_transformers(True), repeats=2, warmup=1, pairs=3)
    assert result["source"] == "built-in pairs"  # no GLUE here
    for key in ("batch_1", "batch_32"):
        assert_stat(result[key]["ours"])
        assert_stat(result[key]["theirs"])
        assert_ratio(result[key]["ratio"])
    assert result["batch_32"]["tokens"] == 64  # the tiny checkpoint has 64 positions, not 128
    assert result["max_abs_difference"] < 1e-5  # the same computation as transformers


def test_early_exit_section(fine_tuned, glue_root, transformers):
    S_values = [0.0, 0.3, 1.0]  # never early; some early; everyone at layer 1 (1.0 > ln 2)
    result = bench.bench_early_exit(fine_tuned, glue_root, CPU, bench.import_transformers(True), S_values,
                                    repeats=2, warmup=1, examples=6, batch_size=4)
    assert (result["task"], result["examples"], result["num_layers"]) == ("sst-2", 6, 3)
    for stat in result["full_ms_per_example"].values():
        assert_stat(stat)

    # The expected saving, recomputed on its own: one full pass, exit layers per S, exit.expected_saving.
    model = load_deebert(fine_tuned)
    dev = read_split(get_task("sst-2"), glue_root, "dev")[:6]
    logits, _ = full_pass(model, encode_batches(Tokenizer.from_dir(fine_tuned), dev, 4))
    for row, S in zip(result["thresholds"], S_values):
        exit_layers = exit_layers_from_entropies(entropy(logits), S)
        assert row["S"] == S
        assert row["expected_saving"] == pytest.approx(expected_saving(exit_layers, 3))
        assert row["exits_per_layer"] == [int((exit_layers == i).sum()) for i in (1, 2, 3)]
        for key in ("batch_1", "batch_4", "hf_batch_1"):
            assert_stat(row[key]["ms_per_example"])
            assert math.isfinite(row[key]["measured_saving"])
            ratio = row[key]["measured_over_expected"]
            assert (ratio is None) == (row["expected_saving"] == 0) and (ratio is None or math.isfinite(ratio))
        assert_ratio(row["hf_batch_1"]["ratio"])
    assert result["thresholds"][0]["expected_saving"] == 0  # S = 0 never exits early
    assert 0 < result["thresholds"][1]["expected_saving"] < 2 / 3  # S = 0.3: some exit early, not all at layer 1
    assert result["thresholds"][2]["exits_per_layer"] == [6, 0, 0]  # S > ln 2 always exits at layer 1
    assert result["thresholds"][2]["expected_saving"] == pytest.approx(2 / 3)


def test_training_section(tiny_checkpoint, glue_root, transformers):
    result = bench.bench_training(tiny_checkpoint, glue_root, CPU, bench.import_transformers(True), steps=2, warmup=1, batch_size=4)
    assert result["source"].startswith("built-in pairs")  # SST-2 here has no train.tsv
    assert_stat(result["stage_1"]["ours"])
    assert_stat(result["stage_1"]["theirs"])
    assert_ratio(result["stage_1"]["ratio"])
    assert_stat(result["stage_2"]["ours"])
    assert result["stage_1"]["ours"]["runs"] == 2


def test_loading_section_ours_only(tiny_checkpoint):
    result = bench.bench_loading(tiny_checkpoint, None, repeats=1)
    assert_stat(result["ours"]["seconds"])
    assert_stat(result["ours"]["import_and_load_seconds"])
    assert result["ours"]["load_peak_mb"] >= 0 and result["ours"]["total_peak_mb"] > 0
    assert 0 < result["weights"]["parameters_mb"] <= result["weights"]["file_mb"]
    assert "theirs" not in result


# ----------------------------------------------------------------------------------------------------
# The command line


def test_the_command_line_quick_run_writes_every_section(tiny_checkpoint, fine_tuned, glue_root, tmp_path):
    out = tmp_path / "out" / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "deebert.bench", "--quick", "--threads", "1", "--model", str(tiny_checkpoint),
         "--checkpoint", str(fine_tuned), "--data_dir", str(glue_root), "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert list(results) == ["machine", "settings", "forward", "exit", "train", "load", "gpu"]
    for section in ("forward", "exit", "train", "load"):
        assert "skipped" not in results[section], results[section]
    assert "skipped" in results["gpu"]
    assert results["machine"]["threads"] == 1 and results["machine"]["torch"] == torch.__version__
    assert_ratio(results["load"]["ratio"]["seconds"])
    assert os.listdir(out.parent) == ["bench.json"]  # the temporary file was renamed, not left behind
    for heading in ("1. forward", "2. early exit", "3. training", "4. loading", "5. gpu: skipped"):
        assert heading in done.stdout


def test_a_missing_model_directory_exits_with_code_2_and_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "deebert.bench", "--quick", "--model", str(tmp_path / "missing")],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: --model ") and "no such directory" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # no traceback


@pytest.mark.parametrize("flags, message", [
    (["--model", "{tmp}/missing"], "no such directory"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--sections", "forward,speed"], "unknown 'speed'"),
    (["--sections", "exit", "--checkpoint", "{tiny}"], "no off-ramps"),  # a pretrained BERT is not fine-tuned
])
def test_bad_input_is_one_error_line_and_exit_code_2(flags, message, tiny_checkpoint, tmp_path, capsys):
    flags = [f.format(tmp=tmp_path, tiny=tiny_checkpoint) for f in flags]
    if "--model" not in flags:
        flags += ["--model", str(tiny_checkpoint)]
    assert bench.main(["--quick", "--no_transformers", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
