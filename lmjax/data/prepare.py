"""`lmjax data prepare`: tokenize a corpus once into shards that training reads with random access.

A prepared directory holds:

    manifest.json            written last: format, tokenizer hash, totals, one entry per shard
    tokenizer.json|.model    a copy of the tokenizer (none for bytes)
    shard-00000.tokens.npy   (n,) uint16/uint32: documents back to back, each ended by eos
    shard-00000.docs.npy     (d,) int64: offset of each document's first token in the shard
    shard-00000.json         the shard's counts and checksums; its presence marks the shard done

The corpus is cut, in source order, into chunks of about `shard_bytes` UTF-8 bytes; a
chunk's shard is a pure function of its documents and the tokenizer, so worker processes
can write shards in any order, and a run that was killed and is started again skips the
finished shards and produces byte-identical files. Empty documents are skipped and
invalid UTF-8 is replaced by U+FFFD; both are counted in the manifest.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from lmjax.data.pipeline import PackedDataset, TokenStream, tokenize
from lmjax.data.sources import DataError, iter_documents
from lmjax.data.tokenizer import token_dtype
from lmjax.data.tokenizer_store import load_tokenizer
from lmjax.files import file_sha256, write_atomically, write_json_atomically

FORMAT = "lmjax-tokens-v1"


def _chunks(source: str, text_field: str, shard_bytes: int) -> Iterator[tuple[list[str], Counter]]:
    """(documents, counts) per chunk of about `shard_bytes` UTF-8 bytes, in source order;
    counts["empty"] and counts["invalid_utf8"] count the chunk's skipped / repaired documents."""
    counts, chunk, size = Counter(), [], 0
    for doc in iter_documents(source, text_field, counts):
        if doc is None or doc == "":
            counts["empty"] += 1
            continue
        if not isinstance(doc, str):
            raise DataError(f"--text-field {text_field!r} holds {type(doc).__name__} values, not text.")
        chunk.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= shard_bytes:
            yield chunk, counts
            counts, chunk, size = Counter(), [], 0
    if chunk or counts:
        yield chunk, counts


_worker_tokenizer = None


def _init_worker(tokenizer_spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_spec)


def _write_shard(out: Path, index: int, documents: list[str], counts: dict) -> dict:
    """Tokenize one chunk and write its three files (the .json last); return its entry."""
    stream = tokenize(documents, _worker_tokenizer)
    name = f"shard-{index:05d}"
    write_atomically(out / f"{name}.tokens.npy", lambda f: np.save(f, stream.tokens))
    write_atomically(out / f"{name}.docs.npy", lambda f: np.save(f, stream.doc_starts))
    entry = {"name": name, "documents": len(documents), "tokens": len(stream.tokens),
             "bytes": sum(len(d.encode("utf-8")) for d in documents),
             "empty_documents": counts.get("empty", 0), "invalid_utf8_documents": counts.get("invalid_utf8", 0),
             "tokens_sha256": file_sha256(out / f"{name}.tokens.npy"),
             "docs_sha256": file_sha256(out / f"{name}.docs.npy")}
    write_json_atomically(out / f"{name}.json", entry)
    return entry


