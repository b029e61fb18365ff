"""Data throughput: `lmjax data prepare` tokens/s per core, and the loader's tokens/s per process.

    python bench/data.py [--mb 16] [--vocab-size 8000] [--batch 16] [--seq-len 128] [--batches 300]

1. Prepare: the first --mb MiB of the stdlib corpus, tokenized with bytes and with a BPE
   tokenizer trained here (HF tokenizers, --vocab-size ids), with 1 and with all worker
   processes; tokens/s per core = tokens / wall seconds / workers.
2. Loader: BatchIterator over the prepared shards (shuffled, packed, the default job's
   batch of --batch x --seq-len), one dataset and a 0.7/0.3 mixture, with reader threads;
   tokens/s of batches delivered to the training loop, against what the default decoder
   consumes (450 x 16 x 128 tokens in ~235 s on the 2-core CPU: ~4k tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from lmjax.data import BatchIterator, Mixture, Subset, load_documents, load_tokenizer
from lmjax.data.prepare import open_prepared, prepare
from lmjax.data.subword import train_tokenizer

DEFAULT_DECODER_TOKENS_PER_S = 450 * 16 * 128 / 235


def bench_prepare(source: str, tokenizer: str, out: Path, workers: int) -> float:
    start = time.perf_counter()
    manifest = prepare(source, tokenizer, out, workers=workers, shard_bytes=2 << 20, progress=False)
    seconds = time.perf_counter() - start
    rate = manifest["tokens"] / seconds
    print(f"prepare  {Path(tokenizer).name:<14} workers={workers}  {manifest['tokens']:>11,} tokens  {seconds:6.1f} s  "
          f"{rate:>12,.0f} tokens/s  {rate / workers:>12,.0f} tokens/s/core")
    return rate / workers


def bench_loader(datasets, label: str, batch: int, batches: int, threads: int) -> float:
    iterator = BatchIterator(datasets, batch, seed=0, threads=threads)
    next(iterator)  # start-up (threads, first reads) not counted
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * batch * datasets_seq_len(datasets) / (time.perf_counter() - start)
    print(f"loader   {label:<30} threads={threads}  {rate:>12,.0f} tokens/s  "
          f"{rate / DEFAULT_DECODER_TOKENS_PER_S:6.0f}x the default decoder's ~{DEFAULT_DECODER_TOKENS_PER_S:,.0f}")
    return rate


def datasets_seq_len(datasets) -> int:
    first = datasets.datasets[0] if isinstance(datasets, Mixture) else datasets
    return first[0]["inputs"].shape[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=16, help="MiB of stdlib text to prepare")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        corpus = root / "corpus.jsonl"
        documents = load_documents("stdlib", max_bytes=args.mb << 20)
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        start = time.perf_counter()
        bpe = train_tokenizer(documents[: len(documents) // 4], root / "bpe.json", args.vocab_size, "bpe")
        seconds = time.perf_counter() - start
        print(f"tokenizer: trained a {args.vocab_size}-id BPE on {args.mb // 4} MiB in {seconds:.1f} s")
        for tokenizer in ("bytes", str(bpe)):
            for workers in sorted({1, cores}):
                bench_prepare(str(corpus), tokenizer, root / f"{Path(tokenizer).stem}-{workers}", workers)
        for tokenizer, name in (("bytes", "bytes"), (str(bpe), "bpe")):
            dataset = open_prepared(root / f"{Path(tokenizer).stem}-1", load_tokenizer(tokenizer), args.seq_len)
            for threads in (1, 2):
                bench_loader(dataset, f"{name}, one dataset", args.batch, args.batches, threads)
            half = len(dataset) // 2
            mixture = Mixture([Subset(dataset, 0, half), Subset(dataset, half, len(dataset))], [0.7, 0.3])
            bench_loader(mixture, f"{name}, 0.7/0.3 mixture", args.batch, args.batches, 2)


if __name__ == "__main__":
    main()
