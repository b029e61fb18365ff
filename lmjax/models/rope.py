"""Rotary position embedding (RoPE) and its context-extension scalings.

`rope_frequencies(cfg)` computes the H/2 inverse frequencies once per configuration (in float64
NumPy, handed to the model as float32 constants) and the factor cos and sin are multiplied by;
`rope` rotates queries or keys by them. `model.rope_scaling`:

- "none": theta^(-2i/H).
- "linear" (position interpolation): every frequency divided by `rope_scaling_factor`.
- "llama3" (Llama 3.1): wavelengths longer than original_max_len / low_freq_factor divided by the
  factor, shorter than original_max_len / high_freq_factor kept, a smooth blend between.
- "yarn" (Peng et al. 2023, NTK-by-parts): dimensions that turn fewer than beta_slow times over
  the original length interpolated (divided by the factor), more than beta_fast times kept, a
  linear ramp between; cos and sin times the attention factor (default 0.1 ln(factor) + 1).

The formulas are transformers' `modeling_rope_utils` (`_compute_linear_scaling_rope_parameters`,
`_compute_llama3_parameters`, `_compute_yarn_parameters`), so imported models give its logits.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from lmjax.config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies (H/2,) float32, attention factor) of `cfg`'s RoPE and its scaling."""
    return _frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor,
                        cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                        cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_attention_factor, cfg.rope_truncate)


@functools.cache
def _frequencies(head_dim, theta, scaling, factor, original_len, low_freq, high_freq, beta_fast, beta_slow,
                 attention_factor, truncate) -> tuple[np.ndarray, float]:
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling == "linear":
        inv_freq = inv_freq / factor
    elif scaling == "llama3":
        inv_freq = _llama3(inv_freq, factor, original_len, low_freq, high_freq)
    elif scaling == "yarn":
        inv_freq = _yarn(inv_freq, head_dim, theta, factor, original_len, beta_fast, beta_slow, truncate)
        if attention_factor is None:
            attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    scale = attention_factor if scaling == "yarn" else 1.0
    return inv_freq.astype(np.float32), float(scale)


def _llama3(inv_freq, factor, original_len, low_freq, high_freq):
    """Llama 3.1's scaling: by wavelength, divided by factor (long), kept (short) or blended."""
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > original_len / low_freq, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelength - low_freq) / (high_freq - low_freq)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original_len / high_freq) & (wavelength <= original_len / low_freq)
    return np.where(medium, blended, scaled)


def _yarn(inv_freq, head_dim, theta, factor, original_len, beta_fast, beta_slow, truncate):
    """YaRN's NTK-by-parts: interpolated below beta_slow rotations over the original length,
    kept above beta_fast, a linear ramp over the dimensions between."""
    def dimension(rotations):  # the dimension that turns `rotations` times over original_len
        return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    kept = 1 - ramp  # the share of each dimension's original frequency
    return inv_freq / factor * (1 - kept) + inv_freq * kept


def rope(x, positions, inv_freq: np.ndarray, attention_factor: float = 1.0):
    """x (B, T, n, H) rotated at positions (B, T) (rotate-half form, as transformers' Llama):
    each half-pair (x1, x2) by the angle position * inv_freq (H/2,); times `attention_factor`."""
    half = x.shape[-1] // 2
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, H/2)
    sin = jnp.sin(angles)[:, :, None, :] * attention_factor
    cos = jnp.cos(angles)[:, :, None, :] * attention_factor
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
