"""Decoding speed of a trained run: time to first token and decode tokens/s, with the KV cache.

    python bench/generate.py RUN_DIR [--batch 1] [--prompt-tokens 32] [--new-tokens 128]

Time to first token = prefill + first sample (compiled beforehand); decode tokens/s counts
new tokens of all rows over the wall time after the first. Also prints the memory-bandwidth
bound: (weight bytes + KV-cache bytes read per step) / device bandwidth, where known.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from lmjax.generate import generate
from lmjax.hardware import PEAK_BANDWIDTH
from lmjax.runs import load
from lmjax.scaling.counting import param_counts


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    model, cfg, _ = load(args.run_dir)
    prompts = [np.random.default_rng(row).integers(0, 256, args.prompt_tokens) for row in range(args.batch)]

    def run(n):
        return generate(model, prompts, n, temperature=0.0)

    run(1), run(args.new_tokens)  # compile both lengths
    first = min(timed(lambda: run(1)) for _ in range(3))
    total = min(timed(lambda: run(args.new_tokens)) for _ in range(3))
    decode_tokens_per_s = args.batch * (args.new_tokens - 1) / (total - first)
    m = cfg.model
    weight_bytes = 4 * param_counts(m)["params_total"]
    kv_bytes = 2 * m.n_layers * m.kv_heads * m.head_dim * 4 * args.batch * (args.prompt_tokens + args.new_tokens // 2)
    kind = jax.devices()[0].device_kind
    bandwidth = next((b for name, b in PEAK_BANDWIDTH.items() if name in kind), None)
    bound = None if bandwidth is None else args.batch * bandwidth / (weight_bytes + kv_bytes)
    print(json.dumps({
        "device": kind, "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "time_to_first_token_ms": round(first * 1e3, 2), "decode_tokens_per_s": round(decode_tokens_per_s, 1),
        "bandwidth_bound_tokens_per_s": bound and round(bound), "fraction_of_bound": bound and round(
            decode_tokens_per_s / bound, 3),
    }))


if __name__ == "__main__":
    main()
