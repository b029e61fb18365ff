"""Byte-level tokenizer: UTF-8 bytes, a few special ids, and T5-style sentinels on top."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes; 256..259 are pad, bos, eos, mask; the top
    `num_sentinels` ids of the 384-id vocabulary are sentinels, sentinel 0 highest."""

    name = "bytes"
    vocab_size = 384  # a multiple of 128
    pad_id, bos_id, eos_id, mask_id = 256, 257, 258, 259
    num_sentinels = 124

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} is outside [0, {self.num_sentinels}).")
        return self.vocab_size - 1 - i

    def encode(self, text: str) -> np.ndarray:
        """text -> (n_bytes,) uint16 ids, no bos/eos added."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """ids -> text; special and sentinel ids are dropped, invalid UTF-8 replaced."""
        ids = np.asarray(ids).reshape(-1)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) UTF-8 bytes each id stands for: 1 for bytes, 0 for special ids."""
        return (np.arange(self.vocab_size) < 256).astype(np.int32)
