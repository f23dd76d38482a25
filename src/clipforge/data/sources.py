"""Data on disk, named by a spec string ``KIND:PATH``: image folders and caption/label tables.

    imagefolder:DIR   one subfolder per class (DIR/cat/001.jpg); class names from folder names
    jsonl:FILE        one JSON object per line with an image path (relative to FILE) and either
                      ``label`` (classification) or ``text``/``caption`` (a string or a list)
    csv:FILE          the same columns in a CSV file with a header row; a caption cell holding a
                      JSON list of strings (``["a cat", "a kitten"]``) is a caption list. The
                      separator (comma, tab, semicolon or pipe) is sniffed from the header line,
                      so OpenCLIP's tab-separated ``filepath``/``title`` files read as they are
    wds:SHARDS        local WebDataset tar shards (a pattern, ``a.tar::b.tar`` or a directory); the
                      readers below extract them once into a cache (``clipforge.data.wds_files``)
                      and read that as a jsonl: table

The readers take the column names (``image_key``, ``caption_key``, ``label_key``) and the CSV
separator when they are given (the recipe's ``data.*`` fields); otherwise the first column present
of ``IMAGE_COLUMNS`` / ``CAPTION_COLUMNS`` is used, and labels come from ``label``.

Training (``clipforge.data.pipeline``) also reads an ``id``/``key`` column (the sample key) and a
``weight`` column (per-sample weight) when a table has them.

This module only *reads the index* (which image files, which labels or captions); decoding
happens later, in workers, via ``load_image``. ``parse_data_spec`` is shared by every user of
spec strings (evaluation now; training sources such as ``wds:`` later), which pass the kinds
they accept.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageOps

from clipforge.data.transforms import to_rgb

DATA_KINDS = ("imagefolder", "jsonl", "csv", "wds")  # wds: last, so messages and guesses lead with files
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "filepath", "image_path", "path")  # first one present is used
CAPTION_COLUMNS = ("text", "caption", "captions", "title")  # title: OpenCLIP's default --csv-caption-key
LABEL_COLUMN = "label"
CSV_SEPARATORS = (",", "\t", ";", "|")  # sniffed from the header line; on a tie the earlier one wins
# what Pillow raises on a file it cannot decode (truncated, not an image, absurdly large, missing)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """Data that cannot be used as given; the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------- spec strings
@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: Path

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def parse_data_spec(spec: str, kinds: Sequence[str] = DATA_KINDS) -> DataSpec:
    """``"imagefolder:val"`` -> ``DataSpec("imagefolder", Path("val"))``; unknown kinds list the valid ones."""
    valid = ", ".join(f"{k}:" for k in kinds)
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise DataError(
            f"data spec '{spec}' has no kind prefix; write KIND:PATH with KIND one of {valid} "
            f"(e.g. {_guess_kind(spec, kinds)}:{spec})"
        )
    if kind not in kinds:
        raise DataError(f"unknown data spec prefix '{kind}:' in '{spec}'; valid prefixes: {valid}")
    return DataSpec(kind, Path(rest).expanduser())


def relative_note(path: Path) -> str:
    """For a 'not found' message: where a relative path was looked for (recipes ship relative paths such as
    ``cifar10/train``, read from wherever the command runs)."""
    if Path(path).is_absolute():
        return ""
    return (f" (a relative path, looked for in the working directory {Path.cwd()}; run from the folder that "
            f"holds it or give an absolute path)")


def _guess_kind(path: str, kinds: Sequence[str]) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in kinds else kinds[0]


# ----------------------------------------------------------------------------- image decoding
def load_image(path: str | Path, size_hint: int | None = None) -> Image.Image:
    """Decode an image file to RGB, upright (EXIF orientation) and on white where transparent.

    ``size_hint`` lets JPEG decoding skip resolution that a later resize to that size would throw
    away (Pillow ``draft``); the result's shorter side stays >= ``size_hint``.
    """
    with Image.open(path) as image:
        if size_hint and image.format == "JPEG":
            image.draft("RGB", _draft_size(image.size, size_hint))
        image.load()  # decode now, so a truncated file fails here and not in a later transform
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def _draft_size(size: tuple[int, int], shorter_side: int) -> tuple[int, int]:
    # draft keeps both sides >= the request; ask for the aspect-correct box around the shorter side
    w, h = size
    scale = shorter_side / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


