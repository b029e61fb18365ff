"""The µP base-width search (issue #27, docs/scaling.md): the base constants and the learning
rate, tuned at width 64 in mup_transfer's shape (2 layers, heads of width 32, d_ff 256, batch
8 x 64 bytes, 200 steps, 20 warm-up, cosine; validation loss over 16 batches).

A random search: `N_RANDOM` points drawn log-uniformly from `RANGES` (and tied or untied
embeddings at even odds) from a fixed seed, after `ANCHORS`, today's defaults at the two
learning rates mup_transfer found best at width 64. Every run is µP at its base width
(`model.mup_base_width=64`, so it is the standard model with the same constants) with Adam's
epsilon scaled by width (`model.mup_scale_adam_eps=true`): the winner's settings transfer to
other widths with `--set model.d_model=W --set model.n_heads=W/32 --set model.d_ff=4W`.

    lmjax sweep mup_base_search                    # sweeps/mup_base_search/results.csv; resumable

A run's name carries its values (r017-lr0.0031-lm2.1-...: `SHORT` names the settings); its
exact overrides are `sweep().runs[i].overrides`. Designed with 256 random points for about 30
minutes of an idle 2-core CPU; run on 2026-12-03 beside another experiment and other jobs
(load 12-22 on 2 cores) at 35-100 s a run, it was cut after the first 62 (38 minutes, two
processes), which are a random search of their own from the same seed. Raising N_RANDOM
extends it: the sweep skips the finished runs.
"""

import math
import random

from lmjax.drivers.sweep import Sweep, SweepRun

N_RANDOM = 62  # as run (2026-12-03); designed as 256, cut for time: the first 62 are a search of their own
SEED = 0
RANGES = {  # setting: (low, high), sampled log-uniformly
    "optim.lr": (5e-4, 3.2e-2),
    "model.logit_multiplier": (0.25, 8.0),
    "model.embedding_multiplier": (0.25, 16.0),
    "model.init_std_input": (0.004, 0.25),
    "model.init_std_hidden": (0.004, 0.1),
    "model.init_std_output": (0.002, 0.1),  # read only when untied: the head's init
    "model.attention_multiplier": (0.25, 4.0),
    "optim.eps": (1e-10, 1e-5),
}
SHORT = {"optim.lr": "lr", "model.logit_multiplier": "lm", "model.embedding_multiplier": "em",
         "model.init_std_input": "si", "model.init_std_hidden": "sh", "model.init_std_output": "so",
         "model.attention_multiplier": "am", "optim.eps": "eps"}
ANCHORS = [{"optim.lr": 2e-3}, {"optim.lr": 4e-3}]  # the rest at their defaults
WIDTH = 64
COMMON = ["model.parametrization=mup", f"model.mup_base_width={WIDTH}", "model.mup_scale_adam_eps=true",
          f"model.d_model={WIDTH}", f"model.n_heads={WIDTH // 32}", f"model.d_ff={4 * WIDTH}",
          "model.n_layers=2", "model.d_head=32", "model.max_seq_len=64", "model.scan_layers=false",
          "data.seq_len=64", "data.max_bytes=4000000", "train.batch_size=8", "train.steps=200",
          "optim.warmup_steps=20", "optim.schedule=cosine", "train.eval_every=1000000", "train.eval_batches=16",
          "train.log_every=20", "train.checkpoint_every=100", "train.sample_tokens=0", "log.wandb=off",
          "log.progress_bar=false"]


def sample(rng: random.Random) -> dict:
    """One random point: every setting of RANGES log-uniform, tied embeddings with probability 1/2."""
    point = {k: float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.2g}") for k, (lo, hi) in RANGES.items()}
    return {**point, "model.tie_embeddings": rng.random() < 0.5}


def run_name(index: int, point: dict) -> str:
    """r017-lr0.0031-lm2.1-...-untied: the index, then each sampled value (ties only when untied)."""
    values = "-".join(f"{SHORT[k]}{v:g}" for k, v in point.items() if k in SHORT)
    untied = "-untied" if point.get("model.tie_embeddings") is False else ""
    return f"r{index:03d}" + (f"-{values}" if values else "") + untied


def sweep():
    rng = random.Random(SEED)
    points = ANCHORS + [sample(rng) for _ in range(N_RANDOM)]
    runs = [SweepRun(run_name(i, p), tuple(f"{k}={str(v).lower()}" for k, v in p.items()))
            for i, p in enumerate(points)]
    return Sweep("decoder_tiny", tuple(runs), tuple(COMMON))
