"""Masked-LM and span-corruption batch builders against hand counts and T5's numbers."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import Config, ConfigError, DataConfig, ModelConfig
from lmjax.data import ByteTokenizer, DataError, PackedDataset, tokenize
from lmjax.data.denoising import MaskedLMDataset, SpanCorruptionDataset
from lmjax.data.objectives import check_sentinels, corrupt_spans, fill_in_spans, mask_tokens, random_spans_noise_mask
from lmjax.spans import noise_span_counts, span_corruption_lengths
from lmjax.train.losses import causal_lm_loss

TOKENIZER = ByteTokenizer()


@pytest.mark.parametrize("inputs_length, density, mean_span, expected", [
    (512, 0.15, 3.0, (568, 114)),  # T5's published pair
    # by hand: 141 raw -> round(21.15) = 21 noise in round(7.0) = 7 spans -> 120 + 7 + 1 = 128 inputs, while
    # 142 raw -> 21 noise, 7 spans -> 129 inputs (too long); targets 21 + 7 + 1 = 29
    (128, 0.15, 3.0, (141, 29)),
    # by hand: 95 raw -> round(47.5) = 48 noise in 16 spans -> 47 + 16 + 1 = 64 inputs (96 raw -> 65), targets
    # 48 + 16 + 1 = 65 > 64, so T5's density-0.5 adjustment takes one raw token off: 94 raw, 64 targets
    (64, 0.5, 3.0, (94, 64)),
])
def test_span_corruption_lengths_match_t5(inputs_length, density, mean_span, expected):
    assert span_corruption_lengths(inputs_length, density, mean_span) == expected


@pytest.mark.parametrize("length, density, mean_span", [(568, 0.15, 3.0), (141, 0.15, 3.0), (40, 0.5, 2.0),
                                                         (12, 0.15, 3.0)])
def test_span_corruption_reconstructs_exactly_with_t5_counts(length, density, mean_span):
    rng = np.random.default_rng(0)
    n_noise, n_spans = noise_span_counts(length, density, mean_span)
    assert n_noise == round(length * density) and n_spans == max(1, round(n_noise / mean_span))
    sentinels = check_sentinels(TOKENIZER, n_spans)
    for _ in range(20):
        raw = rng.integers(0, 256, length)
        noise = random_spans_noise_mask(length, density, mean_span, rng)
        starts = np.flatnonzero(noise & ~np.concatenate([[False], noise[:-1]]))
        assert noise.sum() == n_noise and len(starts) == n_spans and not noise[0]
        inputs, targets = corrupt_spans(raw, noise, sentinels, TOKENIZER.eos_id)
        assert inputs[-1] == targets[-1] == TOKENIZER.eos_id
        assert len(inputs) == length - n_noise + n_spans + 1 and len(targets) == n_noise + n_spans + 1
        # sentinels in order, first in the targets, each once in the inputs
        assert targets[0] == sentinels[0]
        assert [t for t in inputs if t in sentinels] == [t for t in targets if t in sentinels] == list(sentinels)
        np.testing.assert_array_equal(fill_in_spans(inputs[:-1], targets[:-1], sentinels), raw)


def test_corruption_by_hand():
    raw = np.arange(10, 20)
    noise = np.array([0, 1, 1, 0, 0, 0, 1, 0, 0, 0], bool)
    inputs, targets = corrupt_spans(raw, noise, [383, 382], eos_id=258)
    assert inputs.tolist() == [10, 383, 13, 14, 15, 382, 17, 18, 19, 258]
    assert targets.tolist() == [383, 11, 12, 382, 16, 258]


def test_span_corruption_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too short to hold one noise span"):
        noise_span_counts(3, 0.15, 3.0)  # round(0.45) = 0 noise tokens

    class Overlapping(ByteTokenizer):
        num_sentinels = 200  # would reach down into the byte and special ids

    with pytest.raises(ValueError, match="collide with the tokenizer's vocabulary"):
        check_sentinels(Overlapping(), 150)
    with pytest.raises(ValueError, match="reserves 124"):
        check_sentinels(TOKENIZER, 125)
    stream = tokenize(["some text " * 50], TOKENIZER)
    with pytest.raises(DataError, match="too short to hold one noise span"):
        SpanCorruptionDataset(PackedDataset(stream, 2), 2, TOKENIZER, 0.15, 3.0, seed=0)
    with pytest.raises(ConfigError, match="too short to hold one noise span"):
        Config(model=ModelConfig(family="encoder_decoder"), data=DataConfig(seq_len=3))


def test_mlm_split_is_80_10_10_and_only_selected_positions_carry_loss():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, 200_000)
    inputs, loss_mask = mask_tokens(original, np.ones(len(original), bool), rng, 0.15, TOKENIZER.mask_id,
                                    TOKENIZER.ordinary_ids())
    selected = loss_mask == 1
    assert selected.sum() == 30_000  # round(0.15 * 200,000)
    masked = (inputs == TOKENIZER.mask_id) & selected
    kept = (inputs == original) & selected
    randomized = selected & ~masked & ~kept
    # binomial standard deviations on 30,000 draws are < 0.0025; a random token equals the original 1/256 of
    # the time, so "kept" is 0.1 + 0.1 / 256
    np.testing.assert_allclose(masked.mean() / 0.15, 0.8, atol=0.01)
    np.testing.assert_allclose(randomized.mean() / 0.15, 0.1 * 255 / 256, atol=0.01)
    np.testing.assert_allclose(kept.mean() / 0.15, 0.1 + 0.1 / 256, atol=0.01)
    np.testing.assert_array_equal(inputs[~selected], original[~selected])
    # the loss ignores unselected positions whatever the model predicts there
    logits = jnp.asarray(rng.normal(size=(1, 64, 384)), jnp.float32)
    mask = jnp.asarray(loss_mask[None, :64])
    other = logits.at[0, ~selected[:64]].set(100.0)
    targets = jnp.asarray(original[None, :64])
    assert causal_lm_loss(logits, targets, mask)[0] == causal_lm_loss(other, targets, mask)[0]


def test_mlm_skips_padding_and_needs_a_mask_token():
    rng = np.random.default_rng(1)
    selectable = np.arange(100) < 60
    _, loss_mask = mask_tokens(np.zeros(100, int), selectable, rng, 0.15, TOKENIZER.mask_id, TOKENIZER.ordinary_ids())
    assert loss_mask[60:].sum() == 0 and loss_mask.sum() == 9  # round(0.15 * 60)

    class NoMask(ByteTokenizer):
        mask_id = None

    stream = tokenize(["some text " * 50], TOKENIZER)
    with pytest.raises(DataError, match="needs a mask token"):
        MaskedLMDataset(PackedDataset(stream, 32), NoMask(), 0.15, seed=0)
    with pytest.raises(ValueError, match="needs a mask token"):
        mask_tokens(np.zeros(10, int), np.ones(10, bool), rng, 0.15, None, 256)


def test_datasets_are_pure_functions_of_seed_and_index():
    stream = tokenize([f"document {i} " * 40 for i in range(20)], TOKENIZER)
    raw_length, targets_length = span_corruption_lengths(64, 0.15, 3.0)
    windows, raw_windows = PackedDataset(stream, 64), PackedDataset(stream, raw_length)
    for make in (lambda seed: MaskedLMDataset(windows, TOKENIZER, 0.15, seed),
                 lambda seed: SpanCorruptionDataset(raw_windows, 64, TOKENIZER, 0.15, 3.0, seed)):
        a, b, other = make(0), make(0), make(1)
        for i in (5, 0, 5):
            for key, value in a[i].items():
                np.testing.assert_array_equal(value, b[i][key])
        assert any(not np.array_equal(a[3][k], other[3][k]) for k in a[3])
    example = SpanCorruptionDataset(raw_windows, 64, TOKENIZER, 0.15, 3.0, 0)[2]
    assert example["encoder_inputs"].shape == (64,) and example["targets"].shape == (targets_length,)
    assert example["decoder_inputs"][0] == TOKENIZER.bos_id
    np.testing.assert_array_equal(example["decoder_inputs"][1:], example["targets"][:-1])
    real = example["encoder_segment_ids"] == 1
    targets = example["targets"][example["loss_mask"] == 1]
    raw = raw_windows[2]["inputs"]
    assert len(raw) == raw_length
    sentinels = [TOKENIZER.sentinel_id(i) for i in range(20)]
    np.testing.assert_array_equal(fill_in_spans(example["encoder_inputs"][real][:-1], targets[:-1], sentinels), raw)


def test_family_config_errors():
    with pytest.raises(ConfigError, match="model.family='nope' is not one of"):
        ModelConfig(family="nope")
    with pytest.raises(ConfigError, match="only applies to model.family='encoder_decoder'"):
        ModelConfig(n_decoder_layers=2)
    with pytest.raises(ConfigError, match="data.noise_density must be in"):
        DataConfig(noise_density=0.0)
    with pytest.raises(ConfigError, match="exceed model.max_seq_len"):
        Config(model=ModelConfig(family="encoder_decoder", max_seq_len=256),
               data=dataclasses.replace(DataConfig(), seq_len=256, noise_density=0.6, mean_noise_span_length=2.0))
    with pytest.raises(ConfigError, match="too few to separate them"):
        Config(model=ModelConfig(family="encoder_decoder"), data=DataConfig(seq_len=128, noise_density=0.9))


def test_byte_tokenizer_spells_sentinels_like_t5():
    ids = TOKENIZER.encode_with_sentinels("def f(<extra_id_0>):<extra_id_1>")
    assert ids.tolist() == [*b"def f(", 383, *b"):", 382]
    assert TOKENIZER.decode_with_sentinels(ids) == "def f(<extra_id_0>):<extra_id_1>"
