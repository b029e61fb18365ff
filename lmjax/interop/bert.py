"""BertForMaskedLM (and BertForPreTraining's masked-LM part) <-> lmjax's encoder family.

BERT is lmjax's encoder with: post-LayerNorm blocks and no final norm
(`model.norm_placement=post`), a bias on every projection (`model.bias`), learned absolute
positions, token-type embeddings (`model.token_types`), a LayerNorm over the summed input
embeddings (`model.embed_norm`), the exact (erf) GELU (`model.mlp=gelu_exact`), and the MLM
head's transform (dense + GELU + LayerNorm) with an output bias (`model.mlm_head_transform`)
before the output tied to the word embeddings. The pooler and the next-sentence head of
BertForPreTraining have no place in lmjax and are left out, with a note.
"""

from __future__ import annotations

from lmjax.config import ConfigError, ModelConfig
from lmjax.interop.rules import Flat, Linear, Same

ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining")
PEFT_TASK_TYPE = None  # PEFT has no masked-LM task type


def model_config(hf: dict, notes: list[str]) -> ModelConfig:
    """The lmjax ModelConfig of a BERT config.json."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r}: lmjax's BERT form uses the exact GELU ('gelu') only.")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"position_embedding_type={hf['position_embedding_type']!r}: lmjax has absolute learned "
                          "positions for BERT only.")
    if not hf.get("tie_word_embeddings", True):
        raise ConfigError("tie_word_embeddings=false: lmjax's BERT form ties the MLM output to the word embeddings.")
    return ModelConfig(
        family="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"], mlp="gelu_exact", norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12), position="learned",
        max_seq_len=hf.get("max_position_embeddings", 512),
        tie_embeddings=True, init_std=hf.get("initializer_range", 0.02), norm_placement="post", bias=True,
        token_types=hf.get("type_vocab_size", 2), embed_norm=True, mlm_head_transform=True,
    )


def hf_config(cfg: ModelConfig, notes: list[str]) -> dict:
    """config.json of the BertForMaskedLM that holds `cfg`."""
    wanted = dict(mlp="gelu_exact", norm="layernorm", position="learned", norm_placement="post", bias=True,
                  embed_norm=True, mlm_head_transform=True, tie_embeddings=True)
    problems = [f"model.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if cfg.kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.d_model:
        problems.append("grouped-query attention or a head width other than d_model / n_heads")
    if cfg.attention_scale is not None and cfg.attention_scale != cfg.head_dim**-0.5:
        problems.append(f"model.attention_scale={cfg.attention_scale} (needs 1/sqrt(head width))")
    if problems:
        raise ConfigError("BertForMaskedLM cannot hold this encoder: " + "; ".join(problems) + ".")
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": "gelu", "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": max(cfg.token_types, 1), "layer_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "position_embedding_type": "absolute", "tie_word_embeddings": True,
    }


def tied_copies(cfg: ModelConfig) -> tuple[str, ...]:
    """Copies some checkpoints hold: the output's weight (the word embeddings) and bias."""
    return ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def _norm(path: tuple[str, ...], name: str) -> dict:
    return {(*path, "scale"): Same(name + ".weight"), (*path, "bias"): Same(name + ".bias")}


def tensor_rules(cfg: ModelConfig) -> dict[tuple[str, ...], object]:
    """{lmjax weight path: rule}; paths under `blocks` have a leading layer axis, `{i}` in names."""
    layer, block = "bert.encoder.layer.{i}.", ("stack", "blocks")
    rules = {
        ("embed", "table"): Same("bert.embeddings.word_embeddings.weight"),
        ("pos_embed",): Same("bert.embeddings.position_embeddings.weight"),
        **_norm(("embed_norm",), "bert.embeddings.LayerNorm"),
        (*block, "attn", "wo"): Linear((layer + "attention.output.dense.weight",), n_in=2),
        (*block, "attn", "bo"): Same(layer + "attention.output.dense.bias"),
        **_norm((*block, "attn_norm"), layer + "attention.output.LayerNorm"),
        (*block, "mlp", "w_up"): Linear((layer + "intermediate.dense.weight",)),
        (*block, "mlp", "b_up"): Same(layer + "intermediate.dense.bias"),
        (*block, "mlp", "w_down"): Linear((layer + "output.dense.weight",)),
        (*block, "mlp", "b_down"): Same(layer + "output.dense.bias"),
        **_norm((*block, "mlp_norm"), layer + "output.LayerNorm"),
        ("head_dense",): Linear(("cls.predictions.transform.dense.weight",)),
        ("head_bias",): Same("cls.predictions.transform.dense.bias"),
        **_norm(("head_norm",), "cls.predictions.transform.LayerNorm"),
        ("output_bias",): Same("cls.predictions.bias"),
    }
    if cfg.token_types:
        rules[("type_embed",)] = Same("bert.embeddings.token_type_embeddings.weight")
    for lmjax_name, hf_name in (("q", "query"), ("k", "key"), ("v", "value")):
        rules[(*block, "attn", f"w{lmjax_name}")] = Linear((layer + f"attention.self.{hf_name}.weight",))
        rules[(*block, "attn", f"b{lmjax_name}")] = Flat(layer + f"attention.self.{hf_name}.bias")
    return rules
