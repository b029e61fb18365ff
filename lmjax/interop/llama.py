"""LlamaForCausalLM, MistralForCausalLM and MixtralForCausalLM <-> lmjax's decoder family.

All three are lmjax's default decoder: pre-RMSNorm blocks, rotary positions (the rotate-half
form both use, so q and k need no permutation), grouped-query attention, a SwiGLU MLP, or
for Mixtral a top-k softmax router over SwiGLU experts whose top-k weights are renormalised.
"""

from __future__ import annotations

from lmjax.config import ConfigError, ModelConfig, MoEConfig
from lmjax.interop import rope_scaling
from lmjax.interop.rules import Linear, MixtralExperts, Same

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
PEFT_TASK_TYPE = "CAUSAL_LM"  # adapter_config.json's task_type (lmjax lora export-peft)


def model_config(hf: dict, notes: list[str]) -> ModelConfig:
    """The lmjax ModelConfig of a Llama/Mistral/Mixtral config.json (Mistral's and Mixtral's
    `sliding_window` as model.sliding_window, RoPE scaling by `interop.rope_scaling`); settings it
    cannot carry raise ConfigError."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r}: lmjax's gated MLP uses silu (SwiGLU) only.")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            raise ConfigError(f"{name}=true: lmjax's decoder has no biases on its projections.")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    moe = MoEConfig()
    if "num_local_experts" in hf:
        moe = MoEConfig(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], dispatch="dropless",
                        load_balance_coef=hf.get("router_aux_loss_coef", 0.001),
                        router_jitter=hf.get("router_jitter_noise", 0.0), renormalize=True)
    return ModelConfig(
        family="decoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"), d_head=hf.get("head_dim"),
        d_ff=hf["intermediate_size"], mlp="swiglu", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        position="rope", max_seq_len=hf.get("max_position_embeddings", 2048), sliding_window=window,
        **rope_scaling.model_fields(hf),
        tie_embeddings=hf.get("tie_word_embeddings", False), init_std=hf.get("initializer_range", 0.02), moe=moe,
    )


def hf_config(cfg: ModelConfig, notes: list[str]) -> dict:
    """config.json of the LlamaForCausalLM (dense), MistralForCausalLM (dense with a sliding window)
    or MixtralForCausalLM (MoE) that holds `cfg`."""
    problems = []
    if cfg.position != "rope":
        problems.append(f"model.position={cfg.position!r} (needs rope)")
    if cfg.mlp != "swiglu":
        problems.append(f"model.mlp={cfg.mlp!r} (needs swiglu)")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r} (needs rmsnorm)")
    if cfg.attention_scale is not None and cfg.attention_scale != cfg.head_dim**-0.5:
        problems.append(f"model.attention_scale={cfg.attention_scale} (needs 1/sqrt(head width))")
    moe = cfg.moe
    if moe.enabled and (moe.every != 1 or moe.n_shared_experts or not moe.renormalize):
        problems.append("model.moe with every != 1, shared experts or renormalize=false "
                        "(Mixtral: MoE in every layer, no shared experts, renormalised top-k)")
    if moe.router_bias:
        problems.append(f"model.moe.router={moe.router!r} with bias_update_rate={moe.bias_update_rate:g} (Mixtral "
                        "has a softmax router and no selection bias)")
    if cfg.global_every is not None:
        problems.append(f"model.global_every={cfg.global_every} (Mistral and Mixtral window every layer)")
    if problems:
        raise ConfigError("no Hugging Face architecture holds this decoder: " + "; ".join(problems) + ".")
    model_type = "mixtral" if moe.enabled else "llama" if cfg.sliding_window is None else "mistral"
    config = {
        "architectures": [model_type.capitalize() + "ForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.expert_d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope_scaling.hf_parameters(cfg, notes),
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
    }
    if cfg.sliding_window is not None:
        config["sliding_window"] = cfg.sliding_window
    if moe.enabled:
        if moe.dispatch == "capacity":
            notes.append("model.moe.dispatch='capacity': Mixtral routes without dropping tokens (lmjax's 'dropless'), "
                         "so outputs differ wherever lmjax's capacity would have dropped an assignment.")
        if moe.z_loss_coef:
            notes.append(f"model.moe.z_loss_coef={moe.z_loss_coef}: Mixtral has no router z-loss (training only).")
        config.update(num_local_experts=moe.n_routed_experts, num_experts_per_tok=moe.experts_per_token,
                      router_aux_loss_coef=moe.load_balance_coef, router_jitter_noise=moe.router_jitter)
    return config


def tied_copies(cfg: ModelConfig) -> tuple[str, ...]:
    """Names a checkpoint may hold as copies of another tensor: a tied head's lm_head.weight."""
    return ("lm_head.weight",) if cfg.tie_embeddings else ()


def tensor_rules(cfg: ModelConfig) -> dict[tuple[str, ...], object]:
    """{lmjax weight path: rule}; paths under `blocks` have a leading layer axis, `{i}` in names."""
    layer = "model.layers.{i}."
    rules = {
        ("embed", "table"): Same("model.embed_tokens.weight"),
        ("final_norm", "scale"): Same("model.norm.weight"),
        ("stack", "blocks", "attn", "wq"): Linear((layer + "self_attn.q_proj.weight",)),
        ("stack", "blocks", "attn", "wk"): Linear((layer + "self_attn.k_proj.weight",)),
        ("stack", "blocks", "attn", "wv"): Linear((layer + "self_attn.v_proj.weight",)),
        ("stack", "blocks", "attn", "wo"): Linear((layer + "self_attn.o_proj.weight",), n_in=2),
        ("stack", "blocks", "attn_norm", "scale"): Same(layer + "input_layernorm.weight"),
        ("stack", "blocks", "mlp_norm", "scale"): Same(layer + "post_attention_layernorm.weight"),
    }
    if not cfg.tie_embeddings:
        rules[("unembed",)] = Linear(("lm_head.weight",))
    if cfg.moe.enabled:
        rules[("stack", "blocks", "moe", "router")] = Linear((layer + "block_sparse_moe.gate.weight",
                                                              layer + "mlp.gate.weight"))
        for part in ("gate", "up", "down"):
            rules[("stack", "blocks", "moe", f"w_{part}")] = MixtralExperts(part)
    else:
        for part in ("gate", "up", "down"):
            rules[("stack", "blocks", "mlp", f"w_{part}")] = Linear((layer + f"mlp.{part}_proj.weight",))
    return rules
