"""LLaMA-2-7B's published shape (Touvron et al. 2023, Table 1 and model card): 6,738,415,616 weights.

32 layers, d_model 4096, 32 heads of 128, SwiGLU d_ff 11008, vocabulary 32000, untied head,
RMSNorm epsilon 1e-5, context 4096, RoPE theta 10000; trained on 2T tokens in batches of 4M
tokens (1024 sequences of 4096) with AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1, 2000
warmup steps, cosine to 10%, clip 1.0). For `lmjax plan llama2_7b`; training it needs a
SentencePiece tokenizer of 32000 ids (data.tokenizer) and a cluster.
"""

from lmjax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="llama2_7b",
        model=ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                          tie_embeddings=False, max_seq_len=4096, dtype="bfloat16"),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0),
        data=DataConfig(seq_len=4096),
        train=TrainConfig(batch_size=1024, tokens=2 * 10**12),
    )
