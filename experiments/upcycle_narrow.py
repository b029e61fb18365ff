"""The dense model of the sparse-upcycling experiment (docs/moe.md, "Sparse upcycling").

decoder_narrow (d_model 128, 4 layers, SwiGLU d_ff 352: 0.85M parameters) trained 400 steps
of 16 x 128 bytes at a constant learning rate after warmup, so that its last checkpoint is a
mid-training one, not an annealed one. `python bench/upcycling.py OUT` trains it, upcycles it
(`lmjax upcycle`, 8 experts of the full MLP width, top-2) and trains three arms at equal total
FLOPs from there: the dense model continued, the upcycled MoE, and the same MoE from scratch.
"""

import dataclasses

from lmjax.config import Config
from lmjax.experiment import load_experiment


def config() -> Config:
    narrow = load_experiment("decoder_narrow")
    return dataclasses.replace(
        narrow, name="upcycle_narrow",
        optim=dataclasses.replace(narrow.optim, schedule="constant"),
        train=dataclasses.replace(narrow.train, steps=400, eval_every=50, eval_batches=8, checkpoint_every=500,
                                  sample_tokens=0),
    )
