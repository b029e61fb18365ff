"""The training run: data, sharded state, the step loop, evaluation, checkpoints, sample.

`train(cfg, run_dir)` starts a run or, when `run_dir` holds checkpoints, continues it
exactly where its newest checkpoint left off. Everything a run writes goes under
`run_dir`: config.json, metrics.jsonl, checkpoints/, loss.png, sample.txt, wandb/.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from lmjax.checkpoint import Checkpointer
from lmjax.config import Config, ConfigError
from lmjax.data import (BatchIterator, Concat, DataError, Mixture, PackedDataset, Subset, load_documents,
                        load_tokenizer, padded_vocab_size, save_to_run, split_documents)
from lmjax.data.denoising import make_dataset, window_length
from lmjax.parallel import batch_sharding, local_batch_rows, make_mesh, validate_layout
from lmjax.scaling.counting import example_lengths, param_counts, run_flops_per_token, tokens_per_step
from lmjax.scaling.plan import total_steps
from lmjax.train import loggers
from lmjax.train.evaluate import evaluate
from lmjax.train.metrics import mfu, peak_flops_per_device
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.state import abstract_train_state, init_train_state
from lmjax.train.step import make_train_step
from lmjax.xla_setup import enable_compilation_cache


def load_datasets(cfg: Config, tokenizer=None) -> tuple[PackedDataset | Mixture, PackedDataset | Concat, object]:
    """(train, validation, tokenizer) or a DataError / ConfigError, before anything compiles.

    With `data.path` (prepared data, a Mixture when several directories are given) the
    last `data.val_fraction` of each dataset's windows is held out for validation;
    otherwise `data.source` is read and split by documents. `tokenizer` defaults to
    `data.tokenizer`; pass a run's saved copy to reload a run."""
    from lmjax.data.prepare import open_prepared

    tokenizer = load_tokenizer(cfg.data.tokenizer) if tokenizer is None else tokenizer
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids; set model.vocab_size={padded_vocab_size(tokenizer.vocab_size)} "
                          "(padded to a multiple of 128).")
    window = window_length(cfg)  # raw tokens per example (span corruption draws more than seq_len)
    if cfg.data.path is None:
        documents = load_documents(cfg.data.source, cfg.data.text_field, cfg.data.max_bytes)
        train_stream, val_stream = split_documents(documents, tokenizer, cfg.data.val_fraction, cfg.data.seed)
        train_set, val_set = PackedDataset(train_stream, window), PackedDataset(val_stream, window)
    else:
        parts, tails, weights = [], [], []
        for directory, weight in cfg.data.mixture():
            windows = open_prepared(directory, tokenizer, window, verify=cfg.data.verify_shards)
            held_out = max(1, math.ceil(cfg.data.val_fraction * len(windows)))
            if held_out >= len(windows):
                raise DataError(f"data.path {directory} has {len(windows)} windows of data.seq_len="
                                f"{cfg.data.seq_len}, too few to hold out validation; prepare more data.")
            parts.append(Subset(windows, 0, len(windows) - held_out))
            tails.append(Subset(windows, len(windows) - held_out, len(windows)))
            weights.append(weight)
        train_set = parts[0] if len(parts) == 1 else Mixture(parts, weights)
        val_set = tails[0] if len(tails) == 1 else Concat(tails)
    train_set = make_dataset(train_set, cfg, tokenizer, cfg.data.seed)  # the family's objective
    val_set = make_dataset(val_set, cfg, tokenizer, cfg.data.seed + 1)
    if len(val_set) < cfg.train.batch_size:
        raise DataError(f"the validation split has {len(val_set)} sequences of data.seq_len={cfg.data.seq_len}, "
                        f"fewer than train.batch_size={cfg.train.batch_size}; raise data.val_fraction or use more data.")
    return train_set, val_set, tokenizer


def check_resumable(cfg: Config, saved: dict) -> None:
    """Raise ConfigError if `cfg.model` differs from the saved run's model config."""
    now = cfg.to_dict()["model"]
    differences = [f"model.{k}: saved {v!r}, now {now.get(k)!r}" for k, v in saved["model"].items() if now.get(k) != v]
    if differences:
        raise ConfigError("cannot resume: the model shape differs from the saved run (" + "; ".join(differences) + ").")


def _saved_tokenizers(run_dir: Path) -> list[Path]:
    """The tokenizer file a run saved (none for the byte tokenizer)."""
    return [p for p in (run_dir / "tokenizer.json", run_dir / "tokenizer.model") if p.is_file()]


