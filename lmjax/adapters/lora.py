"""LoRA: low-rank adapters trained on a run's frozen weights (Hu et al. 2021).

A targeted weight W is read as a matrix from its inputs to its outputs, one per layer and
expert (the leading `layers` and `expert` axes are kept): wq (L, D, N, H) is L matrices of
D x N*H, wo (L, N, H, D) is L matrices of N*H x D. Its adapter is A (*stacked, *inputs, r)
and B (*stacked, r, *outputs), and the model uses W + (alpha / r) A B.

Training never forms that sum: `low_rank` hands the model each adapted weight as a
`LowRankWeight` (W, A, B, alpha / r), which the model's matmuls and MoE expert products
apply as x W + (alpha / r) (x A) B, so W is an input the gradient never reaches and the step
holds no weight-sized copy or gradient. The branch costs 2 r (inputs + outputs) FLOPs per
token and matrix, forward; tables picked by a regex (embeddings, positions, relative-bias
tables) are looked up as W[ids] + (alpha / r) A[ids] B. `fold` forms W + (alpha / r) A B once,
as ordinary weights, for merging, exporting, evaluation and decoding. The adapters carry
logical axes (their weight's, plus `lora_rank`) and are sharded like any weight.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.config import Config, ConfigError, LoRAConfig, ModelConfig
from lmjax.models.weights import matmul, take_rows
from lmjax.models.weights import weight as read_weight
from lmjax.train.state import abstract_model
from lmjax.train.transforms import WeightTransform


@functools.partial(jax.tree_util.register_dataclass, data_fields=["base", "a", "b"], meta_fields=["scale"])
@dataclasses.dataclass(frozen=True)
class LowRankWeight:
    """A frozen weight W with a low-rank adapter, read as W + scale A B without ever forming
    that sum (a `lmjax.models.weights.FactoredWeight`): `matmul` and the MoE expert products
    compute x W + scale (x A) B, so a training step differentiates A and B alone and holds no
    weight-sized copy or gradient.

    base W (*stacked, *in, *out), a A (*stacked, *in, r), b B (*stacked, r, *out); the
    leading `stacked` axes (layers, experts) are one matrix each, so slicing every leaf along
    them (a layer scan, an expert gather) slices the adapted weight. It stands where a
    parameter's array stands (a `Param`'s value): `read` casts its parts, `take_rows` looks
    rows up as W[ids] + scale A[ids] B, and `fold` forms W + scale A B (`folded`).
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float

    def __getitem__(self, index):
        """`variable[...]`, how modules read a parameter, gives the weight itself."""
        if index is not Ellipsis:
            raise TypeError("a LowRankWeight is read whole (`[...]`); slice its leaves with jax.tree.map.")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def T(self) -> LowRankWeight:
        """A 2-D weight's transpose, W^T + scale B^T A^T (as `jax.Array.T`)."""
        return LowRankWeight(self.base.T, self.b.T, self.a.T, self.scale)

    def read(self, dtype) -> LowRankWeight:
        """The same form with each part read in `dtype` (the base may itself be a form)."""
        return LowRankWeight(read_weight(self.base, dtype), self.a.astype(dtype), self.b.astype(dtype), self.scale)

    def take_rows(self, ids, dtype) -> jax.Array:
        """Rows `ids` of a table (R, D): W[ids] + scale A[ids] B, (*I, D) in `dtype`."""
        return take_rows(self.base, ids, dtype) + self.scale * matmul(take_rows(self.a, ids, dtype),
                                                                      self.b.astype(dtype))

    def matmul(self, x, n_in: int, out_dtype) -> jax.Array:
        """x W + scale (x A) B, each product a `matmul`."""
        low_rank = matmul(self.scale * matmul(x, self.a, n_in), self.b, out_dtype=out_dtype)
        return matmul(x, self.base, n_in, out_dtype) + low_rank

    def expert_matmul(self, equation: str, x) -> jax.Array:
        """jnp.einsum(equation, x, W) + scale (x A) B in x's dtype, for expert weights (E', in, out)
        (A (E', in, r), B (E', r, out)), the rank contracted like the output's last subscript."""
        operands, out = equation.split("->")
        x_sub, w_sub = operands.split(",")
        r = next(c for c in "rqz" if c not in equation)
        xa = jnp.einsum(f"{x_sub},{w_sub[:-1]}{r}->{out[:-1]}{r}", x, self.a.astype(x.dtype))
        low_rank = jnp.einsum(f"{out[:-1]}{r},{w_sub[0]}{r}{w_sub[-1]}->{out}", xa, self.b.astype(x.dtype))
        return jnp.einsum(equation, x, self.base.astype(x.dtype)) + self.scale * low_rank

    def ragged_dot(self, x, group_sizes) -> jax.Array:
        """`jax.lax.ragged_dot` of sorted rows x (M, in): x W + scale (x A) B."""
        low_rank = jax.lax.ragged_dot(jax.lax.ragged_dot(x, self.a.astype(x.dtype), group_sizes),
                                      self.b.astype(x.dtype), group_sizes)
        return jax.lax.ragged_dot(x, self.base.astype(x.dtype), group_sizes) + self.scale * low_rank

    def leaf_axes(self, axes: tuple) -> LowRankWeight:
        """Logical axes of an expert weight (E, in, out) named `axes`, per leaf: A (E, in,
        lora_rank) and B (E, lora_rank, out) beside the base's."""
        return LowRankWeight(axes, (*axes[:2], "lora_rank"), (axes[0], "lora_rank", axes[2]), self.scale)

    def folded(self) -> jax.Array:
        """W + scale A B, summed in float32 and stored in W's dtype (so B = 0 gives W exactly)."""
        w, a, b = self.base, self.a, self.b
        outputs = w.ndim - a.ndim + 1
        lead = w.shape[:b.ndim - outputs - 1]
        rank = a.shape[-1]
        delta = jnp.matmul(a.reshape(*lead, -1, rank).astype(jnp.float32),
                           b.reshape(*lead, rank, -1).astype(jnp.float32))  # (*stacked, inputs, outputs)
        return (w.astype(jnp.float32) + self.scale * delta.reshape(w.shape)).astype(w.dtype)


