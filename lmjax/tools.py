"""Tools that write a new run directory from a trained one: `lmjax lora merge` (`merge_run`)
and `lmjax quantize` (`quantize_run`). Checks run before anything is written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lmjax.adapters.int8 import QUANTIZED_FILE, is_quantized, quantize_params
from lmjax.checkpoint import write_weights_run
from lmjax.config import ConfigError, LoRAConfig, QuantConfig
from lmjax.data import load_from_run, save_to_run
from lmjax.runs import load_config, restore_weights


def merge_run(run_dir: Path, out_dir: Path) -> None:
    """Write the LoRA run `run_dir`'s newest adapters folded into its base as an ordinary run
    directory `out_dir` (config without `lora`, the tokenizer, a step-0 weights-only
    checkpoint, as `lmjax convert from-hf` writes), which `lmjax.load`, `eval`, `generate`, `train --init-from` and
    `convert to-hf` accept."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not load_config(run_dir).lora.enabled:
        raise ConfigError(f"{run_dir} is not a LoRA run (lora.rank=0): there are no adapters to merge.")
    if (out_dir / "checkpoints").exists():
        raise ConfigError(f"{out_dir} already holds checkpoints; give a new --out directory.")
    cfg, _, params, _, _ = restore_weights(run_dir)
    tokenizer = load_from_run(run_dir, cfg.data.tokenizer)
    merged = dataclasses.replace(cfg, lora=LoRAConfig(), train=dataclasses.replace(cfg.train, run_dir=str(out_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_to_run(tokenizer, out_dir)
    write_weights_run(out_dir, merged.to_dict(), params)


def quantize_run(run_dir: Path, out_dir: Path, bits: int = 8, granularity: str = "channel") -> int:
    """Write the newest weights of `run_dir` quantized to int8 as the run directory `out_dir`;
    returns the saved weight bytes."""
    from safetensors.numpy import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if bits != 8:
        raise ConfigError(f"--bits {bits}: lmjax quantize writes int8 weights only; use --bits 8.")
    if is_quantized(run_dir):
        raise ConfigError(f"{run_dir} is already quantized; quantize the float run it came from.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty; give a new --out directory.")
    cfg, _, params, _, _ = restore_weights(run_dir)
    tokenizer = load_from_run(run_dir, cfg.data.tokenizer)
    quantized = dataclasses.replace(cfg, quant=QuantConfig(weights="int8", granularity=granularity),
                                    lora=dataclasses.replace(cfg.lora, rank=0, base=None),
                                    train=dataclasses.replace(cfg.train, run_dir=str(out_dir)))
    tensors = quantize_params(params, granularity)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_to_run(tokenizer, out_dir)
    (out_dir / "config.json").write_text(json.dumps(quantized.to_dict(), indent=2))
    save_file(tensors, str(out_dir / QUANTIZED_FILE))
    return sum(a.nbytes for a in tensors.values())