# ----------------------------------------------------------------------------- what was read
@dataclass
class ClassificationData:
    """Image files with integer labels; ``classnames[label]`` is the text used for zero-shot."""

    source: str
    paths: list[Path]
    labels: list[int]
    classnames: list[str]
    class_ids: list[str] = field(default_factory=list)  # folder names / raw labels, for matching splits


@dataclass
class CaptionData:
    """Unique image files and their captions; ``text_to_image[j]`` is the image caption j describes."""

    source: str
    paths: list[Path]
    captions: list[str]
    text_to_image: list[int]


# ----------------------------------------------------------------------------- image folders
def read_image_folder(root: Path, classnames_file: Path | None = None) -> ClassificationData:
    """Index ``root/<class>/**/<image>``; class order = sorted folder names (as torchvision does)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder not found: {root}{relative_note(root)}")
    if not root.is_dir():
        raise DataError(f"imagefolder:{root} is not a directory (imagefolder expects one subfolder per class)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"no class subfolders in {root}; imagefolder expects one subfolder per class, "
            f"e.g. {root}/cat/001.jpg and {root}/dog/002.jpg"
        )
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        if not files:
            raise DataError(
                f"class folder {class_dir} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                "remove the folder or add images to it"
            )
        paths += files
        labels += [label] * len(files)
    ids = [d.name for d in class_dirs]
    names = read_classnames(classnames_file, ids, f"{root} has {len(ids)} class folders") if classnames_file else [
        folder_to_classname(i) for i in ids
    ]
    return ClassificationData(f"imagefolder:{root}", paths, labels, names, ids)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def folder_to_classname(name: str) -> str:
    """``"pickup_truck"`` -> ``"pickup truck"``: folder names are identifiers, prompts want words."""
    return " ".join(name.replace("_", " ").split())


def read_name_lines(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class names file not found: {path}{relative_note(path)}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_classnames(path: Path, class_ids: Sequence[str], what: str) -> list[str]:
    """One class name per line, in the order of ``class_ids``; the counts must agree."""
    names = read_name_lines(path)
    if len(names) != len(class_ids):
        preview = ", ".join(class_ids[:5]) + (", ..." if len(class_ids) > 5 else "")
        raise DataError(
            f"class names file {path} has {len(names)} names but {what}; write one name per line "
            f"in sorted class order ({preview})"
        )
    return names


# ----------------------------------------------------------------------------- tables (jsonl / csv)
def read_table(spec: DataSpec, separator: str | None = None) -> list[dict[str, Any]]:
    """Rows of a ``jsonl:`` or ``csv:`` file as dicts; every row remembers its line number.

    ``separator``: the CSV field separator; None sniffs it from the header line.
    """
    path = spec.path
    if not path.exists():
        raise DataError(f"{spec.kind} file not found: {path}{relative_note(path)}")
    if not path.is_file():
        raise DataError(f"{spec.kind}:{path} is a directory; pass the .{spec.kind} file itself")
    rows = _read_jsonl(path) if spec.kind == "jsonl" else _read_csv(path, separator)
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    # invalid UTF-8 bytes in one row become lone surrogates instead of failing the whole file;
    # the pipeline then skips that row's caption as "non_utf8_caption"
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append({**row, "_line": lineno})
    return rows


def caption_cell(value: Any) -> Any:
    """A CSV caption cell that holds a JSON list of strings -> the list (CSV has no lists); else as is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value  # "[sic] a caption in brackets" stays a caption
        if isinstance(parsed, list) and parsed and all(isinstance(v, str) for v in parsed):
            return parsed
    return value


def _read_csv(path: Path, separator: str | None = None) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:  # see _read_jsonl
        if separator is None:
            separator = sniff_separator(f.readline())
            f.seek(0)
        reader = csv.DictReader(f, delimiter=separator)
        # line numbers count the header as line 1
        return [{**row, "_line": lineno} for lineno, row in enumerate(reader, 2)]


