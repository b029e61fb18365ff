"""IsoFLOP micro-sweep: 3 budgets x 6 tiny decoders on the stdlib corpus, ~15 CPU minutes (docs/scaling.md)."""

from lmjax.drivers.sweep import isoflop_sweep

BUDGETS = [1e11, 3e11, 1e12]  # training FLOPs
SHAPES = [
    {"model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 48},
    {"model.d_model": 24, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 64},
    {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 96},
    {"model.d_model": 48, "model.n_layers": 2, "model.n_heads": 4, "model.d_ff": 128},
    {"model.d_model": 64, "model.n_layers": 3, "model.n_heads": 4, "model.d_ff": 176},
    {"model.d_model": 96, "model.n_layers": 4, "model.n_heads": 4, "model.d_ff": 256},
]
COMMON = ["model.max_seq_len=64", "data.seq_len=64", "train.batch_size=16", "optim.warmup_steps=10",
          "train.eval_every=1000000", "train.eval_batches=16", "train.log_every=10", "train.checkpoint_every=500",
          "train.sample_tokens=0", "log.wandb=off", "log.progress_bar=false"]


def sweep():
    return isoflop_sweep("decoder_tiny", BUDGETS, SHAPES, COMMON)
