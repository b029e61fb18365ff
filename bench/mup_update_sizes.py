"""How far did each weight move in a finished run, as an operator? (issue #27, docs/scaling.md:
which role's effective learning rate differs between µP and a standard model tuned per width.)

For each run directory, its init (rebuilt from config.json and train.seed, as the trainer
builds it) against its newest checkpoint, per weight matrix, in the units of the spectral
condition for feature learning (Yang, Simon and Bernstein 2023): the largest singular value of
the change of the *effective* matrix (the stored weight times the forward's constant
multiplier: the embedding's `embedding_multiplier`, the head's `logit_scale`), times
sqrt(fan_in / fan_out),

    size(dW) = ||m dW||_2 * sqrt(fan_in / fan_out),

averaged over layers. Feature learning wants it Theta(1) at every width for every matrix;
µP keeps it width-independent at a fixed learning rate, while the standard
parametrization lets the hidden and output matrices' sizes grow with width. The same for the init,
size(W0), and the norm gains' RMS change, are printed beside it. For dense models whose
block stack holds its layers stacked (as the decoders here do); other parameters (MoE experts)
show their RMS change. Writes nothing.

    python bench/mup_update_sizes.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

from lmjax.config import MeshConfig
from lmjax.parallel import make_mesh
from lmjax.train.restore import restore_trained_onto
from lmjax.train.state import trainable_fn

FAN_IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_up": 1, "w_gate": 1, "w_down": 1, "table": 1, "unembed": 1}


def spectral_size(layers: list[np.ndarray], fan_in_dims: int) -> float:
    """Mean over `layers` of ||W||_2 sqrt(fan_in / fan_out), each weight reshaped to
    (fan_in, fan_out) from its first `fan_in_dims` axes."""
    sizes = []
    for w in layers:
        w = w.reshape(int(np.prod(w.shape[:fan_in_dims])), -1)
        sizes.append(np.linalg.norm(w, 2) * np.sqrt(w.shape[0] / w.shape[1]))
    return float(np.mean(sizes))


def movement(run_dir: Path) -> dict[str, tuple[float, float]]:
    """{parameter: (size(dW), size(W0))} of `run_dir` (norm gains: (RMS(dW), RMS(W0)))."""
    cfg, _, trained, _ = restore_trained_onto(run_dir, make_mesh(MeshConfig()))
    initial = trainable_fn(cfg.model)[1](cfg.train.seed)
    multipliers = {"table": cfg.model.embedding_multiplier, "unembed": cfg.model.logit_scale}
    out = {}
    for (path, w0), wt in zip(jax.tree_util.tree_leaves_with_path(initial), jax.tree.leaves(trained)):
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]  # not the Param's ".value"
        name, leaf = ".".join(keys), keys[-1]
        w0 = np.asarray(w0, np.float64) * multipliers.get(leaf, 1.0)
        delta = np.asarray(wt, np.float64) * multipliers.get(leaf, 1.0) - w0
        if leaf in FAN_IN_DIMS:
            per_layer = (lambda w: list(w)) if keys[0] == "stack" else (lambda w: [w])  # the stack's leading axis
            out[name] = tuple(spectral_size(per_layer(w), FAN_IN_DIMS[leaf]) for w in (delta, w0))
        else:
            out[name] = (float(np.sqrt(np.mean(delta**2))), float(np.sqrt(np.mean(w0**2))))
        if leaf == "table" and cfg.model.tie_embeddings:  # the same table read by the head: (d, V), x logit_scale
            as_head = cfg.model.logit_scale / cfg.model.embedding_multiplier
            out[f"{name} as head"] = tuple(spectral_size([w.T * as_head], 1) for w in (delta, w0))
    return out


def main(run_dirs: list[str]) -> None:
    tables = {d: movement(Path(d)) for d in run_dirs}
    names = list(dict.fromkeys(name for table in tables.values() for name in table))
    for i, d in enumerate(run_dirs):
        print(f"[{i}] {d}")
    print("size(dW) (size(W0))".ljust(26) + "".join(f"[{i}]".rjust(20) for i in range(len(run_dirs))))
    for name in names:
        cells = [tables[d].get(name) for d in run_dirs]
        print(f"{name:26s}" + "".join((f"{c[0]:.3g} ({c[1]:.3g})" if c else "-").rjust(20) for c in cells))


if __name__ == "__main__":
    main(sys.argv[1:])
