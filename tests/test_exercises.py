"""tutorial/exercises: the solutions pass every check, and the checks reject typical wrong answers.

Each wrong answer is solutions.py with one change (a line edited, or a function redefined at the end),
written to a temporary file; check.py is run on it in-process with pytest.main, as a learner runs it.
"""

import importlib.util
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

EXERCISES = Path(__file__).resolve().parents[1] / "tutorial" / "exercises"
CHECK = EXERCISES / "check.py"
SOLUTIONS = EXERCISES / "solutions.py"
SKELETON = EXERCISES / "exercise.py"
STEPS = ("step1", "step2", "step3", "step4", "step5", "step6", "step7")


class Outcomes:
    """A pytest plugin that records which checks passed and which failed, with their messages."""

    def __init__(self):
        self.passed, self.failed = [], {}

    def pytest_runtest_logreport(self, report):
        name = report.nodeid.split("::")[-1].split("[")[0]  # check.py::test_x[0.3] -> test_x
        if report.failed:
            self.failed[name] = report.longreprtext
        elif report.passed and report.when == "call":
            self.passed.append(name)


def run_checks(exercise: Path, monkeypatch, step: str = "") -> Outcomes:
    monkeypatch.setenv("DEEBERT_EXERCISE", str(exercise))
    outcomes = Outcomes()
    args = [str(CHECK), "-q", "--tb=short", "-p", "no:cacheprovider", "-p", "no:unraisableexception",
            "--import-mode=importlib"]  # (unraisableexception: five gc.collect() a run, slow with torch loaded)
    outcomes.code = pytest.main(args + (["-k", step] if step else []), plugins=[outcomes])
    return outcomes


def variant(tmp_path, replace=None, append="") -> Path:
    """solutions.py with `replace` = (old, new) done once, and/or `append` added at the end."""
    source = SOLUTIONS.read_text(encoding="utf-8")
    if replace:
        old, new = replace
        assert source.count(old) == 1, f"solutions.py changed: update this test's {old!r}"
        source = source.replace(old, new)
    path = tmp_path / "wrong.py"
    path.write_text(source + textwrap.dedent(append), encoding="utf-8")
    return path


NO_COMPACTION = '''
@torch.no_grad()
def early_exit_batch(model, input_ids, token_type_ids, attention_mask, S):
    """Right answers, wrong work: every example runs through every layer; only the first exit is kept."""
    every_off_ramp = torch.stack(model(input_ids, token_type_ids, attention_mask), dim=1)  # (B, n, C)
    entropies = entropy(every_off_ramp)  # (B, n)
    exit_layers = entropy_exits(every_off_ramp, S)  # (B,)
    logits = every_off_ramp[torch.arange(len(exit_layers)), exit_layers - 1]  # (B, C)
    entropies[torch.arange(model.num_layers) >= exit_layers[:, None]] = float("nan")
    return BatchExitResult(logits, exit_layers, entropies)
'''

