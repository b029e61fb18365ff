"""Token streams, packed fixed-length windows, and a deterministic, resumable batch order.

Documents are tokenized and concatenated, each followed by eos, into one stream per
split. Training examples are non-overlapping windows of seq_len + 1 tokens of that
stream ("packing"): a window may hold pieces of several documents, told apart by
segment ids, so attention and loss never cross a document boundary. The order of
examples is a pure function of (seed, step), so a resumed run, or a run on a different
number of processes, sees exactly the same global batches.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grain
import numpy as np

from lmjax.data.sources import DataError
from lmjax.data.tokenizer import token_dtype


@dataclass(frozen=True)
class TokenStream:
    """tokens (n,) uint16 (uint32 past 65,536 ids): documents back to back, each ended by
    eos; doc_starts (d,) int64: offset of each document's first token. `tokens` may be
    any object with len() and slicing (prepared shards: `lmjax.data.prepare.ShardedTokens`)."""

    tokens: np.ndarray
    doc_starts: np.ndarray


def tokenize(documents: list[str], tokenizer) -> TokenStream:
    """Encode `documents` and concatenate them, each followed by `tokenizer.eos_id`."""
    dtype = token_dtype(tokenizer.vocab_size)
    pieces, starts, offset = [], [], 0
    eos = np.array([tokenizer.eos_id], dtype)
    for doc in documents:
        ids = tokenizer.encode(doc)
        pieces += [ids, eos]
        starts.append(offset)
        offset += len(ids) + 1
    tokens = np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.zeros(0, dtype)
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


class Subset:
    """Examples [start, stop) of a random-access dataset, itself random access."""

    def __init__(self, dataset, start: int, stop: int):
        self.dataset, self.start, self.length = dataset, start, stop - start

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.dataset[self.start + i]


class Concat:
    """Several random-access datasets one after the other."""

    def __init__(self, datasets: list):
        self.datasets = datasets
        self.starts = np.cumsum([0] + [len(d) for d in datasets])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        d = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.datasets[d][i - int(self.starts[d])]


class Mixture(Concat):
    """Datasets sampled in proportion to `weights` by BatchIterator. Indexing it reads the
    datasets one after the other (for evaluation); `map` wraps every part, e.g. in an
    objective's example transform, keeping the weights."""

    def __init__(self, datasets: list, weights: list[float]):
        super().__init__(datasets)
        self.weights = list(weights)

    def map(self, wrap) -> Mixture:
        return Mixture([wrap(d) for d in self.datasets], self.weights)


def example_order(sizes: list[int], weights: list[float], seed: int) -> grain.MapDataset:
    """The global example order: an endless grain MapDataset whose element k is
    (dataset, index). Each dataset is shuffled anew every epoch, by a permutation that is
    a pure function of (seed, dataset number, epoch); several datasets are interleaved
    in proportion to `weights`, deterministically."""
    streams = [grain.MapDataset.range(n).shuffle(seed=seed * 1_000_003 + d).repeat().map(functools.partial(_tag, d))
               for d, n in enumerate(sizes)]
    return streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [float(w) for w in weights])


def _tag(dataset: int, index: int) -> tuple[int, int]:
    return dataset, int(index)


class _LocalBatch:
    """Global batch number -> this process's rows of it, stacked into arrays."""

    def __init__(self, datasets: list, order: grain.MapDataset, global_batch_size: int, rows: np.ndarray):
        self.datasets, self.order, self.batch_size, self.rows = datasets, order, global_batch_size, rows

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        positions = step * self.batch_size + self.rows
        return _stack([self.datasets[d][i] for d, i in (self.order[int(k)] for k in positions)])


class BatchIterator:
    """Host-local training batches in an order that is a pure function of (seed, step).

    `datasets` is one random-access dataset, a list of them mixed by `weights`, or a
    Mixture (which carries its weights). Global
    batch s is elements [s*B, (s+1)*B) of `example_order`, and this process takes `rows`
    of it (all by default; `lmjax.parallel.local_batch_rows` gives each process its
    rows), so any number of processes sees the same global batches. Batches are read
    ahead by grain: `threads` reader threads, or `workers` > 0 worker processes.
    `state()` / `restore()` checkpoint the position.
    """

    def __init__(self, datasets, global_batch_size: int, seed: int, rows: slice | np.ndarray | None = None,
                 step: int = 0, weights: list[float] | None = None, threads: int = 2, workers: int = 0):
        if isinstance(datasets, Mixture):
            datasets, weights = datasets.datasets, datasets.weights
        datasets = list(datasets) if isinstance(datasets, (list, tuple)) else [datasets]
        weights = [1.0] * len(datasets) if weights is None else list(weights)
        if global_batch_size <= 0:
            raise DataError(f"train.batch_size must be positive, got {global_batch_size}.")
        if len(weights) != len(datasets) or any(not w > 0 for w in weights):
            raise DataError(f"mixture weights must be one positive number per dataset, got {weights}.")
        if any(len(d) == 0 for d in datasets):
            raise DataError("the training split has no sequences; use more data or a smaller data.seq_len.")
        self.datasets, self.batch_size, self.seed, self.weights = datasets, global_batch_size, seed, weights
        self.local = np.arange(global_batch_size)[slice(None) if rows is None else rows]
        self.threads, self.workers = threads, workers
        self.wait_seconds = 0.0  # spent waiting in __next__ for a batch
        self.order = example_order([len(d) for d in datasets], weights, seed)
        self._start(int(step))

    def _start(self, step: int) -> None:
        self.step = step
        batches = grain.MapDataset.range(step, sys.maxsize).map(
            _LocalBatch(self.datasets, self.order, self.batch_size, self.local))
        stream = batches.to_iter_dataset(grain.ReadOptions(num_threads=max(self.threads, 1), prefetch_buffer_size=4))
        if self.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; lmjax uses none
                flags.FLAGS.mark_as_parsed()
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        self._iterator = iter(stream)

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(dataset, example index) of each row of global batch `step`, all processes' rows."""
        return [self.order[k] for k in range(step * self.batch_size, (step + 1) * self.batch_size)]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.step += 1
        start = time.perf_counter()
        batch = next(self._iterator)
        self.wait_seconds += time.perf_counter() - start
        return batch

    def state(self) -> dict:
        """{"step": next global batch, "seed": data.seed, "weights"}, JSON-serialisable."""
        return {"step": int(self.step), "seed": int(self.seed), "weights": self.weights}

    def restore(self, state: dict) -> None:
        """Continue from a `state()`: the next batch is the one that followed it."""
        if state["seed"] != self.seed:
            raise DataError(f"the checkpoint's data order used data.seed={state['seed']}, not {self.seed}; "
                            f"resume with data.seed={state['seed']}.")
        if state.get("weights", [1.0]) != self.weights:
            raise DataError(f"the checkpoint's data mixture had weights {state.get('weights', [1.0])}, not "
                            f"{self.weights}; resume with the same data.path.")
        self._start(int(state["step"]))


def eval_batches(dataset: PackedDataset, batch_size: int, max_batches: int | None = None) -> Iterator[dict]:
    """Full batches of consecutive examples from the start (the last partial one dropped;
    one smaller batch when there are fewer than `batch_size` examples)."""
    n_batches = max(len(dataset) // batch_size, 1)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        yield _stack([dataset[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))])
