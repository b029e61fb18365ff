"""Fine-grained experts at CPU scale (Krajewski et al. 2024): G in {1, 2, 4, 8} at equal expert parameters.

Every run is a 2-layer decoder whose MoE layers hold 8 experts of width d_ff at G = 1, top-1
(Switch); granularity G makes that 8G experts of width d_ff / G with G of them per token, so the
expert parameters and FLOPs per token are those of G = 1 (only the router grows). Three sizes
(d_model 32, 48, 64) x three token counts (0.1M, 0.25M, 0.75M) x four granularities = 36 runs,
whose results.csv carries G for `lmjax fit`'s granularity law (docs/moe.md, "Granularity"):

    for s in 0 1 2; do
      lmjax sweep moe_granularity --set train.seed=$s --set data.seed=$s --dir sweeps/moe_granularity/seed$s
    done
    lmjax fit sweeps/moe_granularity/seed0/results.csv --plots sweeps/moe_granularity/seed0

About 5e12 counted training FLOPs per seed, mostly compilation in wall time: 31-38 minutes per
seed on a 2-core CPU shared with another experiment and tests (2026-12-03; the results are in
docs/moe.md).
"""

import dataclasses

from lmjax.config import Config, MoEConfig
from lmjax.config_parse import override
from lmjax.drivers.sweep import Sweep, SweepRun
from lmjax.experiment import load_experiment

SIZES = [{"model.d_model": 32, "model.n_heads": 2, "model.d_ff": 96},
         {"model.d_model": 48, "model.n_heads": 4, "model.d_ff": 128},
         {"model.d_model": 64, "model.n_heads": 4, "model.d_ff": 192}]
TOKENS = [100_000, 250_000, 750_000]
GRANULARITIES = [1, 2, 4, 8]


def config() -> Config:
    """The smallest run at G = 1 (the sweep sets size, tokens and G)."""
    tiny = load_experiment("decoder_tiny")
    moe = MoEConfig(n_experts=8, top_k=1, dispatch="dropless", load_balance_coef=0.01, z_loss_coef=1e-3)
    cfg = dataclasses.replace(tiny, name="moe_granularity", model=dataclasses.replace(tiny.model, moe=moe))
    return override(cfg, [*(f"{k}={v}" for k, v in SIZES[0].items()), "model.n_layers=2", "model.max_seq_len=64",
                          "data.seq_len=64", "train.batch_size=16", "optim.warmup_steps=10", "train.steps=none",
                          f"train.tokens={TOKENS[0]}", "train.eval_every=1000000", "train.eval_batches=16",
                          "train.log_every=10", "train.checkpoint_every=500", "train.sample_tokens=0", "log.wandb=off",
                          "log.progress_bar=false"])


def sweep() -> Sweep:
    runs = [SweepRun(f"d{size['model.d_model']}-D{tokens}-G{g}",
                     (*(f"{k}={v}" for k, v in size.items()), f"train.tokens={tokens}", f"model.moe.granularity={g}"))
            for size in SIZES for tokens in TOKENS for g in GRANULARITIES]
    return Sweep("moe_granularity", tuple(runs))
