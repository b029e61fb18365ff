"""Packed documents against each document alone, per family and attention kernel.

    python bench/packing.py [--attention einsum,dot_product,auto] [--dtype float32]

One row packs several documents (segment ids 1, 2, ..., positions restarting at each; an
encoder-decoder packs both its inputs and its targets so); the same documents also run each
alone in its own right-padded row (a decoder's without segment ids: causal attention needs no
mask for right padding; the decoder's first layer attends through a sliding window of 3
positions, its second over the whole context). Per-token losses and the gradients of their sum must agree: one JSON
line per (family, attention) gives the largest difference of the losses and of the
gradients, the latter over the largest gradient entry. tests/test_packing.py holds them
under 1e-5 on CPU; bench/gpu_suite.py runs the decoder on a GPU, where `auto` sends the lone
rows through cuDNN flash attention and the packed ones through XLA (cuDNN's public API takes
no segment ids; maxtext#4476 was a cuDNN path that silently dropped them).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

INPUT_LENGTHS = (5, 7, 4)  # the documents: inputs (decoder, encoder, encoder-decoder inputs)
TARGET_LENGTHS = (3, 4, 2)  # encoder-decoder targets of the same documents


def packing_config(family: str, attention: str, dtype: str = "float32", **change):
    """The tiny model compared: width 32 (heads of 16, a multiple of 8 for cuDNN), one layer
    per stack (unrolled: quicker to compile), vocabulary 64; T5's relative bias for the
    encoder-decoder; `change` replaces any of these."""
    from lmjax.config import ModelConfig

    shape = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32, scan_layers=False)
    relative = dict(position="relative") if family == "encoder_decoder" else {}
    return ModelConfig(family=family, attention=attention, dtype=dtype, **{**shape, **relative, **change})


def _packed(parts) -> np.ndarray:
    return np.concatenate(parts)[None].astype(np.int32)  # (1, sum of lengths)


def _alone(parts) -> np.ndarray:
    width = max(len(p) for p in parts)
    return np.stack([np.pad(p, (0, width - len(p))) for p in parts]).astype(np.int32)  # (documents, longest)


def _side(prefix: str, tokens: list) -> tuple[dict, dict]:
    """`prefix`inputs, segment_ids and positions of one stack's documents, packed and alone."""
    lengths = [len(t) for t in tokens]
    packed = {f"{prefix}inputs": _packed(tokens), f"{prefix}segment_ids": _packed([np.full(n, i + 1)
                                                                                 for i, n in enumerate(lengths)]),
              f"{prefix}positions": _packed([np.arange(n) for n in lengths])}
    alone = {f"{prefix}inputs": _alone(tokens), f"{prefix}segment_ids": _alone([np.ones(n) for n in lengths]),
             f"{prefix}positions": _alone([np.arange(n) for n in lengths])}
    return packed, alone


def document_batches(cfg, seed: int = 0) -> tuple[dict, dict]:
    """(packed, alone) batches of the same random documents for `cfg`'s family; every target
    counts (loss mask 1) except the lone rows' padding."""
    rng = np.random.default_rng(seed)
    encoder_decoder = cfg.family == "encoder_decoder"
    inputs = [rng.integers(1, cfg.vocab_size, n) for n in INPUT_LENGTHS]
    targets = [rng.integers(1, cfg.vocab_size, n) for n in (TARGET_LENGTHS if encoder_decoder else INPUT_LENGTHS)]
    counted = [np.ones(len(t)) for t in targets]
    packed = {"targets": _packed(targets), "loss_mask": _packed(counted).astype(np.float32)}
    alone = {"targets": _alone(targets), "loss_mask": _alone(counted).astype(np.float32)}
    sides = [("encoder_", inputs), ("decoder_", [np.roll(t, 1) for t in targets])] if encoder_decoder else [
        ("", inputs)]
    for prefix, tokens in sides:
        packed_side, alone_side = _side(prefix, tokens)
        packed.update(packed_side)
        alone.update(alone_side)
    if encoder_decoder:  # lone rows: the right-padded path (no positions: one sequence per row)
        alone = {k: v for k, v in alone.items() if not k.endswith("positions")}
    elif cfg.family == "decoder":
        del alone["segment_ids"]
    return packed, alone


def packed_minus_alone(cfg, seed: int = 0) -> dict:
    """Largest |packed - alone| of the per-token losses and of the gradients of their sum (the
    latter over the largest gradient entry), with the loss scale, for `cfg` (one compile)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lmjax.families import family_of

    family = family_of(cfg)
    graphdef, params = nnx.split(family.build(cfg, nnx.Rngs(seed)))
    packed, alone = (jax.tree.map(jnp.asarray, b) for b in document_batches(cfg, seed))

    def losses_and_grads(params, batch):
        def total(p):
            losses = family.token_losses(nnx.merge(graphdef, p), batch)
            return jnp.sum(losses), losses
        (_, losses), grads = jax.value_and_grad(total, has_aux=True)(params)
        return losses, grads

    both = jax.jit(lambda p: [losses_and_grads(p, b) for b in (packed, alone)])
    (packed_losses, packed_grads), (alone_losses, alone_grads) = jax.device_get(both(params))
    alone_losses = alone_losses[alone["loss_mask"] == 1]  # row by row: the documents in packing order
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(alone_grads))
    grad_diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(packed_grads),
                                                             jax.tree.leaves(alone_grads)))
    return {"loss_max_abs_diff": float(np.abs(packed_losses[0] - alone_losses).max()),
            "grad_max_abs_diff_over_max": grad_diff / scale, "mean_loss": float(np.mean(alone_losses)),
            "tokens": int(alone_losses.size)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", default="einsum,dot_product,auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    window = dict(sliding_window=3, n_layers=2, global_every=2)  # the decoder: a windowed layer, then a global one
    for family in ("decoder", "encoder", "encoder_decoder"):
        for attention in args.attention.split(","):
            change = window if family == "decoder" else {}
            result = packed_minus_alone(packing_config(family, attention, args.dtype, **change))
            print(json.dumps({"family": family, "attention": attention, "dtype": args.dtype, **result}))


if __name__ == "__main__":
    main()
