"""lmjax vs a PyTorch peer (a nanoGPT-style GPT in eager PyTorch), side by side.

    pip install torch && python bench/vs_pytorch.py [--rounds 5] [--steps 10]

Both train the same shape (gpt_small_bench: 4 layers, 4 heads, d_model 128, seq 64, batch
12, vocab 65, learned positions, LayerNorm, GELU MLP 4x, tied embeddings, AdamW) on the
same random tokens, in alternating rounds within one process so that both see the same
machine state. Prints each one's median step time and the ratio lmjax / PyTorch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from train_step import StepRunner


class TorchBlock(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d: int, n_layers: int, n_heads: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(TorchBlock(d, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d, bias=False)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln(x) @ self.tok.weight.T
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def torch_step_times(cfg, vocab: int, steps: int, model=None, optimizer=None):
    m = cfg.model
    if model is None:
        model = TorchGPT(vocab, cfg.data.seq_len, m.d_model, m.n_layers, m.n_heads)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, vocab, (cfg.train.batch_size, cfg.data.seq_len + 1))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times, model, optimizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    runner = StepRunner("gpt_small_bench", [], vocab=65)
    cfg = runner.cfg
    torch_times, model, optimizer = torch_step_times(cfg, 65, 3)  # warm up
    jax_times = []
    torch_times = []
    for _ in range(args.rounds):
        jax_times += runner.step_times(args.steps)
        more, model, optimizer = torch_step_times(cfg, 65, args.steps, model, optimizer)
        torch_times += more
    jax_ms, torch_ms = statistics.median(jax_times) * 1e3, statistics.median(torch_times) * 1e3
    tokens = cfg.train.batch_size * cfg.data.seq_len
    print(json.dumps({
        "shape": "4L 4H d128 T64 B12 V65", "lmjax_step_ms": round(jax_ms, 2), "pytorch_step_ms": round(torch_ms, 2),
        "ratio_lmjax_over_pytorch": round(jax_ms / torch_ms, 3), "lmjax_mfu": round(runner.mfu(jax_ms / 1e3), 4),
        "pytorch_mfu": round(runner.mfu(torch_ms / 1e3), 4), "tokens_per_step": tokens,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
