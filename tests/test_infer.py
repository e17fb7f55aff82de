"""infer.py end to end: texts, pairs, files, JSON, the dev-set sweep, and every kind of bad input.

Most runs call infer.main(argv) in this process (the same code path as the command line, in a fraction
of the time); a few run `python infer.py` as a real subprocess, to see what a user sees.
"""

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deebert import tradeoff
from deebert.checkpoint import load_deebert, save_checkpoint
from deebert.classify import load
from deebert.glue import get_task, read_split
from deebert.tokenizer import Tokenizer, batches

from conftest import fine_tuned, write_glue, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--max_length", "32"]  # the tiny model has 64 positions, fewer than the default 128
LONG_TEXT = " ".join(["the cat sat on the mat"] * 10)  # 62 tokens with [CLS] and [SEP]


def load_infer():
    spec = importlib.util.spec_from_file_location("infer", ROOT / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


infer = load_infer()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    sst_2 = fine_tuned(root / "single", "sst-2", ("negative", "positive"))
    static = load_deebert(root / "single" / "pretrained", labels=["negative", "positive"], num_layers=2)
    static.config.task = "sst-2"  # as train.py --task sst-2 --layers 2 saves it, untrained
    return {
        "sst-2": sst_2,
        "sst-2-k2": save_checkpoint(static, Tokenizer.from_dir(sst_2), root / "single-k2"),
        "rte": fine_tuned(root / "pair", "rte", ("entailment", "not_entailment")),
        "plain": write_tiny_checkpoint(root / "plain-bert"),
    }


def run(argv, capsys) -> tuple:
    """infer.main(argv) in this process: (exit code, stdout, stderr)."""
    try:
        code = infer.main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's errors and --help
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def run_process(argv, cwd, stdin=None, stdin_bytes=None) -> subprocess.CompletedProcess:
    """python infer.py ... as a user runs it (stdin as text, or as raw bytes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *map(str, argv)], cwd=cwd,
                          input=stdin if stdin_bytes is None else stdin_bytes, capture_output=True,
                          text=stdin_bytes is None, env=env, timeout=120)


def assert_one_line_error(code, err, *named) -> None:
    """The contract for bad input: exit code 2, exactly one line `error: ...`, naming the flag or file at fault."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in named:
        assert name in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------------
# Texts and pairs


def test_one_text_as_a_user_runs_it(checkpoints, tmp_path):
    done = run_process(["the cat sat on the mat", "--S", "0.4", "--model", checkpoints["sst-2"], *SHORT], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"checkpoint: {checkpoints['sst-2']}" in done.stdout
    assert "label: " in done.stdout and "probability" in done.stdout
    assert "exit layer: " in done.stdout and " of 3" in done.stdout
    assert "entropy per layer: 1: " in done.stdout


def test_one_pair(checkpoints, capsys):
    code, out, _ = run(["a man eats food", "a man eats", "--S", "0.4", "--model", checkpoints["rte"], *SHORT], capsys)
    assert code == 0
    label = next(line for line in out.splitlines() if line.startswith("label: "))
    assert label.split()[1] in ("entailment", "not_entailment")  # the answer by name, not a class id


@pytest.mark.parametrize("argv", [["a good movie", "--S", "0.4"], ["--S", "0.4", "a good movie"]])
def test_S_before_or_after_the_text_classifies(checkpoints, capsys, argv):
    code, out, err = run([*argv, "--model", checkpoints["sst-2"], *SHORT], capsys)
    assert code == 0, err
    assert "S = 0.4" in out and "label: " in out


def test_a_pair_around_the_flags_is_still_a_pair(checkpoints, capsys):
    code, out, err = run(["a man eats food", "--S", "0.4", "a man eats", "--model", checkpoints["rte"], *SHORT], capsys)
    assert code == 0, err
    assert "label: " in out


def test_a_static_k_layer_checkpoint_classifies(checkpoints, capsys):
    code, out, err = run(["a good movie", "--model", checkpoints["sst-2-k2"], *SHORT], capsys)
    assert code == 0, err
    assert "exit layer: 2 of 2" in out


def test_default_S_is_zero_and_says_so(checkpoints, capsys):
    code, out, _ = run(["a good movie", "--model", checkpoints["sst-2"], *SHORT], capsys)
    assert code == 0
    assert "S = 0" in out and "no early exit" in out and "exit layer: 3 of 3" in out


def test_S_above_ln_C_says_every_input_exits_at_layer_1(checkpoints, capsys):
    code, out, _ = run(["a good movie", "--S", "0.8", "--model", checkpoints["sst-2"], *SHORT], capsys)
    assert code == 0
    assert "every input exits at layer 1" in out and "exit layer: 1 of 3" in out


def test_a_long_text_is_truncated_and_the_output_says_so(checkpoints, capsys):
    code, out, _ = run([LONG_TEXT, "--model", checkpoints["sst-2"], "--max_length", "16"], capsys)
    assert code == 0 and "truncated" in out
    code, out, _ = run(["a cat", "--model", checkpoints["sst-2"], "--max_length", "16"], capsys)
    assert code == 0 and "truncated" not in out


# ----------------------------------------------------------------------------------------------------
# Files, standard input, JSON


def test_stdin_with_json_as_a_user_runs_it(checkpoints, tmp_path):
    lines = "a man eats food\ta man eats\nthe dog runs\tthe cat sat on the mat\n"
    done = run_process(["--file", "-", "--json", "--S", "0.4", "--model", checkpoints["rte"], *SHORT], tmp_path, lines)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["text"], r["text_b"]) for r in records] == [("a man eats food", "a man eats"),
                                                           ("the dog runs", "the cat sat on the mat")]
    for record in records:
        assert set(record) == {"text", "text_b", "label", "probability", "exit_layer", "num_layers", "entropies",
                               "truncated"}
        assert len(record["entropies"]) == record["exit_layer"] and 0.5 <= record["probability"] <= 1
        assert record["truncated"] is False


