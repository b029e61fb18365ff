"""The chunked output head (lmjax.models.head): per-token losses and gradients equal those of the
whole logits at once, for every family and head, and the compiled step's temporaries shrink."""

import dataclasses
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax.adapters.int8 import Int8Weight
from lmjax.adapters.lora import LowRankWeight
from lmjax.config import Config, ConfigError, DataConfig, ModelConfig
from lmjax.families import family_of
from lmjax.models.head import LOGITS_CHUNK_BYTES, chunk_positions
from lmjax.train.losses import token_losses

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=96, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16, scan_layers=False)
CASES = {  # each head's pieces: µP's multiplier, the tied table, BERT's transform and bias, T5's rescale
    "decoder_tied_mup": ModelConfig(**TINY, parametrization="mup", mup_base_width=16),
    "decoder_untied_lora": ModelConfig(**TINY, tie_embeddings=False),
    "decoder_tied_int8": ModelConfig(**TINY),
    "encoder_mlm": ModelConfig(**TINY, family="encoder", norm_placement="post", norm="layernorm", bias=True,
                               mlp="gelu_exact", embed_norm=True, mlm_head_transform=True, position="learned"),
    "encoder_decoder": ModelConfig(**TINY, family="encoder_decoder", position="relative", mlp="relu",
                                   tied_output_rescale=True),
}
ROWS, LENGTH, CHUNK = 2, 16, 4


def _batch(cfg: ModelConfig) -> dict:
    rng = np.random.default_rng(0)

    def ids():
        return jnp.asarray(rng.integers(0, cfg.vocab_size, (ROWS, LENGTH)), jnp.int32)

    batch = {"targets": ids(), "loss_mask": jnp.asarray(rng.integers(0, 2, (ROWS, LENGTH)), jnp.float32)}
    if cfg.family == "encoder_decoder":
        ones = jnp.ones((ROWS, LENGTH), jnp.int32)
        return {**batch, "encoder_inputs": ids(), "decoder_inputs": ids(), "encoder_segment_ids": ones,
                "decoder_segment_ids": ones.at[1, 12:].set(0)}
    return {**batch, "inputs": ids(), "positions": jnp.broadcast_to(jnp.arange(LENGTH), (ROWS, LENGTH)),
            "segment_ids": jnp.ones((ROWS, LENGTH), jnp.int32)}


def _head_weights(name: str, params: nnx.State) -> None:
    """The LoRA case reads its output matrix as W + scale A B; the int8 case its tied table as
    int8 values times per-row float32 scales (as `lmjax quantize` keeps it)."""
    if name == "decoder_untied_lora":
        w = params["unembed"].get_value()
        a, b = (0.1 * jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate([(32, 4), (4, 96)]))
        params["unembed"].set_value(LowRankWeight(w, a, b, 0.5))
    if name == "decoder_tied_int8":
        table = params["embed"]["table"].get_value()
        scale = jnp.max(jnp.abs(table), axis=1, keepdims=True) / 127
        params["embed"]["table"].set_value(Int8Weight(jnp.round(table / scale).astype(jnp.int8), scale))


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_losses_and_gradients_equal_the_whole_logits(name):
    """Per-token losses from the chunked head (4 chunks of 4 positions) equal the cross-entropy of
    the logits computed whole (`predict`) within 1e-6, and so do the gradients of their sum with
    respect to every float parameter (the LoRA case: the adapters too); the chunked step
    really scans 4 chunks."""
    cfg = CASES[name]
    family, batch = family_of(cfg), _batch(cfg)
    chunked_graph = nnx.graphdef(nnx.eval_shape(
        lambda: family.build(dataclasses.replace(cfg, loss_chunk=CHUNK), nnx.Rngs(0))))
    graphdef, params = nnx.split(family.build(cfg, nnx.Rngs(0)))
    _head_weights(name, params)
    differentiable = name != "decoder_tied_int8"

    def chunked(p):
        return family.token_losses(nnx.merge(chunked_graph, p), batch)

    def whole(p):
        return token_losses(family.predict(nnx.merge(graphdef, p), batch), batch["targets"], batch["loss_mask"])

    def losses_and_grads(p):
        return [(f(p), jax.grad(lambda q, f=f: jnp.sum(f(q)))(p) if differentiable else None) for f in (chunked, whole)]

    (got, got_grads), (want, want_grads) = jax.jit(losses_and_grads)(params)
    assert float(jnp.sum(want)) > 10 and np.all(np.asarray(want)[np.asarray(batch["loss_mask"]) == 0] == 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(got), jnp.sum(want), rtol=1e-6)
    scale = max((float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want_grads)), default=0.0)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * scale)  # atol: noise on gradients that are 0
    assert f"length={LENGTH // CHUNK}" in str(jax.make_jaxpr(chunked)(params))


def test_chunk_rule_and_a_chunk_that_does_not_divide():
    """None picks by size: the whole sequence while the logits fit LOGITS_CHUNK_BYTES, else the
    largest divisor of the length that fits; 0 is one chunk; a setting that does not divide the
    targets is refused by the config (one sentence) and by the head itself."""
    assert chunk_positions(None, 2048, 384 * 4) == 2048  # a byte vocabulary: no chunks
    assert chunk_positions(None, 2048, 32768 * 4) == LOGITS_CHUNK_BYTES // (32768 * 4) == 1024
    assert chunk_positions(None, 1000, 8 * 32768 * 4) == 125  # the largest divisor of 1000 under 128
    assert chunk_positions(None, 7, LOGITS_CHUNK_BYTES * 2) == 1
    assert chunk_positions(0, 2048, 1e9) == 2048 and chunk_positions(256, 2048, 1.0) == 256
    with pytest.raises(ConfigError, match="model.loss_chunk=48 does not divide the 64 target positions"):
        Config(model=ModelConfig(loss_chunk=48), data=DataConfig(seq_len=64))
    with pytest.raises(ConfigError, match="model.loss_chunk=5 does not divide the 14 target positions"):
        Config(model=ModelConfig(family="encoder_decoder", loss_chunk=5), data=DataConfig(seq_len=64))
    with pytest.raises(ConfigError, match="model.loss_chunk must be >= 0"):
        ModelConfig(loss_chunk=-1)
    cfg = dataclasses.replace(CASES["decoder_untied_lora"], loss_chunk=5)
    model = family_of(cfg).build(cfg, nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.loss_chunk=5 does not divide the 16 target positions"):
        family_of(cfg).token_losses(model, _batch(cfg))


def test_chunked_head_cuts_the_compiled_steps_temporaries_by_the_logits():
    """XLA's memory analysis of one compiled training step (vocabulary 32k, 2048 positions, one
    row, a one-layer width-64 decoder): chunks of 256 positions need at least the whole
    logits' bytes (256 MiB) fewer temporaries than no chunks, as bench/chunked_loss.py prints."""
    table = runpy.run_path(str(REPO / "bench" / "chunked_loss.py"))["temporaries_table"](32768, 2048, [0, 256])
    logits_bytes = 2048 * 32768 * 4
    assert table[0]["logits_bytes"] == logits_bytes
    assert table[0]["xla_temp_bytes"] - table[1]["xla_temp_bytes"] >= logits_bytes, table
