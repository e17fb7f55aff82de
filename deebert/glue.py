"""GLUE for DeeBERT: the classification tasks, their TSV files, their metrics, and the download.

Each task is a folder of glue_data/, as download_glue_data.py writes it: train.tsv, dev.tsv (MNLI:
dev_matched.tsv, dev_mismatched.tsv) and test.tsv. Columns are 0-based; class id = position in labels:

    task   text_a         text_b         label             labels in the TSV (and their names)  metrics
    SST-2  sentence (0)   -              label (1)         0, 1 (negative, positive)            accuracy
    MRPC   #1 String (3)  #2 String (4)  Quality (0)       0, 1 (not_equivalent, equivalent)    f1, accuracy
    QNLI   question (1)   sentence (2)   label (3)         entailment, not_entailment           accuracy
    RTE    sentence1 (1)  sentence2 (2)  label (3)         entailment, not_entailment           accuracy
    QQP    question1 (3)  question2 (4)  is_duplicate (5)  0, 1 (not_duplicate, duplicate)      f1, accuracy
    MNLI   sentence1 (8)  sentence2 (9)  gold_label (last) contradiction, entailment, neutral   accuracy
    CoLA   sentence (3)   -              label (1)         0, 1 (unacceptable, acceptable)      mcc

Files are parsed as the GLUE loaders parse them: utf-8-sig (MRPC's header starts with a byte-order mark),
tabs, QUOTE_NONE (some RTE and QNLI fields begin with a bare `"`). STS-B, a regression task, is left out."""

import csv
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from deebert.errors import DeeBertError
from deebert.files import write_atomically


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
    label_names: tuple  # what each class id means, for printing answers: ("negative", "positive")

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


BINARY, ENTAILMENT, DEV = ("0", "1"), ("entailment", "not_entailment"), ("dev",)
MNLI_LABELS = ("contradiction", "entailment", "neutral")  # Hugging Face's order, so class ids agree with theirs
MNLI_DEV = ("dev_matched", "dev_mismatched")
TASKS = {
    "sst-2": Task("sst-2", "SST-2", (0,), 1, BINARY, ("accuracy",), True, DEV, ("negative", "positive")),
    "mrpc": Task("mrpc", "MRPC", (3, 4), 0, BINARY, ("f1", "accuracy"), True, DEV, ("not_equivalent", "equivalent")),
    "qnli": Task("qnli", "QNLI", (1, 2), 3, ENTAILMENT, ("accuracy",), True, DEV, ENTAILMENT),
    "rte": Task("rte", "RTE", (1, 2), 3, ENTAILMENT, ("accuracy",), True, DEV, ENTAILMENT),
    "qqp": Task("qqp", "QQP", (3, 4), 5, BINARY, ("f1", "accuracy"), True, DEV, ("not_duplicate", "duplicate")),
    "mnli": Task("mnli", "MNLI", (8, 9), -1, MNLI_LABELS, ("accuracy",), True, MNLI_DEV, MNLI_LABELS),
    "cola": Task("cola", "CoLA", (3,), 1, BINARY, ("mcc",), False, DEV, ("unacceptable", "acceptable")),
}
WHAT_TO_DO = "pass --data_dir, or set GLUE_DIR to a GLUE root with a {}/ subfolder"


