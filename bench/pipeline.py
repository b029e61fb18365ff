"""Step time of pipeline stages on 8 CPU devices against the bubble formula.

    python bench/pipeline.py [decoder_tiny] [--steps 5] [--set model.d_model=64 ...]

Layouts: pipeline P in (1, 2, 4) with the rest of the 8 devices data parallel, and M in
(4, 8, 16) microbatches (the batch, 64 by default, must split into data x M). Each runs in its own
process with XLA_FLAGS=--xla_force_host_platform_device_count=8. Prints one JSON line per layout:
step time, relative to pipeline 1, the bubble (P-1)/(M+P-1) and the compute it costs here. On
one CPU the 8 "devices" share the same cores, so stages never run at once: a pipelined step
computes (M+P-1)/M of the work (the idle iterations compute on zeros), and the measured ratio
shows that plus partitioning overhead, not the speed-up stages would give on separate chips.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from devices_run import run_json

LAYOUTS = [(1, None)] + [(stages, microbatches) for stages in (2, 4) for microbatches in (4, 8, 16)]

MEASURE = """
import json, statistics, sys
sys.path.insert(0, {bench!r})
from train_step import StepRunner
runner = StepRunner({experiment!r}, {overrides!r})
print(json.dumps({{"step_ms": statistics.median(runner.step_times({steps})) * 1e3}}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", default="decoder_tiny")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=["train.batch_size=64"])
    args = parser.parse_args()
    bench_dir = str(Path(__file__).resolve().parent)
    reference = None
    for stages, microbatches in LAYOUTS:
        mesh = [f"mesh.pipeline={stages}", f"mesh.data={8 // stages}"]
        mesh += [f"mesh.pipeline_microbatches={microbatches}"] if microbatches else []
        code = MEASURE.format(bench=bench_dir, experiment=args.experiment, overrides=args.overrides + mesh,
                              steps=args.steps)
        step_ms = run_json(code, devices=8)["step_ms"]
        reference = reference or step_ms
        bubble = (stages - 1) / ((microbatches or 1) + stages - 1)
        print(json.dumps({"pipeline": stages, "microbatches": microbatches, "step_ms": round(step_ms, 1),
                          "relative_to_pipeline_1": round(step_ms / reference, 2), "bubble": round(bubble, 3),
                          "compute_with_bubble": round(1 / (1 - bubble), 2)}), flush=True)


if __name__ == "__main__":
    main()
