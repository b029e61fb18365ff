"""Hugging Face interop against transformers itself: tiny random models built here with
transformers (nothing downloaded), saved with `save_pretrained`, imported, and compared in
float32 (logits within 1e-4, greedy tokens equal); exports loaded back by transformers."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmjax.cli import main  # noqa: E402
from lmjax.config import ConfigError  # noqa: E402
from lmjax.generate import generate  # noqa: E402
from lmjax.interop import llama  # noqa: E402
from lmjax.interop.convert import from_hf, to_hf  # noqa: E402
from lmjax.train.run_eval import restore_weights  # noqa: E402

TOLERANCE = 1e-4
VOCAB = 512  # >= the byte tokenizer's 384 ids, which a run without tokenizer.json records


def llama_config(**overrides):
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, intermediate_size=128, max_position_embeddings=64,
                    rms_norm_eps=1e-6, tie_word_embeddings=False)
    return transformers.LlamaConfig(**{**settings, **overrides})


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
                "llama_decoding": lambda: transformers.LlamaForCausalLM(llama_config(initializer_range=0.2)),
            }[name]().eval()
            hf.save_pretrained(root / "hf")
            notes = from_hf(root / "hf", root / "run")
            model, cfg = load_run(root / "run")
            cache[name] = hf, model, cfg, notes, root
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["llama_untied", "llama_tied", "mistral"])
def test_import_gives_transformers_logits(imported, name):
    hf, model, cfg, _, _ = imported(name)
    ids = tokens()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf, ids), atol=TOLERANCE, rtol=0)


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


def test_sliding_window_is_reported_and_limits_the_context():
    notes = []
    cfg = llama.model_config(transformers.MistralConfig(
        **llama_config().to_diff_dict() | {"sliding_window": 16}).to_dict(), notes)
    assert cfg.max_seq_len == 16
    assert len(notes) == 1 and "sliding_window=16" in notes[0]


@pytest.mark.parametrize("rope", [{"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
                                  {"rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}}])
def test_rope_scaling_is_refused(rope):
    hf = {k: v for k, v in llama_config().to_diff_dict().items() if k != "rope_parameters"} | rope
    with pytest.raises(ConfigError, match="rope scaling"):
        llama.model_config(hf, [])


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


def test_export_loads_in_transformers_with_the_same_logits_and_reimports_bit_for_bit(tiny, tmp_path):
    """A decoder run trained a few steps by lmjax (tiny_config: GQA, tied, swiglu, rope)."""
    from lmjax.train.loop import train

    cfg = tiny(steps=2, sample_tokens=0)
    train(cfg, tmp_path / "run")
    assert to_hf(tmp_path / "run", tmp_path / "hf") == []
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert all(not v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model, _ = load_run(tmp_path / "run")
    ids = tokens(vocab=cfg.model.vocab_size)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf.eval(), ids), atol=TOLERANCE, rtol=0)

    from_hf(tmp_path / "hf", tmp_path / "again")
    before = jax.tree.leaves(nnx.state(model))
    after = jax.tree.leaves(nnx.state(load_run(tmp_path / "again")[0]))
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_shards_above_the_threshold(imported, tmp_path):
    _, _, _, _, root = imported("llama_untied")
    to_hf(root / "run", tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tokens()
    np.testing.assert_allclose(hf_logits(hf, ids), hf_logits(imported("llama_untied")[0], ids), atol=0, rtol=0)


def test_init_from_starts_training_from_the_imported_weights(imported, tiny, tmp_path):
    import dataclasses

    from lmjax.train.loop import train

    _, model, source, _, root = imported("llama_untied")
    cfg = tiny(steps=1, sample_tokens=0)
    cfg = dataclasses.replace(cfg, model=source.model, optim=dataclasses.replace(cfg.optim, lr=1e-12))
    train(cfg, tmp_path / "run", init_from=root / "run")
    trained, _ = load_run(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(trained))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9)


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


def test_importing_lmjax_never_imports_torch():
    code = ("import sys, lmjax, lmjax.cli, lmjax.interop.convert; "
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
