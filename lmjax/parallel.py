"""Device mesh and the one table that maps the model's logical axis names to mesh axes.

The model names axes by meaning (`batch`, `embed`, `heads`, ...); which mesh axis shards
each one is decided here alone, so changing the parallelism never touches model code.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmjax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes that shard it (None: replicated).
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # data parallelism: each replica sees its own rows
    "embed": ("fsdp",),  # FSDP: weights and Adam moments split along the model width
    "heads": ("tensor",),  # tensor parallelism: attention heads split across devices
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),  # tensor parallelism: MLP hidden units split across devices
    "vocab": ("tensor",),  # output logits split by vocabulary
    "expert": ("expert",),  # expert parallelism
    "head_dim": None,
    "length": None,
    "layers": None,  # scanned layer axis stays whole on every device
}


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with axes MESH_AXES, sized by `cfg`.

    One axis may be -1 to take whatever the others leave; the product must equal the
    device count.
    """
    devices = jax.devices() if devices is None else devices
    sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.expert]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise ConfigError(f"mesh axes {dict(zip(MESH_AXES, sizes))} do not divide the {len(devices)} devices.")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                          f"but {len(devices)} are available; make the product of mesh axes equal the device count.")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_mesh(logical_axes: tuple[str | None, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names.

    Mesh axes of size 1 are dropped, and a mesh axis is used at most once per array.
    """
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        axes = tuple(a for a in (LOGICAL_AXIS_RULES.get(name) or ()) if mesh.shape[a] > 1 and a not in used)
        used.update(axes)
        spec.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for an nnx.State whose Variables carry `out_sharding` logical names."""

    def sharding_of(x):
        names = getattr(x, "out_sharding", None) or (None,) * len(x.shape)
        return x.replace(NamedSharding(mesh, logical_to_mesh(tuple(names), mesh)))

    return jax.tree.map(sharding_of, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a (batch, length) array: rows split over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_mesh(("batch", "length"), mesh))
