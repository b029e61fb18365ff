"""Token streams, packed fixed-length windows, and a deterministic, resumable batch order.

Documents are tokenized and concatenated, each followed by eos, into one stream per
split. Training examples are non-overlapping windows of seq_len + 1 tokens of that
stream ("packing"): a window may hold pieces of several documents, told apart by
segment ids, so attention and loss never cross a document boundary. The order of
examples is a pure function of (seed, step), so a resumed run, or a run on a different
number of processes, sees exactly the same global batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from lmjax.data.sources import DataError


@dataclass(frozen=True)
class TokenStream:
    """tokens (n,) uint16: documents back to back, each ended by eos; doc_starts (d,) int64:
    offset of each document's first token."""

    tokens: np.ndarray
    doc_starts: np.ndarray


def tokenize(documents: list[str], tokenizer) -> TokenStream:
    """Encode `documents` and concatenate them, each followed by `tokenizer.eos_id`."""
    pieces, starts, offset = [], [], 0
    eos = np.array([tokenizer.eos_id], np.uint16)
    for doc in documents:
        ids = tokenizer.encode(doc)
        pieces += [ids, eos]
        starts.append(offset)
        offset += len(ids) + 1
    tokens = np.concatenate(pieces).astype(np.uint16, copy=False) if pieces else np.zeros(0, np.uint16)
    return TokenStream(tokens, np.asarray(starts, np.int64))


def _stable_unit(seed: int, index: int) -> float:
    """A uniform draw in [0, 1) that depends only on (seed, index), on every machine."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_documents(documents: list[str], tokenizer, val_fraction: float, seed: int) -> tuple[TokenStream, TokenStream]:
    """(train, validation) streams: document i is held out iff a stable hash of (seed, i)
    falls below `val_fraction`. With 0 < val_fraction < 1 each side gets at least one
    document; val_fraction == 0 puts everything in train (validation is empty)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
    draws = np.array([_stable_unit(seed, i) for i in range(len(documents))])
    is_val = draws < val_fraction
    if val_fraction > 0:
        if len(documents) < 2:
            raise DataError(f"data.source has {len(documents)} document(s), too few to hold some out for "
                            "validation (data.val_fraction > 0); give more documents.")
        if not is_val.any():
            is_val[np.argmin(draws)] = True
        if is_val.all():
            is_val[np.argmax(draws)] = False
    train = [d for d, v in zip(documents, is_val) if not v]
    val = [d for d, v in zip(documents, is_val) if v]
    return tokenize(train, tokenizer), tokenize(val, tokenizer)


class PackedDataset:
    """Random access to non-overlapping windows of seq_len + 1 tokens of a stream.

    Example i is a dict of (seq_len,) arrays: inputs, targets (int32, shifted by one),
    segment_ids (int32; 1 for the first document piece, +1 at each document start),
    positions (int32; restart at 0 at the window start and at each document start) and
    loss_mask (float32; 0 where the target starts a new document).
    """

    def __init__(self, stream: TokenStream, seq_len: int):
        if seq_len <= 0:
            raise DataError(f"data.seq_len must be positive, got {seq_len}.")
        self.stream, self.seq_len = stream, seq_len
        self.length = max(len(stream.tokens) - 1, 0) // seq_len
        if self.length == 0:
            raise DataError(f"data.seq_len={seq_len} needs at least {seq_len + 1} tokens, but the split has "
                            f"{len(stream.tokens)}; lower data.seq_len or add data.")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        t = self.seq_len
        start = i * t
        window = self.stream.tokens[start : start + t + 1].astype(np.int32)
        starts = self.stream.doc_starts
        inside = starts[np.searchsorted(starts, start + 1) : np.searchsorted(starts, start + t, side="right")]
        is_start = np.zeros(t + 1, bool)
        is_start[inside - start] = True
        segments = 1 + np.cumsum(is_start, dtype=np.int32)
        offsets = np.arange(t + 1, dtype=np.int32)
        positions = offsets - np.maximum.accumulate(np.where(is_start, offsets, 0))
        return {
            "inputs": window[:-1],
            "targets": window[1:],
            "segment_ids": segments[:-1],
            "positions": positions[:-1],
            "loss_mask": (segments[1:] == segments[:-1]).astype(np.float32),
        }


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class BatchIterator:
    """Host-local training batches in an order that is a pure function of (seed, step).

    The example order is the concatenation over epochs e of permutation(seed, e); global
    batch s is its elements [s*B, (s+1)*B), and this process takes `rows` of it (all by
    default; `lmjax.parallel.local_batch_rows` gives each process its block).
    `state()` / `restore()` checkpoint the position.
    """

    def __init__(self, dataset: PackedDataset, global_batch_size: int, seed: int, rows: slice | None = None,
                 step: int = 0):
        if global_batch_size <= 0:
            raise DataError(f"train.batch_size must be positive, got {global_batch_size}.")
        if len(dataset) == 0:
            raise DataError("the training split has no sequences; use more data or a smaller data.seq_len.")
        self.dataset, self.batch_size, self.seed, self.step = dataset, global_batch_size, seed, int(step)
        self.local = slice(0, global_batch_size) if rows is None else rows
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        """(len(dataset),) int64 example order of `epoch`; the last few epochs are cached."""
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return self._permutations[epoch]

    def indices(self, step: int) -> np.ndarray:
        """(batch_size,) int64 example indices of global batch `step`, all processes' rows."""
        n = len(self.dataset)
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = positions // n, positions % n
        indices = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            indices[here] = self._permutation(int(epoch))[offsets[here]]
        return indices

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self.indices(self.step)[self.local]
        self.step += 1
        return _stack([self.dataset[int(i)] for i in rows])

    def state(self) -> dict:
        """{"step": next global batch, "seed": data.seed}, JSON-serialisable."""
        return {"step": int(self.step), "seed": int(self.seed)}

    def restore(self, state: dict) -> None:
        """Continue from a `state()`: the next batch is the one that followed it."""
        if state["seed"] != self.seed:
            raise DataError(f"the checkpoint's data order used data.seed={state['seed']}, not {self.seed}; "
                            f"resume with data.seed={state['seed']}.")
        self.step = int(state["step"])


def eval_batches(dataset: PackedDataset, batch_size: int, max_batches: int | None = None) -> Iterator[dict]:
    """Full batches of consecutive examples from the start (the last partial one dropped;
    one smaller batch when there are fewer than `batch_size` examples)."""
    n_batches = max(len(dataset) // batch_size, 1)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        yield _stack([dataset[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))])
