"""GLUE for DeeBERT: the classification tasks, their TSV files, their metrics, and the download.

The files follow the original GLUE distribution, the `glue_data/` folder that `download_glue_data.py`
writes: one folder per task (`RTE/`, `SST-2/`, ...) holding `train.tsv`, `dev.tsv` and `test.tsv`
(MNLI: `dev_matched.tsv` and `dev_mismatched.tsv`). Each `Task` below records where a task keeps its
texts and its label, and which metric the GLUE leaderboard reports for it:

    task   text_a           text_b           label            labels                     metrics
    SST-2  sentence (0)     -                label (1)        0, 1                       accuracy
    MRPC   #1 String (3)    #2 String (4)    Quality (0)      0, 1                       f1, accuracy
    QNLI   question (1)     sentence (2)     label (3)        entailment, not_entailment accuracy
    RTE    sentence1 (1)    sentence2 (2)    label (3)        entailment, not_entailment accuracy
    QQP    question1 (3)    question2 (4)    is_duplicate (5) 0, 1                       f1, accuracy
    MNLI   sentence1 (8)    sentence2 (9)    gold_label(last) contradiction, entailment, neutral  accuracy
    CoLA   sentence (3)     -                label (1)        0, 1                       mcc

The files are parsed the way the GLUE loaders parse them: `utf-8-sig` (MRPC's header starts with a
byte-order mark) and `csv` with tabs and `QUOTE_NONE`, because some RTE and QNLI fields begin with a
bare `"` that a quoting parser would run on into the next rows. STS-B is left out: it is regression
(a similarity score from 0 to 5), and DeeBERT's off-ramps are classifiers.

Where the data comes from, in order: `--data_dir`, then `$GLUE_DIR/<folder>`, then a cache folder
(`~/.cache/deebert/glue/<folder>`) that is filled from the official GLUE zips on first use.
"""

import csv
import http.client
import math
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from deebert.errors import DeeBertError

# ----------------------------------------------------------------------------------------------------
# The tasks


@dataclass(frozen=True)
class Task:
    """One GLUE classification task: where its columns are, what its labels are, how it is scored."""

    name: str  # lower-case key: "rte", "sst-2", ...
    folder: str  # the GLUE folder name: "RTE", "SST-2", ...
    text_columns: tuple  # column of text_a, then of text_b for sentence-pair tasks
    label_column: int  # -1 means the last column (MNLI)
    labels: tuple  # label strings as written in the TSV; class id = position in this tuple
    metrics: tuple  # metrics[0] is the one the GLUE leaderboard ranks by
    has_header: bool
    dev_splits: tuple  # ("dev",), or MNLI's ("dev_matched", "dev_mismatched")

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def min_columns(self) -> int:
        """How many tab-separated columns a data row needs at least."""
        last_text_column = max(self.text_columns)
        if self.label_column < 0:  # MNLI: the label is the last column, after the texts
            return last_text_column + 2
        return max(last_text_column, self.label_column) + 1


ENTAILMENT = ("entailment", "not_entailment")
BINARY = ("0", "1")

TASKS = {
    "sst-2": Task("sst-2", "SST-2", (0,), 1, BINARY, ("accuracy",), True, ("dev",)),
    "mrpc": Task("mrpc", "MRPC", (3, 4), 0, BINARY, ("f1", "accuracy"), True, ("dev",)),
    "qnli": Task("qnli", "QNLI", (1, 2), 3, ENTAILMENT, ("accuracy",), True, ("dev",)),
    "rte": Task("rte", "RTE", (1, 2), 3, ENTAILMENT, ("accuracy",), True, ("dev",)),
    "qqp": Task("qqp", "QQP", (3, 4), 5, BINARY, ("f1", "accuracy"), True, ("dev",)),
    # The label order is the one Hugging Face's glue processors use, so class ids agree with theirs.
    "mnli": Task(
        "mnli", "MNLI", (8, 9), -1, ("contradiction", "entailment", "neutral"), ("accuracy",), True,
        ("dev_matched", "dev_mismatched"),
    ),
    "cola": Task("cola", "CoLA", (3,), 1, BINARY, ("mcc",), False, ("dev",)),
}

ALIASES = {"sst2": "sst-2"}
REGRESSION_TASKS = ("sts-b", "stsb", "sts")