def sniff_separator(header: str) -> str:
    """The field separator of a CSV header line: the candidate it holds most often outside quotes.

    Counting beats ``csv.Sniffer`` on a single line: the Sniffer guesses from character frequencies
    and picks letters or spaces on short headers like ``filepath<TAB>title``. No candidate: a comma.
    """
    unquoted = re.sub(r'"[^"]*"', "", header)
    count, _, best = max((unquoted.count(sep), -i, sep) for i, sep in enumerate(CSV_SEPARATORS))
    return best if count else ","


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The column names of a table (of its first row), for error messages."""
    # csv.DictReader files the cells past the header's under the key None
    return [k for k in rows[0] if isinstance(k, str) and k != "_line"]


def _columns_found(rows: list[dict[str, Any]], path: Path) -> str:
    found = table_columns(rows)
    text = ", ".join(found)
    if path.suffix.lower() != ".jsonl" and len(found) == 1 and any(c in found[0] for c in " :"):
        # one column whose name looks like several: the file uses a separator that was not sniffed
        text += "; if that is several columns, name the separator with data.csv_separator"
    return text


def named_column(rows: list[dict[str, Any]], path: Path, key: str, option: str) -> str:
    """``key`` if the table has that column (in any row: JSONL rows may differ), else a DataError naming the columns."""
    if any(key in row for row in rows):
        return key
    raise DataError(f"{path}: no column '{key}' (named by {option}); the columns are: {_columns_found(rows, path)}")


def _image_column(rows: list[dict[str, Any]], path: Path, key: str | None = None) -> str:
    if key is not None:
        return named_column(rows, path, key, "data.image_key")
    for col in IMAGE_COLUMNS:
        if col in rows[0]:
            return col
    raise DataError(f"{path}: no image path column; expected one of {', '.join(IMAGE_COLUMNS)} "
                    f"(found {_columns_found(rows, path)}); a recipe names another with data.image_key")


def caption_column(rows: list[dict[str, Any]], path: Path, key: str | None = None) -> str | None:
    """The caption column: ``key`` (which must exist), else the first of ``CAPTION_COLUMNS`` present, else None."""
    if key is not None:
        return named_column(rows, path, key, "data.caption_key")
    return next((c for c in CAPTION_COLUMNS if c in rows[0]), None)


def _image_path(row: dict[str, Any], column: str, table: Path) -> Path:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{table}, line {row['_line']}: empty or missing '{column}'")
    p = Path(value.strip()).expanduser()
    return p if p.is_absolute() else table.parent / p  # relative to the table, not to the cwd


def read_labelled_table(spec: DataSpec, classnames_file: Path | None = None, *, image_key: str | None = None,
                        label_key: str | None = None, separator: str | None = None) -> ClassificationData:
    """Rows with an image path and a label (``label``, or the ``label_key`` column): class names
    (strings, sorted) or ids 0..C-1."""
    rows = read_table(spec, separator)
    column = _image_column(rows, spec.path, image_key)
    if label_key is not None:
        label_col = named_column(rows, spec.path, label_key, "data.label_key")
    elif LABEL_COLUMN in rows[0]:
        label_col = LABEL_COLUMN
    else:
        raise DataError(f"{spec.path}: classification needs a '{LABEL_COLUMN}' column "
                        f"(found {_columns_found(rows, spec.path)})")
    raw = [_label_value(r, spec.path, label_col) for r in rows]
    if all(isinstance(v, int) for v in raw):
        labels, ids, names = _integer_labels(raw, spec.path, classnames_file)
    else:
        ids = sorted({str(v) for v in raw})
        index = {c: i for i, c in enumerate(ids)}
        labels = [index[str(v)] for v in raw]
        names = read_classnames(classnames_file, ids, f"{spec.path} has {len(ids)} distinct labels") \
            if classnames_file else list(ids)
    paths = [_image_path(r, column, spec.path) for r in rows]
    return ClassificationData(str(spec), paths, labels, names, ids)


def _label_value(row: dict[str, Any], table: Path, column: str = LABEL_COLUMN) -> int | str:
    value = row.get(column)
    if isinstance(value, str):
        value = value.strip()
        if value.lstrip("-").isdigit():
            value = int(value)  # CSV cells are strings; "3" is class id 3
    if value is None or value == "" or isinstance(value, (bool, float, list, dict)):
        raise DataError(f"{table}, line {row['_line']}: '{column}' must be a class name or an integer id, got {value!r}")
    return value


def table_labels(rows: list[dict[str, Any]], column: str, table: Path) -> tuple[list[int], list[str]]:
    """(label per row, class ids) from a label column: names -> their index in sorted order, or
    integer ids 0..C-1 as they are. Training uses it for ``data.label_key``."""
    raw = [_label_value(r, table, column) for r in rows]
    if all(isinstance(v, int) for v in raw):
        if min(raw) < 0:
            raise DataError(f"{table}: integer labels in '{column}' must be >= 0 (found {min(raw)})")
        return raw, [str(i) for i in range(max(raw) + 1)]
    ids = sorted({str(v) for v in raw})
    index = {c: i for i, c in enumerate(ids)}
    return [index[str(v)] for v in raw], ids


def _integer_labels(raw: list[int], table: Path, classnames_file: Path | None):
    if min(raw) < 0:
        raise DataError(f"{table}: integer labels must be >= 0 (found {min(raw)})")
    if classnames_file is None:
        num = max(raw) + 1
        return raw, [str(i) for i in range(num)], [str(i) for i in range(num)]
    names = read_name_lines(classnames_file)
    if max(raw) >= len(names):
        raise DataError(f"class names file {classnames_file} has {len(names)} names but {table} "
                        f"uses label {max(raw)}; integer labels index the names (0..{len(names) - 1})")
    return raw, [str(i) for i in range(len(names))], names


def read_caption_table(spec: DataSpec, *, image_key: str | None = None, caption_key: str | None = None,
                       separator: str | None = None) -> CaptionData:
    """Rows with an image path and captions, grouped by image (several rows and/or lists per row)."""
    rows = read_table(spec, separator)
    column = _image_column(rows, spec.path, image_key)
    caption_col = caption_column(rows, spec.path, caption_key)
    if caption_col is None:
        raise DataError(f"{spec.path}: retrieval needs a caption column, one of {', '.join(CAPTION_COLUMNS)} "
                        f"(found {_columns_found(rows, spec.path)})")
    image_index: dict[Path, int] = {}
    captions, text_to_image = [], []
    for row in rows:
        path = _image_path(row, column, spec.path)
        if spec.kind == "csv":
            row = {**row, caption_col: caption_cell(row.get(caption_col))}
        for caption in _captions_of(row, caption_col, spec.path):
            captions.append(caption)
            text_to_image.append(image_index.setdefault(path, len(image_index)))
    return CaptionData(str(spec), list(image_index), captions, text_to_image)


def _captions_of(row: dict[str, Any], column: str, table: Path) -> list[str]:
    value = row.get(column)
    texts = value if isinstance(value, list) else [value]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"{table}, line {row['_line']}: '{column}' must be a non-empty string or list of strings, got {value!r}")
    return [t.strip() for t in texts]


# ----------------------------------------------------------------------------- entry points
def read_classification_data(spec: str | DataSpec, classnames_file: Path | None = None, *,
                             image_key: str | None = None, label_key: str | None = None,
                             separator: str | None = None) -> ClassificationData:
    """Labelled images; the keyword arguments name a table's columns and CSV separator (None: found)."""
    spec = spec if isinstance(spec, DataSpec) else parse_data_spec(spec)
    if spec.kind == "imagefolder":
        return read_image_folder(spec.path, classnames_file)
    if spec.kind == "wds":  # imported here: wds_files imports the training pipeline, which imports this module
        from clipforge.data.wds_files import read_wds_labels
        return read_wds_labels(spec, classnames_file)
    return read_labelled_table(spec, classnames_file, image_key=image_key, label_key=label_key,
                               separator=separator)


def read_caption_data(spec: str | DataSpec, *, image_key: str | None = None, caption_key: str | None = None,
                      separator: str | None = None) -> CaptionData:
    """Images and captions; the keyword arguments name a table's columns and CSV separator (None: found)."""
    spec = spec if isinstance(spec, DataSpec) else parse_data_spec(spec)
    if spec.kind == "imagefolder":
        raise DataError(f"retrieval needs captions, which an image folder does not have; "
                        f"use jsonl:FILE or csv:FILE with an image column and a text or caption column")
    if spec.kind == "wds":
        from clipforge.data.wds_files import read_wds_captions
        return read_wds_captions(spec)
    return read_caption_table(spec, image_key=image_key, caption_key=caption_key, separator=separator)
