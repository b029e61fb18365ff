"""Tokenizers behind one interface (`Tokenizer`), and the byte tokenizer.

"bytes" (the default) needs no file. Subword tokenizers (`lmjax.data.subword`) are a
Hugging Face `tokenizers` .json file or a SentencePiece .model file, trained locally by
`lmjax tokenizer train`; `lmjax.data.tokenizer_store` loads either kind and keeps a run's copy.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from lmjax.config import BYTE_VOCAB_SIZE

_SENTINEL = re.compile(r"<extra_id_(\d+)>")


class Tokenizer(Protocol):
    """What callers may ask of any tokenizer (bytes, `tokenizers` .json, SentencePiece .model).

    Ids below `vocab_size` are either ordinary (`ordinary_ids()`: they stand for text) or
    special: pad, bos, eos, mask, unk and the `num_sentinels` sentinels. `path` is the
    tokenizer's file (None for bytes) and `sha256` what prepared data and checkpoints record
    to catch a mismatch.
    """

    name: str
    path: Path | None
    sha256: str
    vocab_size: int  # ids in use, before the model pads its vocabulary
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int | None
    num_sentinels: int

    def sentinel_id(self, i: int) -> int:
        """The id of sentinel i (T5's `<extra_id_i>`), 0 <= i < num_sentinels."""

    def ordinary_ids(self) -> np.ndarray:
        """(n,) int32 sorted ids that stand for text: no pad/bos/eos/mask/unk or sentinel."""

    def encode(self, text: str) -> np.ndarray:
        """text -> (n,) unsigned int ids, no bos/eos added."""

    def encode_prompt(self, text: str) -> np.ndarray:
        """A prompt to continue: `encode`, with bos first where the tokenizer's file says so (LLaMA)."""

    def decode(self, ids) -> str:
        """ids -> text; special and sentinel ids are dropped."""

    def encode_with_sentinels(self, text: str) -> np.ndarray:
        """Like `encode`, with each `<extra_id_N>` in the text as sentinel N."""

    def decode_with_sentinels(self, ids) -> str:
        """Like `decode`, with sentinel N written as `<extra_id_N>`."""

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int32 UTF-8 bytes each id stands for (0 for special ids), for bits per byte."""


class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes; 256..259 are pad, bos, eos, mask; the top
    `num_sentinels` ids of the 384-id vocabulary are sentinels, sentinel 0 highest."""

    name = "bytes"
    path = None
    sha256 = hashlib.sha256(b"lmjax-bytes-v1").hexdigest()
    vocab_size = BYTE_VOCAB_SIZE  # a multiple of 128
    pad_id, bos_id, eos_id, mask_id = 256, 257, 258, 259
    num_sentinels = 124

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} is outside [0, {self.num_sentinels}).")
        return self.vocab_size - 1 - i

    def ordinary_ids(self) -> np.ndarray:
        """The 256 byte ids."""
        return np.arange(256, dtype=np.int32)

    def encode(self, text: str) -> np.ndarray:
        """text -> (n_bytes,) uint16 ids, no bos/eos added."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16)

    def encode_prompt(self, text: str) -> np.ndarray:
        """`encode`: byte runs train without bos."""
        return self.encode(text)

    def encode_with_sentinels(self, text: str) -> np.ndarray:
        """Like `encode`, with each `<extra_id_N>` in the text (T5's spelling) as sentinel N."""
        pieces, last = [], 0
        for match in _SENTINEL.finditer(text):
            pieces += [self.encode(text[last:match.start()]), np.array([self.sentinel_id(int(match[1]))], np.uint16)]
            last = match.end()
        return np.concatenate([*pieces, self.encode(text[last:])])

    def decode_with_sentinels(self, ids) -> str:
        """Like `decode`, with sentinel N written as `<extra_id_N>`."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        lowest = self.vocab_size - self.num_sentinels
        out, run = [], []
        for i in ids + [None]:
            if i is not None and i < 256:
                run.append(i)
                continue
            out.append(self.decode(run))
            run = []
            if i is not None and i >= lowest:
                out.append(f"<extra_id_{self.vocab_size - 1 - i}>")
        return "".join(out)

    def decode(self, ids) -> str:
        """ids -> text; special and sentinel ids are dropped, invalid UTF-8 replaced."""
        ids = np.asarray(ids).reshape(-1)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) UTF-8 bytes each id stands for: 1 for bytes, 0 for special ids."""
        return (np.arange(self.vocab_size) < 256).astype(np.int32)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id: uint16 up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """`vocab_size` rounded up to a multiple of 128 (the model's embedding rows)."""
    return -(-vocab_size // multiple) * multiple