def prepare(source: str, tokenizer_spec: str, out: Path, text_field: str = "text", workers: int = 2,
            shard_bytes: int = 64 << 20, progress: bool = True, stop_after_shards: int | None = None) -> dict:
    """Tokenize `source` (any `data.source`) with `tokenizer_spec` ("bytes" or a file) into
    shards under `out` with `workers` processes; return the manifest. Finished shards
    from an interrupted run with the same settings are kept. `stop_after_shards` stops
    after writing that many new shards, without a manifest (as if killed)."""
    out = Path(out)
    tokenizer = load_tokenizer(tokenizer_spec)
    settings = {"format": FORMAT, "source": source if source == "stdlib" else str(Path(source).resolve()),
                "text_field": text_field, "shard_bytes": shard_bytes, "tokenizer_sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size, "dtype": token_dtype(tokenizer.vocab_size).name}
    finished = _begin(out, settings, tokenizer)
    if finished is not None:
        return finished
    entries, written = _write_shards(out, source, text_field, shard_bytes, tokenizer_spec, workers, progress,
                                     stop_after_shards)
    if stop_after_shards is not None and written >= stop_after_shards:
        return {}
    shards = [entries[i] for i in range(len(entries))]
    totals = {k: sum(s[k] for s in shards) for k in ("documents", "tokens", "bytes", "empty_documents",
                                                     "invalid_utf8_documents")}
    if totals["documents"] == 0:
        raise DataError(f"--data {source!r} contains no text (every document is empty); check --text-field.")
    manifest = {"settings": settings, **totals, "eos_id": tokenizer.eos_id, "shards": shards,
                "tokenizer_file": None if tokenizer.path is None else f"tokenizer{tokenizer.path.suffix}"}
    write_json_atomically(out / "manifest.json", manifest)
    (out / "plan.json").unlink()
    return manifest


def _begin(out: Path, settings: dict, tokenizer) -> dict | None:
    """The manifest when `out` already holds this finished preparation (None otherwise, after
    recording `settings` in plan.json and copying the tokenizer file); DataError when `out`
    holds a finished or unfinished preparation with other settings."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest["settings"] != settings:
            raise DataError(f"--out {out} already holds data prepared with other settings; choose a new --out.")
        return manifest
    plan = out / "plan.json"
    if plan.exists() and json.loads(plan.read_text()) != settings:
        raise DataError(f"--out {out} holds an unfinished prepare with other settings (source, tokenizer or shard "
                        "size); rerun it with those settings or choose a new --out.")
    write_json_atomically(plan, settings)
    if tokenizer.path is not None:
        shutil.copyfile(tokenizer.path, out / f"tokenizer{tokenizer.path.suffix}")
    return None


def _write_shards(out: Path, source: str, text_field: str, shard_bytes: int, tokenizer_spec: str, workers: int,
                  progress: bool, stop_after_shards: int | None) -> tuple[dict[int, dict], int]:
    """({shard index: entry}, shards written now): tokenize every chunk of `source` in `workers`
    processes, keeping the shards an interrupted run finished (their shard-NNNNN.json)."""
    from tqdm import tqdm

    entries, pending, written = {}, {}, 0
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, desc="prepare")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(workers, 1), mp_context=context, initializer=_init_worker,
                             initargs=(tokenizer_spec,)) as pool:
        def collect(keep: int) -> None:
            nonlocal written
            while len(pending) > keep:
                index = min(pending)
                entries[index] = pending.pop(index).result()
                written += 1
                bar.update(entries[index]["tokens"])
                bar.set_postfix(shards=len(entries))

        for index, (documents, counts) in enumerate(_chunks(source, text_field, shard_bytes)):
            if stop_after_shards is not None and written + len(pending) >= stop_after_shards:
                break
            done = out / f"shard-{index:05d}.json"
            if done.exists():
                entries[index] = json.loads(done.read_text())
                continue
            pending[index] = pool.submit(_write_shard, out, index, documents, dict(counts))
            collect(keep=2 * max(workers, 1))  # bounded: at most this many chunks held in memory
        collect(keep=0)
    bar.close()
    return entries, written


class ShardedTokens:
    """The shards' token arrays, memory-mapped, read as one (n,) array: len() and slices."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop, _ = window.indices(len(self))
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - self.starts[first]
            take = min(stop - start, len(self.arrays[first]) - offset)
            pieces.append(self.arrays[first][offset:offset + take])
            start, first = start + take, first + 1
        return np.concatenate(pieces) if len(pieces) != 1 else np.asarray(pieces[0])


def is_prepared(path: str | Path) -> bool:
    """Whether `path` is a directory finished by `lmjax data prepare` (it holds manifest.json)."""
    return (Path(path) / "manifest.json").is_file()


def prepared_tokenizer(path: str | Path):
    """The tokenizer the prepared directory `path` was made with: its copy there, or bytes."""
    copy = json.loads((Path(path) / "manifest.json").read_text())["tokenizer_file"]
    return load_tokenizer(str(Path(path) / copy) if copy else "bytes")


def open_prepared(path: str | Path, tokenizer, seq_len: int, verify: bool = False) -> PackedDataset:
    """Packed windows of seq_len + 1 tokens over a prepared directory (see PackedDataset).
    Checks that it was prepared with `tokenizer` and that no shard is missing, truncated
    or malformed; `verify` also compares every file's SHA-256 with the manifest."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        if (path / "plan.json").is_file():
            raise DataError(f"data.path {path} is an unfinished `lmjax data prepare`; run it again to finish.")
        raise DataError(f"data.path {path} is not a prepared dataset (no manifest.json); "
                        "make one with `lmjax data prepare`.")
    manifest = json.loads((path / "manifest.json").read_text())
    settings = manifest["settings"]
    if settings.get("format") != FORMAT:
        raise DataError(f"data.path {path} has format {settings.get('format')!r}, not {FORMAT!r}; prepare it again.")
    if settings["tokenizer_sha256"] != tokenizer.sha256:
        raise DataError(f"data.path {path} was prepared with another tokenizer (hash "
                        f"{settings['tokenizer_sha256'][:12]}, data.tokenizer={tokenizer.name!r} has "
                        f"{tokenizer.sha256[:12]}); set data.tokenizer to "
                        f"{path / (manifest['tokenizer_file'] or 'bytes')} or prepare the data again.")
    arrays, doc_starts, base = [], [], 0
    for shard in manifest["shards"]:
        tokens = _load_shard_file(path, shard, "tokens", verify)
        docs = _load_shard_file(path, shard, "docs", verify)
        if (tokens.dtype != np.dtype(settings["dtype"]) or tokens.shape != (shard["tokens"],)
                or docs.shape != (shard["documents"],) or (len(docs) and docs[0] != 0)
                or np.any(np.diff(docs) <= 0) or (len(tokens) and tokens[-1] != manifest["eos_id"])):
            raise DataError(f"shard {path / shard['name']} does not match manifest.json (truncated or corrupt); "
                            "delete the directory and prepare it again.")
        arrays.append(tokens)
        doc_starts.append(docs + base)
        base += len(tokens)
    stream = TokenStream(ShardedTokens(arrays), np.concatenate(doc_starts) if doc_starts else np.zeros(0, np.int64))
    return PackedDataset(stream, seq_len)


def _load_shard_file(path: Path, shard: dict, kind: str, verify: bool) -> np.ndarray:
    file = path / f"{shard['name']}.{kind}.npy"
    if not file.is_file():
        raise DataError(f"shard file {file} is missing; prepare the data again.")
    if verify and file_sha256(file) != shard[f"{kind}_sha256"]:
        raise DataError(f"shard file {file} fails its checksum (corrupt); prepare the data again.")
    try:
        return np.load(file, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"shard file {file} is unreadable ({e}); prepare the data again.") from None
