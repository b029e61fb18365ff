"""lm-evaluation-harness on lmjax runs: an `lm_eval` model backed by `lmjax.load`, and
`lmjax eval RUN_DIR --tasks ...` on task files whose data are on disk.

Scores follow what `lmjax eval` measures: a decoder reads context + continuation, packed and
padded into fixed (B, max_seq_len) batches (segment id 0 marks padding), and the continuation's
log-probability is the sum over its tokens. An encoder-decoder encodes the context and scores
the continuation with the decoder (from bos), as it was trained on span targets. A text's
rolling log-likelihood conditions its first token on nothing, like a document in `lmjax eval`:
the first token is the context of the rest (lm-eval's rolling windows of max_seq_len tokens,
each with one token of context). A masked-LM encoder has no next-token distribution and refuses.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lmjax.config import ConfigError


@nnx.jit
def _logits(model, *inputs):
    """The model's logits of `inputs`, compiled (once per batch shape): faster than eager calls, and
    a quantization-aware model (`quant.weights=int8`) fake-quantizes its weights only under jit."""
    return model(*inputs)


@jax.jit
def _token_scores(logits, targets):
    """(log-probabilities of the targets, whether each is the argmax), both (B, T)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return chosen, jnp.argmax(logits, axis=-1) == targets


class LmjaxLM(LM):
    """`lm_eval` model of the newest checkpoint of an lmjax run (any run `lmjax.load` reads:
    trained, LoRA, merged, imported or quantized). Requests are scored `batch_size` at a time."""

    def __init__(self, model, cfg, tokenizer, batch_size: int = 8):
        from lmjax.families import family_of

        super().__init__()
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.spec, self.batch_size, self.max_length = family_of(cfg.model), batch_size, cfg.model.max_seq_len
        if self.spec.generate is None:
            raise ConfigError(f"{cfg.name} is a masked-LM {self.spec.name}, which has no next-token probabilities; "
                              "lm-eval tasks need a decoder or encoder_decoder run.")
        # an encoder-decoder scores continuations through its decoder, started as in training
        self.decoder_start = None if self.spec.decoder_start is None else self.spec.decoder_start(tokenizer)

    @classmethod
    def from_run(cls, run_dir: Path | str, batch_size: int = 8) -> LmjaxLM:
        from lmjax.runs import load

        return cls(*load(Path(run_dir)), batch_size)

    def _forward(self, rows: list[tuple[list[int], list[int]]]):
        """rows of (context, continuation) token lists -> per row (sum of the continuation's
        log-probs, whether every continuation token is the greedy one)."""
        length = self.max_length
        results = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            chunk = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # one compiled shape
            if self.decoder_start is not None:
                encoder, encoder_ids = _pad([c[-length:] for c, _ in chunk], length)
                decoder, decoder_ids = _pad([([self.decoder_start] + t)[:length] for _, t in chunk], length)
                targets, _ = _pad([t[:length] for _, t in chunk], length)
                logits = _logits(self.model, jnp.asarray(encoder), jnp.asarray(decoder), jnp.asarray(encoder_ids),
                                 jnp.asarray(decoder_ids))
                spans = [(0, min(len(t), length)) for _, t in chunk]
            else:
                full = [(c + t)[-(length + 1):] for c, t in chunk]
                inputs, segment_ids = _pad([f[:-1] for f in full], length)
                targets, _ = _pad([f[1:] for f in full], length)
                logits = _logits(self.model, jnp.asarray(inputs), None, jnp.asarray(segment_ids))
                spans = [(len(f) - 1 - len(t), len(f) - 1) for f, (_, t) in zip(full, chunk)]
            chosen, greedy = (np.asarray(a) for a in _token_scores(logits, jnp.asarray(targets)))
            for row, (lo, hi) in enumerate(spans[:len(rows) - start]):
                results.append((float(chosen[row, max(lo, 0):hi].sum()), bool(greedy[row, max(lo, 0):hi].all())))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = []
        for request in requests:
            context, continuation = request.args
            context_ids = list(self.tokenizer.encode(context))
            if not context_ids and self.decoder_start is None:  # a decoder's first token needs something to follow
                context_ids = [self.tokenizer.eos_id]
            rows.append((context_ids, list(self.tokenizer.encode(continuation))))
        return self._forward(rows)

    def loglikelihood_rolling(self, requests) -> list[float]:
        totals = []
        for request in requests:
            ids = list(self.tokenizer.encode(request.args[0]))
            if len(ids) < 2:
                totals.append(0.0)
                continue
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids[1:], ids[0], self.max_length, 1)]
            totals.append(sum(score for score, _ in self._forward(windows)))
        return totals

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, options = request.args
            stops = options.get("until") or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            temperature = float(options.get("temperature", 0.0)) if options.get("do_sample", False) else 0.0
            new_tokens = min(int(options.get("max_gen_toks", 64)), self.max_length - 1)
            prompt = self.spec.encode_prompt(self.tokenizer, context)
            keep = self.max_length - (new_tokens if self.decoder_start is None else 0)
            ids = self.spec.generate(self.model, [prompt[-keep:]], new_tokens, self.tokenizer,
                                     temperature=temperature)[0]
            text = self.tokenizer.decode([int(i) for i in ids if int(i) != self.tokenizer.eos_id])
            cut = min([text.index(s) for s in stops if s in text], default=len(text))
            outputs.append(text[:cut])
        return outputs


def _pad(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, length) int32 zero-padded on the right, segment ids: 1 on tokens, 0 on padding)."""
    tokens = np.zeros((len(rows), length), np.int32)
    segments = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], segments[i, :len(row)] = row, 1
    return tokens, segments


def task_configs(tasks: str) -> list:
    """lm-eval task names, or for each path ending in .yaml its config as a dict, with relative
    `dataset_kwargs.data_files` resolved against the file's folder. ConfigError when a file is
    missing or is not a task config."""
    import yaml

    chosen = []
    for task in (t.strip() for t in tasks.split(",") if t.strip()):
        if not task.endswith((".yaml", ".yml")):
            chosen.append(task)
            continue
        path = Path(task)
        if not path.is_file():
            raise ConfigError(f"--tasks: the task file {path} does not exist.")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"--tasks: {path} is not valid YAML ({str(e).splitlines()[0]}).") from None
        if not isinstance(config, dict) or not isinstance(config.get("task"), str):
            raise ConfigError(f"--tasks: {path} is not an lm-eval task config (it needs a `task:` name).")
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            for split, name in files.items():
                file = path.parent / name
                if not file.is_file():
                    raise ConfigError(f"--tasks: {path} names data file {name}, which is not in {path.parent}.")
                files[split] = str(file)
        chosen.append(config)
    if not chosen:
        raise ConfigError("--tasks is empty; give task names or task YAML files, comma-separated.")
    return chosen


def evaluate_tasks(run_dir: Path, tasks: str, limit: int | None = None, batch_size: int = 8) -> dict:
    """lm-eval's results of the tasks `tasks` (see `task_configs`) on the newest checkpoint of
    `run_dir`: {task: {metric,filter: value}}. Datasets are read from disk only."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval

    configs = task_configs(tasks)
    results = lm_eval.simple_evaluate(model=LmjaxLM.from_run(run_dir, batch_size), tasks=configs, limit=limit,
                                      bootstrap_iters=1000, log_samples=False)
    return results["results"]
