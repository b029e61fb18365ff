"""How one lmjax weight is laid out in a Hugging Face checkpoint, both ways.

A rule turns the HF tensor(s) of one layer into the lmjax array of that layer (`read`,
lazily: a view of the memory-mapped file, so that slicing it reads only the slice) and back
(`write`). HF names may hold `{i}` (the layer) and `{e}` (the expert). torch's `nn.Linear`
stores its weight as (out, in); lmjax stores (*in, *out), e.g. wq (D, N, H) and wo (N, H, D),
so a linear weight is transposed and its flat axes split (a view, never a copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmjax.config import ConfigError


def _get(tensors: dict, name: str) -> np.ndarray:
    if name not in tensors:
        raise ConfigError(f"the checkpoint has no tensor {name}, which this architecture needs; is config.json the "
                          "one written with these weights?")
    return tensors[name]


def _shaped(tensors: dict, name: str, expected: tuple[int, ...]) -> np.ndarray:
    """Tensor `name`, which must have the shape config.json implies (ConfigError otherwise)."""
    array = _get(tensors, name)
    if tuple(array.shape) != tuple(expected):
        raise ConfigError(f"tensor {name} has shape {tuple(array.shape)}, but config.json implies {tuple(expected)}; "
                          "the config and the weights disagree.")
    return array


@dataclass(frozen=True)
class Same:
    """A tensor stored alike in both (embeddings, norm scales, biases, position tables)."""

    name: str

    def read(self, tensors: dict, shape: tuple[int, ...], **ids) -> np.ndarray:
        return _shaped(tensors, self.name.format(**ids), shape)

    def write(self, array: np.ndarray, **ids) -> dict[str, np.ndarray]:
        return {self.name.format(**ids): array}


@dataclass(frozen=True)
class Flat:
    """A bias stored flat in HF, split into heads in lmjax: query.bias (N*H,) <-> bq (N, H)."""

    name: str

    def read(self, tensors: dict, shape: tuple[int, ...], **ids) -> np.ndarray:
        return _shaped(tensors, self.name.format(**ids), (math.prod(shape),)).reshape(shape)

    def write(self, array: np.ndarray, **ids) -> dict[str, np.ndarray]:
        return {self.name.format(**ids): array.reshape(-1)}


@dataclass(frozen=True)
class Linear:
    """A torch Linear weight (out, in) <-> lmjax (*in, *out) with `n_in` input axes. `names`
    are alternative HF names (the first present is read; the first is written)."""

    names: tuple[str, ...]
    n_in: int = 1

    def read(self, tensors: dict, shape: tuple[int, ...], **ids) -> np.ndarray:
        names = [n.format(**ids) for n in self.names]
        name = next((n for n in names if n in tensors), names[0])
        expected = (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))
        return _shaped(tensors, name, expected).T.reshape(shape)

    def write(self, array: np.ndarray, **ids) -> dict[str, np.ndarray]:
        flat_in = math.prod(array.shape[:self.n_in])
        return {self.names[0].format(**ids): array.reshape(flat_in, -1).T}


@dataclass(frozen=True)
class MixtralExperts:
    """One of the experts' matrices of a Mixtral layer: lmjax (E, D, F) w_gate / w_up and
    (E, F, D) w_down. Read from either layout transformers writes: one Linear per expert
    (`block_sparse_moe.experts.{e}.w1/w3/w2`, as `save_pretrained` stores them), or fused
    (`mlp.experts.gate_up_proj` (E, 2F, D), gate first, and `mlp.experts.down_proj` (E, D, F)).
    Written per expert."""

    part: str  # "gate", "up" or "down"

    def _per_expert(self) -> str:
        w = {"gate": "w1", "up": "w3", "down": "w2"}[self.part]
        return "model.layers.{i}.block_sparse_moe.experts.{e}." + w + ".weight"

    def read(self, tensors: dict, shape: tuple[int, ...], i: int) -> np.ndarray:
        n_experts = shape[0]
        if self._per_expert().format(i=i, e=0) in tensors:
            rule = Linear((self._per_expert(),))
            return np.stack([rule.read(tensors, shape[1:], i=i, e=e) for e in range(n_experts)])
        fused = f"model.layers.{i}.mlp.experts." + ("down_proj" if self.part == "down" else "gate_up_proj")
        f = shape[1] if self.part == "down" else shape[2]
        expected = (n_experts, shape[2], f) if self.part == "down" else (n_experts, 2 * f, shape[1])
        weight = _shaped(tensors, fused, expected)
        if self.part != "down":
            weight = weight[:, :f] if self.part == "gate" else weight[:, f:]
        return weight.swapaxes(1, 2)

    def write(self, array: np.ndarray, i: int) -> dict[str, np.ndarray]:
        rule = Linear((self._per_expert(),))
        out = {}
        for e in range(array.shape[0]):
            out.update(rule.write(array[e], i=i, e=e))
        return out
