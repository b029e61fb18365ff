"""Throughput and model-FLOPs utilisation (MFU).

MFU = model FLOPs per second / (peak FLOP/s per device x devices), with model FLOPs from
`lmjax.scaling.counting.train_flops_per_token`. Peaks are the vendors' dense numbers for
known accelerators (`lmjax.hardware.PEAK_FLOPS`); for a CPU, the peak is measured once by a
float32 matmul probe.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from lmjax.hardware import PEAK_FLOPS


@functools.cache
def measured_matmul_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of one (size x size) @ (size x size) matmul on device 0."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(dtype: str, device=None) -> float:
    """Peak FLOP/s of one device for matmuls in `dtype` (table, else a measured probe)."""
    device = device or jax.devices()[0]
    kind = device.device_kind
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_FLOPS[name][dtype]
    return measured_matmul_flops(dtype)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_total: float) -> float:
    """Model-FLOPs utilisation in [0, 1]."""
    return tokens_per_second * flops_per_token / peak_flops_total