def get_task(name: str) -> Task:
    """The task called `name`, in any case: get_task("RTE") is get_task("rte"); "sst2" means "sst-2"."""
    key = name.strip().lower()
    key = {"sst2": "sst-2"}.get(key, key)
    if key in ("sts-b", "stsb", "sts"):
        raise DeeBertError(f"GLUE task {name!r} is regression (a similarity score), which DeeBERT's classifier "
                           f"off-ramps do not support; choose one of: {', '.join(TASKS)}")
    if key not in TASKS:
        raise DeeBertError(f"unknown GLUE task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]


def _task_folder(task: Task, path) -> Path:  # `path`, or its <folder>/ when `path` is a GLUE root (glue_data/)
    path = Path(path)
    return path / task.folder if (path / task.folder).is_dir() else path


def find_data_dir(task: Task, data_dir=None, download: bool = True) -> Path:
    """The folder of `task`'s TSVs: `data_dir` (that folder or a GLUE root), else $GLUE_DIR/<folder>, else
    the cache (~/.cache/deebert/glue/<folder>), which is downloaded into first if empty and `download` is true."""
    def has_tsvs(folder: Path) -> bool:  # this task's train.tsv or one of its dev files
        return any((folder / f"{split}.tsv").is_file() for split in ("train",) + task.dev_splits)

    if data_dir is not None:
        if not has_tsvs(_task_folder(task, data_dir)):
            raise DeeBertError(f"--data_dir {data_dir} has no {task.folder} train.tsv or {task.dev_splits[0]}.tsv; "
                               f"pass the folder of its TSVs or a GLUE root with a {task.folder}/ subfolder")
        return _task_folder(task, data_dir)
    glue_dir = os.environ.get("GLUE_DIR")
    if glue_dir and has_tsvs(Path(glue_dir) / task.folder):
        return Path(glue_dir) / task.folder
    cached = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deebert" / "glue" / task.folder
    if not has_tsvs(cached):
        if not download:
            raise DeeBertError(f"no GLUE data for {task.folder} (GLUE_DIR={glue_dir or 'unset'}, cache {cached} "
                               f"empty); {WHAT_TO_DO.format(task.folder)}")
        print(f"GLUE {task.folder} not found locally; downloading it into {cached}", file=sys.stderr)
        download_task(task, cached)
    return cached


@dataclass(frozen=True)
class Example:
    """One labelled example: one text, or a pair, and its class id (an index into task.labels)."""
    text_a: str
    text_b: str | None
    label: int


def unlabelled(inputs: list) -> list[Example]:
    """Texts, or (text_a, text_b) pairs, as Examples without labels: unlabelled(["a film"]) -> [Example("a film",
    None, None)]."""
    return [Example(text, None, None) if isinstance(text, str) else Example(*text, None) for text in inputs]


def _example(task: Task, row: list, where: str) -> Example:
    """One TSV row as an Example; `where` is "<file> line <n>", for the error messages."""
    last_text = max(task.text_columns)  # MNLI's label, column -1, comes after its texts
    needed = last_text + 2 if task.label_column < 0 else max(last_text, task.label_column) + 1
    if len(row) < needed:
        raise DeeBertError(f"{where}: expected at least {needed} tab-separated columns, found {len(row)}; "
                           f"the file is not in GLUE TSV format")
    label = row[task.label_column]
    if label not in task.labels:  # shortened: a wrong column can hold a whole sentence
        raise DeeBertError(f"{where}: label {label[:40]!r} is not one of {', '.join(task.labels)}; "
                           f"check that the file is {task.folder} data in GLUE TSV format")
    text_b = row[task.text_columns[1]] if task.is_pair else None
    return Example(row[task.text_columns[0]], text_b, task.labels.index(label))


def read_split(task: Task, data_dir, split: str) -> list[Example]:
    """The Examples of <data_dir>/<split>.tsv; split is "train", "dev" (task.dev_splits[0]) or a dev split."""
    split = task.dev_splits[0] if split == "dev" else split
    if split not in ("train",) + task.dev_splits:  # test.tsv among them: GLUE's test files have no labels
        raise DeeBertError(f"{task.folder} has no labelled split {split!r} (GLUE's test files have no labels); "
                           f"choose one of: train, {', '.join(task.dev_splits)}")
    path = _task_folder(task, data_dir) / f"{split}.tsv"
    if not path.is_file():
        raise DeeBertError(f"{task.folder} file not found: {path}; {WHAT_TO_DO.format(task.folder)}")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.has_header:
            next(reader, None)
        examples = [_example(task, row, f"{path} line {reader.line_num}") for row in reader]
    if not examples:
        raise DeeBertError(f"{path} has no data rows; expected {task.folder} examples in GLUE TSV format")
    return examples


def compute_metrics(task: Task, predictions, labels) -> dict[str, float]:
    """The task's GLUE metrics of predicted class ids: accuracy, F1 and Matthews correlation (mcc), class 1 being
    positive. compute_metrics(get_task("mrpc"), [1, 0], [1, 1]) gives {"f1": 2/3, "accuracy": 0.5}."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    predicted, actual = predictions == 1, labels == 1
    tp, fp = int(np.sum(predicted & actual)), int(np.sum(predicted & ~actual))
    fn, tn = int(np.sum(~predicted & actual)), int(np.sum(~predicted & ~actual))
    mcc_denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    every_metric = {  # F1 is the harmonic mean of precision and recall; F1 and MCC are 0 when undefined
        "accuracy": float(np.mean(predictions == labels)),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "mcc": (tp * tn - fp * fn) / mcc_denominator**0.5 if mcc_denominator else 0.0,
    }
    return {name: every_metric[name] for name in task.metrics}


def per_layer_metrics(task: Task, all_logits, labels) -> list[dict]:
    """(N, n, C) logits of every off-ramp -> the task's metrics of each off-ramp as if it were the only exit."""
    return [compute_metrics(task, all_logits[:, i].argmax(-1), labels) for i in range(all_logits.shape[1])]


GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data"  # QQP-clean.zip unpacks to QQP/, QNLIv2.zip to QNLI/
ZIP_URLS = {"CoLA": f"{GLUE_URL}/CoLA.zip", "SST-2": f"{GLUE_URL}/SST-2.zip", "QQP": f"{GLUE_URL}/QQP-clean.zip",
            "MNLI": f"{GLUE_URL}/MNLI.zip", "QNLI": f"{GLUE_URL}/QNLIv2.zip", "RTE": f"{GLUE_URL}/RTE.zip"}
MRPC_URLS = {  # GLUE never hosted MRPC itself; these are the files download_glue_data.py fetches
    "msr_paraphrase_train.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
    "msr_paraphrase_test.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_test.txt",
    "dev_ids.tsv": "https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations.appspot.com/o/"
                   "data%2Fmrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc",
}


def _unpack(zip_path: Path, top_folder: str, folder: Path) -> None:
    """Unpack the zip's <top_folder>/ into `folder`; ValueError for a member path that is absolute or has `..`."""
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.infolist():
            relative = PurePosixPath(member.filename.removeprefix(f"{top_folder}/"))
            if relative.is_absolute() or ".." in relative.parts:
                raise ValueError(f"unsafe path in zip: {member.filename}")
            if member.filename.startswith(f"{top_folder}/") and not member.is_dir():
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as packed, open(folder / relative, "wb") as unpacked:
                    shutil.copyfileobj(packed, unpacked)


def download_task(task: Task, target) -> None:
    """Download `task` into the folder `target`, which appears only once complete (write_atomically)."""
    def download_into(folder: Path) -> None:
        folder.mkdir()
        urls = MRPC_URLS if task.folder == "MRPC" else {f"{task.folder}.zip": ZIP_URLS[task.folder]}
        for file_name, url in urls.items():
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(folder / file_name, "wb") as f:
                    shutil.copyfileobj(response, f)
                if file_name.endswith(".zip"):
                    _unpack(folder / file_name, task.folder, folder)
                    (folder / file_name).unlink()
            except (OSError, http.client.HTTPException, zipfile.BadZipFile, ValueError) as error:
                # offline, refused, an HTTP error, cut off halfway, disk full, not a zip, an unsafe zip; in one line
                reason = " ".join(str(error.reason if isinstance(error, urllib.error.URLError) else error).split())
                raise DeeBertError(f"could not download {task.folder} from {url} ({reason}); "
                                   f"{WHAT_TO_DO.format(task.folder)}") from error
        if task.folder == "MRPC":  # GLUE's MRPC is made from Microsoft's files
            build_mrpc(*(folder / file_name for file_name in MRPC_URLS), folder)
        for split in ("train",) + task.dev_splits:
            if not (folder / f"{split}.tsv").is_file():
                raise DeeBertError(f"the {task.folder} download has no {split}.tsv; {WHAT_TO_DO.format(task.folder)}")

    write_atomically(target, download_into)


def _read_msr(path) -> tuple:
    """(header, rows of 5 fields) of an msr_paraphrase_*.txt; utf-8, not utf-8-sig: the header keeps its BOM."""
    with open(path, encoding="utf-8") as f:
        header, rows = f.readline(), [line.strip().split("\t") for line in f]  # stripped as GLUE's script does
    for line_number, fields in enumerate(rows, start=2):
        if len(fields) != 5:
            raise DeeBertError(f"{path} line {line_number}: expected 5 tab-separated columns (Quality, #1 ID, "
                               f"#2 ID, #1 String, #2 String), found {len(fields)}; it is no MSR paraphrase file")
    return header, rows


def build_mrpc(train_txt, test_txt, dev_ids, target) -> None:
    """Write MRPC's train.tsv, dev.tsv (the pairs listed in `dev_ids`) and test.tsv into `target`, exactly
    as download_glue_data.py does: train and dev keep the header, test.tsv has an index for the label."""
    dev_pairs = {tuple(line.strip().split("\t")) for line in Path(dev_ids).read_text(encoding="utf-8").splitlines()}
    header, train_rows = _read_msr(train_txt)
    _, test_rows = _read_msr(test_txt)
    tsvs = {"train": [header], "dev": [header], "test": ["index\t#1 ID\t#2 ID\t#1 String\t#2 String\n"]}
    for fields in train_rows:  # Quality, #1 ID, #2 ID, #1 String, #2 String
        tsvs["dev" if tuple(fields[1:3]) in dev_pairs else "train"].append("\t".join(fields) + "\n")
    for index, fields in enumerate(test_rows):
        tsvs["test"].append("\t".join([str(index), *fields[1:]]) + "\n")
    Path(target).mkdir(parents=True, exist_ok=True)
    for split, lines in tsvs.items():
        (Path(target) / f"{split}.tsv").write_text("".join(lines), encoding="utf-8", newline="\n")
