import dataclasses
import os
import shutil
import tempfile

import pytest

# Compile for speed, not for fast code: the tests' programs are tiny and each is compiled once or a few
# times, so LLVM's optimisations cost far more than they save (a tiny encoder-decoder MoE run: about half
# the CPU time). Set before any JAX backend starts; subprocesses inherit it (see `xla_flags`).
_FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

from lmjax.config import Config, DataConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402

# JAX's persistent compilation cache, shared by this session's tests and the `lmjax`/python subprocesses
# they start (through the environment): many tests compile the same tiny programs. It lives in a fresh
# directory removed at the end, so every run starts cold and nothing carries over between runs. The size
# limit turns on JAX's file lock, so concurrent processes never read a half-written entry.
_CACHE = {"jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": -1,
          "jax_compilation_cache_max_size": 8 << 30}


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with `devices` CPU devices (this session's flags kept)."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


def pytest_configure(config):
    import jax

    config.lmjax_jax_cache = tempfile.mkdtemp(prefix="lmjax-test-jax-cache-")
    for name, value in {**_CACHE, "jax_compilation_cache_dir": config.lmjax_jax_cache}.items():
        os.environ[name.upper()] = str(value)
        jax.config.update(name, value)


def pytest_unconfigure(config):
    shutil.rmtree(config.lmjax_jax_cache, ignore_errors=True)


def tiny_config(run_dir, **train) -> Config:
    """A model and corpus small enough that a full run takes seconds on a laptop CPU."""
    return Config(
        name="tiny",
        model=ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        data=DataConfig(source="stdlib", seq_len=32, max_bytes=300_000, val_fraction=0.05),
        train=dataclasses.replace(
            TrainConfig(batch_size=8, steps=6, eval_every=3, eval_batches=2, log_every=1, checkpoint_every=2,
                        sample_tokens=8, run_dir=str(run_dir)),
            **train),
        log=LogConfig(wandb="off", progress_bar=False),
    )


@pytest.fixture
def tiny(tmp_path):
    return lambda **train: tiny_config(tmp_path / "run", **train)
