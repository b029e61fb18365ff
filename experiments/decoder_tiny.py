"""The default job: a 3.3M-parameter LLaMA-style decoder on the Python stdlib, ~4 CPU minutes."""

from lmjax.config import Config, DataConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="decoder_tiny",
        model=ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=704, mlp="swiglu", max_seq_len=256,
                          scan_layers=False),  # unrolled: faster than a scan at this depth on CPU
        optim=OptimConfig(lr=3e-3, warmup_steps=50, schedule="cosine"),
        data=DataConfig(source="stdlib", seq_len=128, max_bytes=8_000_000),
        train=TrainConfig(batch_size=16, steps=450, eval_every=75, eval_batches=16, checkpoint_every=150),
        log=LogConfig(wandb="offline"),
    )
