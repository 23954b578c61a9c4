"""GLUE data: the tasks (MRPC, SST-2, CoLA), their splits, encoding and the baseline metrics.

Data comes from local files in the GLUE TSV layout (a folder holding MRPC/, SST-2/, CoLA/ with
train.tsv and dev.tsv: `--data-dir` or $TERNARYLM_GLUE_DIR) or, without a folder, from the hub
dataset `nyu-mll/glue`. Sentence pairs are encoded as `s1 <eos> s2` (the model's eos token is
the separator) and truncated, longest sentence first, to the model's seq_len. Dev metrics are
computed with scikit-learn; the majority-class baseline predicts the most frequent label of the
TRAIN split for every dev example.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ternarylm.data import DataError, hub_offline
from ternarylm.core.errors import UserError

HUB_DATASET = "nyu-mll/glue"
GLUE_DIR_ENV = "TERNARYLM_GLUE_DIR"
SPLITS = ("train", "dev")


class GlueError(UserError):
    """Unusable fine-tuning settings or a failed fine-tuning; the message says what to change."""


class GlueDataError(DataError):
    """GLUE data that cannot be read; the message names the file or source and how to fix it."""


@dataclass(frozen=True)
class GlueTask:
    name: str
    """Our name for the task (mrpc, sst2, cola)."""
    folder: str
    """Folder of train.tsv / dev.tsv in the GLUE layout."""
    hub_config: str
    """Configuration name of the hub dataset nyu-mll/glue."""
    pair: bool
    """Sentence-pair task."""
    metrics: tuple[str, ...]
    """Reported dev metrics, the task's official one first."""


TASKS: dict[str, GlueTask] = {
    "mrpc": GlueTask("mrpc", "MRPC", "mrpc", pair=True, metrics=("f1", "accuracy")),
    "sst2": GlueTask("sst2", "SST-2", "sst2", pair=False, metrics=("accuracy",)),
    "cola": GlueTask("cola", "CoLA", "cola", pair=False, metrics=("mcc", "accuracy")),
}
N_CLASSES = 2  # all three tasks are binary


