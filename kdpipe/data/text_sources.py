"""Reading (text, label) samples and plain text from disk, without torch, so the command line can
check a text source before any long import (kdpipe.preflight) with the same functions the data
module uses.

Sources of `data=text_files` (`data.path`):

- a folder of class folders, one sample per file: `path/<class>/<name>.txt`;
- a `.csv` file with a header (`data.text_key`, `data.label_key` columns);
- a `.jsonl` file, one JSON object per line with the same keys;
- a folder written by Hugging Face `datasets` (`Dataset.save_to_disk`): a `Dataset`, or a
  `DatasetDict` whose `train` / `validation` (or `val`) / `test` splits are kept.

Labels are integers `0..num_classes-1` or names (classes are then the sorted names). Debian's
`fortunes` packages (`data=fortunes_topics`, `data=fortunes_language`) are read by
`fortunes_samples`.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

from kdpipe.errors import ConfigError

FORTUNES_HINT = ("apt-get update && apt-get install -y fortunes fortunes-de fortunes-es fortunes-it "
                 "fortunes-br fortunes-cs fortunes-pl fortunes-ru")
TEXT_SUFFIXES = {".txt", ".text", ".md"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

Samples = tuple[list[str], list]  # texts, labels (int or str)


def source_path(path: str | os.PathLike | None, key: str = "data.path") -> Path:
    """`path` expanded, or a ConfigError that says what to give."""
    if not path:
        raise ConfigError(f"{key} is not set; give a folder of class folders of .txt files, a .csv or "
                          f".jsonl file of (text, label), or a folder saved by datasets' save_to_disk")
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ConfigError(f"{key}={p} does not exist; give a folder of class folders of .txt files, "
                          f"a .csv or .jsonl file, or a folder saved by datasets' save_to_disk")
    return p


def source_kind(p: Path) -> str:
    if p.is_dir():
        return "hf" if any((p / m).is_file() for m in HF_MARKERS) else "folder"
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise ConfigError(f"{p}: cannot read {suffix or 'a file without suffix'} as (text, label) samples; "
                      f"give a .csv or .jsonl file, a folder of class folders, or a datasets folder")


def _folder(p: Path) -> Samples:
    classes = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ConfigError(f"{p} has {len(classes)} class folder(s); put each class's .txt files in "
                          f"its own sub-folder ({p}/<class>/<name>.txt), at least two classes")
    texts, labels = [], []
    for name in classes:
        files = sorted(f for f in (p / name).rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        for f in files:
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(name)
    return texts, labels


def _rows(p: Path, text_key: str, label_key: str) -> Samples:
    texts, labels = [], []
    with p.open(encoding="utf-8", errors="replace", newline="") as fh:
        if source_kind(p) == "csv":
            reader = csv.DictReader(fh, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            rows = enumerate(reader, start=2)
            header = reader.fieldnames or []
            missing = [k for k in (text_key, label_key) if k not in header]
            if missing:
                raise ConfigError(f"{p} has columns {header} but not {missing}; set data.text_key and "
                                  f"data.label_key to the names of its text and label columns")
        else:
            rows = ((i, line) for i, line in enumerate(fh, start=1) if line.strip())
        for line_no, row in rows:
            if isinstance(row, str):
                try:
                    row = json.loads(row)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{p}:{line_no} is not valid JSON ({exc.msg}); one object per line, "
                                      f'e.g. {{"{text_key}": "...", "{label_key}": 0}}') from None
                if not isinstance(row, dict) or text_key not in row or label_key not in row:
                    raise ConfigError(f"{p}:{line_no} lacks the keys {text_key!r} and {label_key!r}; set "
                                      f"data.text_key and data.label_key")
            texts.append(str(row[text_key]))
            labels.append(row[label_key])
    return texts, labels


HF_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def _hf(p: Path, text_key: str, label_key: str) -> dict[str, Samples]:
    try:
        from datasets import Dataset, DatasetDict, load_from_disk
    except ImportError:
        raise ConfigError(f"{p} was saved by Hugging Face datasets, which is not installed; "
                          f"pip install datasets") from None
    try:
        ds = load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001 - datasets raises several kinds; one line says which folder
        why = " ".join(str(exc).split())
        raise ConfigError(f"cannot load {p} with datasets.load_from_disk: {why}") from exc
    parts = {"all": ds} if isinstance(ds, Dataset) else {}
    if isinstance(ds, DatasetDict):
        parts = {HF_SPLITS[k]: v for k, v in ds.items() if k in HF_SPLITS}
        if "train" not in parts:
            raise ConfigError(f"{p} holds splits {list(ds)} but no 'train'; kdpipe reads train, "
                              f"validation (or val) and test")
    out = {}
    for name, part in parts.items():
        missing = [k for k in (text_key, label_key) if k not in part.column_names]
        if missing:
            raise ConfigError(f"{p} ({name}) has columns {part.column_names} but not {missing}; set "
                              f"data.text_key and data.label_key")
        out[name] = ([str(t) for t in part[text_key]], list(part[label_key]))
    return out


def read_samples(path: str | os.PathLike | None, text_key: str = "text", label_key: str = "label",
                 key: str = "data.path") -> dict[str, Samples]:
    """The samples of each split the source defines (`all` when it defines none)."""
    p = source_path(path, key)
    kind = source_kind(p)
    if kind == "hf":
        found = _hf(p, text_key, label_key)
    elif kind == "folder":
        found = {"all": _folder(p)}
    else:
        found = {"all": _rows(p, text_key, label_key)}
    for name, (texts, _) in found.items():
        if not texts:
            raise ConfigError(f"{p}: no samples{'' if name == 'all' else f' in its {name} split'}")
    return found


def read_documents(path: str | os.PathLike | None, text_key: str = "text",
                   key: str = "data.path") -> dict[str, Samples]:
    """Documents for language modelling, per split the source defines: a `.txt` file's paragraphs
    (blank-line separated), a folder's `.txt` files (one document each, sub-folders included), or
    the `text_key` of a CSV / JSONL / datasets source (labels unused)."""
    p = source_path(path, key)
    if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES:
        text = p.read_text(encoding="utf-8", errors="replace")
        docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
        found = {"all": (docs, [0] * len(docs))}
    elif p.is_dir() and source_kind(p) == "folder":
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        docs = [f.read_text(encoding="utf-8", errors="replace").strip() for f in files]
        found = {"all": ([d for d in docs if d], [0] * sum(1 for d in docs if d))}
    else:
        # the text column only: it stands in for the label column these readers also check
        hf = source_kind(p) == "hf"
        parts = _hf(p, text_key, text_key) if hf else {"all": _rows(p, text_key, text_key)}
        found = {k: (texts, [0] * len(texts)) for k, (texts, _) in parts.items()}
    for name, (docs, _) in found.items():
        if not docs:
            raise ConfigError(f"{p}: no text{'' if name == 'all' else f' in its {name} split'}")
    return found


def class_names(labels: list, num_classes: int, where: str) -> list[str] | None:
    """None when the labels are integers in range, else the sorted names (as many as
    `num_classes`), or a ConfigError saying what to change."""
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in labels):
        values = {int(v) for v in labels}
        bad = [v for v in values if not 0 <= v < num_classes]
        if bad:
            raise ConfigError(f"{where} has labels {sorted(bad)[:5]} outside 0..{num_classes - 1}; set "
                              f"data.num_classes={max(values) + 1}")
        return None
    names = sorted({str(v) for v in labels})
    if len(names) != num_classes:
        raise ConfigError(f"{where} has {len(names)} classes ({', '.join(names[:10])}) but "
                          f"data.num_classes={num_classes}; set data.num_classes={len(names)}")
    return names


# ---------------------------------------------------------------------------------------------
# Debian's fortunes


def same_text(text: str) -> str:
    """A text as compared for duplicates: lowercase, whitespace collapsed."""
    return " ".join(text.lower().split())


def read_fortunes(path: Path) -> list[str]:
    """The fortunes of one file: texts separated by lines holding a single `%`."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    out, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            if current:
                out.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    if current and "\n".join(current).strip():
        out.append("\n".join(current).strip())
    return [t for t in out if t]


def fortune_files(root: Path, name: str) -> list[Path]:
    """The fortune files of a category (`root/<name>`) or of a language folder (`root/<name>/*`,
    not the `.dat` indexes, `.u8` copies or the `off/` folder of offensive ones)."""
    p = root / name
    if p.is_file():
        return [p]
    if p.is_dir():
        seen, files = set(), []
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix not in (".dat", ".u8") and f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
        return files
    return []


def fortunes_samples(root: str | os.PathLike, classes: dict[str, list[str]],
                     max_per_class: int | None = None) -> Samples:
    """(texts, class names): each class is a list of fortune files or language folders under
    `root`; a missing one is a ConfigError with the install command."""
    root = Path(os.path.expanduser(str(root)))
    texts, labels = [], []
    for label, sources in classes.items():
        found = []
        for name in sources:
            files = fortune_files(root, name)
            if not files:
                raise ConfigError(f"no fortunes at {root / name} (class {label!r}); install them with: "
                                  f"{FORTUNES_HINT}")
            for f in files:
                found += read_fortunes(f)
        if max_per_class and len(found) > max_per_class:  # a fixed draw: the same on every machine
            found = random.Random(0).sample(found, max_per_class)
        texts += found
        labels += [label] * len(found)
    return texts, labels
