"""Device mesh, shardings of state and batches, and multi-host start-up.

The model names axes by meaning (`batch`, `embed`, `heads`, ...); which mesh axis shards
each one is decided by the rules table in `lmjax.axis_rules` alone, so changing the
parallelism never touches model code.
"""

from __future__ import annotations

import math
import os
import socket
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding

from lmjax.axis_rules import logical_to_mesh, mesh_axes
from lmjax.config import DCN_AXES, MESH_AXES, Config, ConfigError, MeshConfig


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with axes MESH_AXES, sized by `cfg`.

    One axis may be -1 to take whatever the others leave; the product must equal the
    device count. With `dcn_<axis>` > 1 (DCN_AXES) the devices are arranged so that only
    those factors of the pipeline/data/fsdp axes cross hosts (or TPU slices).
    """
    devices = jax.devices() if devices is None else devices
    sizes = mesh_axis_sizes(cfg, len(devices))
    dcn = list(cfg.dcn_sizes().values())
    if math.prod(dcn) == 1:
        return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)
    return Mesh(_hybrid_device_array(sizes, dcn, devices), MESH_AXES)


def mesh_axis_sizes(cfg: MeshConfig, n_devices: int) -> list[int]:
    """The sizes of MESH_AXES over `n_devices`, the -1 axis filled; ConfigError when they do
    not multiply to the device count."""
    sizes = list(cfg.axis_sizes(n_devices).values())
    if -1 in cfg.axis_sizes().values() and n_devices % math.prod(s for s in cfg.axis_sizes().values() if s != -1):
        raise ConfigError(f"mesh axes {cfg.axis_sizes()} do not divide the {n_devices} devices.")
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                          f"but {n_devices} are available; make the product of mesh axes equal the device count.")
    return sizes


def check_dcn(sizes: list[int], dcn: list[int], granules: int, unit: str) -> None:
    """ConfigError unless the `dcn` factors (one per axis of MESH_AXES) divide the mesh axis
    `sizes` and multiply to the number of `granules` (nodes or TPU slices) the devices span."""
    for name, size, across in zip(MESH_AXES, sizes, dcn):
        if size % across:
            raise ConfigError(f"mesh.dcn_{name}={across} does not divide mesh.{name}={size}.")
    if math.prod(dcn) != granules:
        product = " x ".join(f"mesh.dcn_{a}" for a in DCN_AXES)
        raise ConfigError(f"{product} = {math.prod(dcn)}, but the devices span {granules} "
                          f"{unit}; make the product equal that number.")


def _hybrid_device_array(sizes: list[int], dcn: list[int], devices) -> np.ndarray:
    """Devices arranged so that only the `dcn` factors of each axis cross the slow network.
    Its units ("granules") are TPU slices, or for GPUs and CPUs nodes: the SLURM node of each
    process (SLURM_NODEID) under SLURM, whether it runs one process per GPU or per node, and
    otherwise each process (one per host)."""
    tpu = devices[0].platform == "tpu"
    granules = _granules(devices, tpu)
    check_dcn(sizes, dcn, len(granules), "TPU slices" if tpu else "nodes")
    within = [s // d for s, d in zip(sizes, dcn)]
    blocks = np.empty(len(granules), dtype=object)
    blocks[:] = [mesh_utils.create_device_mesh(within, granule) for granule in granules]
    return np.block(blocks.reshape(dcn).tolist())


def _granules(devices, tpu: bool) -> list[list]:
    """The devices grouped by TPU slice, or by node (see `_hybrid_device_array`), in key order."""
    if tpu:
        key = {d: d.slice_index for d in devices}
    else:
        node_of_process = node_of_each_process()
        key = {d: node_of_process[d.process_index] for d in devices}
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(key[d], []).append(d)
    return [groups[k] for k in sorted(groups)]


def node_of_each_process() -> list[int]:
    """For each process index, the node it runs on: SLURM_NODEID under SLURM, else the
    process index itself. Every process must call this (it gathers across processes)."""
    own = int(os.environ.get("SLURM_NODEID", jax.process_index()))
    if jax.process_count() == 1:
        return [own]
    return [int(n) for n in multihost_utils.process_allgather(np.int32(own))]


def _splitting(logical_axes: tuple[str | None, ...], dim: int, mesh: Mesh) -> tuple[int, str]:
    """How many devices split dimension `dim` of an array with these logical axes under the
    rules, and how to name them in an error ("mesh.tensor=4", "mesh.data x mesh.fsdp=4")."""
    axes = mesh_axes(logical_axes, mesh)[dim]
    size = math.prod(mesh.shape[a] for a in axes)
    return size, f"{' x '.join(f'mesh.{a}' for a in axes)}={size}"


def validate_layout(cfg: Config, mesh: Mesh) -> None:
    """Raise ConfigError when the model or batch does not split evenly over `mesh`, with the
    mesh axes that split each dimension taken from the logical-axis rules."""
    m = cfg.model
    checks = [(("embed", "heads", "head_dim"), 1, "model.n_heads", m.n_heads),
              (("embed", "kv_heads", "head_dim"), 1, "model.n_kv_heads", m.kv_heads),
              (("embed", "mlp"), 1, "model.d_ff", m.d_ff), (("vocab", "embed"), 0, "model.vocab_size", m.vocab_size),
              (("vocab", "embed"), 1, "model.d_model", m.d_model)]
    if m.moe.enabled:
        fine = " / model.moe.granularity" if m.moe.granularity > 1 else ""
        checks += [(("expert", "embed", "mlp"), 0, "model.moe.n_experts" + (" * model.moe.granularity" if fine else ""),
                    m.moe.n_routed_experts),
                   (("expert", "embed", "mlp"), 2, ("model.moe.d_ff" if m.moe.d_ff else "model.d_ff") + fine,
                    m.expert_d_ff)]
    for logical_axes, dim, name, size in checks:
        devices, named = _splitting(logical_axes, dim, mesh)
        if size % devices:
            raise ConfigError(f"{named} does not divide {name}={size}; pick mesh sizes that split it evenly "
                              "(each device must hold an equal share).")
    micro_batch = cfg.train.batch_size // cfg.optim.grad_accum_steps
    devices, named = _splitting(("batch", "activation_length"), 0, mesh)
    if micro_batch % devices:
        raise ConfigError(f"the batch of {micro_batch} sequences per micro-step (train.batch_size / "
                          f"optim.grad_accum_steps) does not split over the {devices} data-parallel devices "
                          f"({named}); make it a multiple.")
    _validate_pipeline(cfg, mesh, micro_batch // devices)
    _check_context(cfg, mesh)


def pipeline_stages(mesh: Mesh) -> int:
    """How many pipeline stages `mesh` splits the layer stack into: the product of the mesh axes
    that shard the `layers` logical axis (1: no pipeline)."""
    return _splitting(("layers",), 0, mesh)[0]


def pipeline_note(cfg: Config, mesh: Mesh) -> str:
    """"pipeline P stages x M microbatches (x R repeats), bubble B%" for the run header; "" without stages."""
    stages = pipeline_stages(mesh)
    if stages == 1:
        return ""
    repeats = f" x {cfg.mesh.pipeline_repeats} repeats" if cfg.mesh.pipeline_repeats > 1 else ""
    return (f"pipeline {stages} stages x {cfg.mesh.microbatches(stages)} microbatches{repeats}, bubble "
            f"{cfg.mesh.bubble_fraction(stages):.1%}")


def _validate_pipeline(cfg: Config, mesh: Mesh, rows_per_device: int) -> None:
    """ConfigError when the pipeline stages (the mesh axes of the `layers` logical axis) cannot
    run the layer stack with cfg.mesh's microbatches and repeats; `rows_per_device`: sequences of
    one micro-step on each data-parallel device."""
    stages, named = _splitting(("layers",), 0, mesh)
    if stages == 1:
        return
    m, repeats = cfg.model, cfg.mesh.pipeline_repeats
    microbatches = cfg.mesh.microbatches(stages)
    for name, layers in m.stack_layers.items():  # each stack runs in the same stages
        if layers % (stages * repeats * m.layer_cycle):
            cycle = f" of whole cycles of {m.layer_cycle} blocks (model.moe.every, model.global_every)" * (
                m.layer_cycle > 1)
            raise ConfigError(f"{name}={layers} does not split into {named} x mesh.pipeline_repeats={repeats} "
                              f"stages{cycle}; pick sizes whose product divides it.")
    if microbatches < stages:
        raise ConfigError(f"mesh.pipeline_microbatches={microbatches} is fewer than the {stages} stages ({named}): "
                          "stages would idle most of the step; use at least as many microbatches as stages.")
    if repeats > 1 and microbatches % stages:
        raise ConfigError(f"the circular schedule (mesh.pipeline_repeats={repeats}) sends microbatches round the "
                          f"stages in groups of {stages}; make mesh.pipeline_microbatches={microbatches} a "
                          f"multiple of {named}.")
    if rows_per_device % microbatches:
        raise ConfigError(f"the {rows_per_device} sequences per data-parallel device of each micro-step (train."
                          f"batch_size / (optim.grad_accum_steps x data-parallel devices)) do not split into "
                          f"mesh.pipeline_microbatches={microbatches}; make train.batch_size a multiple of "
                          "grad_accum_steps x microbatches x data-parallel devices.")


def _check_context(cfg: Config, mesh: Mesh) -> None:
    """ConfigError when the sequence is split over devices (context parallelism) in a way lmjax
    cannot run: a sequence that does not split into 2 x shards equal chunks (the load-balanced
    order), or, on a concrete mesh, a process that would hold only part of its rows' positions."""
    shards, named = _splitting(("batch", "activation_length"), 1, mesh)
    if shards == 1:
        return
    if cfg.data.seq_len % (2 * shards):
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} does not split into 2 x {shards} equal chunks for "
                          f"context parallelism ({named}); make it a multiple of {2 * shards}.")
    targets = cfg.targets_length  # an encoder-decoder's, split over the same devices
    if targets % (2 * shards):
        raise ConfigError(f"the {targets} target positions of each example (span corruption of data.seq_len="
                          f"{cfg.data.seq_len}) do not split into 2 x {shards} equal chunks for context parallelism "
                          f"({named}); pick a data.seq_len whose targets do.")
    if isinstance(mesh, Mesh) and len(_own_columns(mesh, 2 * shards)) < 2 * shards:
        raise ConfigError(f"context parallelism ({named}) spans processes; keep mesh.context within one "
                          "host's devices (put the other factors on mesh.data or mesh.fsdp).")


