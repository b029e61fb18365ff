"""RoPE settings <-> transformers' `rope_parameters` (transformers 5; older files: `rope_theta` and
`rope_scaling`, its deprecated alias). Default, linear, llama3 and yarn are carried both ways,
each to lmjax's flat `model.rope_*` fields (`lmjax.models.rope` computes them as transformers
does); any other rope type (dynamic, longrope, ...) or a partial rotary factor is refused."""

from __future__ import annotations

import math

from lmjax.config import ConfigError, ModelConfig

CARRIED = ("default", "linear", "llama3", "yarn")


def model_fields(hf: dict) -> dict:
    """The ModelConfig fields (rope_theta, rope_scaling, rope_scaling_factor, ...) of config.json `hf`."""
    parameters = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = parameters.get("rope_type") or parameters.get("type") or "default"
    if rope_type not in CARRIED:
        raise ConfigError(f"config.json asks for rope scaling {rope_type!r}, which lmjax lacks (it carries "
                          f"{', '.join(CARRIED)}); converting would give a different model.")
    if parameters.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("config.json rotates part of each head (partial_rotary_factor), which lmjax lacks.")
    fields = {"rope_theta": float(parameters.get("rope_theta", hf.get("rope_theta", 10_000.0)))}
    if rope_type == "default":
        return fields
    original = parameters.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if original is None and rope_type != "linear":  # transformers' default: the config's own length
        original = hf.get("max_position_embeddings")
    factor = parameters.get("factor")
    if factor is None and rope_type == "yarn":  # transformers: the extension the lengths imply
        factor = hf["max_position_embeddings"] / original
    fields.update(rope_scaling=rope_type, rope_scaling_factor=float(factor), rope_original_max_len=original)
    if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(parameters["low_freq_factor"]),
                      rope_high_freq_factor=float(parameters["high_freq_factor"]))
    if rope_type == "yarn":
        fields.update(rope_beta_fast=float(parameters.get("beta_fast") or 32),
                      rope_beta_slow=float(parameters.get("beta_slow") or 1),
                      rope_truncate=bool(parameters.get("truncate", True)),
                      rope_attention_factor=_yarn_attention_factor(parameters, float(factor)))
    return fields


def _yarn_attention_factor(parameters: dict, factor: float) -> float | None:
    """YaRN's cos/sin factor: given, or DeepSeek's ratio of mscales, or None (lmjax's default,
    transformers' too: 0.1 ln(factor) + 1)."""
    if parameters.get("attention_factor") is not None:
        return float(parameters["attention_factor"])
    mscale, mscale_all_dim = parameters.get("mscale"), parameters.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        return None

    def get_mscale(scale):
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    return get_mscale(mscale) / get_mscale(mscale_all_dim)


def hf_parameters(cfg: ModelConfig, notes: list[str]) -> dict:
    """config.json's `rope_parameters` for `cfg`'s RoPE and scaling."""
    parameters = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
                  "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "none":
        return parameters
    parameters["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        if cfg.rope_original_max_len is not None:
            notes.append(f"model.rope_original_max_len={cfg.rope_original_max_len}: transformers' linear scaling "
                         "has no original length (max_position_embeddings is model.max_seq_len).")
        return parameters
    parameters["original_max_position_embeddings"] = cfg.rope_original_max_len
    if cfg.rope_scaling == "llama3":
        parameters.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    else:
        parameters.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
        if cfg.rope_attention_factor is not None:
            parameters["attention_factor"] = cfg.rope_attention_factor
    return parameters
