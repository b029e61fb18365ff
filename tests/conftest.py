import dataclasses

import pytest

from lmjax.config import Config, DataConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig


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
