"""µP's coordinate check: does the size of every activation stay the same as the model widens?

Models of widths 64 ... 512 (2 layers, head width 32, d_ff = 4 x width) train a few steps
from the same seeds on the same batch; after every step, the root-mean-square of each
block's output (`activation_rms`, sown by the block stack inside its scan) and of the logits
is recorded. Under µP each curve is flat in width: the least-squares slope of log RMS on
log width is near 0. Under the standard parametrization the updates grow with the fan-in,
so the logits' RMS grows with width. (Yang et al., Tensor Programs V, Appendix D; Microsoft
`mup`'s `get_coord_data` does the same with forward hooks.)
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.config import ModelConfig, OptimConfig
from lmjax.data.tokenizer import ByteTokenizer
from lmjax.families import family_of
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.state import TrainState
from lmjax.train.step import make_train_step

WIDTHS = (64, 128, 256, 512)
HEAD_DIM = 32
# Every base constant away from its default (ModelConfig fields), and an Adam epsilon of the size of
# the hidden matrices' gradients at width 64: the set the check is tested with (tests/test_mup.py).
OFF_DEFAULT_CONSTANTS = {"logit_multiplier": 2.0, "embedding_multiplier": 4.0, "init_std_input": 0.05,
                         "init_std_hidden": 0.03, "init_std_output": 0.01, "attention_multiplier": 0.5}
OFF_DEFAULT_EPS = 1e-4


def check_model_config(width: int, parametrization: str, base_width: int = WIDTHS[0], n_layers: int = 2,
                       seq_len: int = 32, **constants) -> ModelConfig:
    """The coordinate check's decoder of d_model `width`: `n_layers` blocks, heads of width 32
    (the head count grows with width), d_ff = 4 x width, tied embeddings, byte vocabulary;
    `constants`: base constants (ModelConfig fields, e.g. logit_multiplier=2.0)."""
    return ModelConfig(vocab_size=ByteTokenizer().vocab_size, d_model=width, n_layers=n_layers,
                       n_heads=width // HEAD_DIM, d_head=HEAD_DIM, d_ff=4 * width, max_seq_len=seq_len,
                       parametrization=parametrization, mup_base_width=base_width, **constants)


def text_batch(batch_size: int, seq_len: int) -> dict[str, jax.Array]:
    """A fixed decoder batch (B, T) of byte tokens from a standard-library source file
    (json/decoder.py): the same data for every width and seed."""
    text = (Path(json.__file__).parent / "decoder.py").read_bytes()
    tokens = np.frombuffer(text, np.uint8)[: batch_size * (seq_len + 1)]
    tokens = jnp.asarray(tokens.reshape(batch_size, seq_len + 1), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch_size, seq_len))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
            "segment_ids": jnp.ones_like(positions), "loss_mask": jnp.ones((batch_size, seq_len), jnp.float32)}


def activation_rms(model: nnx.Module, batch: dict) -> jax.Array:
    """RMS of every block's output and of the logits of one forward pass: (n_layers + 1,) float32."""
    logits = family_of(model.cfg).predict(model, batch)
    sown = nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))
    return jnp.append(sown["stack"]["activation_rms"], jnp.sqrt(jnp.mean(jnp.square(logits))))


def coordinate_check(parametrization: str, widths=WIDTHS, seeds=(0, 1, 2), steps: int = 5, lr: float = 1e-2,
                     batch_size: int = 4, seq_len: int = 32, eps: float = 1e-8, **constants) -> np.ndarray:
    """RMS (widths, steps, n_layers + 1) averaged over `seeds`: of each block's output and
    (last) of the logits, on one fixed batch, after each of `steps` AdamW steps on that batch
    (constant `lr`, Adam's `eps`, no warmup, clipping or weight decay). After updates rather than at init:
    µP's logits start at O(1 / sqrt(width)) (a readout of O(1) features by O(1) weights, times
    1 / m) and become O(1) at the first update. `constants`: base constants, as `check_model_config`."""
    return coordinate_data(parametrization, widths, seeds, steps, lr, batch_size, seq_len, eps, **constants)[0]


