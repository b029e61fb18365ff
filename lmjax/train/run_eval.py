"""`lmjax eval RUN_DIR`: validation metrics of a run's newest checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from lmjax.checkpoint import Checkpointer
from lmjax.config import Config, ConfigError
from lmjax.parallel import batch_sharding, make_mesh
from lmjax.train.evaluate import evaluate
from lmjax.train.loop import load_datasets, total_steps
from lmjax.train.optimizer import make_optimizer
from lmjax.train.state import abstract_train_state


def evaluate_run(run_dir: Path, max_batches: int | None = None) -> dict:
    """{step, loss, perplexity, bits_per_byte, tokens} on the run's validation split."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json).")
    cfg = Config.from_dict(json.loads(config_file.read_text()))
    checkpointer = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints, async_save=False)
    step = checkpointer.latest_step()
    if step is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet.")
    _, val_set, tokenizer = load_datasets(cfg)
    mesh = make_mesh(cfg.mesh)
    steps = total_steps(cfg)
    graphdef, abstract = abstract_train_state(cfg.model, lambda p: make_optimizer(cfg.optim, steps, p), mesh)
    state, _, _ = checkpointer.restore(abstract, step)
    checkpointer.close()
    result = evaluate(graphdef, state.params, val_set, tokenizer, cfg.train.batch_size, max_batches,
                      batch_sharding(mesh))
    return {"step": step, **result}
