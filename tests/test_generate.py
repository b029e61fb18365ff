import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax.config import ModelConfig
from lmjax.generate import filter_logits, generate
from lmjax.models import DecoderLM

CFG = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=48,
                  init_std=0.5)  # large weights: a peaked, prompt-dependent next-token distribution


def greedy_without_cache(model, prompt, n):
    """Reference: a full forward pass over the whole sequence for every new token. One compiled
    program: the sequence is held at its final length, the positions not generated yet are 0, and
    causal attention keeps them from the position read (eager ops would compile once per length)."""
    forward = nnx.jit(lambda m, t: m(t))
    tokens = np.zeros((1, len(prompt) + n), np.int32)
    tokens[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        tokens[0, i] = int(jnp.argmax(forward(model, jnp.asarray(tokens))[0, i - 1]))
    return tokens[0, len(prompt):]


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_cached_greedy_equals_full_forward_greedy(position):
    model = DecoderLM(dataclasses.replace(CFG, position=position), rngs=nnx.Rngs(0))
    prompt = [72, 101, 108, 108, 111]
    np.testing.assert_array_equal(generate(model, [prompt], 12, temperature=0.0)[0],
                                  greedy_without_cache(model, prompt, 12))


def test_batched_prompts_of_different_lengths_equal_each_alone():
    model = DecoderLM(CFG, rngs=nnx.Rngs(1))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40], [100, 200, 300]]
    together = generate(model, prompts, 10, temperature=0.0)
    for prompt, out in zip(prompts, together):
        np.testing.assert_array_equal(out, generate(model, [prompt], 10, temperature=0.0)[0])
        np.testing.assert_array_equal(out, greedy_without_cache(model, prompt, 10))


def test_top_k_1_and_tiny_temperature_are_greedy():
    model = DecoderLM(CFG, rngs=nnx.Rngs(2))
    prompt = [[1, 2, 3]]
    greedy = generate(model, prompt, 10, temperature=0.0)[0]
    np.testing.assert_array_equal(generate(model, prompt, 10, temperature=1.0, top_k=1, seed=3)[0], greedy)
    np.testing.assert_array_equal(generate(model, prompt, 10, temperature=1e-4, seed=4)[0], greedy)
    sampled = [generate(model, prompt, 10, temperature=1.5, seed=s)[0] for s in range(4)]
    assert any(not np.array_equal(s, greedy) for s in sampled)  # sampling does sample


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = jnp.array([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(probs)

    def kept(p):
        return set(np.flatnonzero(np.isfinite(filter_logits(logits, 1.0, top_p=p)[0])).tolist())

    assert kept(0.5) == {1}  # 0.5 alone reaches 0.5
    assert kept(0.51) == {1, 3}  # 0.5 + 0.3
    assert kept(0.8) == {1, 3}
    assert kept(0.81) == {1, 3, 2}  # + 0.15 = 0.95
    assert kept(1.0) == {0, 1, 2, 3}
    assert set(np.flatnonzero(np.isfinite(filter_logits(logits, 1.0, top_k=2)[0])).tolist()) == {1, 3}


def test_stop_tokens_cut_the_output():
    model = DecoderLM(CFG, rngs=nnx.Rngs(0))
    full = generate(model, [[72, 101]], 12, temperature=0.0)[0]
    stop = int(full[4])
    cut = generate(model, [[72, 101]], 12, temperature=0.0, stop_tokens=(stop,))[0]
    first = int(np.flatnonzero(full == stop)[0])
    np.testing.assert_array_equal(cut, full[: first + 1])


def test_too_long_is_an_error():
    model = DecoderLM(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_seq_len=48"):
        generate(model, [list(range(40))], 9)
