"""Decode tokens/s and resident weight bytes of one decoder with float32, bfloat16 and int8
weights (random weights: speed does not depend on their values), interleaved A/B.

    python bench/int8_decode.py [--size tiny|110m] [--batch 1] [--prompt-tokens 32] [--new-tokens 64] [--rounds 3]

tiny is decoder_tiny (3.3M params); 110m is d_model 768, 12 layers, 12 heads, d_ff 2048,
vocab 32768. Compute is float32 in all three; only the stored weights differ: float32,
bfloat16 (every parameter cast), int8 (`lmjax quantize`'s storage kept as `Int8Weight`s, read
through `lmjax.models.weights.weight`). Each round times each variant in turn: time to first token (prefill +
first sample) and the whole generation; decode tokens/s = batch * (new_tokens - 1) / (whole -
first). Prints one JSON line with each variant's median over rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.adapters.int8 import load_params, quantize_params, resident_bytes
from lmjax.config import MeshConfig
from lmjax.experiment import load_experiment
from lmjax.families import family_of
from lmjax.generate import generate
from lmjax.parallel import make_mesh
from lmjax.train.state import abstract_model


def model_config(size: str):
    cfg = load_experiment("decoder_tiny").model
    if size == "110m":
        cfg = dataclasses.replace(cfg, d_model=768, n_layers=12, n_heads=12, n_kv_heads=None, d_ff=2048,
                                  vocab_size=32768)
    return cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "110m"), default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = model_config(args.size)
    graphdef, abstract = abstract_model(cfg)
    float32 = nnx.state(family_of(cfg).build(cfg, nnx.Rngs(0)))
    variants = {
        "float32": float32,
        "bfloat16": jax.tree.map(lambda a: a.astype(jnp.bfloat16), float32),
        "int8": load_params(quantize_params(float32, "channel"), abstract, make_mesh(MeshConfig())),
    }
    prompts = [np.random.default_rng(row).integers(0, cfg.vocab_size, args.prompt_tokens) for row in range(args.batch)]

    def seconds(params, n):
        model = nnx.merge(graphdef, params)
        start = time.perf_counter()
        generate(model, prompts, n, temperature=0.0)
        return time.perf_counter() - start

    for params in variants.values():  # compile both lengths of each
        seconds(params, 1), seconds(params, args.new_tokens)
    first, rate = {name: [] for name in variants}, {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, params in variants.items():
            f, whole = seconds(params, 1), seconds(params, args.new_tokens)
            first[name].append(f)
            rate[name].append(args.batch * (args.new_tokens - 1) / (whole - f))
    print(json.dumps({
        "size": args.size, "params": sum(a.size for a in jax.tree.leaves(float32)), "batch": args.batch,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "device": jax.devices()[0].device_kind,
        **{name: {"weight_bytes": resident_bytes(params),
                  "time_to_first_token_ms": round(statistics.median(first[name]) * 1e3, 1),
                  "decode_tokens_per_s": round(statistics.median(rate[name]), 1),
                  "decode_tokens_per_s_all": [round(r, 1) for r in rate[name]]}
           for name, params in variants.items()},
    }))


if __name__ == "__main__":
    main()