def get_task(name: str) -> Task:
    """The task called `name`, in any case: get_task("RTE") is get_task("rte"); "sst2" means "sst-2"."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in REGRESSION_TASKS:
        raise DeeBertError(
            f"GLUE task {name!r} is regression (a similarity score), which DeeBERT's classifier "
            f"off-ramps do not support; choose one of: {', '.join(TASKS)}"
        )
    if key not in TASKS:
        raise DeeBertError(f"unknown GLUE task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]


# ----------------------------------------------------------------------------------------------------
# Finding the data


def cache_dir() -> Path:
    """Where downloaded GLUE tasks live: $XDG_CACHE_HOME/deebert/glue, by default ~/.cache/deebert/glue."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "deebert" / "glue"


def _task_folder(task: Task, path) -> Path:
    """`path` itself, or its <folder>/ subfolder when `path` is a GLUE root such as glue_data/."""
    path = Path(path)
    if (path / task.folder).is_dir():
        return path / task.folder
    return path


def _has_tsvs(task: Task, folder: Path) -> bool:
    """Whether `folder` holds this task's train.tsv or one of its dev files."""
    splits = ("train",) + task.dev_splits
    return any((folder / f"{split}.tsv").is_file() for split in splits)


def find_data_dir(task: Task, data_dir=None, download: bool = True) -> Path:
    """The folder with `task`'s TSVs: `data_dir`, else $GLUE_DIR/<folder>, else the cache.

    `data_dir` may be the task's own folder (the one with train.tsv) or a GLUE root that holds a
    <folder>/ subfolder. When neither it nor $GLUE_DIR is given or has the task, the task is looked up
    in the cache and, with `download=True`, downloaded there first.
    """
    if data_dir is not None:
        folder = _task_folder(task, data_dir)
        if not _has_tsvs(task, folder):
            raise DeeBertError(
                f"--data_dir {data_dir} holds no train.tsv or {task.dev_splits[0]}.tsv for {task.folder}; "
                f"pass the folder with {task.folder}'s TSVs or a GLUE root with a {task.folder}/ subfolder"
            )
        return folder

    glue_dir = os.environ.get("GLUE_DIR")
    if glue_dir and _has_tsvs(task, Path(glue_dir) / task.folder):
        return Path(glue_dir) / task.folder

    cached = cache_dir() / task.folder
    if _has_tsvs(task, cached):
        return cached
    if not download:
        raise DeeBertError(
            f"no GLUE data for {task.folder} (GLUE_DIR={glue_dir or 'unset'}, cache {cached} empty); "
            f"pass --data_dir with its TSVs or set GLUE_DIR to a GLUE root with a {task.folder}/ subfolder"
        )
    print(f"GLUE {task.folder} not found locally; downloading it into {cached}", file=sys.stderr)
    download_task(task, cached)
    return cached


# ----------------------------------------------------------------------------------------------------
# Reading a split


@dataclass(frozen=True)
class Example:
    """One labelled example: one text, or a pair, and its class id (an index into task.labels)."""

    text_a: str
    text_b: str | None
    label: int


def _split_file(task: Task, split: str) -> str:
    """The file name of `split`: "dev" is dev.tsv, or dev_matched.tsv for MNLI."""
    if split.startswith("test"):  # test.tsv, MNLI's test_matched.tsv and test_mismatched.tsv
        raise DeeBertError(
            f"GLUE's test files have no labels; read {task.folder}'s 'train' or one of {', '.join(task.dev_splits)}"
        )
    if split == "dev":
        split = task.dev_splits[0]
    if split != "train" and split not in task.dev_splits:
        allowed = ", ".join(("train", "dev") + tuple(s for s in task.dev_splits if s != "dev"))
        raise DeeBertError(f"{task.folder} has no split {split!r}; choose one of: {allowed}")
    return f"{split}.tsv"


