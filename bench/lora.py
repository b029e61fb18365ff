"""LoRA against full fine-tuning of the same model: step time (interleaved A/B) and memory.

    python bench/lora.py [--experiment decoder_tiny] [--rank 8] [--steps 3] [--rounds 3] [--set ...]

Memory, per variant: `lmjax plan`'s training estimate (weights, adapters, gradients, Adam,
activations) and XLA's memory analysis of the compiled step (arguments: train state, frozen
base and batch; temporaries: gradients and activations), compiled from abstract shapes.
Time: trains the experiment for one step as the base, sets up a full fine-tune and a LoRA run
on it (`--init-from`), then times `--rounds` rounds of `--steps` steps of each, alternating,
and prints the median seconds per step and their ratio. One JSON line per variant, then a
summary line.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
from memory import compiled_memory  # bench/memory.py

from lmjax.adapters import weight_transforms
from lmjax.cli import transform_bytes
from lmjax.config_parse import override
from lmjax.experiment import load_experiment
from lmjax.runs import restore_weights_onto, train
from lmjax.scaling.memory import memory_estimate
from lmjax.train.run import setup

MIB = 2**20


def plan_memory(cfg) -> dict:
    """`lmjax plan`'s training memory of `cfg`, in MiB."""
    estimate = memory_estimate(cfg, len(jax.devices()), **transform_bytes(cfg))
    keys = ("weights", "adapters", "gradients", "adam", "master_weights", "activations", "train")
    return {f"plan_{k}_mib": round(estimate.get(f"memory_{k}_bytes", 0) / MIB, 2) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="decoder_tiny")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    quiet = ["train.sample_tokens=0", "log.progress_bar=false", "log.wandb=off", "train.eval_every=1000",
             "train.checkpoint_every=1000", "train.steps=1000"]
    cfg = override(load_experiment(args.experiment), args.overrides + quiet)
    variants = {"full": cfg, "lora": override(cfg, [f"lora.rank={args.rank}"])}
    report = {}
    for name, variant in variants.items():
        xla = compiled_memory(variant)
        report[name] = {**plan_memory(variant), "xla_arguments_mib": round(xla["xla_arguments_bytes"] / MIB, 2),
                        "xla_temp_mib": round(xla["xla_temp_bytes"] / MIB, 2)}

    root = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    train(override(cfg, ["train.steps=1"]), root / "base")
    runs = {name: setup(variant, root / name, root / "base", transforms=weight_transforms(variant),
                        restore_weights=lambda path, mesh: restore_weights_onto(path, mesh)[2])
            for name, variant in variants.items()}
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run.state, metrics, _ = run.train_step(run.state, run.next_batch())
            jax.block_until_ready(metrics)
            seconds[name].append((time.perf_counter() - start) / args.steps)
    for name in runs:
        report[name]["seconds_per_step"] = round(statistics.median(seconds[name]), 3)
        print(json.dumps({"experiment": args.experiment, "overrides": args.overrides, "variant": name,
                          "rank": args.rank, "batch": [cfg.train.batch_size, cfg.data.seq_len], **report[name],
                          "seconds": [round(s, 3) for s in seconds[name]]}))
    full, lora = report["full"], report["lora"]
    print(f"{args.experiment}: LoRA rank {args.rank} / full fine-tuning: step time "
          f"{lora['seconds_per_step'] / full['seconds_per_step']:.2f} (medians of {args.rounds} interleaved rounds "
          f"of {args.steps} steps); XLA arguments {lora['xla_arguments_mib']:.1f} / {full['xla_arguments_mib']:.1f} "
          f"MiB, temporaries {lora['xla_temp_mib']:.1f} / {full['xla_temp_mib']:.1f} MiB; plan "
          f"{lora['plan_train_mib']:.1f} / {full['plan_train_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
