import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from lmjax.analysis import attention_maps, parameter_table
from lmjax.config import ModelConfig
from lmjax.families import family_of
from lmjax.models import DecoderLM, layers
from lmjax.scaling.counting import param_counts

CFG = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)


def forward_pass_probabilities(monkeypatch, run):
    """Every `attention_probabilities` result computed while `run()` executes the model, in
    execution order, captured from inside the (scanned) forward pass."""
    captured, real = [], layers.attention_probabilities

    def recording(*args, **kwargs):
        probs = real(*args, **kwargs)
        jax.debug.callback(lambda p: captured.append(np.asarray(p)[0]), probs, ordered=True)
        return probs

    monkeypatch.setattr(layers, "attention_probabilities", recording)
    jax.block_until_ready(run())
    monkeypatch.setattr(layers, "attention_probabilities", real)
    jax.effects_barrier()
    return captured


@pytest.mark.parametrize("position", ["rope", "learned", "relative"])
@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder_decoder"])
def test_attention_maps_are_the_forward_pass_probabilities(monkeypatch, family, position):
    cfg = dataclasses.replace(CFG, family=family, position=position, attention="einsum", dtype="float32",
                              n_decoder_layers=3 if family == "encoder_decoder" else None)
    model = family_of(cfg).build(cfg, nnx.Rngs(0))
    tokens, decoder_tokens = np.arange(10) * 7, np.arange(6) * 5 + 1
    if family == "encoder_decoder":
        forward = forward_pass_probabilities(monkeypatch, lambda: model(tokens[None], decoder_tokens[None]))
        maps = attention_maps(model, tokens, decoder_tokens)
        assert maps["encoder"].shape == (2, 4, 10, 10) and maps["decoder"].shape == (3, 4, 6, 6)
        assert maps["cross"].shape == (3, 4, 6, 10)
        # execution order: the encoder's layers, then each decoder layer's self- and cross-attention
        expected = [*maps["encoder"], *[m for pair in zip(maps["decoder"], maps["cross"]) for m in pair]]
        causal, bidirectional = maps["decoder"], maps["encoder"]
    else:
        forward = forward_pass_probabilities(monkeypatch, lambda: model(tokens[None]))
        expected = maps = attention_maps(model, tokens)
        assert maps.shape == (2, 4, 10, 10)
        causal, bidirectional = (maps, None) if family == "decoder" else (None, maps)
    assert len(forward) == len(expected)
    for captured, mapped in zip(forward, expected):
        np.testing.assert_allclose(mapped, captured, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mapped.sum(-1), 1.0, rtol=1e-5)
    later = lambda m: np.triu(np.ones(m.shape[-2:], bool), k=1)  # noqa: E731
    if causal is not None:
        assert np.all(causal[..., later(causal)] == 0)
    if bidirectional is not None:
        assert np.all(bidirectional[..., later(bidirectional)] > 0)


def test_parameter_table_adds_up():
    model = DecoderLM(CFG, rngs=nnx.Rngs(0))
    table = parameter_table(model)
    assert sum(r["count"] for r in table) == param_counts(CFG)["params_total"]
    wq = next(r for r in table if r["parameter"].endswith("attn.wq"))
    assert wq["shape"] == (2, 32, 4, 8) and wq["axes"] == ("layers", "embed", "heads", "head_dim")