def run_tokenizer(cfg: Config, run_dir: Path):
    """`data.tokenizer`, or the run's saved copy when resuming after the original file is gone."""
    spec = cfg.data.tokenizer
    saved = _saved_tokenizers(run_dir)
    if spec != "bytes" and not Path(spec).expanduser().is_file() and saved:
        return load_tokenizer(str(saved[0]))
    return load_tokenizer(spec)


def check_same_tokenizer(tokenizer, run_dir: Path) -> None:
    """Raise ConfigError if the run being resumed saved a different tokenizer."""
    from lmjax.data.tokenizer import file_sha256

    saved = _saved_tokenizers(run_dir)
    if (saved and file_sha256(saved[0]) != tokenizer.sha256) or (not saved and tokenizer.path is not None):
        raise ConfigError(f"cannot resume: data.tokenizer={tokenizer.name!r} is not the tokenizer the run in "
                          f"{run_dir} was trained with; use {saved[0] if saved else 'bytes'}.")


def write_json_atomically(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2))
    os.replace(temporary, path)


class _StopRequest:
    """First Ctrl-C asks the loop to checkpoint and stop after the current step; a second
    one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        loggers.console("interrupt: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def train(cfg: Config, run_dir: Path) -> dict:
    """Train (or resume) the run in `run_dir` on a mesh over all devices; returns the
    final metrics. Every check that can fail on user input runs before compilation."""
    run_dir = Path(run_dir)
    enable_compilation_cache(cfg.train.compilation_cache_dir)
    steps = total_steps(cfg)
    mesh = make_mesh(cfg.mesh)
    validate_layout(cfg, mesh)
    train_set, val_set, tokenizer = load_datasets(cfg, run_tokenizer(cfg, run_dir))
    main_process = jax.process_index() == 0

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints)
    resuming = checkpointer.latest_step() is not None
    if resuming:
        check_resumable(cfg, json.loads((run_dir / "config.json").read_text()))
        check_same_tokenizer(tokenizer, run_dir)
    if main_process:  # other processes may be reading config.json: replace it atomically
        write_json_atomically(run_dir / "config.json", cfg.to_dict())
        write_json_atomically(run_dir / "environment.json", loggers.environment())
        save_to_run(tokenizer, run_dir)

    optimizer_for = lambda params: make_optimizer(cfg.optim, steps, params)
    batches = BatchIterator(train_set, cfg.train.batch_size, cfg.data.seed,
                            rows=local_batch_rows(mesh, cfg.train.batch_size), workers=cfg.data.workers)
    if resuming:  # restore straight into the sharded layout; nothing is initialised first
        graphdef, abstract, optimizer = abstract_train_state(cfg.model, optimizer_for, mesh)
        state, data_state, _ = checkpointer.restore(abstract)
        shardings = jax.tree.map(lambda x: x.sharding, abstract)
        batches.restore(data_state)
    else:
        graphdef, state, shardings, optimizer = init_train_state(cfg.model, optimizer_for, cfg.train.seed, mesh)

    rows = batch_sharding(mesh)
    to_global = lambda batch: {k: jax.make_array_from_process_local_data(rows, v) for k, v in batch.items()}
    step_fn = make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, steps),
                              cfg.optim.grad_accum_steps, cfg.model.dropout > 0 or cfg.model.moe.router_jitter > 0,
                              cfg.model.moe)
    compile_start = time.perf_counter()
    batch_shape = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, *v.shape), v.dtype, sharding=rows)
                   for k, v in train_set[0].items()}
    with jax.set_mesh(mesh):  # activation sharding constraints resolve against it while tracing
        train_step = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, None, None)).lower(
            state, batch_shape).compile()
    compile_seconds = time.perf_counter() - compile_start

    lengths = example_lengths(cfg)  # tokens/s and MFU count encoder and decoder tokens
    flops_per_token, step_tokens = run_flops_per_token(cfg), tokens_per_step(cfg)
    peak = peak_flops_per_device(cfg.model.dtype) * len(jax.devices())
    logger = loggers.MetricsLogger(cfg, run_dir, resuming, enabled=main_process)
    start_step = int(state.step)
    if main_process:
        counts = param_counts(cfg.model)
        loggers.console(f"run {run_dir}  |  {counts['params_total']:,} params  |  {steps} steps of "
                        f"{cfg.train.batch_size}x{'+'.join(str(n) for n in lengths if n)} tokens  |  "
                        f"compiled in {compile_seconds:.1f}s"
                        + (f"  |  resumed at step {start_step}" if resuming else ""))

    def save():
        if checkpointer.latest_step() != int(state.step):  # a stop right after a periodic save has nothing new
            checkpointer.save(int(state.step), state, batches.state(), cfg.to_dict())

    def run_eval(step):
        result = evaluate(graphdef, state.params, val_set, tokenizer, cfg.train.batch_size, cfg.train.eval_batches,
                          rows)
        logger.log({"step": step, **{f"val_{k}": v for k, v in result.items()}})
        loggers.console(f"step {step:>6}  val loss {result['loss']:.4f}  ppl {result['perplexity']:.2f}  "
                        f"bpb {result['bits_per_byte']:.3f}")
        return result

    halt = min(steps, cfg.train.halt_at_step or steps)
    bar = loggers.progress_bar(steps, start_step, main_process and cfg.log.progress_bar)
    interval_start, interval_step = time.perf_counter(), start_step
    step, last_val = start_step, None
    with _StopRequest() as stop:
        while step < halt and not stop.requested:
            state, metrics, routing = train_step(state, to_global(next(batches)))
            step += 1
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == halt:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - interval_start
                tokens_per_second = (step - interval_step) * step_tokens / elapsed
                record = {"step": step, **metrics, "tokens_per_second": tokens_per_second,
                          "step_seconds": elapsed / (step - interval_step),
                          "mfu": mfu(tokens_per_second, flops_per_token, peak)}
                logger.log(record)
                if routing:
                    logger.log_routing(step, jax.device_get(routing))
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_second:,.0f}",
                                mfu=f"{record['mfu']:.0%}")
                interval_start, interval_step = time.perf_counter(), step
            if step % cfg.train.eval_every == 0 and step != halt:
                last_val = run_eval(step)
                interval_start = time.perf_counter()
            if step % cfg.train.checkpoint_every == 0 and step != halt:
                save()
    bar.close()
    save()
    if step == steps:
        last_val = run_eval(step)
    checkpointer.wait()
    checkpointer.close()
    logger.close()
    if step == steps:
        # every process takes part in gathering the (possibly cross-host) weights for the sample
        host_params = multihost_utils.process_allgather(state.params, tiled=True) if cfg.train.sample_tokens else None
        if main_process:
            finish_run(cfg, run_dir, graphdef, host_params, tokenizer, val_set)
    return {"step": step, "finished": step == steps, **({f"val_{k}": v for k, v in last_val.items()} if last_val else {})}


def finish_run(cfg: Config, run_dir: Path, graphdef, host_params, tokenizer, val_set) -> None:
    """Write loss.png and print (and save) a sample from the trained model, whose weights
    `host_params` are numpy arrays on this host: a continuation of train.sample_prompt for
    a decoder, the spans of the first validation example filled in for an encoder-decoder,
    none for an encoder."""
    from flax import nnx

    from lmjax.generate import generate
    from lmjax.train.plots import plot_loss_curves

    plot_loss_curves(loggers.read_metrics(run_dir), run_dir / "loss.png")
    loggers.console(f"loss curve: {run_dir / 'loss.png'}")
    if cfg.train.sample_tokens == 0 or cfg.model.family == "encoder":
        return
    if cfg.model.family == "encoder_decoder":
        text = fill_in_sample(nnx.merge(graphdef, host_params), val_set[0], tokenizer, cfg.train.sample_tokens)
        (run_dir / "sample.txt").write_text(text)
        loggers.console("sample:\n" + text)
        return
    prompt = tokenizer.encode(cfg.train.sample_prompt)
    new_tokens = min(cfg.train.sample_tokens, cfg.model.max_seq_len - len(prompt))
    model = nnx.merge(graphdef, host_params)
    ids = generate(model, [prompt], new_tokens, seed=cfg.train.seed, temperature=cfg.train.sample_temperature)[0]
    text = cfg.train.sample_prompt + tokenizer.decode(ids)
    (run_dir / "sample.txt").write_text(text)
    loggers.console("sample:\n" + text)


def fill_in_sample(model, example: dict, tokenizer, max_new_tokens: int) -> str:
    """A span-corruption example's corrupted input, the model's greedy targets and the true
    ones, as text with sentinels spelled <extra_id_N>."""
    from lmjax.generate import generate

    inputs = example["encoder_inputs"][example["encoder_segment_ids"] == 1]
    targets = example["targets"][example["loss_mask"] == 1]
    new_tokens = min(max_new_tokens, model.cfg.max_seq_len)
    generated = generate(model, [inputs], new_tokens, temperature=0.0, stop_tokens=(tokenizer.eos_id,),
                         start_token=tokenizer.bos_id)[0]
    show = getattr(tokenizer, "decode_with_sentinels", tokenizer.decode)  # bytes: <extra_id_N>
    return f"input:     {show(inputs)}\npredicted: {show(generated)}\ntrue:      {show(targets)}\n"