SOFTMAX = "p = logits.float().softmax(dim=-1)"
WRONG = {  # name: (step, the change, the checks that must fail, a phrase the failure must teach)
    "entropy over the batch dim": ("step1", {"replace": ("softmax(dim=-1)", "softmax(dim=0)")},
                                   {"test_step1_entropy_is_over_the_classes_not_the_batch"}, ""),
    "a softmax dim that depends on the rank": (
        "step1", {"replace": (SOFTMAX, "p = logits.float().softmax(dim=-1 if logits.dim() < 3 else 1)")},
        {"test_step1_matches_the_package_on_random_logits_of_any_rank"}, "dim=-1, for logits of any rank"),
    "torch's implicit softmax dim": ("step1", {"replace": (SOFTMAX, "p = F.softmax(logits.float())")},
                                     {"test_step1_matches_the_package_on_random_logits_of_any_rank"}, "any rank"),
    "<= in early_exit": ("step2", {"replace": ("if e < S:", "if e <= S:")}, {"test_step2_S_zero_never_exits_early"},
                         "strictly"),
    "<= in entropy_exits": ("step3", {"replace": (".double() < S  # (N, n, C)", ".double() <= S  # (N, n, C)")},
                            {"test_step3_an_entropy_of_exactly_S_does_not_exit"}, "strictly"),
    "the used fraction, not the saving": ("step4", {"replace": ("return 1.0 - used_fraction", "return used_fraction")},
                                          {"test_step4_worked_examples"}, "not the used"),
    "<= in early_exit_batch": ("step5", {"replace": ("exits = e.double() < S", "exits = e.double() <= S")},
                               {"test_step5_S_zero_runs_every_layer_and_S_above_ln_C_only_the_first"}, ""),
    "stage 2 trains the last off-ramp too": (
        "step6", {"replace": ("for ramp in model.off_ramps[:-1] for p", "for ramp in model.off_ramps for p")},
        {"test_step6_trains_every_off_ramp_but_the_last_and_nothing_else"}, "must not train the last off-ramp"),
    "stage 2's loss counts the last off-ramp": (
        "step6", {"replace": ("zip(model.off_ramps[:-1], hidden_states[:-1])", "zip(model.off_ramps, hidden_states)")},
        {"test_step6_the_loss_sums_the_lower_off_ramps_losses"}, "without the last off-ramp"),
    "gradients reach the encoder in stage 2": (
        "step6", {"replace": ("    with torch.no_grad():  # the backbone is frozen", "    if True:  # the backbone")},
        {"test_step6_no_gradient_reaches_the_encoder"}, "torch.no_grad()"),
    "stage 2 averages where the paper sums": (
        "step6", {"replace": ("return sum(losses)  # the paper sums them", "return sum(losses) / len(losses)")},
        {"test_step6_the_loss_sums_the_lower_off_ramps_losses"}, "the paper sums"),
    "patience one layer early (t off-ramps agree, not t + 1)": (
        "step7", {"replace": ("if counter >= t:", "if counter + 1 >= t:")},
        {"test_step7_worked_examples", "test_step7_matches_the_package_on_random_logits"}, "t + 1 off-ramps"),
    "patience one layer late": ("step7", {"replace": ("if counter >= t:", "if counter > t:")},
                                {"test_step7_worked_examples", "test_step7_matches_the_package_on_random_logits"},
                                "off-by-one"),
}


def test_the_solutions_pass_every_check(monkeypatch):
    outcomes = run_checks(SOLUTIONS, monkeypatch)
    assert outcomes.code == 0 and not outcomes.failed, outcomes.failed
    assert {name.split("_")[1] for name in outcomes.passed} == set(STEPS)


@pytest.mark.parametrize("name", WRONG)
def test_the_checks_reject_a_wrong_answer_and_say_why(tmp_path, monkeypatch, name):
    step, change, must_fail, lesson = WRONG[name]
    outcomes = run_checks(variant(tmp_path, **change), monkeypatch, step)
    assert outcomes.code == pytest.ExitCode.TESTS_FAILED
    assert must_fail <= set(outcomes.failed), f"{name}: only {sorted(outcomes.failed)} failed"
    assert all(lesson in outcomes.failed[check] for check in must_fail), outcomes.failed  # a message that teaches


def test_the_checks_reject_a_batch_without_compaction(tmp_path, monkeypatch):
    """Every example through every layer gives the package's very answers: only the forward-hook count
    of the examples each layer runs on can tell, and it does."""
    outcomes = run_checks(variant(tmp_path, append=NO_COMPACTION), monkeypatch, "step5")
    assert set(outcomes.failed) == {"test_step5_no_layer_runs_after_an_exit"}


def test_the_skeleton_fails_every_step_with_its_own_message(monkeypatch):
    outcomes = run_checks(SKELETON, monkeypatch)
    assert outcomes.code == pytest.ExitCode.TESTS_FAILED and not outcomes.passed
    assert {name.split("_")[1] for name in outcomes.failed} == set(STEPS)
    for name, message in outcomes.failed.items():
        step = name.split("_")[1].replace("step", "step ")  # test_step3_x -> "step 3"
        assert f"NotImplementedError: {step}:" in message, message


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"exercises_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_skeleton_has_the_solutions_signatures():
    skeleton, solutions, check = load(SKELETON), load(SOLUTIONS), load(CHECK)
    for name in check.FUNCTIONS:
        assert inspect.signature(getattr(skeleton, name)) == inspect.signature(getattr(solutions, name)), name


def test_the_tiny_model_exits_at_every_layer_at_each_threshold_checked():
    """What makes the comparisons meaningful: at each S of the checks, the inputs exit at layers 1, 2 and 3."""
    from deebert.exit import early_exit_batch

    check = load(CHECK)
    model, batch = check.tiny_deebert(), check.random_batch()
    for S in check.THRESHOLDS:
        exit_layers = early_exit_batch(model, *check.inputs(batch), S=S).exit_layers
        assert set(exit_layers.tolist()) == {1, 2, 3}, (S, torch.bincount(exit_layers))
