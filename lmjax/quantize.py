"""`lmjax quantize`: post-training, weights-only int8 quantization with qwix.

Every weight matrix (a parameter with two or more axes besides its stacked `layers` and
`expert` axes) is stored as int8 values and float32 scales computed by
`qwix.quantize` (symmetric absmax: scale = max|w| / 127 over the quantized group, value =
round(w / scale)); norm gains and biases stay in float. `granularity` "channel" keeps one
scale per output unit of each matrix, per layer and expert (per row for the looked-up tables:
token and position embeddings, relative-bias tables); "tensor" one per matrix, per layer and
expert. The quantized run directory holds config.json (with `quant` set), the tokenizer and
`quantized.safetensors`; loading it (`lmjax.load`, `eval`, `generate`) dequantizes the
weights with `qwix.dequantize` into the model's parameter dtype.

Error bound, per matmul: rounding moves each weight by at most scale / 2 = max|w| / 254 of its
group, so for y = sum_i x_i w_ij the quantized result differs by at most
sum_i |x_i| * max_i |w_ij| / 254 (per channel) — at most 0.4% of sum_i |x_i| max_i |w_ij|.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.config import ConfigError, QuantConfig
from lmjax.lora import matrix_split, path_name

QUANTIZED_FILE = "quantized.safetensors"


def groups(weight: nnx.Variable, granularity: str) -> tuple[int, ...] | None:
    """The axes of `weight` that keep their own scales (qwix's channelwise axes), or None when
    the weight is not a matrix and stays in float."""
    axes = tuple(weight.out_sharding or (None,) * len(weight.shape))
    stacked, inputs = matrix_split(axes)
    if len(axes) - stacked < 2:
        return None
    if granularity == "tensor":
        return tuple(range(stacked))
    if weight.get_metadata().get("role") == "input":  # looked-up rows: one scale per row
        return (*range(stacked), stacked)
    return (*range(stacked), *range(stacked + inputs, len(axes)))


def quantize_params(params: nnx.State, granularity: str) -> dict[str, np.ndarray]:
    """{name: array} to save: `path.qvalue` (int8) and `path.scale` (float32) for each matrix,
    `path` (its own dtype) for each other parameter."""
    import qwix

    tensors = {}
    for path, weight in nnx.to_flat_state(params):
        name, value = path_name(path), jax.device_get(weight[...])
        channelwise = groups(weight, granularity)
        if channelwise is None:
            tensors[name] = np.asarray(value)
            continue
        q = qwix.quantize(jnp.asarray(value, jnp.float32), jnp.int8, channelwise_axes=channelwise)
        tensors[f"{name}.qvalue"], tensors[f"{name}.scale"] = np.asarray(q.qvalue), np.asarray(q.scale)
    return tensors


def dequantize_params(tensors: dict[str, np.ndarray], abstract: nnx.State) -> nnx.State:
    """The model weights (in `abstract`'s dtypes) from the saved `tensors`."""
    import qwix

    flat = []
    for path, variable in nnx.to_flat_state(abstract):
        name = path_name(path)
        if name in tensors:
            value = jnp.asarray(tensors[name])
        else:
            value = qwix.dequantize(qwix.QArray(jnp.asarray(tensors[f"{name}.qvalue"]),
                                                jnp.asarray(tensors[f"{name}.scale"])))
        flat.append((path, variable.replace(value.astype(variable.dtype))))
    return nnx.from_flat_state(flat)


def is_quantized(run_dir: Path) -> bool:
    return (Path(run_dir) / QUANTIZED_FILE).is_file()


def weight_bytes(run_dir: Path) -> int:
    """Bytes of a quantized run's weights file: int8 values, scales, float vectors and a small
    JSON header."""
    return (Path(run_dir) / QUANTIZED_FILE).stat().st_size


def quantize_run(run_dir: Path, out_dir: Path, bits: int = 8, granularity: str = "channel") -> int:
    """Write the newest weights of `run_dir` quantized to int8 as the run directory `out_dir`;
    returns the saved weight bytes. Checks run before anything is written."""
    from safetensors.numpy import save_file

    from lmjax.data import load_from_run, save_to_run
    from lmjax.train.run_eval import load_config, restore_weights

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if bits != 8:
        raise ConfigError(f"--bits {bits}: lmjax quantize writes int8 weights only; use --bits 8.")
    if is_quantized(run_dir) or load_config(run_dir).quant.weights != "none":
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


def restore_quantized_onto(run_dir: Path, mesh):
    """(config, graphdef, params, step 0) of a quantized run: its weights dequantized into the
    model's parameter dtype, sharded over `mesh` by their logical axes."""
    from safetensors.numpy import load_file

    from lmjax.parallel import state_shardings
    from lmjax.train.run_eval import load_config
    from lmjax.train.state import abstract_model

    cfg = load_config(run_dir)
    graphdef, abstract = abstract_model(cfg.model)
    params = dequantize_params(load_file(str(Path(run_dir) / QUANTIZED_FILE)), abstract)
    return cfg, graphdef, jax.device_put(params, state_shardings(abstract, mesh)), 0
