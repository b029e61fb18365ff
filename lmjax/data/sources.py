"""Where documents come from: the stdlib corpus, text/JSONL/Parquet files, HF datasets on disk."""

from __future__ import annotations

import json
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".py", ".text")  # read whole, one document per file
RECORD_SUFFIXES = (".jsonl", ".parquet")  # one document per line / row
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by datasets.save_to_disk


class DataError(ValueError):
    """A user-facing data problem; the message names the setting and the fix."""


def stdlib_files() -> list[Path]:
    """The running Python's standard-library .py files (no site-packages, no __pycache__),
    sorted by relative path and then put in a fixed pseudo-random order, so that a
    prefix of the list is a representative sample rather than the modules starting with 'a'."""
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = sorted(p.relative_to(root) for p in root.rglob("*.py"))
    relative = [p for p in relative if "site-packages" not in p.parts and "__pycache__" not in p.parts]
    order = np.random.default_rng(1234).permutation(len(relative))
    return [root / relative[i] for i in order]


def _decode(data: bytes, counts: Counter | None) -> str:
    """UTF-8 text; invalid bytes become U+FFFD and are counted in counts["invalid_utf8"]."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if counts is not None:
            counts["invalid_utf8"] += 1
        return data.decode("utf-8", errors="replace")


def _jsonl_documents(path: Path, text_field: str, counts: Counter | None = None) -> Iterator[str]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            line = _decode(raw, counts)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data.source {path}:{number} is not valid JSON ({e.msg}); "
                                "a .jsonl file needs one JSON object per line.") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"data.source {path}:{number} has no field {text_field!r}; set data.text_field "
                                "to the key that holds the text.")
            yield record[text_field]


def _require_column(columns: list[str], text_field: str, where: Path) -> None:
    if text_field not in columns:
        raise DataError(f"data.source {where} has no column {text_field!r} (columns: {', '.join(columns)}); "
                        "set data.text_field to the column that holds the text.")


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    _require_column(columns, text_field, path)
    yield from pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()


def _hf_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.source {path} is a Hugging Face dataset; `pip install datasets` to read it.") from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    _require_column(dataset.column_names, text_field, path)
    yield from dataset[text_field]


def _file_documents(path: Path, text_field: str, counts: Counter | None = None) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field, counts)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, text_field)
    elif suffix in TEXT_SUFFIXES:
        yield _decode(path.read_bytes(), counts)
    else:
        raise DataError(f"data.source {path} has the unknown suffix {path.suffix!r}; "
                        f"use one of {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)}.")


def _directory_documents(path: Path, text_field: str, counts: Counter | None = None) -> Iterator[str]:
    readable = TEXT_SUFFIXES + RECORD_SUFFIXES
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in readable)
    if not files:
        raise DataError(f"data.source directory {path} holds no {', '.join(readable)} files; "
                        "point data.source at your text.")
    for file in files:
        yield from _file_documents(file, text_field, counts)


def _take_until(documents: Iterable, max_bytes: int | None, text_field: str) -> list[str]:
    """Non-empty documents in order, stopping after the one that brings the total to
    `max_bytes` UTF-8 bytes (so the total exceeds it by less than one document)."""
    taken, total = [], 0
    for doc in documents:
        if not doc:
            continue
        if not isinstance(doc, str):
            raise DataError(f"data.text_field {text_field!r} holds {type(doc).__name__} values, not text; "
                            "set data.text_field to a string field.")
        taken.append(doc)
        total += len(doc.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    return taken


def iter_documents(source: str, text_field: str = "text", counts: Counter | None = None) -> Iterator[str | None]:
    """Every document of `source` in a fixed order, streamed (empty ones and None included;
    see `load_documents` for the sources). Invalid UTF-8 is replaced by U+FFFD and counted
    in `counts["invalid_utf8"]`."""
    if source == "stdlib":
        for p in stdlib_files():
            yield _decode(p.read_bytes(), counts)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source {source!r} does not exist; give 'stdlib' or a path to your text.")
    if path.is_dir() and any((path / marker).exists() for marker in HF_MARKERS):
        yield from _hf_documents(path, text_field)
    elif path.is_dir():
        yield from _directory_documents(path, text_field, counts)
    else:
        yield from _file_documents(path, text_field, counts)


def load_documents(source: str, text_field: str = "text", max_bytes: int | None = None) -> list[str]:
    """Non-empty documents from `source`, in a fixed order, reading stops once `max_bytes`
    UTF-8 bytes are taken (None: everything).

    `source` is "stdlib" (the running Python's standard-library .py files), a text file
    (one document), a .jsonl file (one document per line, key `text_field`), a .parquet
    file (one per row, column `text_field`), a directory saved by HF
    `datasets.save_to_disk` (column `text_field`), or a directory of such files (read
    recursively in sorted order). Raises DataError naming the setting to fix.
    """
    taken = _take_until(iter_documents(source, text_field), max_bytes, text_field)
    if not taken:
        raise DataError(f"data.source {source!r} contains no text (every document is empty); "
                        "point data.source at your text or check data.text_field.")
    return taken
