"""Byte-level tokenizer: UTF-8 bytes, a few special ids, and T5-style sentinels on top."""

from __future__ import annotations

import re

import numpy as np

_SENTINEL = re.compile(r"<extra_id_(\d+)>")


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
