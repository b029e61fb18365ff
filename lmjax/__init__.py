"""lmjax: pretrain transformer language models with JAX and Flax NNX."""


def load(run_dir, step=None):
    """(model, config, tokenizer) of a run's checkpoint; see lmjax.train.run_eval.load."""
    from lmjax.train.run_eval import load as load_run

    return load_run(run_dir, step)
