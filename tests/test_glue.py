"""Tests for deebert/glue.py: tasks, TSV reading, metrics, finding and downloading the data.

Offline and fast: urlopen is replaced by a fake server. The real-data tests read $GLUE_DIR (a glue_data/
folder) and skip when it is unset or lacks the task; everything else writes tiny TSVs into tmp_path.
"""

import io
import math
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from deebert import glue
from deebert.errors import DeeBertError
from deebert.glue import TASKS, Example, build_mrpc, compute_metrics, download_task, find_data_dir, get_task, read_split

RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


def write_tsv(folder: Path, name: str, lines: list) -> Path:
    """Write `lines` as a TSV file, one per line, with a final newline."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def error_message(function, *args, **kwargs) -> str:
    """The message of the DeeBertError that function(*args, **kwargs) raises, checked to be one line. The tests then
    check what it names (the file and line, the flag, the value at fault), not how it is worded."""
    with pytest.raises(DeeBertError) as error:
        function(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------------
# Tasks


def test_tasks_table():
    assert list(TASKS) == ["sst-2", "mrpc", "qnli", "rte", "qqp", "mnli", "cola"]
    assert [task.is_pair for task in TASKS.values()] == [False, True, True, True, True, True, False]
    assert len(get_task("mnli").labels) == 3
    assert len(get_task("rte").labels) == 2
    assert get_task("mrpc").main_metric == "f1"
    assert get_task("qqp").metrics == ("f1", "accuracy")
    assert get_task("cola").main_metric == "mcc"
    assert get_task("sst-2").main_metric == "accuracy"
    assert get_task("mnli").dev_splits == ("dev_matched", "dev_mismatched")


def test_label_names():
    for task in TASKS.values():
        assert len(task.label_names) == len(task.labels), task.name
    assert get_task("sst-2").label_names == ("negative", "positive")
    assert get_task("mrpc").label_names == ("not_equivalent", "equivalent")
    assert get_task("qqp").label_names == ("not_duplicate", "duplicate")
    assert get_task("cola").label_names == ("unacceptable", "acceptable")
    assert get_task("rte").label_names == get_task("qnli").label_names == ("entailment", "not_entailment")
    assert get_task("mnli").label_names == ("contradiction", "entailment", "neutral")


def test_get_task_is_case_insensitive_with_alias():
    assert get_task("RTE") is TASKS["rte"]
    assert get_task("CoLA") is TASKS["cola"]
    assert get_task("SST-2") is TASKS["sst-2"]
    assert get_task("sst2") is TASKS["sst-2"]


def test_get_task_refuses_unknown_and_regression_tasks():
    message = error_message(get_task, "wnli")
    assert "'wnli'" in message
    assert all(name in message for name in TASKS)
    assert "regression" in error_message(get_task, "STS-B")


# ----------------------------------------------------------------------------------------------------
# Real data from $GLUE_DIR


@pytest.fixture
def glue_root() -> Path:
    if not os.environ.get("GLUE_DIR"):
        pytest.skip("GLUE_DIR is not set")
    return Path(os.environ["GLUE_DIR"])


def real_split(glue_root: Path, name: str, split: str) -> list:
    task = get_task(name)
    folder = glue_root / task.folder
    if not (folder / f"{split}.tsv").is_file():
        pytest.skip(f"{folder}/{split}.tsv is absent")
    return read_split(task, folder, split)


@pytest.mark.parametrize(
    "name, split, count",
    [
        ("rte", "train", 2490), ("rte", "dev", 277),
        ("mrpc", "train", 3668), ("mrpc", "dev", 408),
        ("sst-2", "train", 67349), ("sst-2", "dev", 872),
        ("cola", "train", 8551), ("cola", "dev", 1043),
        ("qnli", "dev", 5463),
    ],
)
def test_real_row_counts_and_labels(glue_root, name, split, count):
    examples = real_split(glue_root, name, split)
    assert len(examples) == count
    assert {example.label for example in examples} == set(range(len(get_task(name).labels)))
    assert all((example.text_b is not None) == get_task(name).is_pair for example in examples)


def test_real_first_rows(glue_root):
    rte = real_split(glue_root, "rte", "dev")[0]
    assert rte.text_a.startswith("Dana Reeve, the widow of the actor Christopher Reeve")
    assert rte.text_b == "Christopher Reeve had an accident."
    assert get_task("rte").labels[rte.label] == "not_entailment"

    mrpc = real_split(glue_root, "mrpc", "train")[0]  # the header with its byte-order mark is skipped
    assert mrpc == Example(
        'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .',
        'Referring to him as only " the witness " , Amrozi accused his brother of deliberately distorting '
        "his evidence .",
        1,
    )
    sst = real_split(glue_root, "sst-2", "train")[0]
    assert sst == Example("hide new secretions from the parental units ", None, 0)  # trailing space kept

    cola = real_split(glue_root, "cola", "dev")[0]  # no header: the first line is data
    assert cola == Example("The sailors rode the breeze clear of the rocks.", None, 1)

    qnli = real_split(glue_root, "qnli", "dev")[0]
    assert qnli.text_a == "What came into force after the new constitution was herald?"
    assert get_task("qnli").labels[qnli.label] == "entailment"


def test_real_bare_quotes_stay_in_their_row(glue_root):
    rte = real_split(glue_root, "rte", "train")[2164]  # indices run 0..2489, so position = index
    assert rte.text_a.startswith('"That film wasn\'t too successful, but then \'WarGames,\'')
    assert rte.text_b == 'The film "WarGames" was shot in 1983.'
    qnli = real_split(glue_root, "qnli", "dev")[694]
    assert qnli.text_a == "Who discovered the Compton Effect?"
    assert qnli.text_b.startswith('" Luis Walter Alvarez')


def test_real_data_dir_may_be_the_glue_root(glue_root):
    task = get_task("rte")
    if not (glue_root / "RTE").is_dir():
        pytest.skip("GLUE_DIR has no RTE/")
    assert find_data_dir(task, glue_root, download=False) == glue_root / "RTE"
    assert len(read_split(task, glue_root, "dev")) == 277


def test_build_mrpc_reproduces_glue_files(glue_root, tmp_path):
    mrpc = glue_root / "MRPC"
    sources = [mrpc / "msr_paraphrase_train.txt", mrpc / "msr_paraphrase_test.txt", mrpc / "dev_ids.tsv"]
    if not all(path.is_file() for path in sources):
        pytest.skip("GLUE_DIR/MRPC lacks msr_paraphrase_train.txt, msr_paraphrase_test.txt or dev_ids.tsv")
    build_mrpc(*sources, tmp_path)
    for name in ("train.tsv", "dev.tsv", "test.tsv"):  # all three must exist in GLUE_DIR/MRPC and match
        assert (tmp_path / name).read_bytes() == (mrpc / name).read_bytes(), name


# ----------------------------------------------------------------------------------------------------
# Synthetic TSVs: reading


def test_read_pair_task(tmp_path):
    write_tsv(tmp_path, "dev.tsv", [RTE_HEADER, "0\tA cat sat.\tAn animal sat.\tentailment",
                                    '1\t"Quoted\tstart.\tnot_entailment'])
    examples = read_split(get_task("rte"), tmp_path, "dev")
    assert examples == [Example("A cat sat.", "An animal sat.", 0), Example('"Quoted', "start.", 1)]


def test_read_windows_line_endings(tmp_path):
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\r\ngood \t1\r\nbad \t0\r\n")
    examples = read_split(get_task("sst-2"), tmp_path, "train")
    assert examples == [Example("good ", None, 1), Example("bad ", None, 0)]


def test_read_cola_has_no_header(tmp_path):
    write_tsv(tmp_path, "train.tsv", ["gj04\t1\t\tThe cat sat.", "gj04\t0\t*\tCat the sat."])
    examples = read_split(get_task("cola"), tmp_path, "train")
    assert examples == [Example("The cat sat.", None, 1), Example("Cat the sat.", None, 0)]


def test_read_mnli_dev_splits(tmp_path):
    def mnli_row(sentence1, sentence2, extra_labels, gold):
        parses = ["(parse)"] * 4
        return "\t".join(["0", "p", "q", "fiction", *parses, sentence1, sentence2, *extra_labels, gold])

    header12 = mnli_row("sentence1", "sentence2", ["label1"], "gold_label")
    header16 = mnli_row("sentence1", "sentence2", ["label1", "label2", "label3", "label4", "label5"], "gold_label")
    write_tsv(tmp_path, "train.tsv", [header12, mnli_row("A.", "B.", ["neutral"], "neutral")])
    five = ["entailment"] * 5
    write_tsv(tmp_path, "dev_matched.tsv", [header16, mnli_row("M.", "N.", five, "entailment")])
    write_tsv(tmp_path, "dev_mismatched.tsv", [header16, mnli_row("X.", "Y.", five, "contradiction")])

    mnli = get_task("mnli")
    assert read_split(mnli, tmp_path, "train") == [Example("A.", "B.", 2)]
    assert read_split(mnli, tmp_path, "dev") == [Example("M.", "N.", 1)]  # "dev" means dev_matched
    assert read_split(mnli, tmp_path, "dev_matched") == [Example("M.", "N.", 1)]
    assert read_split(mnli, tmp_path, "dev_mismatched") == [Example("X.", "Y.", 0)]


def test_read_qqp(tmp_path):
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    write_tsv(tmp_path, "dev.tsv", [header, "7\t1\t2\tHow old?\tWhat age?\t1", "8\t3\t4\tWhy?\tHow?\t0"])
    assert read_split(get_task("qqp"), tmp_path, "dev") == [
        Example("How old?", "What age?", 1),
        Example("Why?", "How?", 0),
    ]


# ----------------------------------------------------------------------------------------------------
# Synthetic TSVs: every error is one line that names the file, the line and what is wrong there


@pytest.mark.parametrize("name, lines, where", [
    ("rte", [RTE_HEADER, "0\tA.\tB.\tentailment", "1\tonly two"], "train.tsv line 3"),
    ("qqp", ["header", "7\t1\t2\tHow old?\tWhat age?\t1", "8\t3\t4\tWhy?\t0"], "train.tsv line 3"),
    ("mnli", ["header", "\t".join(["x"] * 10)], "train.tsv line 2"),  # the label is the last column, after the texts
])
def test_a_row_with_too_few_columns_names_its_file_and_line(tmp_path, name, lines, where):
    write_tsv(tmp_path, "train.tsv", lines)
    assert where in error_message(read_split, get_task(name), tmp_path, "train")


def test_a_bad_label_names_its_line_and_the_label(tmp_path):
    write_tsv(tmp_path, "train.tsv", [RTE_HEADER, "0\tA.\tB.\tmaybe"])
    message = error_message(read_split, get_task("rte"), tmp_path, "train")
    assert "train.tsv line 2" in message and "'maybe'" in message


def test_an_empty_split_names_its_file(tmp_path):
    write_tsv(tmp_path, "dev.tsv", [RTE_HEADER])
    (tmp_path / "train.tsv").write_bytes(b"")
    for split in ("dev", "train"):
        assert f"{split}.tsv" in error_message(read_split, get_task("rte"), tmp_path, split)


def test_a_missing_file_is_named_with_the_flag_that_fixes_it(tmp_path):
    message = error_message(read_split, get_task("rte"), tmp_path, "train")
    assert str(tmp_path / "train.tsv") in message and "--data_dir" in message


def test_the_test_split_and_an_unknown_split_are_refused(tmp_path):
    write_tsv(tmp_path, "test.tsv", ["index\tsentence1\tsentence2", "0\tA.\tB."])
    assert "'test'" in error_message(read_split, get_task("rte"), tmp_path, "test")
    assert "'dev_matched'" in error_message(read_split, get_task("rte"), tmp_path, "dev_matched")


# ----------------------------------------------------------------------------------------------------
# Metrics on textbook cases


def test_metrics_perfect_and_all_wrong():
    labels = [0, 1, 1, 0]
    assert compute_metrics(get_task("mrpc"), labels, labels) == {"f1": 1.0, "accuracy": 1.0}
    assert compute_metrics(get_task("cola"), labels, labels) == {"mcc": 1.0}
    wrong = [1, 0, 0, 1]
    assert compute_metrics(get_task("mrpc"), wrong, labels) == {"f1": 0.0, "accuracy": 0.0}
    assert compute_metrics(get_task("cola"), wrong, labels) == {"mcc": -1.0}


def test_metrics_known_values():
    predictions = np.array([1, 1, 0, 0, 1])
    labels = np.array([1, 0, 1, 0, 1])
    # tp = 2, fp = 1, fn = 1, tn = 1
    metrics = compute_metrics(get_task("qqp"), predictions, labels)
    assert list(metrics) == ["f1", "accuracy"]
    assert metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2/3
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    mcc = compute_metrics(get_task("cola"), predictions, labels)["mcc"]
    assert mcc == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))  # 1/6


def test_metrics_constant_predictions():
    labels = [0, 1, 1, 0, 1]
    assert compute_metrics(get_task("cola"), [1] * 5, labels) == {"mcc": 0.0}
    assert compute_metrics(get_task("cola"), [0] * 5, labels) == {"mcc": 0.0}
    assert compute_metrics(get_task("mrpc"), [0] * 5, labels)["f1"] == 0.0  # no positive predicted


def test_metrics_three_classes():
    metrics = compute_metrics(get_task("mnli"), [0, 1, 2, 2], [0, 1, 2, 1])
    assert metrics == {"accuracy": 0.75}
    assert isinstance(metrics["accuracy"], float)


# ----------------------------------------------------------------------------------------------------
# Finding the data: --data_dir, then GLUE_DIR, then the cache


def rte_folder(root: Path) -> Path:
    write_tsv(root / "RTE", "dev.tsv", [RTE_HEADER, "0\tA.\tB.\tentailment"])
    return root / "RTE"


@pytest.fixture
def no_download(monkeypatch):
    def refuse(task, target):
        raise AssertionError("download_task must not be called")

    monkeypatch.setattr(glue, "download_task", refuse)


def test_find_data_dir_order(tmp_path, monkeypatch, no_download):
    task = get_task("rte")
    argument = rte_folder(tmp_path / "argument")
    glue_dir = rte_folder(tmp_path / "glue_dir")
    cached = rte_folder(tmp_path / "xdg" / "deebert" / "glue")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "glue_dir"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    assert find_data_dir(task, argument) == argument
    assert find_data_dir(task, str(tmp_path / "argument")) == argument  # a GLUE root works too
    assert find_data_dir(task) == glue_dir
    monkeypatch.delenv("GLUE_DIR")
    assert find_data_dir(task) == cached
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "empty"))  # GLUE_DIR without RTE/: on to the cache
    assert find_data_dir(task) == cached


def test_find_data_dir_cache_defaults_to_home(tmp_path, monkeypatch, no_download):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cached = rte_folder(tmp_path / ".cache" / "deebert" / "glue")
    assert find_data_dir(get_task("rte")) == cached


def test_find_data_dir_errors(tmp_path, monkeypatch, no_download):
    assert "--data_dir" in error_message(find_data_dir, get_task("rte"), tmp_path)  # an argument without data
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    message = error_message(find_data_dir, get_task("rte"), download=False)  # nothing anywhere, no download
    assert "--data_dir" in message


# ----------------------------------------------------------------------------------------------------
# Download, with urllib.request.urlopen replaced by a fake server


def zip_bytes(files: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def serve(monkeypatch, pages: dict) -> list:
    """Make urlopen answer each url of `pages` with its bytes; return the list of urls asked for."""
    asked = []

    def fake_urlopen(url, timeout=None):
        asked.append(url)
        if url not in pages:
            raise urllib.error.URLError("no network")
        return io.BytesIO(pages[url])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return asked


RTE_ZIP = {
    "RTE/train.tsv": f"{RTE_HEADER}\n0\tA.\tB.\tentailment\n",
    "RTE/dev.tsv": f"{RTE_HEADER}\n0\tC.\tD.\tnot_entailment\n",
    "RTE/test.tsv": "index\tsentence1\tsentence2\n0\tE.\tF.\n",
    "__MACOSX/RTE/._train.tsv": "resource fork",
}


def download_error(tmp_path, monkeypatch, zip_files) -> str:
    """Serve RTE.zip as `zip_files` (or as these bytes); return the one-line error and check nothing is left."""
    page = zip_files if isinstance(zip_files, bytes) else zip_bytes(zip_files)
    serve(monkeypatch, {glue.ZIP_URLS["RTE"]: page})
    message = error_message(download_task, get_task("rte"), tmp_path / "RTE")
    assert os.listdir(tmp_path) == []
    return message


def test_download_fills_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    asked = serve(monkeypatch, {glue.ZIP_URLS["RTE"]: zip_bytes(RTE_ZIP)})
    task = get_task("rte")

    folder = find_data_dir(task)
    assert folder == tmp_path / "deebert" / "glue" / "RTE"
    assert asked == ["https://dl.fbaipublicfiles.com/glue/data/RTE.zip"]
    assert sorted(path.name for path in folder.iterdir()) == ["dev.tsv", "test.tsv", "train.tsv"]
    assert read_split(task, folder, "dev") == [Example("C.", "D.", 1)]
    assert os.listdir(folder.parent) == ["RTE"]  # no partial folder left behind
    assert find_data_dir(task) == folder  # the second time it is found, not downloaded
    assert len(asked) == 1


def test_download_of_a_zip_named_otherwise(tmp_path, monkeypatch):
    header = "index\tquestion\tsentence\tlabel"
    files = {  # QNLIv2.zip unpacks to QNLI/
        "QNLI/train.tsv": f"{header}\n0\tWho?\tHim.\tentailment\n",
        "QNLI/dev.tsv": f"{header}\n0\tWhat?\tThat.\tnot_entailment\n",
        "QNLI/test.tsv": "index\tquestion\tsentence\n0\tWhy?\tBecause.\n",
    }
    asked = serve(monkeypatch, {glue.ZIP_URLS["QNLI"]: zip_bytes(files)})
    download_task(get_task("qnli"), tmp_path / "QNLI")
    assert asked == ["https://dl.fbaipublicfiles.com/glue/data/QNLIv2.zip"]
    assert read_split(get_task("qnli"), tmp_path / "QNLI", "train") == [Example("Who?", "Him.", 0)]
    assert os.listdir(tmp_path) == ["QNLI"]


def test_download_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    serve(monkeypatch, {})
    message = error_message(download_task, get_task("rte"), tmp_path / "RTE")
    assert "https://dl.fbaipublicfiles.com/glue/data/RTE.zip" in message and "no network" in message
    assert "--data_dir" in message  # the way out when offline
    assert os.listdir(tmp_path) == []


def test_download_cut_off_halfway_leaves_nothing(tmp_path, monkeypatch):
    class CutOff(io.BytesIO):
        def read(self, size=-1):
            raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: CutOff())
    assert "RTE.zip" in error_message(download_task, get_task("rte"), tmp_path / "RTE")
    assert os.listdir(tmp_path) == []


def test_download_of_a_bad_zip(tmp_path, monkeypatch):
    assert "RTE.zip" in download_error(tmp_path, monkeypatch, b"<html>not a zip</html>")
    assert "dev.tsv" in download_error(tmp_path, monkeypatch, {"RTE/train.tsv": RTE_ZIP["RTE/train.tsv"]})
    for unsafe in ("RTE/../escaped.tsv", "/absolute.tsv"):
        message = download_error(tmp_path, monkeypatch, {**RTE_ZIP, unsafe: "x"})
        assert unsafe in message
    assert not (tmp_path.parent / "escaped.tsv").exists()


BOM_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def test_download_mrpc_builds_it(tmp_path, monkeypatch):
    train_txt = BOM_HEADER + "1\t11\t12\tA cat .\tA feline .\n0\t21\t22\tRain .\tSun . \n1\t31\t32\tYes .\tSure .\n"
    test_txt = BOM_HEADER + "1\t41\t42\tUp .\tDown .\n"
    pages = {
        glue.MRPC_URLS["msr_paraphrase_train.txt"]: train_txt.encode("utf-8"),
        glue.MRPC_URLS["msr_paraphrase_test.txt"]: test_txt.encode("utf-8"),
        glue.MRPC_URLS["dev_ids.tsv"]: b"21\t22\n",
    }
    serve(monkeypatch, pages)
    folder = tmp_path / "MRPC"
    download_task(get_task("mrpc"), folder)

    assert (folder / "train.tsv").read_text(encoding="utf-8") == (
        BOM_HEADER + "1\t11\t12\tA cat .\tA feline .\n1\t31\t32\tYes .\tSure .\n"
    )
    assert (folder / "dev.tsv").read_text(encoding="utf-8") == BOM_HEADER + "0\t21\t22\tRain .\tSun .\n"
    assert (folder / "test.tsv").read_text(encoding="utf-8") == (
        "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t41\t42\tUp .\tDown .\n"
    )
    assert read_split(get_task("mrpc"), folder, "dev") == [Example("Rain .", "Sun .", 0)]


def test_build_mrpc_rejects_a_malformed_line(tmp_path):
    write_tsv(tmp_path, "train.txt", [BOM_HEADER.rstrip("\n"), "1\t11\t12\tonly one string"])
    write_tsv(tmp_path, "test.txt", [BOM_HEADER.rstrip("\n")])
    write_tsv(tmp_path, "dev_ids.tsv", ["11\t12"])
    message = error_message(build_mrpc, tmp_path / "train.txt", tmp_path / "test.txt", tmp_path / "dev_ids.tsv",
                            tmp_path / "MRPC")
    assert "train.txt line 2" in message
