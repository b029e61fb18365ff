"""Bad steps, judged inside the compiled train step: a step whose loss or global gradient norm
is not finite, or whose loss is a spike, is not applied.

A spike is a loss more than `spike_sigmas` standard deviations above the mean of the losses of
the last `SPIKE_WINDOW` applied steps (judged once `spike_min_steps` of them are in), as
OLMo-core's and Levanter's skip-step optimizers judge it. The judgment reads only global
values that the step computes anyway (the mean loss, the gradient norm), so every process
makes the same choice without a host sync. The recent losses and the counters live in the train
state (`GuardState`), so a resumed run judges exactly as an uninterrupted one. The host reads the
counters at log and checkpoint steps (`lmjax.train.rollback`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmjax.config import SPIKE_WINDOW, TrainConfig


class GuardState(NamedTuple):
    """What bad-step judgment carries from step to step; int32 and float32 scalars except `losses`.

    losses: (SPIKE_WINDOW,) float32, ring buffer of the losses (nats/token) of good steps, slot
    `good % SPIKE_WINDOW` written next; good: good steps so far; bad_in_a_row: bad steps since
    the last good one; most_in_a_row: the longest such run since the start (or the last roll-back);
    skipped: bad steps whose update was not applied.
    """

    losses: jax.Array
    good: jax.Array
    bad_in_a_row: jax.Array
    most_in_a_row: jax.Array
    skipped: jax.Array


def init_guard() -> GuardState:
    """The judgment's state before the first step (each counter its own array: the step donates them)."""
    return GuardState(jnp.zeros((SPIKE_WINDOW,), jnp.float32), *(jnp.zeros((), jnp.int32) for _ in range(4)))


@dataclass(frozen=True)
class BadStepRule:
    """How a step is judged (train.skip_bad_steps, train.spike_sigmas, train.spike_min_steps):
    `skip` False still judges and counts bad steps, but applies them."""

    skip: bool = True
    spike_sigmas: float | None = 6.0
    spike_min_steps: int = 50

    @classmethod
    def from_config(cls, train: TrainConfig) -> BadStepRule:
        return cls(train.skip_bad_steps, train.spike_sigmas, train.spike_min_steps)

    def is_spike(self, guard: GuardState, loss: jax.Array) -> jax.Array:
        """True when `loss` lies more than spike_sigmas standard deviations (population) above the
        mean of the recent good losses, and at least spike_min_steps of them are in."""
        if self.spike_sigmas is None:
            return jnp.zeros((), bool)
        count = jnp.minimum(guard.good, SPIKE_WINDOW)
        kept = jnp.arange(SPIKE_WINDOW) < count
        n = jnp.maximum(count, 1).astype(jnp.float32)
        mean = jnp.sum(jnp.where(kept, guard.losses, 0.0)) / n
        std = jnp.sqrt(jnp.sum(jnp.where(kept, (guard.losses - mean) ** 2, 0.0)) / n)
        return (count >= self.spike_min_steps) & (loss > mean + self.spike_sigmas * std)

    def judge(self, guard: GuardState, loss: jax.Array, grad_norm: jax.Array) -> tuple[jax.Array, GuardState]:
        """(apply: bool scalar, the guard after this step) for a step of mean `loss` and global
        gradient norm `grad_norm` (float32 scalars)."""
        good = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        good = good & ~self.is_spike(guard, loss)
        losses = jnp.where(good, guard.losses.at[guard.good % SPIKE_WINDOW].set(loss.astype(jnp.float32)),
                           guard.losses)
        in_a_row = jnp.where(good, 0, guard.bad_in_a_row + 1)
        skip = ~good if self.skip else jnp.zeros((), bool)
        new = GuardState(losses, guard.good + good, in_a_row, jnp.maximum(guard.most_in_a_row, in_a_row),
                         guard.skipped + skip)
        return ~skip, new


def apply_if_good(rule: BadStepRule, guard: GuardState, loss, grad_norm, updated, current):
    """(`updated` if the step is applied else `current` (two pytrees of one structure: params and
    optimizer state), the guard after the step, metrics {skipped_steps, bad_steps_in_a_row}).

    A step that is applied returns `updated` unchanged, bit for bit."""
    apply, guard = rule.judge(guard, loss, grad_norm)
    kept = jax.tree.map(lambda new, old: jnp.where(apply, new, old), updated, current)
    return kept, guard, {"skipped_steps": guard.skipped, "bad_steps_in_a_row": guard.bad_in_a_row}