def _read_tsv_rows(path: Path):
    """Yield (line number, list of fields) for every line of a GLUE TSV file."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            yield reader.line_num, row


def _row_to_example(task: Task, row: list, where: str) -> Example:
    """Turn one TSV row into an Example; `where` is "<file> line <n>" for the error messages."""
    if len(row) < task.min_columns:
        raise DeeBertError(
            f"{where}: expected at least {task.min_columns} tab-separated columns, found {len(row)}; "
            f"the file is not in GLUE TSV format"
        )
    label = row[task.label_column]
    if label not in task.labels:
        shown = label if len(label) <= 40 else label[:40] + "..."  # a wrong column can hold a whole sentence
        raise DeeBertError(
            f"{where}: label {shown!r} is not one of {', '.join(task.labels)}; "
            f"check that the file is {task.folder} data in GLUE TSV format"
        )
    text_a = row[task.text_columns[0]]
    text_b = row[task.text_columns[1]] if task.is_pair else None
    return Example(text_a, text_b, task.labels.index(label))


def read_split(task: Task, data_dir, split: str) -> list[Example]:
    """Read <data_dir>/<split>.tsv into Examples; split is "train", "dev" or one of task.dev_splits.

    For example, read_split(get_task("rte"), "glue_data/RTE", "dev") gives 277 Examples, the first
    being Example(text_a="Dana Reeve, the widow of ...", text_b="Christopher Reeve had an accident.",
    label=1), label 1 being "not_entailment".
    """
    path = _task_folder(task, data_dir) / _split_file(task, split)
    if not path.is_file():
        raise DeeBertError(
            f"{task.folder} file not found: {path}; pass --data_dir with the folder that holds "
            f"{task.folder}'s TSVs or set GLUE_DIR to a GLUE root with a {task.folder}/ subfolder"
        )
    examples = []
    for line_number, row in _read_tsv_rows(path):
        if task.has_header and line_number == 1:
            continue
        examples.append(_row_to_example(task, row, f"{path} line {line_number}"))
    if not examples:
        raise DeeBertError(f"{path} has no data rows; expected {task.folder} examples in GLUE TSV format")
    return examples


# ----------------------------------------------------------------------------------------------------
# Metrics (plain numpy; binary F1 and MCC take class id 1 as the positive class)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the label: accuracy([1, 0, 1], [1, 1, 1]) == 2/3."""
    return float(np.mean(predictions == labels))


def _confusion_counts(predictions: np.ndarray, labels: np.ndarray) -> tuple:
    """(tp, fp, fn, tn) for positive class 1, as Python ints."""
    tp = int(np.sum((predictions == 1) & (labels == 1)))
    fp = int(np.sum((predictions == 1) & (labels != 1)))
    fn = int(np.sum((predictions != 1) & (labels == 1)))
    tn = int(np.sum((predictions != 1) & (labels != 1)))
    return tp, fp, fn, tn


