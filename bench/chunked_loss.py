"""XLA's temporaries of a compiled training step against `model.loss_chunk` (the chunked head).

    python bench/chunked_loss.py [--vocab 32768] [--seq-len 2048] [--chunks 0,none,1024,512,256]

A decoder whose logits dominate its activations (width 64, one layer, one row of `--seq-len`
positions, float32) is compiled from abstract shapes for each chunk setting (nothing is
allocated, run or timed) and one JSON line per setting gives `memory_analysis()`'s temporary
bytes, the whole batch's float32 logits' bytes, and how far the temporaries fell from no
chunks (0). docs/benchmarks.md keeps the table.
"""

from __future__ import annotations

import argparse
import json
import runpy
from pathlib import Path

import jax

from lmjax.config import Config, DataConfig, ModelConfig, TrainConfig

compiled_memory = runpy.run_path(str(Path(__file__).with_name("memory.py")))["compiled_memory"]


def chunk_config(vocab: int, seq_len: int, chunk: int | None) -> Config:
    """The benchmark's decoder with `model.loss_chunk` = chunk (None: the size rule)."""
    model = ModelConfig(vocab_size=vocab, d_model=64, n_layers=1, n_heads=2, d_ff=128, max_seq_len=seq_len,
                        loss_chunk=chunk)
    return Config(model=model, data=DataConfig(seq_len=seq_len), train=TrainConfig(batch_size=1))


def temporaries_table(vocab: int, seq_len: int, chunks: list[int | None]) -> list[dict]:
    """One row per chunk setting: loss_chunk, xla_temp_bytes, logits_bytes (seq_len x vocab x 4)
    and temp_drop_bytes (the first row's temporaries less this row's)."""
    rows = []
    for chunk in chunks:
        temp = compiled_memory(chunk_config(vocab, seq_len, chunk))["xla_temp_bytes"]
        rows.append({"loss_chunk": chunk, "xla_temp_bytes": temp, "logits_bytes": seq_len * vocab * 4,
                     "temp_drop_bytes": rows[0]["xla_temp_bytes"] - temp if rows else 0})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunks", default="0,none,1024,512,256",
                        help="comma-separated model.loss_chunk settings; the first is the baseline")
    args = parser.parse_args()
    chunks = [None if c == "none" else int(c) for c in args.chunks.split(",")]
    for row in temporaries_table(args.vocab, args.seq_len, chunks):
        print(json.dumps({"device": jax.devices()[0].device_kind, "vocab": args.vocab, "seq_len": args.seq_len,
                          **row}))


if __name__ == "__main__":
    main()
