"""Labels from a file: a CSV or TSV with a path column and a label column, and optionally a split
column (train / val / test), as fastai's `from_csv` and Hugging Face's `metadata.csv` read them.

Paths are relative to the file's folder (or absolute). Every row is checked before anything
trains: a missing image, an empty label, an unknown split value or one path with two labels is
refused naming its row. The samples come out in the order a class-folder scan gives (class by
class, paths sorted), so a file describing a folder trains exactly as the folder does.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune.data.folders import auto_split, is_image_file, require_images, split_off_val
from finetune.data.loading import DatasetSplits, Sample
from finetune.errors import DataUnavailableError

log = logging.getLogger(__name__)

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
ROWS_NAMED = 10  # at most this many bad rows are listed in one message


def _dialect(file: Path, sample: str) -> type[csv.Dialect] | csv.Dialect:
    """Tab-separated for .tsv; otherwise sniffed among , ; tab and |, else plain CSV."""
    if file.suffix.lower() == ".tsv":
        return csv.excel_tab
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        return csv.excel


def read_rows(file: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the (line number, row) pairs of the CSV/TSV `file`; blank lines skipped.
    Raises `DataUnavailableError` when the file is missing or has no header."""
    if not file.is_file():
        raise DataUnavailableError(
            f"Labels file {file} does not exist. Fix: set data.root to the folder that holds "
            "it and data.labels.file to its name (or an absolute path)."
        )
    text = file.read_text(encoding="utf-8-sig")  # a BOM from a spreadsheet export is no column
    reader = csv.DictReader(text.splitlines(), dialect=_dialect(file, text[:4096]))
    header = [name.strip() for name in reader.fieldnames or []]
    if not header:
        raise DataUnavailableError(f"Labels file {file} is empty: it needs a header row.")
    reader.fieldnames = header
    rows = [
        (reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None})
        for row in reader
        if any((value or "").strip() for value in row.values() if isinstance(value, str))
    ]
    return header, rows


def _require_column(file: Path, header: list[str], column: str, key: str) -> None:
    if column not in header:
        raise DataUnavailableError(
            f"Labels file {file} has no column '{column}' (its columns: {', '.join(header)}). "
            f"Fix: data.labels.{key}=<one of those>."
        )


def _refuse(file: Path, problems: list[str], fix: str) -> None:
    if problems:
        listed = "\n".join(f"  {problem}" for problem in problems[:ROWS_NAMED])
        more = (
            f"\n  ... and {len(problems) - ROWS_NAMED} more" if len(problems) > ROWS_NAMED else ""
        )
        raise DataUnavailableError(
            f"{len(problems)} row(s) of labels file {file} cannot be used:\n{listed}{more}\n"
            f"Fix: {fix}"
        )


def labelled_rows(file: Path, labels: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """(image path, label, split or None) for each row of `file`, with the columns that
    `labels` names (`path_column`, `label_column`, `split_column`: the split column is read
    when the file has it). Raises `DataUnavailableError` naming the rows that cannot be used."""
    header, rows = read_rows(file)
    path_column, label_column = labels["path_column"], labels["label_column"]
    _require_column(file, header, path_column, "path_column")
    _require_column(file, header, label_column, "label_column")
    split_column = labels.get("split_column")
    if split_column and split_column not in header:
        if split_column != "split":  # the default is read only where the file has it
            _require_column(file, header, split_column, "split_column")
        split_column = None
    problems, found, first_label, unread = [], [], {}, []
    for line, row in rows:
        path, label = row.get(path_column, ""), row.get(label_column, "")
        split = SPLIT_NAMES.get(row.get(split_column, "").lower()) if split_column else None
        full = (file.parent / path).expanduser()
        if not path:
            problems.append(f"line {line}: empty {path_column}")
        elif not label:
            problems.append(f"line {line}: {path}: empty {label_column}")
        elif split_column and split is None:
            problems.append(
                f"line {line}: {path}: {split_column} '{row.get(split_column, '')}' is none of "
                "train, val, test"
            )
        elif not full.is_file():
            problems.append(f"line {line}: {path}: no such file under {file.parent}")
        elif not is_image_file(full):  # as a scan of class folders leaves it out
            unread.append(f"line {line}: {path}")
        elif str(full) in first_label and first_label[str(full)][1] != label:
            earlier, other = first_label[str(full)]
            problems.append(
                f"line {line}: {path}: labelled '{label}', and '{other}' on line {earlier}"
            )
        elif str(full) not in first_label:
            first_label[str(full)] = (line, label)
            found.append((str(full), label, split))
    _refuse(
        file,
        problems,
        "correct or remove those rows (paths are relative to the labels file's folder; "
        "splits are train, val or test).",
    )
    if unread:
        log.warning(
            "Left out %d row(s) of %s naming a file of a type training does not read (as a "
            "scan of class folders leaves it out), e.g. %s. Fix: convert them to JPEG or PNG.",
            len(unread),
            file,
            ", ".join(unread[:3]),
        )
    if len(found) < sum(1 for _ in rows) - len(problems) - len(unread):
        log.warning("Labels file %s lists some images twice; each is used once.", file)
    return found


def build_from_labels_file(
    root: Path, labels: Mapping[str, Any], val_fraction: float, split_seed: int
) -> DatasetSplits:
    """The splits that the labels file `root / labels["file"]` describes: its split column's,
    or val split off seeded and stratified (`data.val_fraction`, `data.split_seed`) when it
    has none. Classes are the labels, sorted."""
    file = (root / labels["file"]).expanduser()
    rows = labelled_rows(file, labels)
    class_names = sorted({label for _, label, _ in rows})
    if len(class_names) < 2:
        raise DataUnavailableError(
            f"Labels file {file} names {len(class_names)} class(es): a classifier needs two or "
            "more. Fix: check data.labels.label_column."
        )
    index = {name: position for position, name in enumerate(class_names)}
    by_split: dict[str | None, list[Sample]] = {}
    for path, label, split in rows:
        by_split.setdefault(split, []).append((path, index[label]))
    for samples in by_split.values():
        samples.sort(key=lambda sample: (sample[1], sample[0]))  # a folder scan's order
    if None in by_split:
        train, val = split_off_val(by_split[None], class_names, val_fraction, split_seed)
        return require_images(
            DatasetSplits(class_names, train, val, None, auto_split(val_fraction, split_seed)),
            file,
        )
    train, val, test = (by_split.get(name) for name in ("train", "val", "test"))
    untrained = sorted(set(class_names) - {class_names[label] for _, label in train or []})
    if untrained:
        raise DataUnavailableError(
            f"Labels file {file} has no train rows of class(es) {', '.join(untrained)}. Fix: "
            "mark some of their rows train, or remove the class."
        )
    val_from = f"the split column '{labels.get('split_column')}' of {file}"
    if val is None:
        train, val = split_off_val(train or [], class_names, val_fraction, split_seed)
        val_from = f"{auto_split(val_fraction, split_seed)} of the rows marked train"
    return require_images(DatasetSplits(class_names, train or [], val, test, val_from), file)