def f1_score(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1: 2 tp / (2 tp + fp + fn), the harmonic mean of precision and recall; 0.0 if undefined."""
    tp, fp, fn, _ = _confusion_counts(predictions, labels)
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)); 0.0 if a factor is 0."""
    tp, fp, fn, tn = _confusion_counts(predictions, labels)
    denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    if denominator == 0:
        return 0.0
    return (tp * tn - fp * fn) / math.sqrt(denominator)


METRICS = {"accuracy": accuracy, "f1": f1_score, "mcc": matthews_corrcoef}


def _as_class_ids(task: Task, values, what: str) -> np.ndarray:
    """`values` as a 1-D integer array of class ids of `task`, or a DeeBertError saying what is wrong."""
    ids = np.asarray(values)
    if ids.ndim != 1:
        raise DeeBertError(
            f"{what} must be a 1-D sequence of class ids, got shape {ids.shape}; take the argmax of the logits"
        )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise DeeBertError(
            f"{what} must be integer class ids, got dtype {ids.dtype}; take the argmax of the logits"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= task.num_labels):
        raise DeeBertError(
            f"{what} hold class ids outside 0..{task.num_labels - 1}; {task.folder} has {task.num_labels} classes"
        )
    return ids


def compute_metrics(task: Task, predictions, labels) -> dict[str, float]:
    """The task's GLUE metrics, keyed by task.metrics: compute_metrics(mrpc, [1, 0], [1, 1]) gives
    {"f1": 2/3, "accuracy": 0.5}."""
    predictions = _as_class_ids(task, predictions, "predictions")
    labels = _as_class_ids(task, labels, "labels")
    if len(predictions) != len(labels):
        raise DeeBertError(
            f"{len(predictions)} predictions for {len(labels)} labels; pass one prediction per example"
        )
    if len(labels) == 0:
        raise DeeBertError("no predictions to score; pass at least one example")
    return {name: METRICS[name](predictions, labels) for name in task.metrics}


# ----------------------------------------------------------------------------------------------------
# Download: the official GLUE zips, and MRPC built from Microsoft's files as download_glue_data.py does

GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data"
ZIP_URLS = {  # QQP-clean.zip unpacks to QQP/, QNLIv2.zip to QNLI/
    "CoLA": f"{GLUE_URL}/CoLA.zip",
    "SST-2": f"{GLUE_URL}/SST-2.zip",
    "QQP": f"{GLUE_URL}/QQP-clean.zip",
    "MNLI": f"{GLUE_URL}/MNLI.zip",
    "QNLI": f"{GLUE_URL}/QNLIv2.zip",
    "RTE": f"{GLUE_URL}/RTE.zip",
}
SENTEVAL_URL = "https://dl.fbaipublicfiles.com/senteval/senteval_data"
MRPC_URLS = {  # GLUE never hosted MRPC itself; these are the files download_glue_data.py fetches
    "msr_paraphrase_train.txt": f"{SENTEVAL_URL}/msr_paraphrase_train.txt",
    "msr_paraphrase_test.txt": f"{SENTEVAL_URL}/msr_paraphrase_test.txt",
    "dev_ids.tsv": (
        "https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations.appspot.com/o/"
        "data%2Fmrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc"
    ),
}


def _download_error(task: Task, url: str, reason) -> DeeBertError:
    reason = " ".join(str(reason).split())  # one line, whatever the reason's text holds
    return DeeBertError(
        f"could not download {task.folder} from {url} ({reason}); "
        f"pass --data_dir or set GLUE_DIR to a folder with the GLUE TSVs"
    )


def _fetch(task: Task, url: str, destination: Path) -> None:
    """Stream `url` into the file `destination`."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as f:
            shutil.copyfileobj(response, f)
    except urllib.error.HTTPError as error:  # the server answered, with an error status
        raise _download_error(task, url, error) from error
    except urllib.error.URLError as error:  # no answer: offline, DNS, refused, ...
        raise _download_error(task, url, error.reason) from error
    except (OSError, http.client.HTTPException) as error:  # cut off halfway, timed out, disk full
        raise _download_error(task, url, error) from error


def _zip_prefix_of_train(task: Task, url: str, names: list) -> str:
    """The folder inside the zip that holds train.tsv, e.g. "QNLI/" (the shallowest, if several)."""
    candidates = [
        name for name in names
        if PurePosixPath(name).name == "train.tsv" and not name.startswith("__MACOSX")
    ]
    if not candidates:
        raise _download_error(task, url, "the zip holds no train.tsv")
    shallowest = min(candidates, key=lambda name: len(PurePosixPath(name).parts))
    return shallowest[: -len("train.tsv")]


def _unpack_task_zip(task: Task, url: str, zip_path: Path, folder: Path) -> None:
    """Unpack the zip's task folder (the one with train.tsv) into `folder`, without that top folder."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as error:
        raise _download_error(task, url, f"not a zip file: {error}") from error
    with archive:
        prefix = _zip_prefix_of_train(task, url, archive.namelist())
        for member in archive.infolist():
            if member.is_dir() or not member.filename.startswith(prefix):
                continue
            relative = PurePosixPath(member.filename[len(prefix):])
            if relative.is_absolute() or ".." in relative.parts:
                raise _download_error(task, url, f"unsafe path in zip: {member.filename}")
            destination = folder.joinpath(*relative.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(destination, "wb") as target:
                shutil.copyfileobj(source, target)


def _download_zip_task(task: Task, folder: Path) -> None:
    url = ZIP_URLS[task.folder]
    zip_path = folder / f"{task.folder}.zip"
    _fetch(task, url, zip_path)
    _unpack_task_zip(task, url, zip_path, folder)
    zip_path.unlink()


def _download_mrpc(task: Task, folder: Path) -> None:
    for file_name, url in MRPC_URLS.items():
        _fetch(task, url, folder / file_name)
    train_txt, test_txt, dev_ids = (folder / file_name for file_name in MRPC_URLS)
    build_mrpc(train_txt, test_txt, dev_ids, folder)


def download_task(task: Task, target) -> None:
    """Download `task` into the folder `target` (train.tsv, dev.tsv or MNLI's dev files, test.tsv).

    The files go into a temporary folder beside `target`, renamed to `target` only once complete, so an
    interrupted download never leaves a half-filled `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        if task.folder == "MRPC":
            _download_mrpc(task, partial)
        else:
            _download_zip_task(task, partial)
        _check_download(task, partial)
        _move_into_place(task, partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # already gone when the rename succeeded


def _check_download(task: Task, folder: Path) -> None:
    for split in ("train",) + task.dev_splits:
        if not (folder / f"{split}.tsv").is_file():
            raise DeeBertError(
                f"the {task.folder} download has no {split}.tsv; "
                f"pass --data_dir or set GLUE_DIR to a folder with the GLUE TSVs"
            )


def _move_into_place(task: Task, partial: Path, target: Path) -> None:
    """Rename `partial` to `target` (which may exist only as an empty folder)."""
    try:
        os.rename(partial, target)
    except OSError as error:
        if _has_tsvs(task, target):  # another process finished the same download first: keep theirs
            return
        raise DeeBertError(
            f"cannot move the {task.folder} download into {target} ({error}); remove that folder and retry"
        ) from error


# ----------------------------------------------------------------------------------------------------
# MRPC, built from Microsoft's paraphrase files


def _read_dev_ids(path: Path) -> set:
    """The (#1 ID, #2 ID) pairs listed one per line, tab-separated, in dev_ids.tsv."""
    with open(path, encoding="utf-8") as f:
        return {tuple(line.strip().split("\t")) for line in f if line.strip()}


def _read_msr_pairs(path: Path) -> tuple:
    """(header line, list of (label, id1, id2, string1, string2)) of msr_paraphrase_{train,test}.txt.

    Read as utf-8, not utf-8-sig, on purpose: the header keeps its byte-order mark, as GLUE's files do.
    Each line is stripped of surrounding whitespace before splitting, as download_glue_data.py does.
    """
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        pairs = []
        for line_number, line in enumerate(f, start=2):
            fields = line.strip().split("\t")
            if len(fields) != 5:
                raise DeeBertError(
                    f"{path} line {line_number}: expected 5 tab-separated columns "
                    f"(Quality, #1 ID, #2 ID, #1 String, #2 String), found {len(fields)}; "
                    f"the file is not an MSR paraphrase file"
                )
            pairs.append(tuple(fields))
    return header, pairs


def _open_for_writing(path: Path):
    return open(path, "w", encoding="utf-8", newline="\n")  # "\n" line ends on every system


def build_mrpc(train_txt, test_txt, dev_ids, target) -> None:
    """Write MRPC's train.tsv, dev.tsv and test.tsv into `target`, exactly as download_glue_data.py does.

    A pair of msr_paraphrase_train.txt goes to dev.tsv when its (#1 ID, #2 ID) is listed in `dev_ids`,
    else to train.tsv; both copy the header. test.tsv replaces the label column with a 0-based index.
    """
    for path in (train_txt, test_txt, dev_ids):
        if not Path(path).is_file():
            raise DeeBertError(
                f"MRPC source file not found: {path}; pass msr_paraphrase_train.txt, msr_paraphrase_test.txt "
                f"and dev_ids.tsv"
            )
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    dev_pairs = _read_dev_ids(Path(dev_ids))

    header, pairs = _read_msr_pairs(Path(train_txt))
    train_path, dev_path = target / "train.tsv", target / "dev.tsv"
    with _open_for_writing(train_path) as train_file, _open_for_writing(dev_path) as dev_file:
        train_file.write(header)
        dev_file.write(header)
        for label, id1, id2, string1, string2 in pairs:
            out = dev_file if (id1, id2) in dev_pairs else train_file
            out.write(f"{label}\t{id1}\t{id2}\t{string1}\t{string2}\n")

    _, pairs = _read_msr_pairs(Path(test_txt))
    with _open_for_writing(target / "test.tsv") as test_file:
        test_file.write("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        for index, (_, id1, id2, string1, string2) in enumerate(pairs):
            test_file.write(f"{index}\t{id1}\t{id2}\t{string1}\t{string2}\n")
