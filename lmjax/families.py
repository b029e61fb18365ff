"""One spec per model family: everything that differs between decoder, encoder and
encoder-decoder, in one place.

A `Family` is a frozen dataclass of what a family is and does, modelled on Levanter's
`LmConfig` and T5X's `BaseModel`: its block stacks (from which `lmjax.scaling` counts
parameters, FLOPs, memory and the KV cache), its window and example lengths, how raw
windows become its examples, how its model turns a batch into per-token losses or logits,
and what training's finish, `lmjax generate` and generation do for it. `family_of(model_cfg)`
picks the spec once; no other module compares a family name.

The data side (`lmjax.data`, which loads Grain) and generation are imported inside the
functions that read data or sample, so that building, counting and training-step code
(`bench/gpu_suite.py`) runs without Grain installed.

Adding a family (a prefix LM, say): a model class in `lmjax/models/lm.py`, its dataset in
`lmjax/data/denoising.py` if its examples are not the packed windows, one `Family` here
and its name in `ModelConfig.family`'s choices (docs/design.md, "Adding a family").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from flax import nnx

from lmjax.config import Config, ConfigError, ModelConfig
from lmjax.models import DecoderLM, EncoderDecoderLM, EncoderLM
from lmjax.spans import span_corruption_lengths


@dataclass(frozen=True)
class StackShape:
    """One block stack of a family's model: `n_layers` blocks with causal or bidirectional
    self-attention, optionally cross-attending to the first stack's output. It runs over the
    example's first length (inputs) or, with `over_targets`, its second (targets). The last
    stack of a family feeds the output head; each stack has a final norm and, with
    `position=relative`, its own bias table."""

    n_layers: int
    causal: bool
    cross: bool = False
    over_targets: bool = False


@dataclass(frozen=True)
class Family:
    """What a model family is and does (the fields that may be None default to None).

    - `stacks(model_cfg)`: its block stacks, in order (see StackShape).
    - `example_lengths(cfg)`: (first, second) tokens of one example: (seq_len, 0) when the
      inputs are also what is predicted, (inputs, targets) for an encoder-decoder.
    - `window_length(cfg)`: raw tokens per example read from the data.
    - `examples(windows, cfg, tokenizer, seed)`: the family's dataset over raw windows, or
      None when the packed windows are its examples.
    - `build(model_cfg, rngs)`: the model.
    - `forward(model, batch, dropout_key, targets=None, loss_mask=None)`: the model over the
      batch: logits (B, T, V) float32 over the batch's targets, or, given the targets and loss
      mask, the per-token losses (B, T) from the chunked head. Callers use the methods
      `token_losses` (training and evaluation) and `predict` (logits, for analysis).
    - `sample(model, cfg, tokenizer, val_set)`: the text training's finish prints and saves
      to sample.txt; None: the family has no sample.
    - `encode_prompt(tokenizer, text)`, `generate(model, prompts, max_new_tokens, tokenizer,
      **sampling)` and `show(tokenizer, text, prompt, new_ids)`: what `lmjax generate` does
      (prompt: the encoded text); None when the family does not generate.
    - `decoder_start(tokenizer)`: the id a decoder of targets starts from (an encoder-decoder's
      bos, as in training); None for families without one.
    - `hf_architecture`: the name of the Hugging Face translator module that exports the
      family's checkpoints (`lmjax.interop.<name>`; named, not imported: interop sits above).
    """

    name: str
    stacks: Callable[[ModelConfig], tuple[StackShape, ...]]
    example_lengths: Callable[[Config], tuple[int, int]]
    window_length: Callable[[Config], int]
    build: Callable[[ModelConfig, nnx.Rngs], nnx.Module]
    forward: Callable
    hf_architecture: str
    examples: Callable | None = None
    sample: Callable | None = None
    encode_prompt: Callable | None = None
    generate: Callable | None = None
    show: Callable | None = None
    decoder_start: Callable | None = None

    def token_losses(self, model, batch: dict, dropout_key=None):
        """Cross-entropy (B, T) float32 (nats) of each of the batch's targets, 0 where its loss_mask
        is 0, computed `model.loss_chunk` positions at a time (`lmjax.models.head`): what
        training and evaluation take, so neither ever holds the whole batch's logits."""
        return self.forward(model, batch, dropout_key, batch["targets"], batch["loss_mask"])

    def predict(self, model, batch: dict, dropout_key=None):
        """Logits (B, T, V) float32 over the batch's targets, all at once (for analysis)."""
        return self.forward(model, batch, dropout_key)


