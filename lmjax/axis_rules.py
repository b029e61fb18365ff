"""The one table that maps the model's logical axis names to mesh axes, and what models use
of it: a leaf module (it imports nothing from lmjax), so models may import it.

The model names axes by meaning (`batch`, `embed`, `heads`, ...); which mesh axis shards
each one is decided here alone (MaxText's `logical_axis_rules`, T5X's
`standard_logical_axis_rules`), so changing the parallelism never touches model code. The
mesh axes themselves (`lmjax.config.MESH_AXES`) are made by `lmjax.parallel`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import NamedTuple

import jax
from jax.sharding import Mesh, PartitionSpec

# logical axis -> mesh axes that shard it (None: replicated).
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # data parallelism: each replica sees its own rows
    "embed": ("fsdp",),  # FSDP: weights and Adam moments split along the model width
    "heads": ("tensor",),  # tensor parallelism: attention heads split across devices
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),  # tensor parallelism: MLP hidden units split across devices
    "vocab": ("tensor",),  # output logits split by vocabulary
    "expert": ("expert",),  # expert parallelism: each device holds E / expert of the experts
    "expert_batch": ("data", "fsdp"),  # rows of the expert inputs (E, B, C, D): batch without the expert axis
    "head_dim": None,
    "activation_length": ("context",),  # context parallelism: activations' sequence positions (B, T, ...) split
    "activation_kv_length": None,  # the keys and values attention reads: whole (all-gathered over `context`)
    "length": None,  # the learned position table's rows (max_seq_len): tiny, replicated
    "relative_buckets": None,  # T5 relative position bias table: tiny, replicated
    "layers": ("pipeline",),  # pipeline parallelism: stage s holds layers [s L/P, (s+1) L/P) of each stack
    "lora_rank": None,  # LoRA adapters' rank: a few columns, never split
}


def mesh_axes(logical_axes: tuple[str | None, ...], mesh: Mesh) -> tuple[tuple[str, ...], ...]:
    """For each dimension of an array with these logical names, the mesh axes that shard it
    under `mesh`, in the rules' order. Mesh axes of size 1 are dropped, and a mesh axis is
    used at most once per array. A `shard_map` body passes these to its collectives
    (as Levanter derives `pspec_for_axis` from its axis mapping)."""
    used: set[str] = set()
    out = []
    for name in logical_axes:
        axes = tuple(a for a in (LOGICAL_AXIS_RULES.get(name) or ()) if mesh.shape.get(a, 1) > 1 and a not in used)
        used.update(axes)
        out.append(axes)
    return tuple(out)


def logical_to_mesh(logical_axes: tuple[str | None, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names (`mesh_axes`)."""
    return PartitionSpec(*(axes if len(axes) > 1 else (axes[0] if axes else None)
                           for axes in mesh_axes(logical_axes, mesh)))


def constrain(x, logical_axes: tuple[str | None, ...]):
    """Pin activation x's sharding by logical axis names under the current mesh
    (`jax.set_mesh`); a no-op outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(logical_axes, mesh))


def sequence_shards() -> int:
    """How many devices split activations' sequence positions (`activation_length`) under the
    current mesh (`jax.set_mesh`): 1 outside one, or without context parallelism."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[a] for a in mesh_axes(("activation_length",), mesh)[0])


class PipelineLayout(NamedTuple):
    """How the current mesh and schedule run a layer stack in stages: `stage_axes`, the mesh axes
    of the `layers` logical axis; P `stages` (their product); M `microbatches`; R `repeats`."""

    stage_axes: tuple[str, ...]
    stages: int
    microbatches: int
    repeats: int


_SCHEDULE = contextvars.ContextVar("lmjax_pipeline_schedule", default=(None, 1))


@contextlib.contextmanager
def pipeline_schedule(microbatches: int | None, repeats: int = 1):
    """Within it, a pipelined layer stack cuts its batch into `microbatches` (None: as many as
    stages) and runs `repeats` virtual stages per device; the trainer sets it from cfg.mesh
    around tracing, as it sets the mesh."""
    token = _SCHEDULE.set((microbatches, repeats))
    try:
        yield
    finally:
        _SCHEDULE.reset(token)


def pipeline_layout() -> PipelineLayout | None:
    """The PipelineLayout under the current mesh (`jax.set_mesh`) and `pipeline_schedule`, or None
    when no mesh axis splits the `layers` axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = mesh_axes(("layers",), mesh)[0]
    stages = math.prod(mesh.shape[a] for a in axes)
    if stages == 1:
        return None
    microbatches, repeats = _SCHEDULE.get()
    return PipelineLayout(axes, stages, microbatches or stages, repeats)