def coordinate_data(parametrization: str, widths=WIDTHS, seeds=(0, 1, 2), steps: int = 5, lr: float = 1e-2,
                    batch_size: int = 4, seq_len: int = 32, eps: float = 1e-8, **constants):
    """`coordinate_check`'s RMS (widths, steps, n_layers + 1), and the update sizes: {parameter
    name ("stack.blocks.attn.wq"): (widths, steps)} the RMS of each parameter's change from its
    init after each step (over all its entries, every layer's), both averaged over `seeds`. Under µP with
    Adam a hidden matrix's entries move as 1 / m (width slope -1), every other parameter's as 1."""
    optim = OptimConfig(lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=None, eps=eps)
    batch = text_batch(batch_size, seq_len)
    table, updates = [], []
    for width in widths:
        cfg = check_model_config(width, parametrization, widths[0], seq_len=seq_len, **constants)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda cfg=cfg: family_of(cfg).build(cfg, nnx.Rngs(0))))
        optimizer = make_optimizer(optim, steps, abstract, cfg)
        train_step = make_train_step(graphdef, optimizer, learning_rate_schedule(optim, steps), 1, use_rng=False)

        def measured_steps(seed, cfg=cfg, graphdef=graphdef, optimizer=optimizer, train_step=train_step):
            params = nnx.state(family_of(cfg).build(cfg, nnx.Rngs(jax.random.key(seed))))
            state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jnp.zeros((2,), jnp.uint32))

            def step(state, _):
                state = train_step(state, batch)[0]
                moved = jax.tree.map(lambda new, old: jnp.sqrt(jnp.mean(jnp.square(new - old))),
                                     nnx.to_pure_dict(state.params), nnx.to_pure_dict(params))
                return state, (activation_rms(nnx.merge(graphdef, state.params), batch), moved)

            return jax.lax.scan(step, state, length=steps)[1]

        run = jax.jit(measured_steps)
        rms, moved = zip(*(run(seed) for seed in seeds))
        table.append(np.mean(rms, axis=0))
        updates.append(jax.tree.map(lambda *per_seed: np.mean(per_seed, axis=0), *moved))
    names = [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(
        updates[0])]
    per_width = [jax.tree.leaves(u) for u in updates]
    return np.stack(table), {name: np.stack([w[i] for w in per_width]) for i, name in enumerate(names)}


def width_slopes(rms: np.ndarray, widths=WIDTHS) -> np.ndarray:
    """Least-squares slope of log RMS on log width, per step and layer: (steps, n_layers + 1)."""
    x = np.log(np.asarray(widths, float))
    y = np.log(rms).reshape(len(widths), -1)
    slopes = np.polyfit(x, y, 1)[0]
    return slopes.reshape(rms.shape[1:])


def width_exponents(rms: np.ndarray, widths=WIDTHS) -> np.ndarray:
    """Each output's width exponent, (n_layers + 1,): its `width_slopes` averaged over the
    steps. A parametrization's defect is an exponent that every step shows (the standard
    parametrization's blocks: 1.2 to 2.9 from step 1 on); one step's slope over 3 seeds also
    carries finite-width noise of about ±0.15 once the activations have grown (docs/scaling.md)."""
    return width_slopes(rms, widths).mean(axis=0)


def plot_coordinate_check(results: dict[str, np.ndarray], path, widths=WIDTHS) -> None:
    """One panel per parametrization ({name: rms}): RMS against width, a line per (layer, step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True, squeeze=False)
    for ax, (name, rms) in zip(axes[0], results.items()):
        n_steps, n_outputs = rms.shape[1:]
        colours = plt.cm.viridis(np.linspace(0, 0.9, n_steps))
        for step in range(n_steps):
            for output in range(n_outputs):
                label = f"step {step + 1}" if output == n_outputs - 1 else None
                ax.plot(widths, rms[:, step, output], "-o" if output == n_outputs - 1 else "--", color=colours[step],
                        markersize=3, label=label)
        ax.set(xscale="log", yscale="log", xlabel="width (d_model)", title=f"{name}: blocks (dashed), logits (solid)")
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0][0].set_ylabel("RMS of the output")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

