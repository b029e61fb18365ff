"""The train state pytree and its creation directly in its sharded layout."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmjax.config import ModelConfig
from lmjax.families import family_of
from lmjax.parallel import state_shardings
from lmjax.train.guard import GuardState, init_guard
from lmjax.train.transforms import WeightTransform, adapter_of, wrap_model


class TrainState(NamedTuple):
    """Everything a training step reads and writes; checkpointed whole.

    params: nnx.State of the model's variables: its trained weights (`nnx.Param`) and the
    MoE routers' selection biases (`RouterBias`, moved by the balancing rule, not by the
    optimizer), or for an adapting run (LoRA) the adapter's alone
    (`lmjax.train.transforms.Adapter`); opt_state: optax state (Adam moments mirror the
    `nnx.Param`s of params alone, see `split_trainable`); step: int32
    scalar, steps taken (bad steps that were skipped included); rng: PRNG key for dropout; guard:
    the bad-step judgment's recent losses and counters (`lmjax.train.guard`; None: no judgment,
    as in checkpoints written before it existed).
    """

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array
    guard: GuardState | None = None


def split_trainable(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(the `nnx.Param`s of `params`, every other variable): the first is what gradients, the
    optimizer, weight decay, µP multipliers and master weights see; the second (router biases)
    is kept beside it. `nnx.merge_state` joins them again."""
    return nnx.split_state(params, nnx.Param, ...)


def abstract_model(cfg: ModelConfig, transforms: tuple[WeightTransform, ...] = ()) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract params) of the model of cfg.family, without allocating any weights.
    The graphdef is of the model each transform wraps (`WeightTransform.wrap_model`: QAT runs
    it under qwix's QtProvider); the params are the same."""
    return nnx.split(nnx.eval_shape(lambda: wrap_model(family_of(cfg).build(cfg, nnx.Rngs(0)), transforms)))


def trainable_fn(cfg: ModelConfig, transforms: tuple[WeightTransform, ...] = ()):
    """(graphdef, build(seed) -> the params a run trains): the model's, or with an adapting
    transform (LoRA) that transform's own (`Adapter.init_trainable`; the model's are frozen)."""
    graphdef, abstract_params = abstract_model(cfg, transforms)
    adapter = adapter_of(transforms)
    if adapter is not None:
        def build(seed):
            return adapter.init_trainable(abstract_params, seed)
    else:
        def build(seed):
            return nnx.state(family_of(cfg).build(cfg, nnx.Rngs(seed)))
    return graphdef, build


def _init_fn(cfg: ModelConfig, make_optimizer, transforms: tuple[WeightTransform, ...] = ()):
    """(graphdef, optimizer, init(seed) -> TrainState) for the params `trainable_fn` builds.

    `make_optimizer(params) -> optax.GradientTransformation` may read the params' metadata.
    """
    graphdef, build = trainable_fn(cfg, transforms)
    optimizer = make_optimizer(split_trainable(jax.eval_shape(lambda: build(0)))[0])

    def init(seed):
        params = build(seed)
        key = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
        return TrainState(params, optimizer.init(split_trainable(params)[0]), jnp.zeros((), jnp.int32), key,
                          init_guard())

    return graphdef, optimizer, init


def init_train_state(cfg: ModelConfig, make_optimizer, seed: int, mesh: Mesh,
                     transforms: tuple[WeightTransform, ...] = ()):
    """Initialise params and optimizer state inside one jit whose outputs are already
    sharded over `mesh` (no device ever holds unsharded weights); `transforms` as in `trainable_fn`.

    Returns (graphdef, state: TrainState, shardings: TrainState of NamedShardings, optimizer).
    """
    graphdef, optimizer, init = _init_fn(cfg, make_optimizer, transforms)
    shardings = train_state_shardings(jax.eval_shape(lambda: init(seed)), mesh)
    state = jax.jit(lambda: init(seed), out_shardings=shardings)()
    return graphdef, state, shardings, optimizer


def abstract_train_state(cfg: ModelConfig, make_optimizer, mesh: Mesh, transforms: tuple[WeightTransform, ...] = ()):
    """(graphdef, TrainState of jax.ShapeDtypeStruct carrying shardings over `mesh`, optimizer):
    the target a checkpoint is restored into, allocated nowhere."""
    graphdef, optimizer, init = _init_fn(cfg, make_optimizer, transforms)
    shapes = jax.eval_shape(lambda: init(0))
    shardings = train_state_shardings(shapes, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return graphdef, abstract, optimizer


def train_state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Params and Adam moments by their logical axes; scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        params=state_shardings(abstract_state.params, mesh),
        opt_state=_opt_shardings(abstract_state.opt_state, mesh),
        step=replicated,
        rng=replicated,
        guard=jax.tree.map(lambda _: replicated, abstract_state.guard),
    )


def _opt_shardings(opt_state, mesh: Mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: state_shardings(x, mesh) if isinstance(x, nnx.State) else replicated,
        opt_state,
        is_leaf=lambda x: isinstance(x, nnx.State),
    )
