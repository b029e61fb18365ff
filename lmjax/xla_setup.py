"""Process-wide XLA settings, made before the backend starts: the GPU flag preset and JAX's
persistent compilation cache.

The preset (`GPU_PRESET`, after MaxText's `configs/gpu/a3/*/1vm.sh`) turns on the latency-hiding
scheduler, cuBLAS instead of Triton GEMMs, pipelined and combined collectives and while-loop
double buffering. `XLA_FLAGS` is read once, when the backend starts, so the GPU is detected from
the installed CUDA plugin and the device files, never from `jax.default_backend()` (which would
start the backend). An unknown flag aborts the process at start (on jaxlib 0.10.2,
`--xla_gpu_graph_level` and `--xla_gpu_enable_async_all_gather` do), so every flag is first
probed in a subprocess against the installed jaxlib (on its CPU backend: the flag parser is the
same), the verdicts cached per jaxlib version, and a rejected flag dropped with a warning.
A user's own `XLA_FLAGS` is never touched.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

GPU_PRESET = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",  # overlap collectives with compute
    "--xla_gpu_enable_triton_gemm=false",  # cuBLAS GEMMs
    "--xla_gpu_enable_command_buffer=",  # no CUDA-graph command buffers (MaxText: graph_level=0)
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    "--xla_disable_hlo_passes=rematerialization",
)

CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")
_PROBE = "import jax; jax.jit(lambda x: x + 1)(1).block_until_ready()"


def cuda_plugin_installed() -> bool:
    """Whether a JAX CUDA plugin distribution is installed (no import, no backend start)."""
    for name in CUDA_PLUGINS:
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def gpu_device_present() -> bool:
    """Whether an NVIDIA device file exists (/dev/nvidia0, ...)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def gpu_backend_will_start(environ=os.environ) -> bool:
    """A CUDA plugin is installed, a device is present, and JAX_PLATFORMS does not exclude it."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and not {"cuda", "gpu"} & set(platforms):
        return False
    return cuda_plugin_installed() and gpu_device_present()


def probe(flags: list[str]) -> bool:
    """Whether the installed jaxlib starts and compiles with `flags` as XLA_FLAGS (a subprocess)."""
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    try:
        return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def default_cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmjax" / "xla_flags.json"


def supported_flags(flags, cache_file: Path | None = None) -> list[str]:
    """The `flags` the installed jaxlib accepts, in order. Verdicts are cached in `cache_file`
    per jaxlib version; new flags are probed together, and one by one (concurrently) only if
    that fails."""
    cache_file = cache_file or default_cache_file()
    version = importlib.metadata.version("jaxlib")
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    verdicts = cache.setdefault(version, {})
    new = [f for f in flags if f not in verdicts]
    if new:
        if probe(new):
            verdicts.update(dict.fromkeys(new, True))
        else:
            with ThreadPoolExecutor(max_workers=8) as pool:
                verdicts.update(zip(new, pool.map(lambda flag: probe([flag]), new)))
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache, indent=1))
        except OSError as e:
            log.warning("could not cache the XLA flag probe in %s: %s", cache_file, e)
    for flag in flags:
        if not verdicts[flag]:
            log.warning("XLA flag %s is not known to jaxlib %s: left out of the GPU preset", flag, version)
    return [f for f in flags if verdicts[f]]


def apply_gpu_preset(environ=os.environ, cache_file: Path | None = None) -> list[str]:
    """Set XLA_FLAGS to the supported part of `GPU_PRESET` when a GPU backend will start and
    XLA_FLAGS is unset; returns the flags set (none otherwise). Call before JAX computes anything."""
    if "XLA_FLAGS" in environ or not gpu_backend_will_start(environ):
        return []
    flags = supported_flags(GPU_PRESET, cache_file)
    environ["XLA_FLAGS"] = " ".join(flags)
    return flags


def enable_compilation_cache(directory: str | None) -> None:
    """Turn on JAX's persistent compilation cache in `directory` (None: leave it off). JAX
    stores programs that took over `jax_persistent_cache_min_compile_time_secs` (1 s) to compile."""
    if directory is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