def test_a_file_gives_the_same_answers_as_one_text_at_a_time(checkpoints, tmp_path, capsys):
    texts = ["the cat sat on the mat", "a very bad movie", "not good", "the man runs", LONG_TEXT, "dog"]
    path = tmp_path / "inputs.txt"
    path.write_text("\n".join(texts) + "\n")
    code, out, _ = run(["--file", path, "--json", "--S", "0.4", "--batch_size", "4",
                        "--model", checkpoints["sst-2"], *SHORT], capsys)
    assert code == 0
    batched = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in batched] == texts and [r["truncated"] for r in batched] == [False] * 4 + [True, False]
    for text, record in zip(texts, batched):
        code, out, _ = run([text, "--json", "--S", "0.4", "--model", checkpoints["sst-2"], *SHORT], capsys)
        alone = json.loads(out)
        assert (alone["label"], alone["exit_layer"]) == (record["label"], record["exit_layer"])
        assert alone["probability"] == pytest.approx(record["probability"], abs=1e-5)


def test_a_file_without_json_prints_one_line_per_input(checkpoints, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("a good movie\nbad\n")
    code, out, _ = run(["--file", tmp_path / "in.txt", "--model", checkpoints["sst-2"], *SHORT], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if "exit 3/3" in line]
    assert len(lines) == 2 and lines[0].split()[0] == "1" and lines[1].endswith("bad")


# ----------------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line "error: ...", no traceback


def test_bad_input_as_a_user_sees_it(checkpoints, tmp_path):
    for argv in (["a text", "--S", "abc", "--model", checkpoints["sst-2"]],
                 ["a text", "--model", checkpoints["plain"], *SHORT]):
        done = run_process(argv, tmp_path)
        assert_one_line_error(done.returncode, done.stderr)
        assert done.stdout == ""


@pytest.mark.parametrize("argv, named", [
    (["", "--model", "{sst-2}"], ["text"]),
    (["   ", "--model", "{sst-2}"], ["text"]),
    (["a", "--model", "{missing}"], ["{missing}"]),
    (["a", "--model", "{plain}"], ["{plain}"]),  # a pretrained BERT: no off-ramps
    (["a", "--S", "-1", "--model", "{sst-2}"], ["--S"]),
    (["a", "--S", "abc", "--model", "{sst-2}"], ["--S"]),
    (["a", "--S", "nan", "--model", "{sst-2}"], ["--S"]),
    (["premise", "hypothesis", "--model", "{sst-2}"], ["sst-2"]),
    (["premise only", "--model", "{rte}"], ["rte"]),
    (["a", "b", "", "--model", "{rte}"], ["rte"]),
    (["premise", "", "--model", "{rte}"], ["text 2"]),
    (["--model", "{sst-2}"], ["--file"]),  # nothing to do
    (["a", "--model", "{sst-2}", "--max_length", "1000"], ["--max_length"]),
    (["a", "--model", "{sst-2}", "--task", "rte"], ["--task", "rte"]),
    (["a", "--model", "{sst-2}", "--batch_size", "0"], ["--batch_size"]),
    (["--model", "{sst-2}", "--file", "{missing}"], ["--file", "{missing}"]),
    (["a", "--model", "{sst-2}", "--file", "{missing}"], ["--file"]),
    (["--eval", "a", "--model", "{sst-2}"], ["--eval"]),
    (["--eval", "--S", "0.3", "--model", "{sst-2}"], ["--eval", "--S"]),
    (["--eval", "--model", "{sst-2}", "--calibration_file", "x.txt"], ["--calibration_file", "--max_disagree"]),
    (["--eval", "--model", "{sst-2}", "--max_disagree", "0.1", "--calibration_file", "{missing}"],
     ["--calibration_file", "{missing}"]),
    (["--eval", "--model", "{sst-2}", "--static", "{plain}"], ["{plain}"]),
    (["--eval", "--model", "{sst-2}", "--static", "{sst-2}"], ["--static"]),  # not fewer layers
    (["--eval", "--model", "{sst-2}", "--static", "{rte}"], ["rte"]),  # another task
    (["a", "--model", "{sst-2}", "--device", "tpu"], ["--device"]),
    (["a", "--model", "{sst-2}", "--dtype", "bf16"], ["--dtype"]),  # no GPU here
    (["a", "--model", "{sst-2}", "--thresholds", "0.1", "x"], ["--thresholds"]),
])
def test_bad_input_gives_one_line_error(checkpoints, tmp_path, capsys, argv, named):
    places = {"{missing}": str(tmp_path / "nowhere"), **{f"{{{k}}}": str(v) for k, v in checkpoints.items()}}
    code, out, err = run(SHORT + [places.get(a, a) for a in argv], capsys)  # a later --max_length wins
    assert_one_line_error(code, err, *[places.get(name, name) for name in named])


@pytest.mark.parametrize("content, task, line", [
    ("a man eats\ta man\nno tab here\n", "rte", "line 2"),
    ("a man eats\ta man\na\tb\tc\n", "rte", "line 2"),
    ("good movie\n\nbad movie\n", "sst-2", "line 2"),
    ("good movie\nbad\tmovie\n", "sst-2", "line 2"),
    ("\tpremise missing\n", "rte", "line 1"),
    ("", "sst-2", ""),  # no inputs at all: the file is named
])
def test_a_malformed_file_line_names_its_line(checkpoints, tmp_path, capsys, content, task, line):
    path = tmp_path / "inputs.txt"
    path.write_text(content)
    code, _, err = run(["--file", path, "--model", checkpoints[task], *SHORT], capsys)
    assert_one_line_error(code, err, str(path), line)


def test_bytes_that_are_not_utf8_name_their_line(checkpoints, tmp_path, capsys):
    path = tmp_path / "inputs.txt"
    path.write_bytes(b"a good movie\nbad \xff\xfe bytes\n")
    code, _, err = run(["--file", path, "--model", checkpoints["sst-2"], *SHORT], capsys)
    assert_one_line_error(code, err, "line 2 is not UTF-8 text")
    done = run_process(["--file", "-", "--model", checkpoints["sst-2"], *SHORT], tmp_path, None, stdin_bytes=b"\xc3(\n")
    assert_one_line_error(done.returncode, done.stderr.decode(), "standard input line 1 is not UTF-8 text")


def test_a_malformed_stdin_line_names_its_line(checkpoints, capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"fine\ttoo\nnot fine\n")))
    code, _, err = run(["--file", "-", "--model", checkpoints["rte"], *SHORT], capsys)
    assert_one_line_error(code, err, "standard input line 2")


