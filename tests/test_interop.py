"""Hugging Face interop against transformers itself: tiny random models built here with
transformers (nothing downloaded), saved with `save_pretrained`, imported, and compared in
float32 (logits within 1e-4, greedy tokens equal); exports loaded back by transformers."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch  # the test extra installs torch and transformers: a missing one fails here
import transformers
from conftest import xla_flags
from flax import nnx

import lmjax
from lmjax.cli import main
from lmjax.config import ConfigError
from lmjax.data.tokenizer import ByteTokenizer
from lmjax.generate import generate, generate_targets
from lmjax.interop import llama
from lmjax.interop.convert import folding_factor, from_hf, multiplier_folding_factors, to_hf
from lmjax.models import DecoderLM
from lmjax.runs import restore_weights

TOLERANCE = 1e-4
VOCAB = 512  # >= the byte tokenizer's 384 ids, which a run without tokenizer.json records


def llama_config(**overrides):
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, intermediate_size=128, max_position_embeddings=64,
                    rms_norm_eps=1e-6, tie_word_embeddings=False)
    return transformers.LlamaConfig(**{**settings, **overrides})


def mixtral_config():
    return transformers.MixtralConfig(**llama_config().to_diff_dict() | {
        "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96, "initializer_range": 0.1})


def bert_config():
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=96, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)


def t5_config(feed_forward_proj, tied, **overrides):
    """A T5 with 2 encoder and 3 decoder layers and heads of width d_kv=32 != d_model/heads."""
    return transformers.T5Config(**{
        "vocab_size": VOCAB, "d_model": 64, "d_kv": 32, "d_ff": 96, "num_layers": 2, "num_decoder_layers": 3,
        "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
        "dropout_rate": 0.0, "feed_forward_proj": feed_forward_proj, "tie_word_embeddings": tied} | overrides)


def load_run(run_dir):
    cfg, graphdef, params, _, _ = restore_weights(run_dir)
    return nnx.merge(graphdef, params), cfg


def tokens(batch=2, length=12, vocab=VOCAB, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name -> (transformers model, lmjax model, lmjax config), each converted once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            hf = {
                "llama_untied": lambda: transformers.LlamaForCausalLM(llama_config()),
                "llama_tied": lambda: transformers.LlamaForCausalLM(llama_config(
                    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500_000.0})),
                "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
                    **llama_config().to_diff_dict() | {"sliding_window": None})),
                "mistral_window": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
                    **llama_config().to_diff_dict() | {"sliding_window": 16})),
                "llama_decoding": lambda: transformers.LlamaForCausalLM(llama_config(initializer_range=0.2)),
                "mixtral": lambda: transformers.MixtralForCausalLM(mixtral_config()),
                "bert": lambda: transformers.BertForMaskedLM(bert_config()),
                "bert_pretraining": lambda: transformers.BertForPreTraining(bert_config()),
                "t5_relu": lambda: transformers.T5ForConditionalGeneration(t5_config("relu", tied=True)),
                "t5_gated": lambda: transformers.T5ForConditionalGeneration(t5_config("gated-gelu", tied=False)),
                "t5_decoding": lambda: transformers.T5ForConditionalGeneration(
                    t5_config("gated-gelu", tied=False, initializer_factor=8.0)),
            }[name]().eval()
            hf.save_pretrained(root / "hf")  # Mixtral: one w1/w2/w3 Linear per expert
            notes = from_hf(root / "hf", root / "run")
            model, cfg = load_run(root / "run")
            cache[name] = hf, model, cfg, notes, root
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["llama_untied", "llama_tied", "mistral", "mixtral"])
def test_import_gives_transformers_logits(imported, name):
    hf, model, cfg, _, _ = imported(name)
    ids = tokens()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf, ids), atol=TOLERANCE, rtol=0)


def t5_inputs(seed=0):
    """Encoder ids (2, 14), the second row padded after 9 tokens, and decoder ids (2, 6)."""
    rng = np.random.default_rng(seed)
    encoder, decoder = rng.integers(2, VOCAB, (2, 14)), rng.integers(2, VOCAB, (2, 6))
    mask = np.ones_like(encoder)
    mask[1, 9:] = 0
    return np.where(mask == 1, encoder, 0), mask, decoder


@pytest.mark.parametrize("name", ["t5_relu", "t5_gated"])
def test_t5_import_gives_transformers_logits(imported, name):
    hf, model, cfg, _, _ = imported(name)
    assert cfg.model.tied_output_rescale == (name == "t5_relu") and cfg.model.attention_scale == 1.0
    encoder, mask, decoder = t5_inputs()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(encoder), attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(decoder)).logits.numpy()
    ours = model(jnp.asarray(encoder), jnp.asarray(decoder), encoder_segment_ids=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOLERANCE, rtol=0)


def test_t5_greedy_decoding_matches_transformers_generate(imported):
    hf, model, _, _, _ = imported("t5_decoding")
    encoder, mask, _ = t5_inputs(seed=1)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(encoder), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=8, eos_token_id=None, decoder_start_token_id=0, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True,
                          use_cache=False)  # transformers' cache assumes as many decoder as encoder layers
    top2 = np.sort(torch.stack(out.scores).numpy(), axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3, "a near tie would let rounding decide"
    prompts = [row[m == 1] for row, m in zip(encoder, mask)]
    ours = generate_targets(model, prompts, 8, temperature=0.0, start_token=0)
    np.testing.assert_array_equal(np.stack(ours), out.sequences[:, 1:].numpy())


@pytest.mark.parametrize("name", ["bert", "bert_pretraining"])
def test_bert_import_gives_transformers_logits_at_non_padding_positions(imported, name):
    hf, model, cfg, notes, _ = imported(name)
    ids, mask, _ = t5_inputs()
    types = np.zeros_like(ids)
    types[:, 5:] = 1  # sentence B
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    theirs = (out.logits if name == "bert" else out.prediction_logits).numpy()
    ours = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(mask), token_types=jnp.asarray(types)))
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=TOLERANCE, rtol=0)
    if name == "bert_pretraining":  # the pooler and next-sentence head are left out, with a note
        assert any("bert.pooler.dense.weight" in n and "cls.seq_relationship.weight" in n for n in notes), notes


def test_mixtral_routes_each_token_to_the_same_experts(imported):
    from lmjax.models.moe import pop_routing_statistics

    hf, model, cfg, _, _ = imported("mixtral")
    assert (cfg.model.moe.n_experts, cfg.model.moe.top_k, cfg.model.moe.dispatch) == (4, 2, "dropless")
    ids = tokens(batch=2, length=16)
    model(jnp.asarray(ids))
    ours = np.sort(np.asarray(pop_routing_statistics(model)["experts"]), axis=-1)  # (L, B, T, 2)
    with torch.no_grad():
        router_logits = hf(torch.tensor(ids), output_router_logits=True).router_logits  # L x (B*T, E)
    theirs = np.stack([np.sort(torch.topk(r, 2).indices.numpy(), axis=-1) for r in router_logits])
    np.testing.assert_array_equal(ours.reshape(theirs.shape), theirs)
    assert len(np.unique(theirs)) == 4  # every expert is used somewhere


def test_mixtral_fused_expert_layout_imports(imported, tmp_path):
    """transformers' in-memory layout: mlp.gate, mlp.experts.gate_up_proj (E, 2F, D), down_proj."""
    from safetensors.torch import save_file

    hf, model, _, _, root = imported("mixtral")
    (tmp_path / "hf").mkdir()
    shutil.copy(root / "hf" / "config.json", tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, tmp_path / "hf" / "model.safetensors")
    from_hf(tmp_path / "hf", tmp_path / "run")
    fused, _ = load_run(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(fused, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_import_reads_the_config(imported):
    _, _, untied, _, _ = imported("llama_untied")
    _, _, tied, _, _ = imported("llama_tied")
    assert (untied.model.head_dim, untied.model.d_model // untied.model.n_heads) == (32, 16)  # head_dim is its own
    assert untied.model.kv_heads == 2 and not untied.model.tie_embeddings and untied.model.rope_theta == 10_000
    assert tied.model.tie_embeddings and tied.model.rope_theta == 500_000
    assert untied.model.norm_eps == 1e-6 and untied.model.max_seq_len == 64


def test_rope_is_rotate_half_so_q_and_k_are_copied_unpermuted(imported):
    """lmjax's wq is HF's q_proj transposed and reshaped, nothing more: a permuted (interleaved)
    convention would need the head's halves reordered and fail the logits test above."""
    hf, model, _, _, _ = imported("llama_untied")
    q_proj = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()  # (N*H, D)
    wq = np.asarray(model.stack.blocks.attn.wq[...][0])  # (D, N, H)
    np.testing.assert_array_equal(wq.reshape(64, -1).T, q_proj)


def test_greedy_decoding_matches_transformers_generate(imported):
    hf, model, _, _, _ = imported("llama_decoding")
    prompts = tokens(batch=2, length=5, seed=1)
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                          do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores).numpy()  # (new tokens, B, V)
    top2 = np.sort(scores, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3, "a near tie would let rounding decide"
    ours = generate(model, list(prompts), 8, temperature=0.0)
    np.testing.assert_array_equal(np.stack(ours), out.sequences[:, 5:].numpy())


def test_mistral_sliding_window_is_carried_both_ways(imported, tmp_path):
    """A window of 16 over 48 tokens: imported as model.sliding_window (max_seq_len stays
    max_position_embeddings), logits equal transformers', exported as Mistral's sliding_window."""
    hf, model, cfg, _, root = imported("mistral_window")
    assert (cfg.model.sliding_window, cfg.model.max_seq_len) == (16, 64)
    ids = tokens(length=48)
    ours = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=TOLERANCE, rtol=0)
    hf.config.sliding_window = None  # transformers reads it at every call
    try:
        assert np.abs(hf_logits(hf, ids) - ours).max() > 1e-2  # the window matters here
    finally:
        hf.config.sliding_window = 16

    to_hf(root / "run", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["sliding_window"] == 16 and config["architectures"] == ["MistralForCausalLM"]
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(hf_logits(exported, ids), ours, atol=TOLERANCE, rtol=0)
    from_hf(tmp_path / "hf", tmp_path / "again")
    again, again_cfg = load_run(tmp_path / "again")
    assert again_cfg.model == cfg.model
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_interleaved_windows_are_refused_on_export():
    cfg = llama.model_config(transformers.MistralConfig(**llama_config().to_diff_dict() | {"sliding_window": 16})
                             .to_dict(), [])
    with pytest.raises(ConfigError, match="model.global_every=2"):
        llama.hf_config(dataclasses.replace(cfg, global_every=2), [])


@pytest.mark.parametrize("rope", [{"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
                                  {"rope_theta": 1e4, "rope_scaling": {"type": "longrope", "factor": 2.0}}])
def test_rope_scaling_lmjax_lacks_is_refused(rope):
    hf = {k: v for k, v in llama_config().to_diff_dict().items() if k != "rope_parameters"} | rope
    with pytest.raises(ConfigError, match="rope scaling"):
        llama.model_config(hf, [])


SCALED_ROPE = {  # original length 16 < the 48 tokens compared
    "llama3": {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 16,
             "beta_fast": 16.0},
}


@pytest.mark.parametrize("rope_type", list(SCALED_ROPE))
def test_scaled_rope_imports_with_transformers_logits_and_exports(tmp_path, rope_type):
    """A tiny Llama with each scaling, 48 tokens: logits equal transformers' past the original
    length; export writes the same rope_parameters, which transformers and lmjax read back alike."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(llama_config(rope_parameters=dict(SCALED_ROPE[rope_type]))).eval()
    hf.save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "run")
    model, cfg = load_run(tmp_path / "run")
    assert cfg.model.rope_scaling == rope_type and cfg.model.max_seq_len == 64
    ids = tokens(length=48)
    ours = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=TOLERANCE, rtol=0)
    plain = DecoderLM(dataclasses.replace(cfg.model, rope_scaling="none"), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(model, nnx.Param))
    assert np.abs(np.asarray(plain(jnp.asarray(ids))) - ours).max() > 1e-3  # the scaling matters here

    to_hf(tmp_path / "run", tmp_path / "exported")
    written = json.loads((tmp_path / "exported" / "config.json").read_text())["rope_parameters"]
    assert written.items() >= SCALED_ROPE[rope_type].items()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    np.testing.assert_allclose(hf_logits(exported, ids), ours, atol=TOLERANCE, rtol=0)
    assert llama.model_config(json.loads((tmp_path / "exported" / "config.json").read_text()), []) == cfg.model


def test_rope_theta_is_read_from_old_and_new_configs():
    old = llama_config().to_diff_dict()
    old.pop("rope_parameters")
    assert llama.model_config(old | {"rope_theta": 1234.0}, []).rope_theta == 1234.0
    new = old | {"rope_parameters": {"rope_type": "default", "rope_theta": 4321.0}}
    assert llama.model_config(new, []).rope_theta == 4321.0


def test_bf16_checkpoint_imports(imported, tmp_path):
    hf, _, _, _, _ = imported("llama_untied")
    bf16 = transformers.LlamaForCausalLM(llama_config()).eval()
    bf16.load_state_dict(hf.state_dict())
    bf16.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "run", dtype="bfloat16")
    model, cfg = load_run(tmp_path / "run")
    assert cfg.model.param_dtype == "bfloat16"
    reference = bf16.float().state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
    ours = np.asarray(model.stack.blocks.mlp.w_down[...][1].astype(jnp.float32))
    np.testing.assert_array_equal(ours, reference.T)  # bf16 -> bf16: the same bits


TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.max_seq_len=64",
        "data.seq_len=32", "data.max_bytes=300000", "train.batch_size=8", "train.steps=2", "train.eval_every=2",
        "train.eval_batches=1", "train.sample_tokens=0", "log.wandb=off", "log.progress_bar=false"]


MULTIPLIERS = {"llama_tiny": ["model.logit_multiplier=2", "model.embedding_multiplier=0.5",  # untied µP, m = 4:
                              "model.parametrization=mup", "model.mup_base_width=8",  # head x 2/4, queries x 1/2
                              "model.mup_scale_adam_eps=true", "model.attention_multiplier=0.5"],
               "moe_tiny": ["model.logit_multiplier=0.5", "model.embedding_multiplier=0.5"]}  # tied: equal


@pytest.mark.parametrize("experiment, hf_class", [
    ("llama_tiny", "AutoModelForCausalLM"), ("moe_tiny", "AutoModelForCausalLM"),
    ("t5_tiny_hf", "AutoModelForSeq2SeqLM"), ("bert_tiny", "AutoModelForMaskedLM")])
def test_export_loads_in_transformers_with_the_same_logits_and_reimports_bit_for_bit(tmp_path, experiment, hf_class):
    """Each HF-representable experiment, shrunk, trained two steps by lmjax, exported; the
    decoders with logit and embedding multipliers (llama_tiny: untied and µP at 4x its base width,
    with growing head width and an attention multiplier), which export folds into the weights
    (powers of 2, so the re-imported weights are the trained ones times the factors, bit for bit)."""
    from lmjax.config_parse import override
    from lmjax.experiment import load_experiment
    from lmjax.train.loop import train

    cfg = override(load_experiment(experiment), TINY + [f"train.run_dir={tmp_path / 'run'}"]
                   + (["model.moe.d_ff=32"] if experiment == "moe_tiny" else []) + MULTIPLIERS.get(experiment, []))
    train(cfg, tmp_path / "run")
    notes = to_hf(tmp_path / "run", tmp_path / "hf")
    assert all("z_loss" in n for n in notes) and len(notes) == cfg.model.moe.enabled  # the z-loss: training only
    hf, info = getattr(transformers, hf_class).from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    text = "def f(x): <extra_id_0> + 1  # héllo"  # the byte tokenizer, as transformers reads it
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text).input_ids == \
        list(ByteTokenizer().encode_with_sentinels(text))
    model, _ = load_run(tmp_path / "run")
    ids = tokens(vocab=cfg.model.vocab_size)
    if cfg.model.family == "encoder_decoder":
        ours = model(jnp.asarray(ids), jnp.asarray(ids[:, :5]))
        with torch.no_grad():
            theirs = hf.eval()(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(ids[:, :5])).logits.numpy()
    else:
        ours, theirs = model(jnp.asarray(ids)), hf_logits(hf.eval(), ids)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOLERANCE, rtol=0)

    from_hf(tmp_path / "hf", tmp_path / "again")
    factors = multiplier_folding_factors(cfg.model)
    assert bool(factors) == (experiment in MULTIPLIERS)
    before = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    after = jax.tree.leaves(nnx.state(load_run(tmp_path / "again")[0], nnx.Param))
    assert len(before) == len(after)
    for (path, a), b in zip(before, after):
        factor = folding_factor(factors, tuple(str(k.key) for k in path))
        np.testing.assert_array_equal(np.asarray(a) * np.asarray(factor, a.dtype), np.asarray(b))


def test_export_shards_above_the_threshold(imported, tmp_path):
    _, _, _, _, root = imported("llama_untied")
    to_hf(root / "run", tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tokens()
    np.testing.assert_allclose(hf_logits(hf, ids), hf_logits(imported("llama_untied")[0], ids), atol=0, rtol=0)


def test_init_from_starts_training_from_the_imported_weights(imported, tiny, tmp_path):
    from lmjax.train.loop import train

    _, model, source, _, root = imported("llama_untied")
    cfg = tiny(steps=1, sample_tokens=0)
    cfg = dataclasses.replace(cfg, model=source.model, optim=dataclasses.replace(cfg.optim, lr=1e-12))
    train(cfg, tmp_path / "run", init_from=root / "run")
    trained, _ = load_run(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(trained, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9)


def test_imported_checkpoint_holds_the_weights_alone(imported):
    """No optimizer state is saved: the checkpoint's arrays are transformers' parameters, 4 bytes
    each in float32 (a training checkpoint adds two Adam moments, 3x), and so are its bytes on
    disk, within Orbax's metadata."""
    hf, _, _, _, root = imported("llama_untied")
    weight_bytes = 4 * sum(p.numel() for p in hf.parameters())
    manager = ocp.CheckpointManager(root / "run" / "checkpoints",
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    saved = jax.tree.leaves(manager.item_metadata(0)["state"].tree)
    manager.close()
    assert sum(np.prod(m.shape) * np.dtype(m.dtype).itemsize for m in saved) == weight_bytes
    disk = sum(f.stat().st_size for f in (root / "run" / "checkpoints").rglob("*") if f.is_file())
    assert disk < 1.3 * weight_bytes, (disk, weight_bytes)  # Orbax compresses zeros: so were zero moments


SHARDED_IMPORT = """
import sys
import jax, numpy as np
from flax import nnx
from lmjax.config import MeshConfig
from lmjax.interop.convert import import_params, model_config_from_hf
from lmjax.parallel import make_mesh

hf_dir, ids_file, logits_file = sys.argv[1:]
assert len(jax.devices()) == 8
mesh = make_mesh(MeshConfig(data=1, fsdp=8))
cfg = model_config_from_hf(hf_dir, [])
params = import_params(hf_dir, cfg, mesh, [])
wq = params["stack"]["blocks"]["attn"]["wq"][...]
assert wq.sharding.spec[1] == "fsdp", wq.sharding.spec  # (layers, embed, heads, head_dim): embed split 8 ways
assert wq.addressable_shards[0].data.shape[1] == cfg.d_model // 8
from lmjax.train.state import abstract_model
graphdef, _ = abstract_model(cfg)
with jax.set_mesh(mesh):
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, np.load(ids_file))
np.save(logits_file, np.asarray(logits))
"""


def test_sharded_import_onto_8_devices_gives_the_same_logits(imported, tmp_path):
    hf, _, _, _, root = imported("llama_untied")
    ids = tokens()
    np.save(tmp_path / "ids.npy", ids)
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    process = subprocess.run([sys.executable, "-c", SHARDED_IMPORT, root / "hf", tmp_path / "ids.npy",
                              tmp_path / "logits.npy"], env=env, capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), hf_logits(hf, ids), atol=TOLERANCE, rtol=0)


def run_cli(capsys, *args):
    code = main(list(map(str, args)))
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_inputs_exit_2_with_one_line(imported, tiny, tmp_path, capsys):
    _, _, _, _, root = imported("llama_untied")
    source = root / "hf"

    def copy(name):
        shutil.copytree(source, tmp_path / name)
        return tmp_path / name

    unsupported = copy("unsupported")
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    mismatch = copy("mismatch")
    (mismatch / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    missing = copy("missing")
    (missing / "model.safetensors").rename(missing / "model-00001-of-00002.safetensors")
    weight_map = {"lm_head.weight": "model-00001-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors"}
    (missing / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for directory, message in ((unsupported, "GPT2LMHeadModel"), (mismatch, "disagree"),
                               (missing, "model-00002-of-00002.safetensors")):
        code, lines = run_cli(capsys, "convert", "from-hf", directory, "--out", tmp_path / f"{directory.name}-run")
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
        assert not (tmp_path / f"{directory.name}-run").exists()  # nothing written

    run_dir = tmp_path / "finetune"
    code, lines = run_cli(capsys, "train", "decoder_tiny", "--init-from", root / "run", "--set",
                          f"train.run_dir={run_dir}")
    assert code == 2 and len(lines) == 1 and "--init-from" in lines[0], lines
    assert not run_dir.exists()

    code, lines = run_cli(capsys, "train", "--resume", root / "run")  # weights only: nothing to resume
    assert code == 2 and len(lines) == 1 and f"--init-from {root / 'run'}" in lines[0], lines
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["0"]


def test_importing_lmjax_never_imports_torch():
    code = ("import sys, lmjax, lmjax.cli, lmjax.interop.convert; "
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def corpus():
    import inspect
    import textwrap

    return [inspect.getsource(m) for m in (json, shutil, textwrap)] + ["Héllo wörld, ça va? 🙂 Ünïcödé!"] * 20


TEXTS = ["def f(x):\n    return x + 1  # ok", "Héllo wörld, ça va? 🙂", "  leading spaces and\ttabs\n\n", "ÆØÅ 漢字 ☃"]


def llama_style():
    """BPE with byte fallback over Metaspace pieces, BOS prepended (LLaMA's tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def t5_style():
    """Unigram over Metaspace pieces, </s> appended, sentinels at the top ids (T5's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(10))])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tokenizer, {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def bert_style():
    """WordPiece over BERT's normalizer and pre-tokenizer, [CLS] ... [SEP] (BERT's)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tokenizer, {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]",
                       "unk_token": "[UNK]"}


@pytest.mark.parametrize("style", [llama_style, t5_style, bert_style], ids=["llama", "t5", "bert"])
def test_hf_tokenizers_encode_the_same_ids_as_transformers(style, tmp_path):
    from lmjax.data.subword import HFTokenizer

    tokenizer, roles = style()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles).save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = HFTokenizer(tmp_path / "tokenizer.json")
    for text in TEXTS:
        assert list(ours.encode(text)) == theirs(text, add_special_tokens=False).input_ids
        assert ours.decode(ours.encode(text)) == theirs.decode(ours.encode(text), skip_special_tokens=True)
    assert ours.eos_id == (theirs.eos_token_id if theirs.eos_token_id is not None else theirs.sep_token_id)
    assert ours.pad_id == theirs.pad_token_id and ours.mask_id == theirs.mask_token_id
    start = {"llama": theirs.bos_token_id, "t5": theirs.pad_token_id, "bert": theirs.cls_token_id}[style.__name__[:-6]]
    assert ours.bos_id == start  # T5 decodes from pad; BERT opens with [CLS]
    opened = style is not t5_style  # the file's post-processor puts <s> / [CLS] first
    assert list(ours.encode_prompt(TEXTS[0])) == [start] * opened + theirs(TEXTS[0], add_special_tokens=False).input_ids
    if style is t5_style:
        assert ours.num_sentinels == 10 and ours.sentinel_id(0) == theirs.convert_tokens_to_ids("<extra_id_0>")


def test_import_carries_the_model_tokenizer(imported, tiny, tmp_path):
    import lmjax
    from lmjax.train.loop import train

    _, _, _, _, root = imported("llama_untied")
    shutil.copytree(root / "hf", tmp_path / "hf")
    tokenizer, roles = llama_style()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles).save_pretrained(tmp_path / "hf")
    assert from_hf(tmp_path / "hf", tmp_path / "run") == []
    _, cfg, ours = lmjax.load(tmp_path / "run")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert list(ours.encode_prompt(TEXTS[1])) == theirs(TEXTS[1]).input_ids and ours.bos_id == 1
    to_hf(tmp_path / "run", tmp_path / "back")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert again(TEXTS[1]).input_ids == theirs(TEXTS[1]).input_ids

    bytes_run = dataclasses.replace(tiny(steps=1), model=cfg.model)  # the shapes fit, the tokenizer does not
    with pytest.raises(ConfigError, match="--init-from .* set data.tokenizer=.*tokenizer.json"):
        train(bytes_run, tmp_path / "finetune", init_from=tmp_path / "run")
    assert not (tmp_path / "finetune").exists()


@pytest.mark.parametrize("name, kind", [("llama_untied", "sentencepiece-bpe"), ("t5_relu", "sentencepiece-unigram")])
def test_export_writes_a_sentencepiece_run_tokenizer_that_transformers_encodes_alike(imported, name, kind, tmp_path):
    """A decoder run with a LLaMA-style BPE .model, a T5 run with a Unigram one (byte fallback)."""
    from lmjax.data.subword import SentencePieceTokenizer, train_tokenizer

    run = tmp_path / "run"
    shutil.copytree(imported(name)[4] / "run", run)
    train_tokenizer(corpus(), run / "tokenizer.model", 400, kind, num_sentinels=10)
    config = json.loads((run / "config.json").read_text())
    config["data"]["tokenizer"] = str(run / "tokenizer.model")
    (run / "config.json").write_text(json.dumps(config))
    assert to_hf(run, tmp_path / "hf") == []
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = SentencePieceTokenizer(run / "tokenizer.model")
    texts = TEXTS + ["x  \n\n   y  ", "   ", "mask <mask> and <extra_id_3>x<extra_id_0>"]
    for text in texts:  # lmjax adds no bos/eos to a text, and neither does the export
        assert theirs(text).input_ids == list(ours.encode_prompt(text)) == list(ours.encode_with_sentinels(text))
        assert theirs.decode(ours.encode(text), skip_special_tokens=True) == ours.decode(ours.encode(text))
    assert [theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id, theirs.mask_token_id] == \
        [ours.pad_id, ours.bos_id, ours.eos_id, ours.mask_id]
    assert theirs.convert_tokens_to_ids("<extra_id_3>") == ours.sentinel_id(3)
    assert len(theirs("ünïcödé 漢字 ☃ 🙂").input_ids) > 0 and theirs.unk_token_id not in theirs("漢字 ☃ 🙂").input_ids


def test_sentencepiece_export_without_transformers_is_refused_before_writing(imported, tmp_path, monkeypatch):
    from lmjax.data.subword import train_tokenizer

    run = tmp_path / "run"
    shutil.copytree(imported("llama_untied")[4] / "run", run)
    train_tokenizer(corpus()[-1:], run / "tokenizer.model", 300, "sentencepiece-bpe", num_sentinels=10)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"data": config["data"] | {"tokenizer": "t.model"}}))
    monkeypatch.setitem(sys.modules, "transformers.convert_slow_tokenizer", None)  # as if not installed
    with pytest.raises(ConfigError, match="needs transformers"):
        to_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_model_without_tokenizer_json_imports_and_evaluates_on_prepared_token_shards(tmp_path, capsys):
    """A model directory with no tokenizer.json and 128 ids (fewer than the byte tokenizer's
    384) imports as a run without a tokenizer (data.tokenizer='none'); it evaluates on token
    shards prepared with a 128-id tokenizer (a randomly initialised model scores about
    ln 128), and the commands that need text say in one line that it has no tokenizer."""
    import math

    from tokenizers import Tokenizer, models, pre_tokenizers

    from lmjax.data.prepare import prepare

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config(vocab_size=128)).save_pretrained(tmp_path / "hf")
    notes = from_hf(tmp_path / "hf", tmp_path / "run")
    assert any("data.tokenizer='none'" in note for note in notes)
    words = [f"w{i}" for i in range(100)]
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<mask>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    (tmp_path / "text.txt").write_text("\n".join(" ".join(rng.choice(words, 60)) for _ in range(50)))
    prepare(str(tmp_path / "text.txt"), str(tmp_path / "tokenizer.json"), tmp_path / "shards", workers=1,
            progress=False)

    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "shards"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and abs(result["loss"] - math.log(128)) < 0.1
    model, cfg, tokenizer = lmjax.load(tmp_path / "run")  # notebooks get the model, and no tokenizer
    assert tokenizer is None and model(jnp.arange(4)[None]).shape == (1, 4, 128)
    for command in (["generate", str(tmp_path / "run"), "--prompt", "w1 w2"], ["eval", str(tmp_path / "run")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "this run has no tokenizer" in err and len(err.strip().splitlines()) == 1
