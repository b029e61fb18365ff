"""Batch builders of the encoder objectives, as pure numpy on one sequence.

- causal LM (decoder): predict token t + 1 from tokens <= t; its batches are the packed
  windows themselves (`lmjax.data.pipeline.PackedDataset`).
- masked LM (encoder, BERT): select a share of the tokens; of those, replace 80% by the
  mask token, 10% by a random token, keep 10%; predict the originals at the selected
  positions only.
- span corruption (encoder-decoder, T5): replace random spans of the raw tokens by
  sentinels in the inputs; the targets list each span after its sentinel. The lengths
  are `lmjax.spans`.

All three end in the same masked cross-entropy over (targets, loss_mask)
(`lmjax.train.losses`).
"""

from __future__ import annotations

import numpy as np

from lmjax.spans import noise_span_counts

# ---------------------------------------------------------------- masked LM (BERT)

def mask_tokens(tokens, selectable, rng: np.random.Generator, mlm_probability: float, mask_id: int | None,
                replacement_ids):
    """BERT masking of one sequence.

    tokens (T,) int; selectable (T,) bool: positions that may be chosen (not padding).
    round(mlm_probability * n_selectable) positions (at least one) are chosen uniformly; each is
    replaced by `mask_id` with probability 0.8, by an id drawn uniformly from `replacement_ids`
    (the tokenizer's ordinary ids) with probability 0.1, and kept otherwise. Returns
    (inputs (T,) int32, loss_mask (T,) float32: 1 at the chosen positions).
    """
    if mask_id is None:
        raise ValueError("masked-LM needs a mask token, but the tokenizer has none (mask_id is None); "
                         "use a tokenizer that reserves one.")
    tokens = np.asarray(tokens, np.int32)
    candidates = np.flatnonzero(selectable)
    if len(candidates) == 0:
        raise ValueError("masked-LM got a sequence with no tokens to select (all padding).")
    n_chosen = max(1, round(mlm_probability * len(candidates)))
    chosen = rng.choice(candidates, n_chosen, replace=False)
    action = rng.random(n_chosen)
    inputs = tokens.copy()
    masked, randomized = chosen[action < 0.8], chosen[(action >= 0.8) & (action < 0.9)]
    inputs[masked] = mask_id
    inputs[randomized] = rng.choice(replacement_ids, len(randomized))
    loss_mask = np.zeros(len(tokens), np.float32)
    loss_mask[chosen] = 1.0
    return inputs, loss_mask


# ---------------------------------------------------------------- span corruption (T5)

def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive integers summing to `total`, every such composition equally likely."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """(length,) bool: True on noise tokens. Exactly `noise_span_counts` noise tokens in
    exactly that many spans, alternating with non-empty kept spans; the sequence starts with
    kept tokens, as in T5."""
    n_noise, n_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_partition(n_noise, n_spans, rng)
    kept_lengths = _random_partition(length - n_noise, n_spans, rng)
    runs = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)  # kept, noise, kept, noise, ...
    return np.repeat(np.tile([False, True], n_spans), runs)


def corrupt_spans(tokens, noise_mask, sentinel_ids, eos_id: int):
    """(inputs, targets) int32 of one raw sequence `tokens` (T,) with `noise_mask` (T,) bool.

    Each noise span is replaced in the inputs by the next sentinel id from `sentinel_ids`;
    the targets are, span by span, the sentinel then the span's tokens. Both end with eos.
    """
    tokens, noise_mask = np.asarray(tokens, np.int32), np.asarray(noise_mask, bool)
    span_starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
    n_spans = int(span_starts.sum())
    if n_spans > len(sentinel_ids):
        raise ValueError(f"{n_spans} noise spans need as many sentinels, but only {len(sentinel_ids)} are given; "
                         "use shorter sequences or a tokenizer with more sentinels.")
    sentinels = np.asarray(sentinel_ids, np.int32)[:n_spans]
    inputs = np.where(span_starts, 0, tokens)[~noise_mask | span_starts]  # one slot per span, then fill it
    inputs[np.flatnonzero(span_starts[~noise_mask | span_starts])] = sentinels
    start_in_noise = (np.cumsum(noise_mask) - 1)[span_starts]  # where each span begins among noise tokens
    targets = np.insert(tokens[noise_mask], start_in_noise, sentinels)
    return np.append(inputs, eos_id).astype(np.int32), np.append(targets, eos_id).astype(np.int32)


def fill_in_spans(inputs, targets, sentinel_ids) -> np.ndarray:
    """Inverse of `corrupt_spans`, given its inputs and targets without their final eos: the
    inputs with each sentinel replaced by the tokens the targets list after it (by nothing
    for a sentinel the targets do not mention, as a generated target may)."""
    sentinel_ids = [int(s) for s in sentinel_ids]
    spans, current = {}, None
    for token in np.asarray(targets).tolist():
        if token in sentinel_ids:
            current = spans.setdefault(token, [])
        elif current is not None:
            current.append(token)
    out = []
    for token in np.asarray(inputs).tolist():
        out += spans.get(token, []) if token in sentinel_ids else [token]
    return np.array(out, np.int32)


def check_sentinels(tokenizer, n_spans: int) -> np.ndarray:
    """Sentinel ids 0..n_spans-1 of `tokenizer`, after checking that there are enough and that
    none collides with its vocabulary: a sentinel must be a distinct id inside the vocabulary,
    stand for no text (`token_byte_lengths` 0) and not be pad, bos, eos or mask."""
    if n_spans > tokenizer.num_sentinels:
        raise ValueError(f"span corruption needs {n_spans} sentinels, but the tokenizer reserves "
                         f"{tokenizer.num_sentinels}; use shorter sequences or a lower data.noise_density.")
    ids = np.array([tokenizer.sentinel_id(i) for i in range(n_spans)], np.int64)
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id}
    inside = (ids >= 0) & (ids < tokenizer.vocab_size)
    text = np.asarray(tokenizer.token_byte_lengths())[ids.clip(0, tokenizer.vocab_size - 1)] > 0
    colliding = ids[~inside | text | np.isin(ids, list(specials - {None}))]
    if len(colliding) or len(set(ids.tolist())) < len(ids):
        shown = colliding[:5].tolist() if len(colliding) else sorted(ids.tolist())[:5]
        raise ValueError(f"sentinel ids {shown} collide with the tokenizer's vocabulary (ordinary or special ids, "
                         f"or each other); reserve sentinels the tokenizer does not otherwise use.")
    return ids.astype(np.int32)
