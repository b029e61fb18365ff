"""Pipeline parallelism: a layer stack's stages run on microbatches at once (GPipe, and the
circular schedule with R repeats).

The stacked weights (L, ...) are sharded along `layers` over the pipeline mesh axes (the rules
table), so viewing them as (P, L/P, ...) puts stage s's layers on the devices of stage s. The
schedule is written as one program over all stages (the "vmap over stages" formulation of
GSPMD pipelining, as MaxText and Praxis do it): a state of P microbatch activations
(P, mb, T, D), sharded like the stages, goes through `jax.vmap(stage)` (`spmd_axis_name`: the
stage dimension stays on its devices, every other sharding constraint inside applies per stage),
then shifts by one stage (a collective permute between neighbours) while stage 0 takes the next
microbatch. After M R + P - 1 iterations every microbatch has passed every stage R times; each
microbatch's last pass through the last stage is the stack's output for its rows. The backward
pass is autodiff of that loop: all forwards, then all backwards (GPipe). Stages of an idle
iteration (the bubble: P - 1 iterations' worth) compute on zeros, and their results reach no
output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmjax.axis_rules import constrain


def to_microbatches(a, microbatches: int):
    """(B, ...) -> (M, B / M, ...): microbatch m holds rows m, M + m, 2M + m, ..., so that with
    rows split over data-parallel devices in blocks (B / devices a multiple of M), every microbatch
    is split over the same devices."""
    return jnp.swapaxes(a.reshape(a.shape[0] // microbatches, microbatches, *a.shape[1:]), 0, 1)


def from_microbatches(a):
    """(M, B / M, ...) -> (B, ...), the inverse of `to_microbatches`."""
    return jnp.swapaxes(a, 0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def circular_stages(a, stages: int, repeats: int):
    """Stacked weights (L_kind, ...) -> (P, R, L_kind / (P R), ...): chunk c = r P + s of the layer
    stack (layers [c L/(P R), (c+1) L/(P R))) runs on stage s in repeat r. With R = 1 this is a
    reshape that keeps each stage's layers on its devices; with R > 1 it moves the weights between
    the stages (an all-to-all over the pipeline axes, every step; see docs/launch.md)."""
    chunked = a.reshape(repeats, stages, a.shape[0] // (stages * repeats), *a.shape[1:])
    return constrain(jnp.swapaxes(chunked, 0, 1), ("layers", *(None,) * (chunked.ndim - 1)))


def run_pipeline(stage_fn, stage_weights, x, side, stages: int, microbatches: int, repeats: int,
                 stage_axes: tuple[str, ...]):
    """`stage_fn` over `stages` stages, `repeats` times round, on `microbatches` microbatches.

    stage_fn(weights, h, side, microbatch, stage, repeat) -> (h, aux): one stage's chunk of layers;
    weights one (stage, repeat)'s slice of `stage_weights` (every leaf (P, R, ...), as
    `circular_stages` makes them), h (mb, T, D) a microbatch's activations, side that microbatch's
    slice of `side` (a pytree of (B, ...) arrays, such as positions and masks), microbatch, stage and
    repeat int32 scalars. x (B, T, D) -> (y (B, T, D), aux summed over microbatches, every leaf
    (P, R, ...)); idle stages' aux is left out. `stage_axes`: the mesh axes of the stages.

    Iteration t (of M R + P - 1) has stage s on step k = t - s of its M R, microbatch k mod M in
    repeat k div M. Stage 0 takes a fresh microbatch in the first M iterations and afterwards the
    microbatch's last-stage output of the repeat before, which `outputs` holds (M >= P: it is
    there by then). With R = 1 this is GPipe.
    """
    state_axes = ("layers", "batch", "activation_length", None)  # (P, mb, T, D), as the blocks constrain h
    inputs = constrain(to_microbatches(x, microbatches), (None, *state_axes[1:]))  # (M, mb, T, D)
    side = jax.tree.map(lambda a: to_microbatches(a, microbatches), side)
    steps = microbatches * repeats
    stage_index = jnp.arange(stages)

    def run_stage(weights, h, side, microbatch, stage, repeat):
        return stage_fn(jax.tree.map(lambda w: w[repeat], weights), h, side, microbatch, stage, repeat)

    run_stages = jax.vmap(run_stage, spmd_axis_name=stage_axes)

    def iteration(carry, t):
        state, outputs, aux_sum = carry
        first = t % microbatches
        entering = jnp.where(t < microbatches, inputs[first], outputs[first])
        shifted = jnp.roll(state, 1, axis=0).at[0].set(jnp.where(t < steps, entering, jnp.zeros_like(entering)))
        step = t - stage_index  # each stage's step of its M R
        valid = (step >= 0) & (step < steps)
        step = jnp.clip(step, 0, steps - 1)
        microbatch, repeat = step % microbatches, step // microbatches
        stage_side = jax.tree.map(lambda a: a[microbatch], side)  # (P, mb, ...)
        state, aux = run_stages(stage_weights, constrain(shifted, state_axes), stage_side, microbatch, stage_index,
                                repeat)
        state = constrain(state, state_axes)
        outputs = outputs.at[microbatch[-1]].set(jnp.where(valid[-1], state[-1], outputs[microbatch[-1]]))
        here = valid[:, None] & (repeat[:, None] == jnp.arange(repeats))  # (P, R)
        aux_sum = jax.tree.map(lambda total, a: total + jnp.where(here.reshape(*here.shape, *(1,) * (a.ndim - 1)),
                                                                  a[:, None], 0), aux_sum, aux)
        return (state, outputs, aux_sum), None

    zeros = jnp.zeros((stages, *inputs.shape[1:]), x.dtype)
    scalars = jnp.zeros((stages,), jnp.int32)
    aux_shape = jax.eval_shape(run_stages, stage_weights, zeros, jax.tree.map(lambda a: a[scalars], side), scalars,
                               scalars, scalars)[1]
    init = (constrain(zeros, state_axes), constrain(jnp.zeros_like(inputs), (None, *state_axes[1:])),
            jax.tree.map(lambda a: jnp.zeros((stages, repeats, *a.shape[1:]), a.dtype), aux_shape))
    (_, outputs, aux_sum), _ = jax.lax.scan(iteration, init, jnp.arange(steps + stages - 1))
    return from_microbatches(outputs), aux_sum
