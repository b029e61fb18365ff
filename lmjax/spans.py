"""Span-corruption lengths (T5): how many raw tokens corrupt into a given input length.

Pure arithmetic on integers, below the config (which checks that the targets fit the
model) and the data side (which draws the spans, `lmjax.data.objectives`).
"""

from __future__ import annotations


def noise_span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a raw sequence of `length` tokens, as T5 counts them:
    round(length * density) noise tokens in round(noise tokens / mean span length) spans
    (at least one). Raises ValueError when the sequence cannot hold one noise span."""
    n_noise, n_spans = _span_counts(length, noise_density, mean_noise_span_length)
    if n_noise < 1:
        raise ValueError(f"a sequence of {length} tokens is too short to hold one noise span at noise density "
                         f"{noise_density} (it rounds to 0 noise tokens); use longer sequences (data.seq_len) or "
                         "a higher data.noise_density.")
    if length - n_noise < n_spans:
        raise ValueError(f"{n_spans} noise spans of {length} tokens at noise density {noise_density} leave only "
                         f"{length - n_noise} kept tokens, too few to separate them; lower data.noise_density or "
                         "raise data.mean_noise_span_length.")
    return n_noise, n_spans


def _span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    n_noise = round(length * noise_density)
    return n_noise, max(1, round(n_noise / mean_noise_span_length))


def _corrupted_lengths(raw_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs, targets) lengths after corrupting `raw_length` tokens: the kept tokens plus one
    sentinel per span plus eos; the noise tokens plus one sentinel per span plus eos."""
    n_noise, n_spans = _span_counts(raw_length, noise_density, mean_noise_span_length)
    return raw_length - n_noise + n_spans + 1, n_noise + n_spans + 1


def span_corruption_lengths(inputs_length: int, noise_density: float,
                            mean_noise_span_length: float) -> tuple[int, int]:
    """(raw tokens to draw, targets length) so that corrupted inputs fit in `inputs_length`.

    The largest raw length whose corrupted inputs (eos included) still fit, as T5's
    `random_spans_helper` finds it: 512 inputs at density 0.15 and mean span 3 take 568 raw
    tokens and give 114 targets. (T5's adjustment for density 0.5 is applied too.)
    """
    raw = inputs_length - 1
    while _corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        raw += 1
    _, targets_length = _corrupted_lengths(raw, noise_density, mean_noise_span_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        raw, targets_length = raw - 1, targets_length - 1
    noise_span_counts(raw, noise_density, mean_noise_span_length)  # raises if no noise span fits
    return raw, targets_length