ROLES = {"attention": ("wq", "wk", "wv", "wo"), "mlp": ("w_up", "w_gate", "w_down")}
STACKED_AXES = ("layers", "expert")  # one matrix per layer and per expert


def path_name(path: tuple) -> str:
    """A parameter path as text, e.g. `stack/blocks/attn/wq`."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def matrix_split(axes: tuple) -> tuple[int, int]:
    """(stacked, inputs): how many leading axes are per-layer/per-expert copies, and how many
    of the rest are the matrix's inputs. A weight that reads the model width (`embed` first)
    maps it to the other axes; one that writes it (`embed` last) maps the other axes to it."""
    stacked = 0
    while stacked < len(axes) and axes[stacked] in STACKED_AXES:
        stacked += 1
    rest = axes[stacked:]
    inputs = len(rest) - 1 if rest and rest[-1] == "embed" and rest[0] != "embed" else 1
    return stacked, inputs


def _matchers(targets: str):
    matchers = []
    for target in (t.strip() for t in targets.split(",") if t.strip()):
        if target in ROLES:
            matchers.append(lambda name, names=ROLES[target]: name.rsplit("/", 1)[-1] in names)
            continue
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise ConfigError(f"lora.targets: {target!r} is neither a role ({', '.join(ROLES)}) nor a valid regular "
                              f"expression ({e}).") from None
        matchers.append(lambda name, pattern=pattern: pattern.search(name) is not None)
    return matchers


def targeted(cfg: LoRAConfig, params: nnx.State) -> dict[tuple, nnx.Variable]:
    """path -> weight (a Variable, possibly abstract) of every weight `cfg.targets` selects.

    Raises ConfigError when the targets match nothing, match a vector, or when `cfg.rank`
    exceeds the smaller side of a targeted matrix."""
    matchers = _matchers(cfg.targets)
    chosen = {path: v for path, v in nnx.to_flat_state(params) if any(m(path_name(path)) for m in matchers)}
    if not chosen:
        names = ", ".join(path_name(p) for p, _ in list(nnx.to_flat_state(params))[:4])
        raise ConfigError(f"lora.targets={cfg.targets!r} matches no weight of this model; use roles "
                          f"({', '.join(ROLES)}) or a regex on parameter paths such as {names}.")
    for path, weight in chosen.items():
        axes = tuple(weight.out_sharding or (None,) * len(weight.shape))
        stacked, inputs = matrix_split(axes)
        if len(axes) - stacked < 2:
            raise ConfigError(f"lora.targets={cfg.targets!r} matches {path_name(path)} {weight.shape}, which is not "
                              "a matrix; narrow the regex to weight matrices.")
        n_in = math.prod(weight.shape[stacked:stacked + inputs])
        n_out = math.prod(weight.shape[stacked + inputs:])
        if cfg.rank > min(n_in, n_out):
            raise ConfigError(f"lora.rank={cfg.rank} exceeds the smaller side of {path_name(path)} ({n_in} x "
                              f"{n_out}); use lora.rank <= {min(n_in, n_out)} or leave that weight out of "
                              "lora.targets.")
    return chosen


def adapted_sizes(cfg: LoRAConfig, model: ModelConfig) -> tuple[int, int]:
    """(elements of the targeted weights, elements of their adapters) of `model`, exactly:
    r (inputs + outputs) per targeted matrix, per layer and expert."""
    params = abstract_model(model)[1]
    weights = adapters = 0
    for weight in targeted(cfg, params).values():
        stacked, inputs = matrix_split(tuple(weight.out_sharding))
        n_in = math.prod(weight.shape[stacked:stacked + inputs])
        n_out = math.prod(weight.shape[stacked + inputs:])
        weights += math.prod(weight.shape)
        adapters += math.prod(weight.shape[:stacked]) * cfg.rank * (n_in + n_out)
    return weights, adapters


def init_adapters(cfg: LoRAConfig, params: nnx.State, seed: int) -> nnx.State:
    """Adapters for the weights of `params` (abstract or concrete) that `cfg` targets: at
    path p, `lora_a` normal(0, 1/rank) (PEFT's Gaussian init) and `lora_b` zeros, in the
    weight's dtype, with logical axes (*stacked, *inputs, "lora_rank") and
    (*stacked, "lora_rank", *outputs) and the weight's role. With B = 0 the adapted model is the base model."""
    flat = {}
    for index, (path, weight) in enumerate(sorted(targeted(cfg, params).items(), key=lambda kv: path_name(kv[0]))):
        axes = tuple(weight.out_sharding or (None,) * len(weight.shape))
        stacked, inputs = matrix_split(axes)
        split = stacked + inputs
        a_shape = (*weight.shape[:split], cfg.rank)
        b_shape = (*weight.shape[:stacked], cfg.rank, *weight.shape[split:])
        key = jax.random.fold_in(jax.random.key(seed), index)
        a = jax.random.normal(key, a_shape, weight.dtype) / cfg.rank
        role = weight.get_metadata().get("role")  # the optimizer treats an adapter like its weight
        flat[(*path, "lora_a")] = nnx.Param(a, out_sharding=(*axes[:split], "lora_rank"), eager_sharding=False,
                                            role=role)
        flat[(*path, "lora_b")] = nnx.Param(jnp.zeros(b_shape, weight.dtype),
                                            out_sharding=(*axes[:stacked], "lora_rank", *axes[split:]),
                                            eager_sharding=False, role=role)
    return nnx.from_flat_state(flat)


def _with_adapters(params: nnx.State, adapters: nnx.State, cfg: LoRAConfig, read) -> nnx.State:
    """`params` with every adapted weight's value replaced by `read(LowRankWeight(W, A, B, alpha / rank))`."""
    pairs: dict[tuple, dict] = {}
    for path, variable in nnx.to_flat_state(adapters):
        pairs.setdefault(tuple(path[:-1]), {})[path[-1]] = variable[...]
    flat = []
    for path, weight in nnx.to_flat_state(params):
        pair = pairs.get(tuple(path))
        if pair is not None:
            weight = weight.replace(read(LowRankWeight(weight[...], pair["lora_a"], pair["lora_b"],
                                                       cfg.alpha / cfg.rank)))
        flat.append((path, weight))
    return nnx.from_flat_state(flat)


def low_rank(params: nnx.State, adapters: nnx.State, cfg: LoRAConfig) -> nnx.State:
    """`params` with every adapted weight a `LowRankWeight`, which the model applies as
    x W + (alpha / rank) (x A) B: the training step's form, whose gradient reaches A and B
    alone (nothing the size of W is formed or differentiated)."""
    return _with_adapters(params, adapters, cfg, lambda weight: weight)


def fold(params: nnx.State, adapters: nnx.State, cfg: LoRAConfig) -> nnx.State:
    """`params` with every adapted weight W replaced by W + (alpha / rank) A B, summed in
    float32 and stored in W's dtype (so B = 0 gives W exactly): ordinary weights, for merging,
    exporting, evaluating and decoding."""
    return _with_adapters(params, adapters, cfg, LowRankWeight.folded)


@dataclasses.dataclass(frozen=True)
class LoRA(WeightTransform):
    """LoRA as the trainer's weight transform (`lmjax.train.transforms.Adapter`): the run
    trains adapters on the frozen weights of the run `lora.base` (`--init-from`)."""

    cfg: LoRAConfig
    name: str = "lora"

    def check(self, cfg: Config, init_from: Path | None) -> Config:
        """`cfg` with `lora.base` set to `init_from` (absolute), the run whose weights the adapters
        adapt; ConfigError when there is neither, or when `lora.targets` does not fit the model."""
        if init_from is not None:
            cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, base=str(Path(init_from).absolute())))
        if cfg.lora.base is None:
            raise ConfigError(f"lora.rank={cfg.lora.rank} adapts a trained model; give --init-from RUN_DIR.")
        targeted(cfg.lora, abstract_model(cfg.model)[1])
        return cfg

    def frozen_run(self, cfg: Config) -> Path:
        return Path(cfg.lora.base)

    def init_trainable(self, abstract_params: nnx.State, seed: int) -> nnx.State:
        return init_adapters(self.cfg, abstract_params, seed)

    def apply(self, frozen: nnx.State, trained: nnx.State) -> nnx.State:
        return low_rank(frozen, trained, self.cfg)

    def fold(self, frozen: nnx.State, trained: nnx.State) -> nnx.State:
        return fold(frozen, trained, self.cfg)

    def sizes(self, cfg: Config) -> dict[str, int]:
        """{"adapter_bytes": the adapters' bytes in `model.param_dtype`}."""
        return {"adapter_bytes": adapted_sizes(self.cfg, cfg.model)[1] * jnp.dtype(cfg.model.param_dtype).itemsize}
