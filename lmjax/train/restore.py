"""Reading back what a run trained: its config and the trained weights of a checkpoint, onto
any mesh. Restoring the model weights of any kind of run (a LoRA run folded into its base, a
quantized run) is `lmjax.runs`."""

from __future__ import annotations

from pathlib import Path

import jax

from lmjax.checkpoint import Checkpointer, all_finite
from lmjax.config import Config, ConfigError
from lmjax.config_parse import read_config
from lmjax.parallel import state_shardings
from lmjax.train.state import trainable_fn
from lmjax.train.transforms import WeightTransform


def load_config(run_dir: Path) -> Config:
    return read_config(Path(run_dir) / "config.json")


def restore_trained_onto(run_dir: Path, mesh, step: int | None = None, transforms: tuple[WeightTransform, ...] = ()):
    """(config, graphdef, trained params, step) of checkpoint `step` (default: newest) of
    `run_dir`, sharded over `mesh` by their logical axes: the state's params, shaped as the
    `transforms` the run trained with say (a LoRA run's are its adapters alone); the optimizer
    state is not read; ConfigError when the weights hold NaN or inf."""
    cfg = load_config(run_dir)
    if not (Path(run_dir) / "checkpoints").is_dir():  # opening a Checkpointer would create the folder
        raise ConfigError(f"{run_dir} has no checkpoint yet.")
    checkpointer = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet.")
    graphdef, build = trainable_fn(cfg.model, transforms)
    shapes = jax.eval_shape(lambda: build(0))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            state_shardings(shapes, mesh))
    params = checkpointer.restore_params(abstract, step)
    steps_saved = checkpointer.manager.all_steps()
    checkpointer.close()
    if not all_finite(params):
        earlier = ", ".join(str(s) for s in steps_saved if s < step)
        raise ConfigError(f"{run_dir}: the weights of checkpoint step {step} hold NaN or inf (the run diverged before "
                          "it was saved); " + (f"earlier checkpoints: steps {earlier} (lmjax.load(run_dir, step=N))."
                                               if earlier else "no earlier checkpoint is left; train it again."))
    return cfg, graphdef, params, step