def family_of(cfg: ModelConfig) -> Family:
    """The spec of `cfg.family`."""
    return FAMILIES[cfg.family]


def _single_stack_forward(model, batch: dict, dropout_key=None, targets=None, loss_mask=None):
    """Decoder and encoder batches: inputs, positions, segment_ids (B, T) (segment_ids may be left
    out when every row is one sequence: fused attention kernels then need no mask)."""
    return model(batch["inputs"], batch["positions"], batch.get("segment_ids"), dropout_key, targets=targets,
                 loss_mask=loss_mask)


def _encoder_decoder_forward(model, batch: dict, dropout_key=None, targets=None, loss_mask=None):
    """encoder_inputs, encoder_segment_ids (B, S) and decoder_inputs, decoder_segment_ids (B, T);
    packed rows also carry encoder_positions (B, S) and decoder_positions (B, T)."""
    return model(batch["encoder_inputs"], batch["decoder_inputs"], batch["encoder_segment_ids"],
                 batch["decoder_segment_ids"], dropout_key, targets=targets, loss_mask=loss_mask,
                 encoder_positions=batch.get("encoder_positions"), decoder_positions=batch.get("decoder_positions"))


def _masked_lm_examples(windows, cfg: Config, tokenizer, seed: int):
    from lmjax.data.denoising import MaskedLMDataset

    return MaskedLMDataset(windows, tokenizer, cfg.data.mlm_probability, seed)


def _span_corruption_examples(windows, cfg: Config, tokenizer, seed: int):
    from lmjax.data.denoising import SpanCorruptionDataset

    return SpanCorruptionDataset(windows, cfg.data.seq_len, tokenizer, cfg.data.noise_density,
                                 cfg.data.mean_noise_span_length, seed, positions=cfg.mesh.context != 1)


def _span_lengths(cfg: Config) -> tuple[int, int]:
    """(raw tokens, targets) of span corruption into data.seq_len inputs; ConfigError if impossible."""
    try:
        return span_corruption_lengths(cfg.data.seq_len, cfg.data.noise_density, cfg.data.mean_noise_span_length)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _continue_prompt(model, cfg: Config, tokenizer, val_set) -> str:
    """train.sample_prompt and the model's continuation of it."""
    from lmjax import generate

    prompt = tokenizer.encode(cfg.train.sample_prompt)
    new_tokens = min(cfg.train.sample_tokens, cfg.model.max_seq_len - len(prompt))
    ids = generate.generate(model, [prompt], new_tokens, seed=cfg.train.seed,
                            temperature=cfg.train.sample_temperature)[0]
    return cfg.train.sample_prompt + tokenizer.decode(ids)


def _fill_in_sample(model, cfg: Config, tokenizer, val_set) -> str:
    """The first validation example's corrupted input, the model's greedy targets and the
    true ones, as text with sentinels spelled <extra_id_N>."""
    from lmjax import generate

    example = val_set[0]
    inputs = example["encoder_inputs"][example["encoder_segment_ids"] == 1]
    targets = example["targets"][example["loss_mask"] == 1]
    new_tokens = min(cfg.train.sample_tokens, model.cfg.max_seq_len)
    generated = generate.generate_targets(model, [inputs], new_tokens, temperature=0.0,
                                          stop_tokens=(tokenizer.eos_id,), start_token=tokenizer.bos_id)[0]
    show = tokenizer.decode_with_sentinels
    return f"input:     {show(inputs)}\npredicted: {show(generated)}\ntrue:      {show(targets)}\n"


