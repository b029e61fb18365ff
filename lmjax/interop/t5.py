"""T5ForConditionalGeneration <-> lmjax's encoder_decoder family.

T5 is lmjax's encoder-decoder with: RMSNorm (T5's LayerNorm has no mean and no bias),
relative position biases (one table per stack, computed once and shared by its layers),
attention logits not scaled (`model.attention_scale` 1.0), heads of width `d_kv`, a ReLU
(original T5) or tanh-GELU-gated (v1.1, "gated-gelu") feed-forward, and the output head
tied to the shared embedding. transformers 5 always ties the head and rescales the final
hidden state by d_model**-0.5 unless config.json says `tie_word_embeddings: false` (v1.1);
in lmjax that rescale is `model.tied_output_rescale`.
"""

from __future__ import annotations

from lmjax.config import ConfigError, ModelConfig
from lmjax.interop.rules import Linear, Same

ARCHITECTURES = ("T5ForConditionalGeneration",)
PEFT_TASK_TYPE = "SEQ_2_SEQ_LM"  # adapter_config.json's task_type (lmjax lora export-peft)
_MLP = {"relu": "relu", "gated-gelu": "geglu"}


def model_config(hf: dict, notes: list[str]) -> ModelConfig:
    """The lmjax ModelConfig of a T5 config.json."""
    projection = hf.get("feed_forward_proj", "relu")
    if projection not in _MLP:
        raise ConfigError(f"feed_forward_proj={projection!r}: lmjax holds T5's 'relu' and 'gated-gelu' only.")
    if hf.get("num_heads") is None or hf.get("d_kv") is None:
        raise ConfigError("config.json lacks num_heads or d_kv, which a T5 config has.")
    rescale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    return ModelConfig(
        family="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], n_heads=hf["num_heads"], d_head=hf["d_kv"],
        attention_scale=1.0, d_ff=hf["d_ff"], mlp=_MLP[projection], norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), position="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        max_seq_len=hf.get("n_positions") or 512, tie_embeddings=True, tied_output_rescale=rescale,
        init_std=hf.get("initializer_factor", 1.0) * hf["d_model"] ** -0.5,
    )


def hf_config(cfg: ModelConfig, notes: list[str]) -> dict:
    """config.json of the T5ForConditionalGeneration that holds `cfg`."""
    problems = []
    if cfg.position != "relative":
        problems.append(f"model.position={cfg.position!r} (needs relative)")
    if cfg.mlp not in ("relu", "geglu"):
        problems.append(f"model.mlp={cfg.mlp!r} (needs relu or geglu)")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r} (needs rmsnorm)")
    if cfg.attention_scale != 1.0:
        problems.append(f"model.attention_scale={cfg.attention_scale} (needs 1.0)")
    if cfg.kv_heads != cfg.n_heads:
        problems.append(f"model.n_kv_heads={cfg.n_kv_heads} (needs n_heads)")
    if not cfg.tie_embeddings:
        problems.append("model.tie_embeddings=false (transformers ties T5's head)")
    if cfg.moe.enabled:
        problems.append("model.moe (T5 is dense)")
    if problems:
        raise ConfigError("T5ForConditionalGeneration cannot hold this encoder_decoder: " + "; ".join(problems) + ".")
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers, "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance, "dropout_rate": 0.0,
        "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": "relu" if cfg.mlp == "relu" else "gated-gelu",
        "tie_word_embeddings": cfg.tied_output_rescale,  # transformers: false means "tied, not rescaled"
        "initializer_factor": 1.0,
    }


def tied_copies(cfg: ModelConfig) -> tuple[str, ...]:
    """Names some T5 checkpoints hold as copies of `shared.weight` (read from there)."""
    return ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def _stack(stack: str, prefix: str, cross: bool, gated: bool) -> dict:
    block = prefix + ".block.{i}.layer."
    mlp_layer = block + ("2" if cross else "1") + ".DenseReluDense."
    rules = {}
    attentions = [("attn", "0.SelfAttention.")] + ([("cross_attn", "1.EncDecAttention.")] if cross else [])
    for name, hf_name in attentions:
        for w in "qkv":
            rules[(stack, "blocks", name, f"w{w}")] = Linear((block + hf_name + f"{w}.weight",))
        rules[(stack, "blocks", name, "wo")] = Linear((block + hf_name + "o.weight",), n_in=2)
    rules[(stack, "blocks", "attn_norm", "scale")] = Same(block + "0.layer_norm.weight")
    if cross:
        rules[(stack, "blocks", "cross_norm", "scale")] = Same(block + "1.layer_norm.weight")
    rules[(stack, "blocks", "mlp_norm", "scale")] = Same(block + ("2" if cross else "1") + ".layer_norm.weight")
    if gated:
        rules[(stack, "blocks", "mlp", "w_gate")] = Linear((mlp_layer + "wi_0.weight",))
        rules[(stack, "blocks", "mlp", "w_up")] = Linear((mlp_layer + "wi_1.weight",))
    else:
        rules[(stack, "blocks", "mlp", "w_up")] = Linear((mlp_layer + "wi.weight",))
    rules[(stack, "blocks", "mlp", "w_down")] = Linear((mlp_layer + "wo.weight",))
    return rules


def tensor_rules(cfg: ModelConfig) -> dict[tuple[str, ...], object]:
    """{lmjax weight path: rule}; paths under `blocks` have a leading layer axis, `{i}` in names."""
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    return {
        ("embed", "table"): Same("shared.weight"),
        ("encoder_bias", "table"): Same("encoder." + bias),
        ("decoder_bias", "table"): Same("decoder." + bias),
        ("encoder_norm", "scale"): Same("encoder.final_layer_norm.weight"),
        ("final_norm", "scale"): Same("decoder.final_layer_norm.weight"),
        **_stack("encoder", "encoder", cross=False, gated=cfg.gated_mlp),
        **_stack("decoder", "decoder", cross=True, gated=cfg.gated_mlp),
    }