def local_batch_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """The rows of each global (batch_size, ...) batch that this process must load, in
    ascending order: the union of the blocks its devices hold under `batch_sharding(mesh)`.
    On a hybrid mesh they need not be one contiguous block."""
    by_rows = NamedSharding(mesh, logical_to_mesh(("batch",), mesh))
    blocks = by_rows.addressable_devices_indices_map((batch_size,)).values()
    return np.unique(np.concatenate([np.arange(batch_size)[b[0]] for b in blocks]))


def _own_columns(mesh: Mesh, length: int) -> np.ndarray:
    """The sequence positions (of `length`) that this process's devices hold under `batch_sharding`."""
    blocks = batch_sharding(mesh).addressable_devices_indices_map((mesh.size, length)).values()
    return np.unique(np.concatenate([np.arange(length)[b[1]] for b in blocks]))


def load_balanced_order(length: int, shards: int) -> np.ndarray:
    """The order (length,) in which a sequence split over `shards` devices is laid out so that each
    holds an equal share of a causal mask's triangle (MaxText's load-balanced context parallelism):
    cut into 2 x shards chunks, device i holds chunks i and 2 x shards - 1 - i. Entry j is the
    original index of the token at index j; `length` must be a multiple of 2 x shards."""
    chunks = np.arange(length).reshape(2 * shards, length // (2 * shards))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])


def sequence_order(mesh: Mesh, length: int) -> np.ndarray | None:
    """The order `global_batch` lays out sequences of `length` in under `mesh`
    (`load_balanced_order` over the devices that split `activation_length`), or None when the
    sequence is not split (natural order)."""
    shards, _ = _splitting(("batch", "activation_length"), 1, mesh)
    return load_balanced_order(length, shards) if shards > 1 else None


def natural_order(per_token: np.ndarray, mesh: Mesh) -> np.ndarray:
    """Per-token values (B, T, ...) of a batch laid out by `global_batch` under `mesh`, gathered to
    the host, put back in each row's natural order (`sequence_order` undone)."""
    order = sequence_order(mesh, per_token.shape[1])
    return per_token if order is None else per_token[:, np.argsort(order)]


def global_batch(local: dict[str, np.ndarray], rows: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
    """Global (batch_size, T, ...) arrays sharded by `rows` from this process's rows of them
    (`local_batch_rows`, in that order). Under context parallelism each row's positions are
    reordered along T by `sequence_order` (every array of the batch alike: tokens, targets,
    positions, segment ids and loss mask travel together, so the loss is unchanged)."""
    out = {}
    for k, v in local.items():
        order = sequence_order(rows.mesh, v.shape[1]) if v.ndim > 1 else None
        v = v if order is None else v[:, order]
        out[k] = jax.make_array_from_process_local_data(rows, v, (batch_size, *v.shape[1:]))
    return out


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_seconds: int = 300,
                           heartbeat_timeout_seconds: int = 100) -> None:
    """Join a multi-process run: with explicit arguments, or when the environment names a
    cluster (SLURM with more than one task, a TPU VM slice, GKE/JobSet, LMJAX_DISTRIBUTED=auto
    for jax.distributed's own detection, or LMJAX_COORDINATOR with LMJAX_NUM_PROCESSES and
    LMJAX_PROCESS_ID). Does nothing for a single process. CPU processes use gloo. A process
    whose heartbeat stops for `heartbeat_timeout_seconds` is taken for dead, and JAX's
    coordination service ends the others."""
    coordinator = coordinator or os.environ.get("LMJAX_COORDINATOR")
    if coordinator:
        num_processes = num_processes or _int_env("LMJAX_NUM_PROCESSES")
        process_id = process_id if process_id is not None else _int_env("LMJAX_PROCESS_ID")
        if num_processes is None or process_id is None:
            raise ConfigError(f"--coordinator {coordinator} needs --num-processes and --process-id (or "
                              "LMJAX_NUM_PROCESSES and LMJAX_PROCESS_ID).")
        if not (num_processes >= 1 and 0 <= process_id < num_processes):
            raise ConfigError(f"--process-id {process_id} is not one of the --num-processes {num_processes} "
                              f"(0 to {num_processes - 1}).")
    elif num_processes is not None or process_id is not None:
        raise ConfigError("--num-processes and --process-id need --coordinator HOST:PORT (the address of process 0); "
                          "without it the run would be single-process.")
    elif not _cluster_environment():
        return
    if coordinator and process_id != 0:
        _wait_for_coordinator(coordinator, timeout_seconds)  # jax aborts the process instead of raising
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_seconds,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return None if value is None else int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer.") from None


def process_0_text(text: str, max_bytes: int = 4096) -> str:
    """`text` as process 0 has it, on every process (all must call this, after
    `initialize_distributed`); `text` itself in a single-process run."""
    if jax.process_count() == 1:
        return text
    encoded = text.encode()
    if len(encoded) > max_bytes:
        raise ConfigError(f"{text[:40]}... is longer than {max_bytes} bytes.")
    buffer = np.zeros(max_bytes, np.uint8)
    buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).rstrip(b"\0").decode()


def _wait_for_coordinator(address: str, timeout_seconds: int) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError(f"could not join the multi-process run at coordinator {address} within "
                                  f"{timeout_seconds} s; check that process 0 is running and the address is "
                                  "reachable.") from None
            time.sleep(0.2)


def _cluster_environment() -> bool:
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    jobset = "JOBSET_NAME" in env or "MEGASCALE_COORDINATOR_ADDRESS" in env
    return slurm or tpu_pod or jobset or env.get("LMJAX_DISTRIBUTED") == "auto"


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for an nnx.State whose Variables carry `out_sharding` logical names."""

    def sharding_of(x):
        names = getattr(x, "out_sharding", None) or (None,) * len(x.shape)
        return x.replace(NamedSharding(mesh, logical_to_mesh(tuple(names), mesh)))

    return jax.tree.map(sharding_of, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a (batch, length) array: rows split over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_mesh(("batch", "activation_length"), mesh))
