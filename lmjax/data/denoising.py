"""Random-access datasets for the encoder objectives, over raw token windows (any dataset
whose example i is a dict with "inputs", "segment_ids", "positions": PackedDataset, prepared
shards, mixtures).

Each example's randomness is a pure function of (seed, example index), so batches are
deterministic and resumable, with no hidden RNG state (the same example is corrupted the
same way in every epoch, as in the original BERT data).

- MaskedLMDataset (encoder): BERT masking of PackedDataset windows.
- SpanCorruptionDataset (encoder_decoder): T5 span corruption of raw windows long enough
  that the corrupted inputs fill `inputs_length`.
"""

from __future__ import annotations

import numpy as np

from lmjax.data.objectives import check_sentinels, corrupt_spans, mask_tokens, random_spans_noise_mask
from lmjax.data.sources import DataError
from lmjax.data.tokenizer import Tokenizer
from lmjax.spans import noise_span_counts, span_corruption_lengths


class MaskedLMDataset:
    """Example i: a dict of (seq_len,) arrays: inputs (masked token ids, int32), targets (the
    original ids), segment_ids and positions (as PackedDataset), loss_mask (float32, 1 at the
    selected positions only)."""

    def __init__(self, windows, tokenizer: Tokenizer, mlm_probability: float, seed: int):
        if tokenizer.mask_id is None:
            raise DataError("the masked-LM objective needs a mask token, but the tokenizer has none (mask_id); "
                            "use a tokenizer that reserves one.")
        self.windows, self.tokenizer, self.mlm_probability, self.seed = windows, tokenizer, mlm_probability, seed
        self.replacement_ids = tokenizer.ordinary_ids()  # never pad/bos/eos/mask/unk or a sentinel

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        window = self.windows[i]
        rng = np.random.default_rng([self.seed, i])
        inputs, loss_mask = mask_tokens(window["inputs"], window["segment_ids"] != 0, rng, self.mlm_probability,
                                        self.tokenizer.mask_id, self.replacement_ids)
        return {"inputs": inputs, "targets": window["inputs"], "segment_ids": window["segment_ids"],
                "positions": window["positions"], "loss_mask": loss_mask}


class SpanCorruptionDataset:
    """Example i: encoder_inputs, encoder_segment_ids (inputs_length,) and decoder_inputs,
    targets, decoder_segment_ids, loss_mask (targets_length,), from raw window i, whose
    "inputs" must hold `raw_length` tokens (`span_corruption_lengths`; `window_length`).
    decoder_inputs are the targets shifted right after bos; padding (segment 0, loss 0)
    fills any shortfall. With `positions`, also encoder_positions (inputs_length,) and
    decoder_positions (targets_length,) int32, 0, 1, 2, ...: a batch whose tokens are reordered
    (context parallelism's load-balanced layout) still says where each token stands."""

    def __init__(self, windows, inputs_length: int, tokenizer, noise_density: float, mean_noise_span_length: float,
                 seed: int, positions: bool = False):
        try:
            self.raw_length, self.targets_length = span_corruption_lengths(inputs_length, noise_density,
                                                                           mean_noise_span_length)
            n_spans = noise_span_counts(self.raw_length, noise_density, mean_noise_span_length)[1]
            self.sentinels = check_sentinels(tokenizer, n_spans)
        except ValueError as e:
            raise DataError(str(e)) from None
        if len(windows) and len(windows[0]["inputs"]) != self.raw_length:
            raise DataError(f"span corruption of {inputs_length} inputs needs raw windows of {self.raw_length} tokens, "
                            f"got {len(windows[0]['inputs'])}.")
        self.windows = windows
        self.inputs_length, self.tokenizer, self.seed = inputs_length, tokenizer, seed
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.positions = positions

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        raw = self.windows[i]["inputs"]
        rng = np.random.default_rng([self.seed, i])
        noise = random_spans_noise_mask(len(raw), self.noise_density, self.mean_noise_span_length, rng)
        inputs, targets = corrupt_spans(raw, noise, self.sentinels, self.tokenizer.eos_id)
        encoder_inputs, encoder_segments = _pad(inputs, self.inputs_length, self.tokenizer.pad_id)
        targets, decoder_segments = _pad(targets, self.targets_length, self.tokenizer.pad_id)
        decoder_inputs = np.concatenate([[self.tokenizer.bos_id], targets[:-1]]).astype(np.int32)
        example = {"encoder_inputs": encoder_inputs, "encoder_segment_ids": encoder_segments,
                   "decoder_inputs": decoder_inputs, "targets": targets, "decoder_segment_ids": decoder_segments,
                   "loss_mask": decoder_segments.astype(np.float32)}
        if self.positions:
            example["encoder_positions"] = np.arange(self.inputs_length, dtype=np.int32)
            example["decoder_positions"] = np.arange(self.targets_length, dtype=np.int32)
        return example


def _pad(ids: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids padded to `length` with pad_id, segment ids: 1 on ids, 0 on padding), int32."""
    out = np.full(length, pad_id, np.int32)
    out[: len(ids)] = ids
    return out, (np.arange(length) < len(ids)).astype(np.int32)