def _generate_continuations(model, prompts, max_new_tokens: int, tokenizer, **sampling):
    from lmjax import generate

    room = model.cfg.context_length - max(len(p) for p in prompts)
    if max_new_tokens > room:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} does not fit: the longest prompt leaves "
                          f"{room} of the model's {model.cfg.context_length} positions (model.max_seq_len="
                          f"{model.cfg.max_seq_len}).")
    return generate.generate(model, prompts, max_new_tokens, stop_tokens=(tokenizer.eos_id,), **sampling)


def _generate_spans(model, prompts, max_new_tokens: int, tokenizer, **sampling):
    from lmjax import generate

    limit = model.cfg.max_seq_len
    if max(len(p) for p in prompts) > limit or max_new_tokens > limit:
        raise ConfigError(f"prompts and --max-new-tokens must each fit in model.max_seq_len={limit}.")
    return generate.generate_targets(model, prompts, max_new_tokens, stop_tokens=(tokenizer.eos_id,),
                                     start_token=tokenizer.bos_id, **sampling)


def _show_filled_in(tokenizer, text, prompt, targets) -> str:
    """The generated targets, and the prompt (without its eos) with the spans filled in."""
    from lmjax.data.objectives import fill_in_spans

    targets = targets[:-1] if len(targets) and targets[-1] == tokenizer.eos_id else targets
    sentinels = [tokenizer.sentinel_id(i) for i in range(tokenizer.num_sentinels)]
    return (f"targets: {tokenizer.decode_with_sentinels(targets)}\n"
            f"filled:  {tokenizer.decode(fill_in_spans(prompt[:-1], targets, sentinels))}")


def _single_stack(name: str, causal: bool, model: type, hf_architecture: str, **behaviour) -> Family:
    """A family of one block stack over the packed windows' data.seq_len tokens."""
    return Family(name=name, stacks=lambda m: (StackShape(m.n_layers, causal=causal),),
                  example_lengths=lambda cfg: (cfg.data.seq_len, 0), window_length=lambda cfg: cfg.data.seq_len,
                  build=lambda m, rngs: model(m, rngs=rngs), forward=_single_stack_forward,
                  hf_architecture=hf_architecture, **behaviour)


FAMILIES = {
    "decoder": _single_stack(
        "decoder", causal=True, model=DecoderLM, hf_architecture="llama",
        sample=_continue_prompt,
        encode_prompt=lambda tokenizer, text: tokenizer.encode(text),
        generate=_generate_continuations,
        show=lambda tokenizer, text, prompt, new_ids: text + tokenizer.decode(new_ids),
    ),
    "encoder": _single_stack("encoder", causal=False, model=EncoderLM, hf_architecture="bert",
                             examples=_masked_lm_examples),
    "encoder_decoder": Family(
        name="encoder_decoder",
        stacks=lambda m: (StackShape(m.n_layers, causal=False),
                          StackShape(m.decoder_layers, causal=True, cross=True, over_targets=True)),
        example_lengths=lambda cfg: (cfg.data.seq_len, _span_lengths(cfg)[1]),
        window_length=lambda cfg: _span_lengths(cfg)[0],
        examples=_span_corruption_examples,
        build=lambda m, rngs: EncoderDecoderLM(m, rngs=rngs),
        forward=_encoder_decoder_forward,
        sample=_fill_in_sample,
        encode_prompt=lambda tokenizer, text: np.append(tokenizer.encode_with_sentinels(text), tokenizer.eos_id),
        generate=_generate_spans,
        show=_show_filled_in,
        decoder_start=lambda tokenizer: tokenizer.bos_id,
        hf_architecture="t5",
    ),
}