def task_spec(task: str | GlueTask) -> GlueTask:
    """The task for a name, case-insensitive; `SST-2` and `sst_2` name sst2."""
    if isinstance(task, GlueTask):
        return task
    key = str(task).strip().lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise GlueError(f"unknown GLUE task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[key]


@dataclass
class GlueData:
    """One split of one task: sentences (and second sentences for pairs) with 0/1 labels."""

    task: str
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: list[int]
    source: str
    """Where it came from: the TSV path, or hub:nyu-mll/glue/<config>/<split>."""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> GlueData:
        return dataclasses.replace(
            self, text_a=[self.text_a[i] for i in indices],
            text_b=None if self.text_b is None else [self.text_b[i] for i in indices],
            labels=[self.labels[i] for i in indices])


_MRPC_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
_SST2_HEADER = ["sentence", "label"]


def read_glue_tsv(task: str | GlueTask, path: str | Path, split: str = "train") -> GlueData:
    """Read a GLUE TSV: MRPC (header Quality, #1 ID, #2 ID, #1 String, #2 String), SST-2
    (header sentence, label) or CoLA (no header: source, label, original label, sentence).

    A leading UTF-8 BOM is dropped and quote characters are kept as text (csv.QUOTE_NONE):
    MRPC sentences such as `" The foodservice pie business ...` start with one.
    """
    spec, path = task_spec(task), Path(path)
    if not path.is_file():
        what = "is a directory, not" if path.is_dir() else "not found: expected"
        raise GlueDataError(f"{path}: {what} the GLUE {spec.folder} {path.name} file; pass "
                            f"--data-dir (or set ${GLUE_DIR_ENV}) to the folder holding "
                            f"{spec.folder}/train.tsv and {spec.folder}/dev.tsv")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as err:
        raise GlueDataError(f"{path}: not UTF-8 text ({err}); pass the GLUE TSV file") from None
    numbered = [(n, row) for n, row in enumerate(rows, start=1) if row and any(row)]
    if not numbered:
        raise GlueDataError(f"{path}: file is empty; expected the GLUE {spec.folder} TSV")
    if spec.name == "mrpc":
        header, cols, label_col, text_cols = _MRPC_HEADER, 5, 0, (3, 4)
    elif spec.name == "sst2":
        header, cols, label_col, text_cols = _SST2_HEADER, 2, 1, (0,)
    else:
        header, cols, label_col, text_cols = None, 4, 1, (3,)
    if header is not None:
        n, first = numbered.pop(0)
        if [c.strip() for c in first] != header:
            raise GlueDataError(f"{path}, line {n}: expected the {spec.folder} header "
                                f"{' <tab> '.join(header)}, found {_excerpt(first)}")
    texts: list[list[str]] = [[] for _ in text_cols]
    labels = []
    for n, row in numbered:
        if len(row) != cols:
            hint = (" (CoLA train/dev have no header; its test.tsv has no labels)"
                    if spec.name == "cola" else "")
            raise GlueDataError(f"{path}, line {n}: expected {cols} tab-separated columns, found "
                                f"{len(row)}: {_excerpt(row)}{hint}")
        label = row[label_col].strip()
        if label not in ("0", "1"):
            hint = (" (CoLA train/dev have no header line)" if spec.name == "cola" and n == 1
                    else "")
            raise GlueDataError(f"{path}, line {n}: label {label!r} is not 0 or 1{hint}")
        labels.append(int(label))
        for out, col in zip(texts, text_cols):
            out.append(row[col].strip())
    return GlueData(spec.name, split, texts[0], texts[1] if spec.pair else None, labels,
                    str(path))


def _excerpt(row: list[str]) -> str:
    text = "\t".join(row)
    return repr(text if len(text) <= 120 else text[:117] + "...")


def glue_file(data_dir: str | Path, task: str | GlueTask, split: str) -> Path:
    """<data_dir>/<MRPC|SST-2|CoLA>/<split>.tsv; data_dir may also be the task folder itself."""
    spec, data_dir = task_spec(task), Path(data_dir).expanduser()
    if split not in SPLITS:
        raise GlueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not data_dir.is_dir():
        raise GlueDataError(f"{data_dir}: GLUE data directory not found; pass --data-dir (or set "
                            f"${GLUE_DIR_ENV}) to the folder holding {spec.folder}/{split}.tsv")
    names = (spec.folder, spec.folder.lower(), spec.name, spec.name.upper())
    if data_dir.name in names and not any((data_dir / name).is_dir() for name in names):
        return data_dir / f"{split}.tsv"
    for name in names:
        if (data_dir / name).is_dir():
            return data_dir / name / f"{split}.tsv"
    return data_dir / spec.folder / f"{split}.tsv"


def load_glue(task: str | GlueTask, split: str, data_dir: str | Path | None = None) -> GlueData:
    """One split (train or dev) from local TSVs when a folder is given ($TERNARYLM_GLUE_DIR when
    data_dir is None), else from the hub dataset nyu-mll/glue."""
    spec = task_spec(task)
    if split not in SPLITS:
        raise GlueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    data_dir = resolve_data_dir(data_dir)
    if data_dir is not None:
        return read_glue_tsv(spec, glue_file(data_dir, spec, split), split)
    return _load_hub(spec, split)


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(GLUE_DIR_ENV) or None
    return None if data_dir is None else Path(data_dir).expanduser()


def _load_hub(spec: GlueTask, split: str) -> GlueData:
    hub_split = "validation" if split == "dev" else split
    where = f"hub:{HUB_DATASET}/{spec.hub_config}/{hub_split}"
    fix = (f"no local GLUE folder was given either: pass --data-dir (or set ${GLUE_DIR_ENV}) to "
           f"a folder holding {spec.folder}/train.tsv and {spec.folder}/dev.tsv in the GLUE "
           f"TSV layout")
    if hub_offline():
        raise GlueDataError(f"cannot load hub dataset {HUB_DATASET!r} ({spec.hub_config}): "
                            f"offline mode (HF_HUB_OFFLINE) is set; {fix}")
    try:
        import datasets

        rows = list(datasets.load_dataset(HUB_DATASET, spec.hub_config, split=hub_split))
    except Exception as err:  # network, missing config or split: all mean "not reachable"
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise GlueDataError(f"cannot load hub dataset {HUB_DATASET!r} ({spec.hub_config}, "
                            f"split {hub_split}): {first}; {fix}") from err
    columns = ("sentence1", "sentence2") if spec.pair else ("sentence",)
    if rows and any(c not in rows[0] for c in (*columns, "label")):
        raise GlueDataError(f"{where}: expected columns {', '.join((*columns, 'label'))}, found "
                            f"{', '.join(rows[0])}")
    labels = [int(r["label"]) for r in rows]
    if any(label not in (0, 1) for label in labels):
        raise GlueDataError(f"{where}: labels must be 0 or 1 (the hub's test split has none)")
    text_a = [r[columns[0]].strip() for r in rows]
    text_b = [r["sentence2"].strip() for r in rows] if spec.pair else None
    return GlueData(spec.name, split, text_a, text_b, labels, where)


def glue_metrics(task: str | GlueTask, y_true, y_pred) -> dict[str, float]:
    """The task's dev metrics (scikit-learn): MRPC f1 and accuracy, SST-2 accuracy, CoLA mcc
    (Matthews correlation) and accuracy. F1 is of the positive class (label 1)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = task_spec(task)
    compute = {
        "f1": lambda: f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0.0),
        "accuracy": lambda: accuracy_score(y_true, y_pred),
        "mcc": lambda: matthews_corrcoef(y_true, y_pred),
    }
    return {name: float(compute[name]()) for name in spec.metrics}


def majority_label(labels: list[int]) -> int:
    """The most frequent label (the smaller one on a tie)."""
    if not labels:
        raise GlueError("no training labels to take the majority class from")
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label))


def majority_baseline(task: str | GlueTask, train_labels: list[int],
                      dev_labels: list[int]) -> tuple[int, dict[str, float]]:
    """The train split's majority label and its dev metrics when predicted for every example."""
    label = majority_label(train_labels)
    return label, glue_metrics(task, dev_labels, [label] * len(dev_labels))


def encode(tokenizer, data: GlueData, sep_id: int, max_len: int) -> list[list[int]]:
    """Token ids per example: `a` or `a <sep> b`, at most max_len tokens (pairs lose tokens from
    the end of the longer sentence first). An empty example becomes [sep_id]."""
    if max_len < (3 if data.text_b is not None else 1):
        raise GlueError(f"seq_len {max_len} is too short to encode {data.task} examples")
    enc = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    a = [e.ids for e in enc(data.text_a, add_special_tokens=False)]
    if data.text_b is None:
        return [ids[:max_len] or [sep_id] for ids in a]
    b = [e.ids for e in enc(data.text_b, add_special_tokens=False)]
    out = []
    for x, y in zip(a, b):
        la, lb = truncate_pair(len(x), len(y), max_len - 1)
        out.append([*x[:la], sep_id, *y[:lb]])
    return out


def truncate_pair(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Lengths kept of two sentences so they fit `budget` tokens: the longer one loses tokens
    first; once they are equal both lose alternately, the first sentence first."""
    excess = la + lb - budget
    if excess <= 0:
        return la, lb
    cut = min(excess, abs(la - lb))
    la, lb = (la - cut, lb) if la >= lb else (la, lb - cut)
    rest = excess - cut
    return la - (rest + 1) // 2, lb - rest // 2


def pad_batch(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and the mask [B, T] of real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return ids.to(device), mask.to(device)
