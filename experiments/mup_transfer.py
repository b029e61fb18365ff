"""Learning-rate transfer across width (docs/scaling.md, µP): 6 learning rates x widths 64-512
x {standard, µP}, 2 layers, heads of width 32, d_ff = 4 x width, on the default corpus.

`lmjax sweep mup_transfer` runs the 48 runs one after another, resumably (about 10 minutes of an
idle 2-core CPU); more seeds: `--dir sweeps/mup_transfer_s1 --set train.seed=1 --set data.seed=1`.
Then `python -m lmjax.scaling.transfer sweeps/mup_transfer/results.csv [sweeps/mup_transfer_s1/results.csv
...] --out docs/scaling` writes the loss-against-learning-rate figures and the optimum per width.
µP's base width is the narrowest, 64: there both parametrizations are the same model.
"""

from lmjax.drivers.sweep import Sweep, SweepRun

WIDTHS = [64, 128, 256, 512]
LEARNING_RATES = [5e-4 * 2**k for k in range(6)]  # 5e-4 ... 1.6e-2, log-spaced by factors of 2
PARAMETRIZATIONS = ["standard", "mup"]
STEPS = 200
COMMON = ["model.n_layers=2", "model.d_head=32", "model.max_seq_len=64", "model.scan_layers=false",
          "model.mup_base_width=64", "data.seq_len=64", "data.max_bytes=4000000", "train.batch_size=8",
          f"train.steps={STEPS}", "optim.warmup_steps=20", "optim.schedule=cosine", "train.eval_every=1000000",
          "train.eval_batches=16", "train.log_every=20", "train.checkpoint_every=100", "train.sample_tokens=0",
          "log.wandb=off", "log.progress_bar=false"]


def run_name(parametrization: str, width: int, lr: float) -> str:
    return f"{parametrization}-w{width}-lr{lr:.3g}"


def sweep():
    runs = [SweepRun(run_name(p, width, lr), (f"model.parametrization={p}", f"model.d_model={width}",
                                              f"model.n_heads={width // 32}", f"model.d_ff={4 * width}",
                                              f"optim.lr={lr!r}"))
            for p in PARAMETRIZATIONS for width in WIDTHS for lr in LEARNING_RATES]
    return Sweep("decoder_tiny", tuple(runs), tuple(COMMON))
