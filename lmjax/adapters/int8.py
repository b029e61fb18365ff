"""int8 weights: post-training, weights-only int8 quantization with qwix (`lmjax quantize`,
`lmjax.tools.quantize_run`), and the form a quantized run is read in (`Int8Weight`).

Every weight matrix (a parameter with two or more axes besides its stacked `layers` and
`expert` axes) is stored as int8 values and float32 scales computed by
`qwix.quantize` (symmetric absmax: scale = max|w| / 127.5 over the quantized group, value =
round(w / scale) clipped to [-128, 127]: qwix widens the outermost buckets by half a step);
norm gains and biases stay in float. `granularity` "channel" keeps one
scale per output unit of each matrix, per layer and expert (per row for the looked-up tables:
token and position embeddings, relative-bias tables); "tensor" one per matrix, per layer and
expert. The quantized run directory holds config.json (with `quant` set), the tokenizer and
`quantized.safetensors`; loading it (`lmjax.load`, `eval`, `generate`, the lm-eval harness)
keeps each matrix in memory as an `Int8Weight` (int8 values, float32 scales), which the model
dequantizes where it reads it (`lmjax.models.weights.weight`, `take_rows`).

Error bound, per matmul: rounding moves each weight by at most scale / 2 = max|w| / 255 of its
group, so for y = sum_i x_i w_ij the quantized result differs by at most
sum_i |x_i| * max_i |w_ij| / 255 (per channel) — at most 0.4% of sum_i |x_i| max_i |w_ij|.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lmjax.adapters.lora import matrix_split, path_name
from lmjax.config import ModelConfig
from lmjax.parallel import state_shardings
from lmjax.train.restore import load_config
from lmjax.train.state import abstract_model

QUANTIZED_FILE = "quantized.safetensors"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["qvalue", "scale"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """A matrix kept int8 in memory (a `lmjax.models.weights.WeightForm`): qvalue (*shape) int8,
    scale float32 of the same rank, size 1 on the axes that share one scale. The model
    dequantizes it (qvalue * scale) where it reads it, in the compute dtype."""

    qvalue: jax.Array
    scale: jax.Array

    def __getitem__(self, index):
        """`variable[...]`, how modules read a parameter, gives the weight itself."""
        if index is not Ellipsis:
            raise TypeError("an Int8Weight is read whole (`[...]`); slice its leaves with jax.tree.map.")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.qvalue.shape

    @property
    def T(self) -> Int8Weight:
        """A 2-D weight's transpose (values and scales transposed)."""
        return Int8Weight(self.qvalue.T, self.scale.T)

    def read(self, dtype) -> jax.Array:
        """qvalue * scale in `dtype`."""
        import qwix

        return qwix.dequantize(qwix.QArray(self.qvalue, self.scale)).astype(dtype)

    def take_rows(self, ids, dtype) -> jax.Array:
        """Rows `ids` (int, any shape I) of a table (R, ...) -> (*I, ...) in `dtype`, with their
        scales (one per row, or one for the whole table): only the rows taken are dequantized."""
        scale = self.scale
        scale = jnp.take(scale, ids, axis=0) if scale.shape[0] > 1 else scale.reshape((1,) * ids.ndim + scale.shape[1:])
        return Int8Weight(jnp.take(self.qvalue, ids, axis=0), scale).read(dtype)


def groups(weight: nnx.Variable, granularity: str) -> tuple[int, ...] | None:
    """The axes of `weight` that keep their own scales (qwix's channelwise axes), or None when
    the weight is not a matrix and stays in float."""
    axes = tuple(weight.out_sharding or (None,) * len(weight.shape))
    stacked, inputs = matrix_split(axes)
    if len(axes) - stacked < 2 or weight.get_metadata().get("role") == "vector":  # biases such as bq (heads, head_dim)
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


def scale_sharding(sharding: NamedSharding, scale_shape: tuple[int, ...]) -> NamedSharding:
    """The sharding of a matrix's scales, given the matrix's: the same mesh axes, except on the
    axes where the scales have size 1 (one scale for the whole axis), which are not split."""
    spec = tuple(sharding.spec) + (None,) * (len(scale_shape) - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*(None if n == 1 else a for a, n in zip(spec, scale_shape))))


def load_params(tensors: dict[str, np.ndarray], abstract: nnx.State, mesh, keep_int8: bool = True) -> nnx.State:
    """The model weights from the saved `tensors`, sharded over `mesh` by their logical axes.
    With `keep_int8` each matrix's value is an `Int8Weight` (int8 values, float32 scales), read
    by the model through `lmjax.models.weights.weight`; otherwise it is dequantized into
    `abstract`'s dtype (for code that changes weights: `--init-from`, LoRA, `convert to-hf`)."""
    import qwix

    shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh)))
    flat = []
    for path, variable in nnx.to_flat_state(abstract):
        name, sharding = path_name(path), shardings[path].get_value()
        if name in tensors:
            value = jax.device_put(tensors[name], sharding)
        elif keep_int8:
            qvalue, scale = tensors[f"{name}.qvalue"], tensors[f"{name}.scale"]
            value = Int8Weight(jax.device_put(qvalue, sharding),
                               jax.device_put(scale, scale_sharding(sharding, scale.shape)))
        else:
            value = qwix.dequantize(qwix.QArray(jnp.asarray(tensors[f"{name}.qvalue"]),
                                                jnp.asarray(tensors[f"{name}.scale"])))
            value = jax.device_put(value.astype(variable.dtype), sharding)
        flat.append((path, variable.replace(value)))
    return nnx.from_flat_state(flat)


def resident_bytes(params: nnx.State) -> int:
    """Bytes the weights `params` hold on their devices (every shard counted once)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def int8_weight_bytes(cfg: ModelConfig, granularity: str = "channel") -> tuple[int, int]:
    """(bytes of the model's weights as `lmjax quantize` stores them: int8 values, float32
    scales, vectors in `param_dtype`; bytes of the same weights in `param_dtype`), counted on the
    abstract model (nothing allocated)."""
    quantized = unquantized = 0
    for _, weight in nnx.to_flat_state(abstract_model(cfg)[1]):
        size, itemsize = math.prod(weight.shape), jnp.dtype(weight.dtype).itemsize
        unquantized += size * itemsize
        channelwise = groups(weight, granularity)
        if channelwise is None:
            quantized += size * itemsize
        else:
            quantized += size + 4 * math.prod(n for a, n in enumerate(weight.shape) if a in channelwise)
    return quantized, unquantized


def is_quantized(run_dir: Path) -> bool:
    return (Path(run_dir) / QUANTIZED_FILE).is_file()


def restore_quantized_onto(run_dir: Path, mesh, keep_int8: bool = True):
    """(config, graphdef, params, step 0) of a quantized run, sharded over `mesh` by their
    logical axes: the matrices `Int8Weight`s, or with `keep_int8` False dequantized into
    the model's parameter dtype (`load_params`)."""
    from safetensors.numpy import load_file

    cfg = load_config(run_dir)
    graphdef, abstract = abstract_model(cfg.model)
    return cfg, graphdef, load_params(load_file(str(Path(run_dir) / QUANTIZED_FILE)), abstract, mesh, keep_int8), 0
