"""Where documents come from: the stdlib corpus, text/JSONL/Parquet files, HF datasets on disk."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".py", ".text")


class DataError(ValueError):
    """A user-facing data problem; the message names the setting and the fix."""


def stdlib_files() -> list[Path]:
    """The running Python's standard-library .py files (no site-packages), in a fixed
    pseudo-random order, so that a prefix of the list is a representative sample."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "__pycache__" not in p.parts)
    order = np.random.default_rng(1234).permutation(len(files))
    return [files[i] for i in order]


def _take_until(documents, max_bytes: int | None) -> list[str]:
    taken, total = [], 0
    for doc in documents:
        if not doc:
            continue
        if max_bytes is not None and total >= max_bytes:
            break
        taken.append(doc)
        total += len(doc.encode("utf-8"))
    return taken


def _jsonl_documents(path: Path, text_field: str):
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise DataError(f"{path}:{number} has no field {text_field!r}; set data.text_field to the key "
                                "that holds the text.")
            yield record[text_field]


def _column(table_columns, text_field: str, where) -> None:
    if text_field not in table_columns:
        raise DataError(f"{where} has no column {text_field!r} (columns: {', '.join(table_columns)}); "
                        "set data.text_field.")


def _parquet_documents(path: Path, text_field: str):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    _column(table.column_names, text_field, path)
    yield from table.column(text_field).to_pylist()


def _hf_documents(path: Path, text_field: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face dataset; `pip install datasets` to read it.") from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    _column(dataset.column_names, text_field, path)
    yield from dataset[text_field]


def _file_documents(path: Path, text_field: str):
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path, text_field)
    elif path.suffix in TEXT_SUFFIXES:
        yield path.read_text(encoding="utf-8", errors="replace")
    else:
        raise DataError(f"data.source file {path} has an unknown suffix; use .txt, .md, .jsonl or .parquet.")


def load_documents(source: str, text_field: str = "text", max_bytes: int | None = None) -> list[str]:
    """Documents (non-empty strings) from `source`, at most about `max_bytes` UTF-8 bytes.

    `source` is "stdlib", a text/JSONL/Parquet file, a directory saved by HF
    `datasets.save_to_disk`, or a directory of such files (read in sorted order).
    """
    if source == "stdlib":
        documents = (p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files())
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data.source {source!r} does not exist; give 'stdlib' or a path to your text.")
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists()):
            documents = _hf_documents(path, text_field)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl", ".parquet"))
            documents = (doc for f in files for doc in _file_documents(f, text_field))
        else:
            documents = _file_documents(path, text_field)
    taken = _take_until(documents, max_bytes)
    if not taken:
        raise DataError(f"data.source {source!r} contains no text.")
    return taken
