"""lmjax: pretrain transformer language models with JAX and Flax NNX."""


def load(run_dir, step=None):
    """(model, config, tokenizer) of a run's checkpoint; see lmjax.runs.load."""
    from lmjax.runs import load as load_run

    return load_run(run_dir, step)
