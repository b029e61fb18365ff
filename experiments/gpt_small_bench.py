"""nanoGPT's CPU shape (4 layers, 4 heads, d_model 128, seq 64, batch 12): the benchmark peer."""

from lmjax.config import Config, DataConfig, ModelConfig, TrainConfig


def config() -> Config:
    return Config(
        name="gpt_small_bench",
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512, mlp="gelu", norm="layernorm",
                          position="learned", max_seq_len=64, scan_layers=False),
        data=DataConfig(seq_len=64),
        train=TrainConfig(batch_size=12, steps=200),
    )
