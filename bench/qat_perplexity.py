"""Validation perplexity before and after `lmjax quantize`, for a float-trained run and a
quantization-aware one (`quant.weights=int8`) of the same experiment and length.

    python bench/qat_perplexity.py decoder_tiny --dir /tmp/qat_ppl [--set train.steps=150 ...]

Trains both runs (same seed, data and steps), quantizes each (int8, per channel) and prints
one JSON line: each run's own evaluation (float forward; QAT forward for the QAT run), its
quantized run's, and the relative rise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from lmjax.config import QuantConfig
from lmjax.config_parse import override
from lmjax.experiment import load_experiment
from lmjax.runs import evaluate_run, train
from lmjax.tools import quantize_run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    base = override(load_experiment(args.experiment), ["log.wandb=off", "log.progress_bar=false",
                                                       "train.sample_tokens=0", *args.overrides])
    result = {"experiment": args.experiment, "overrides": args.overrides}
    for name, quant in (("float", QuantConfig()), ("qat", QuantConfig(weights="int8"))):
        run, quantized = args.dir / name, args.dir / f"{name}-int8"
        cfg = dataclasses.replace(base, quant=quant, train=dataclasses.replace(base.train, run_dir=str(run)))
        train(cfg, run)
        quantize_run(run, quantized)
        before, after = evaluate_run(run)["perplexity"], evaluate_run(quantized)["perplexity"]
        result[name] = {"perplexity": round(before, 4), "perplexity_int8": round(after, 4),
                        "rise": round(after / before - 1, 5)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
