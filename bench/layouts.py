"""Step time of one experiment under each mesh layout on 8 CPU devices, relative to one device,
next to the bytes each layout communicates per step (from the sharding math).

    python bench/layouts.py [gpt_small_bench] [--steps 10]

Each layout runs in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the reference with 1). On one CPU the 8 "devices" share the same cores, so the ratios show
partitioning and collective overhead, not speed-up. Prints one JSON line per layout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from devices_run import run_json

LAYOUTS = {
    "1 device": (1, []),
    "data 8": (8, ["mesh.data=8"]),
    "fsdp 8": (8, ["mesh.data=1", "mesh.fsdp=8"]),
    "data 2 x fsdp 2 x tensor 2": (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
    "data 2 x tensor 4": (8, ["mesh.data=2", "mesh.tensor=4"]),
}

MEASURE = """
import json, statistics, sys
sys.path.insert(0, {bench!r})
from train_step import StepRunner
from lmjax.scaling.counting import param_counts
runner = StepRunner({experiment!r}, {overrides!r})
cfg = runner.cfg
print(json.dumps({{"step_ms": statistics.median(runner.step_times({steps})) * 1e3,
                   "param_bytes": 4 * param_counts(cfg.model)["params_total"],
                   "layer_activation_bytes": 4 * cfg.train.batch_size * cfg.data.seq_len * cfg.model.d_model,
                   "n_layers": cfg.model.n_layers}}))
"""


def communication_bytes(layout: str, param_bytes: int, activation_bytes: int, n_layers: int) -> float:
    """Bytes each device sends per step (ring collectives), by the formulas in docs/launch.md."""
    def ring(n):
        return (n - 1) / n

    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in layout.split(" x "):
        name, _, n = part.partition(" ")
        if name in sizes:
            sizes[name] = int(n)
    replicas = sizes["data"] * sizes["fsdp"]
    gradient_sync = 2 * param_bytes / sizes["tensor"] * ring(sizes["data"]) if sizes["data"] > 1 else 0.0
    fsdp = 3 * param_bytes / sizes["tensor"] * ring(sizes["fsdp"]) if sizes["fsdp"] > 1 else 0.0
    tensor = 4 * n_layers * 2 * activation_bytes / replicas * ring(sizes["tensor"]) if sizes["tensor"] > 1 else 0.0
    return gradient_sync + fsdp + tensor


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", default="gpt_small_bench")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=["train.batch_size=16"])
    args = parser.parse_args()
    bench_dir = str(Path(__file__).resolve().parent)
    reference = None
    for layout, (devices, mesh) in LAYOUTS.items():
        code = MEASURE.format(bench=bench_dir, experiment=args.experiment, overrides=args.overrides + mesh,
                              steps=args.steps)
        result = run_json(code, devices)
        reference = reference or result["step_ms"]
        comm = communication_bytes(layout, result["param_bytes"], result["layer_activation_bytes"], result["n_layers"])
        print(json.dumps({"layout": layout, "step_ms": round(result["step_ms"], 1),
                          "relative_to_1_device": round(result["step_ms"] / reference, 2),
                          "communication_mb_per_device_per_step": round(comm / 1e6, 2)}))


if __name__ == "__main__":
    main()