# ----------------------------------------------------------------------------------------------------
# Finding the checkpoint: runs/<task>, else the newest runs/*


def test_the_default_checkpoint_is_under_runs(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["a good movie", *SHORT], capsys)
    assert_one_line_error(code, err, "no fine-tuned checkpoint under runs/", "train first", "--model")
    code, _, err = run(["a good movie", "--task", "sst-2", *SHORT], capsys)
    assert_one_line_error(code, err, "runs/sst-2", "train first")

    shutil.copytree(checkpoints["rte"], tmp_path / "runs" / "rte")
    shutil.copytree(checkpoints["sst-2"], tmp_path / "runs" / "sst-2")
    os.utime(tmp_path / "runs" / "rte" / "config.json", (1e9, 1e9))  # rte saved long ago, sst-2 just now
    code, out, _ = run(["a good movie", *SHORT], capsys)
    assert code == 0 and "checkpoint: runs/sst-2" in out
    code, out, _ = run(["a man", "a woman", "--task", "rte", *SHORT], capsys)
    assert code == 0 and "checkpoint: runs/rte" in out


# ----------------------------------------------------------------------------------------------------
# --eval on a tiny GLUE folder


def test_eval_sweeps_times_and_writes_the_csvs_and_png(checkpoints, tmp_path, capsys):
    data_dir = write_glue(tmp_path / "glue") / "SST-2"
    code, out, err = run(["--eval", "--model", checkpoints["sst-2"], "--data_dir", data_dir, "--thresholds", "0", "0.3",
                          "0.5", "0.8", "--eval_batch_size", "8", "--timing_examples", "6", "--timing_seconds", "1",
                          "--static", checkpoints["sst-2-k2"], "--out", tmp_path / "results", *SHORT], capsys)
    assert code == 0, err
    assert "SST-2 dev: 24 examples" in out
    assert "wall clock on 6 examples sorted by length" in out
    with open(tmp_path / "results" / "tradeoff.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["S"] for row in rows] == ["full", "0.0", "0.3", "0.5", "0.8"]
    assert float(rows[-1]["expected_saving"]) == pytest.approx(1 - 1 / 3)  # S = 0.8 > ln 2: everyone at layer 1
    for row in rows[1:]:  # each S's wall clock, at both batch sizes, on the timed examples
        assert row["measured_saving_batch1"] and row["measured_saving_batch8"]
    assert float(rows[-1]["expected_saving_batch8"]) == pytest.approx(1 - 1 / 3)
    with open(tmp_path / "results" / "rules.csv", newline="") as f:
        rules = list(csv.DictReader(f))
    assert {row["rule"] for row in rules} == {"entropy", "max probability", "patience", "PCEE (t = 2)", "static"}
    static = next(row for row in rules if row["rule"] == "static")
    assert static["threshold"] == "2" and float(static["expected_saving"]) == pytest.approx(1 / 3)
    assert f"static {checkpoints['sst-2-k2'].name}" in out  # timed beside the full model
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "results" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_the_printed_rules_table_is_what_the_full_pass_gives(checkpoints, tmp_path, capsys):
    """Recomputed here from the same full pass, every printed number of the rules table agrees."""
    data_dir = write_glue(tmp_path / "glue") / "SST-2"
    code, out, err = run(["--eval", "--model", checkpoints["sst-2"], "--data_dir", data_dir, "--no_timing",
                          "--out", tmp_path, *SHORT], capsys)
    assert code == 0, err
    model, tokenizer = load(checkpoints["sst-2"], "cpu", max_length=32)
    examples = read_split(get_task("sst-2"), data_dir, "dev")
    logits, labels = tradeoff.full_pass(model, batches(tokenizer, examples, 8))
    for name, rule in tradeoff.compare_rules(logits, labels, get_task("sst-2")).items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        expected = ["-" if v is None else f"{100 * v:.2f}" for v in [*rule["at"].values(), rule["mean"]]]
        assert line.split()[-4:] == expected, line


def test_certify_then_classify_with_S_auto(checkpoints, tmp_path, capsys):
    data_dir = write_glue(tmp_path / "glue", n_dev=64) / "SST-2"
    model = tmp_path / "model"
    shutil.copytree(checkpoints["sst-2"], model)
    code, _, err = run(["a good movie", "--S", "auto", "--model", model, *SHORT], capsys)
    assert_one_line_error(code, err, "--S auto", "--max_disagree")
    base = ["--eval", "--model", model, "--data_dir", data_dir, "--no_timing", *SHORT]
    code, _, err = run(base + ["--max_disagree", "0.01"], capsys)  # 32 examples cannot certify 1%
    assert_one_line_error(code, err, "32 calibration examples", "230")
    code, out, err = run(base + ["--max_disagree", "0.1", "--delta", "0.1"], capsys)
    assert code == 0, err
    assert "certified on a random half of SST-2 dev (32 examples)" in out and "it did not see" in out
    certified = json.loads((model / "results.json").read_text())["calibration"]
    assert certified["epsilon"] == 0.1 and certified["examples"] == 32 and certified["dtype"] == "fp32"
    code, out, err = run(["a good movie", "--S", "auto", "--model", model, *SHORT], capsys)
    assert code == 0 and f"S = {certified['S']:g} (calibrated)" in out
    assert "another precision" not in out
    results = json.loads((model / "results.json").read_text())
    results["calibration"]["dtype"] = "bf16"  # as if certified on a GPU in bf16; this run is fp32
    (model / "results.json").write_text(json.dumps(results))
    code, out, err = run(["a good movie", "--S", "auto", "--model", model, *SHORT], capsys)
    assert code == 0 and "certified in bf16 and this run is in fp32" in out
    texts = tmp_path / "unlabelled.txt"
    texts.write_text("".join(f"{w} movie\n" for w in ["good", "bad", "very good", "not bad", "the"] * 8))
    code, out, err = run(base + ["--max_disagree", "0.1", "--calibration_file", texts], capsys)
    assert code == 0 and "certified on 40 unlabelled texts" in out, err


@pytest.mark.parametrize("flag, value", [("--max_disagree", "0"), ("--max_disagree", "1.5"), ("--delta", "1")])
def test_epsilon_and_delta_outside_0_1_are_refused(checkpoints, capsys, flag, value):
    code, _, err = run(["--eval", "--model", checkpoints["sst-2"], flag, value, *SHORT], capsys)
    assert_one_line_error(code, err, flag, "is outside (0, 1)")


def test_eval_without_timing_uses_the_papers_thresholds(checkpoints, tmp_path, capsys):
    data_dir = write_glue(tmp_path / "glue") / "SST-2"
    code, out, err = run(["--eval", "--model", checkpoints["sst-2"], "--data_dir", data_dir, "--no_timing",
                          "--max_eval_examples", "10", "--out", tmp_path, *SHORT], capsys)
    assert code == 0, err
    assert "SST-2 dev: 10 examples" in out and "wall clock" not in out
    assert len((tmp_path / "tradeoff.csv").read_text().splitlines()) == 1 + 1 + 13  # header, full, 13 thresholds


def test_eval_on_a_task_without_data_is_a_one_line_error(checkpoints, tmp_path, capsys):
    code, _, err = run(["--eval", "--model", checkpoints["sst-2"], "--data_dir", tmp_path, *SHORT], capsys)
    assert_one_line_error(code, err, "--data_dir", "SST-2")


# ----------------------------------------------------------------------------------------------------
# --help


def test_help_shows_every_option_with_its_default(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for action in infer.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.option_strings[0] in out
            assert "default" in (action.help or ""), action.option_strings[0]


def test_S_takes_a_number_or_auto_and_the_sweep_takes_several():
    parser = infer.build_parser()
    assert parser.parse_intermixed_args(["--S", "inf", "text"]).S == math.inf
    assert parser.parse_intermixed_args(["--S", "auto", "text"]).S == "auto"
    assert parser.parse_intermixed_args(["--eval", "--thresholds", "0.4", "0.5"]).thresholds == [0.4, 0.5]
