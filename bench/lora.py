"""LoRA step time against full fine-tuning of the same model, interleaved A/B.

    python bench/lora.py [--experiment decoder_tiny] [--rank 8] [--steps 5] [--rounds 3] [--set ...]

Trains the experiment for one step as the base, sets up a full fine-tune and a LoRA run on it
(`--init-from`), then times `--rounds` rounds of `--steps` steps of each, alternating, and
prints the median seconds per step and their ratio.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax

from lmjax.config import override
from lmjax.experiment import load_experiment
from lmjax.train.loop import train
from lmjax.train.run import setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="decoder_tiny")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    quiet = ["train.sample_tokens=0", "log.progress_bar=false", "log.wandb=off", "train.eval_every=1000",
             "train.checkpoint_every=1000"]
    cfg = override(load_experiment(args.experiment), args.overrides + quiet)
    root = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    train(override(cfg, ["train.steps=1"]), root / "base")
    long = ["train.steps=1000"]
    runs = {"full": setup(override(cfg, long), root / "full", root / "base"),
            "lora": setup(override(cfg, long + [f"lora.rank={args.rank}"]), root / "lora", root / "base")}
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run.state, metrics, _ = run.train_step(run.state, run.next_batch())
            jax.block_until_ready(metrics)
            seconds[name].append((time.perf_counter() - start) / args.steps)
    full, lora = (statistics.median(seconds[n]) for n in ("full", "lora"))
    print(f"{args.experiment}: full {full:.3f} s/step, LoRA rank {args.rank} {lora:.3f} s/step, "
          f"LoRA / full {lora / full:.2f} (medians of {args.rounds} rounds of {args.steps} steps)")


if __name__ == "__main__":
    main()
