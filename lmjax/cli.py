"""The `lmjax` command: train, eval, generate and experiments.

    lmjax train [EXPERIMENT] [--set section.field=value ...] [--resume RUN_DIR | --init-from RUN_DIR] [--fresh]
    lmjax eval RUN_DIR [--json] [--max-batches N] [--data SOURCE] [--token-losses FILE.npy]
    lmjax eval RUN_DIR --tasks NAME_OR_YAML[,...] [--limit N] [--json]   (lm-evaluation-harness)
    lmjax generate RUN_DIR --prompt TEXT [--temperature T --top-k K --top-p P --max-new-tokens N]
        (an encoder_decoder run fills in each <extra_id_N> of the prompt)
    lmjax plan [EXPERIMENT] [--set ...] [--budget-flops C | --budget-pfdays X] [--law LAW.json] [--json]
    lmjax sweep SWEEP [--set section.field=value ...] [--dir DIR] [--slurm | --commands | --collect]
    lmjax fit RESULTS.csv [--n-column N --d-column D --c-column C --loss-column L --g-column G] [--plots DIR] [--json]
    lmjax experiments
    lmjax tokenizer train --data SOURCE --vocab-size N --out FILE [--kind bpe|unigram|sentencepiece-bpe|...]
    lmjax data prepare --data SOURCE --tokenizer FILE --out DIR [--workers N]
    lmjax data verify DIR --tokenizer FILE
    lmjax convert from-hf HF_DIR --out RUN_DIR [--dtype float32|bfloat16] [--mesh fsdp=8 ...]
    lmjax convert to-hf RUN_DIR --out HF_DIR [--step N]
    lmjax lora merge RUN_DIR --out MERGED_RUN
    lmjax lora export-peft RUN_DIR --out PEFT_DIR
    lmjax quantize RUN_DIR --out RUN_Q [--bits 8] [--granularity channel|tensor]
    lmjax upcycle DENSE_RUN --out RUN_DIR [--set model.moe.KEY=VALUE ...] [--noise S] [--seed N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from lmjax.config import Config, ConfigError
from lmjax.config_parse import override, read_config
from lmjax.exits import exit_at_once_if_distributed, exit_if_peer_lost
from lmjax.experiment import experiment_summary, list_experiments, load_experiment
from lmjax.records import json_line

DEFAULT_EXPERIMENT = "decoder_tiny"


def _experiment_listing() -> str:
    return "\n".join(f"  {name:<20} {experiment_summary(path)}" for name, path in list_experiments().items())


def build_parser() -> argparse.ArgumentParser:
    """The `lmjax` parser: each command's `add_<command>` adds its sub-parser and sets `func`."""
    parser = argparse.ArgumentParser(prog="lmjax", description="Pretrain transformer language models with JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_eval, add_generate, add_plan, add_sweep, add_fit, add_experiments, add_tokenizer,
                add_data, add_convert, add_lora, add_quantize, add_upcycle):
        add(commands)
    return parser


def _add_overrides(parser, example: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. {example} (repeatable)")


def add_train(commands) -> None:
    train = commands.add_parser(
        "train", help="train a model (default: the decoder_tiny experiment)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="experiments:\n" + _experiment_listing() + "\n\nexample: lmjax train decoder_tiny "
               "--set model.d_model=256 --set optim.lr=1e-3",
    )
    train.set_defaults(func=cmd_train)
    train.add_argument("experiment", nargs="?", help=f"experiment name or .py file (default: {DEFAULT_EXPERIMENT})")
    _add_overrides(train, "model.d_model=256")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    train.add_argument("--new-data-order", action="store_true",
                       help="let a resumed run change train.batch_size or the data (it then sees other batches than "
                            "an uninterrupted run would)")
    train.add_argument("--fresh", action="store_true", help="start over in a run directory that already holds a "
                       "run, deleting its checkpoints and records (without it the same command continues the run)")
    train.add_argument("--init-from", metavar="RUN_DIR", help="start from the newest weights of RUN_DIR (e.g. one "
                       "made by `lmjax convert from-hf`), with a fresh optimizer and step 0")
    cluster = train.add_argument_group("multi-process runs (SLURM, TPU VMs and GKE are detected without these)")
    cluster.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    cluster.add_argument("--num-processes", type=int)
    cluster.add_argument("--process-id", type=int)
    cluster.add_argument("--coordinator-timeout", type=int, default=300, metavar="SECONDS")
    cluster.add_argument("--heartbeat-timeout", type=int, default=100, metavar="SECONDS", help="a process silent "
                         "this long is taken for dead and the run ends (JAX's default: 100)")


def resolve_train_config(experiment: str | None, overrides: list[str], resume: str | None) -> tuple[Config, Path]:
    """(config, run_dir) for `lmjax train`: from the experiment, or from the run being resumed."""
    if resume is not None:
        run_dir = Path(resume)
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise ConfigError(f"--resume {resume}: no config.json there; is it a run directory?")
        base = load_experiment(experiment) if experiment else read_config(saved)
        return override(base, overrides + [f"train.run_dir={run_dir}"]), run_dir
    cfg = override(load_experiment(experiment or DEFAULT_EXPERIMENT), overrides)
    run_dir = Path(cfg.train.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg, run_dir


def cmd_train(args) -> None:
    from lmjax.parallel import initialize_distributed, process_0_text
    from lmjax.runs import train
    from lmjax.train.resume import clear_run

    cfg, run_dir = resolve_train_config(args.experiment, args.overrides, args.resume)
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout,
                           args.heartbeat_timeout)
    if args.init_from and args.resume:
        raise ConfigError("give --resume or --init-from, not both.")
    if args.fresh and args.resume:
        raise ConfigError("give --resume or --fresh, not both.")
    run_dir = Path(process_0_text(str(run_dir)))  # a timestamped name differs between processes
    if args.fresh:
        clear_run(run_dir)
    summary = train(cfg, run_dir, Path(args.init_from) if args.init_from else None, args.new_data_order)
    state = "finished" if summary["finished"] else f"stopped at step {summary['step']}; resume with --resume"
    print(f"run {state}: {run_dir}")


def add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="validation loss, perplexity and bits per byte of a run")
    evaluate.set_defaults(func=cmd_eval)
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--max-batches", type=int, default=None, help="default: the whole validation split")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--data", metavar="SOURCE", help="evaluate on all of this data source instead of the "
                          "run's validation split (stdlib, a file, a directory, an HF dataset on disk, or token "
                          "shards made by `lmjax data prepare`)")
    evaluate.add_argument("--token-losses", metavar="FILE.npy", help="save every position's loss (nats)")
    evaluate.add_argument("--tasks", metavar="NAME_OR_YAML[,...]", help="run lm-evaluation-harness tasks instead: "
                          "task YAML files whose data are on disk (e.g. experiments/lm_eval/python_stdlib/"
                          "python_stdlib.yaml) or names of tasks lm-eval knows")
    evaluate.add_argument("--limit", type=int, default=None, help="with --tasks: the first N examples of each task")


def cmd_eval(args) -> None:
    if args.tasks is not None:
        return cmd_eval_tasks(args)
    from lmjax.runs import evaluate_run

    if args.max_batches is not None and args.max_batches < 1:
        raise ConfigError(f"--max-batches must be at least 1, got {args.max_batches}; leave it out for the whole "
                          "validation split.")
    if args.token_losses and not Path(args.token_losses).parent.is_dir():
        raise ConfigError(f"--token-losses {args.token_losses}: the directory {Path(args.token_losses).parent} "
                          "does not exist; create it first.")
    result = evaluate_run(Path(args.run_dir), args.max_batches, args.data,
                          Path(args.token_losses) if args.token_losses else None)
    if args.json:
        print(json_line(result))
    else:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))


def cmd_eval_tasks(args) -> None:
    from lmjax.harness import evaluate_tasks

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}.")
    results = evaluate_tasks(Path(args.run_dir), args.tasks, args.limit)
    if args.json:
        print(json_line(results, default=str))
        return
    for task, metrics in results.items():
        print(task + "  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


def add_generate(commands) -> None:
    generate = commands.add_parser("generate", help="continue prompts with a trained model (KV-cache decoding); "
                                   "an encoder_decoder run fills in the prompt's <extra_id_0>, <extra_id_1>, ...")
    generate.set_defaults(func=cmd_generate)
    generate.add_argument("run_dir")
    generate.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=0)


def cmd_generate(args) -> None:
    from flax import nnx

    from lmjax.adapters.int8 import int8_weight_bytes, is_quantized, resident_bytes
    from lmjax.data import load_tokenizer
    from lmjax.families import family_of
    from lmjax.runs import load
    from lmjax.scaling.memory import kv_cache_bytes_per_sequence

    check_sampling_args(args)
    model, cfg, tokenizer = load(Path(args.run_dir))
    if tokenizer is None:  # a run imported without one: the one line of why text cannot be read
        load_tokenizer(cfg.data.tokenizer)
    spec = family_of(cfg.model)
    if spec.generate is None:
        raise ConfigError(f"lmjax generate needs a family that generates (decoder, encoder_decoder); {args.run_dir} "
                          f"is a {cfg.model.family} (use lmjax eval).")
    prompts = [spec.encode_prompt(tokenizer, p) for p in args.prompt]
    cache_length = max(len(p) for p in prompts) + args.max_new_tokens
    cache_bytes = len(prompts) * kv_cache_bytes_per_sequence(cfg.model, cache_length)
    outputs = spec.generate(model, prompts, args.max_new_tokens, tokenizer, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(f"KV cache: {cache_bytes / 2**20:.2f} MiB ({len(prompts)} sequence(s) of {cache_length} positions)",
          file=sys.stderr)
    if is_quantized(args.run_dir):
        print(f"weights: {resident_bytes(nnx.state(model, nnx.Param)) / 2**20:.2f} MiB resident (int8 matrices with "
              f"float32 scales; {int8_weight_bytes(cfg.model)[1] / 2**20:.2f} MiB in {cfg.model.param_dtype})",
              file=sys.stderr)
    for text, prompt, ids in zip(args.prompt, prompts, outputs):
        print(spec.show(tokenizer, text, prompt, ids))


def check_sampling_args(args) -> None:
    """ConfigError for `lmjax generate` arguments that cannot sample, before anything is read."""
    if any(p == "" for p in args.prompt):
        raise ConfigError("--prompt is empty; give at least one character to continue.")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}.")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1 (1: greedy), got {args.top_k}; leave it out for no limit.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}; leave it out for no limit.")


def add_plan(commands) -> None:
    plan = commands.add_parser("plan", help="parameters, FLOPs, memory and compute-optimal sizes, without training")
    plan.set_defaults(func=cmd_plan)
    plan.add_argument("experiment", nargs="?", help=f"experiment name or .py file (default: {DEFAULT_EXPERIMENT})")
    _add_overrides(plan, "model.n_layers=32")
    budget = plan.add_mutually_exclusive_group()
    budget.add_argument("--budget-flops", type=float, metavar="C", help="training compute budget in FLOPs")
    budget.add_argument("--budget-pfdays", type=float, metavar="X", help="training compute budget in petaFLOP/s-days")
    plan.add_argument("--law", metavar="LAW.json", help="compute-optimal N from a fitted law (`lmjax fit --json`) "
                      "instead of 20 tokens per parameter")
    plan.add_argument("--hardware", default="H100", help="named accelerator for the wall time (default: H100)")
    plan.add_argument("--devices", type=int, default=1, help="devices the mesh spans (default: 1)")
    plan.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation assumed (default: 0.4)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_plan(args) -> None:
    from lmjax.scaling.counting import PETAFLOP_DAY
    from lmjax.scaling.plan import format_plan, load_law, plan, shape_notes

    cfg = override(load_experiment(args.experiment or DEFAULT_EXPERIMENT), args.overrides)
    for note in shape_notes(cfg.model):
        print(f"note: {note}", file=sys.stderr)
    budget = args.budget_pfdays * PETAFLOP_DAY if args.budget_pfdays is not None else args.budget_flops
    if budget is not None and budget <= 0:
        raise ConfigError(f"the budget must be positive, got {budget}.")
    result = plan(cfg, budget, load_law(args.law) if args.law else None, args.hardware, args.mfu, args.devices,
                  **transform_bytes(cfg))
    print(json_line(result) if args.json else format_plan(result))


def transform_bytes(cfg: Config) -> dict:
    """The sizes of the run's weight transforms that `memory_estimate` and `plan` take:
    {"adapter_bytes": LoRA adapters' bytes, "int8_bytes": (int8 storage, float storage)}, each
    only when the config turns it on (`WeightTransform.sizes`)."""
    from lmjax.adapters import weight_transforms

    return {name: size for transform in weight_transforms(cfg) for name, size in transform.sizes(cfg).items()}


def add_sweep(commands) -> None:
    sweep = commands.add_parser("sweep", help="run a sweep (IsoFLOP grid, override grid, WSD branches) resumably")
    sweep.set_defaults(func=cmd_sweep)
    sweep.add_argument("sweep", help="sweep name (experiments/NAME.py defining sweep()) or .py file")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override applied to every run, before the run's own (e.g. a tuned optim.lr with "
                            "model.parametrization=mup and model.mup_base_width)")
    sweep.add_argument("--dir", metavar="DIR", help="sweep directory (default: sweeps/NAME)")
    emit = sweep.add_mutually_exclusive_group()
    emit.add_argument("--slurm", action="store_true", help="print a SLURM job-array script instead of running")
    emit.add_argument("--commands", action="store_true", help="print one launch command per run instead of running")
    sweep.add_argument("--only-index", type=int, metavar="I", help="run only run number I (one SLURM job); "
                       "results.csv is left to --collect")
    emit.add_argument("--collect", action="store_true", help="only write results.csv from the finished runs")


def cmd_sweep(args) -> None:
    import shlex

    from lmjax.drivers.sweep import collect_results, load_sweep, run_config, run_sweep, slurm_script

    sweep = load_sweep(args.sweep)
    sweep = dataclasses.replace(sweep, overrides=(*sweep.overrides, *args.overrides))
    set_args = "".join(f" --set {shlex.quote(o)}" for o in args.overrides)
    sweep_dir = Path(args.dir or f"sweeps/{Path(args.sweep).stem}")
    if args.slurm:
        print(slurm_script(args.sweep, sweep, sweep_dir, set_args), end="")
        return
    if args.commands:
        if any(run.trunk for run in sweep.runs):
            raise ConfigError(f"{args.sweep} has WSD branches, which must run after their trunk, not side by side; "
                              "use --slurm (dependent jobs) or run the sweep without --commands.")
        for i, run in enumerate(sweep.runs):
            run_config(sweep, run, sweep_dir)  # validate before printing
            print(f"lmjax sweep {shlex.quote(args.sweep)}{set_args} --dir {shlex.quote(str(sweep_dir))} "
                  f"--only-index {i}")
        return
    if args.collect:
        print(f"results: {collect_results(sweep, sweep_dir)}")
    elif args.only_index is None:
        print(f"results: {run_sweep(sweep, sweep_dir)}")
    else:  # one run of many (a SLURM job): results.csv is left to the collecting job
        print(f"run: {run_sweep(sweep, sweep_dir, only=args.only_index)}")


def add_fit(commands) -> None:
    fit = commands.add_parser("fit", help="fit scaling laws (Approaches 2 and 3) to a sweep's results.csv")
    fit.set_defaults(func=cmd_fit)
    fit.add_argument("results", metavar="RESULTS.csv")
    fit.add_argument("--n-column", default="N")
    fit.add_argument("--d-column", default="D")
    fit.add_argument("--c-column", default="C")
    fit.add_argument("--loss-column", default="val_loss")
    fit.add_argument("--g-column", default="G", help="MoE granularity; with it, also fit the granularity law")
    fit.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for confidence intervals")
    fit.add_argument("--plots", metavar="DIR", help="save isoflop.png, frontier.png and loss_vs_n_d.png here "
                     "(and loss_vs_g.png with a granularity fit)")
    fit.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_fit(args) -> None:
    from lmjax.scaling.fit import fit_results, format_fit, read_results

    data = read_results(Path(args.results), args.n_column, args.d_column, args.c_column, args.loss_column,
                        args.g_column)
    fitted = fit_results(data, bootstrap=args.bootstrap)
    if args.plots:
        from lmjax.scaling.plots import save_scaling_plots

        save_scaling_plots(data, fitted, Path(args.plots))
    print(json_line(fitted) if args.json else format_fit(fitted))


def add_experiments(commands) -> None:
    commands.add_parser("experiments", help="list the experiments that `lmjax train` can run").set_defaults(
        func=cmd_experiments)


def cmd_experiments(args) -> None:
    print(_experiment_listing())


def add_tokenizer(commands) -> None:
    """`lmjax tokenizer train` (see docs/data.md)."""
    tokenizer = commands.add_parser("tokenizer", help="train a subword tokenizer on your own text")
    train = tokenizer.add_subparsers(dest="action", required=True).add_parser(
        "train", help="train a tokenizer file with HF tokenizers or SentencePiece (no download)")
    train.set_defaults(func=cmd_tokenizer)
    train.add_argument("--data", required=True, metavar="SOURCE", help="stdlib, a file, a directory, an HF dataset")
    train.add_argument("--out", required=True,
                       help="tokenizer.json (bpe, unigram) or tokenizer.model (sentencepiece-*)")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--kind", default="bpe", help="bpe (default), unigram, sentencepiece-bpe, sentencepiece-unigram")
    train.add_argument("--sentinels", type=int, default=100, help="reserved <extra_id_i> tokens for span corruption")
    train.add_argument("--text-field", default="text")
    train.add_argument("--max-bytes", type=int, default=1 << 30, help="train on at most this much text")


def cmd_tokenizer(args) -> None:
    from lmjax.data import load_documents, load_tokenizer, padded_vocab_size
    from lmjax.data.subword import train_tokenizer

    documents = load_documents(args.data, args.text_field, args.max_bytes)
    out = train_tokenizer(documents, Path(args.out), args.vocab_size, args.kind, args.sentinels)
    tokenizer = load_tokenizer(str(out))
    print(f"wrote {out}: {tokenizer.vocab_size} ids; train with --set data.tokenizer={out} "
          f"--set model.vocab_size={padded_vocab_size(tokenizer.vocab_size)}")


def add_data(commands) -> None:
    """`lmjax data prepare | verify` (see docs/data.md)."""
    data = commands.add_parser("data", help="tokenize a corpus once into shards for training (data.path)")
    actions = data.add_subparsers(dest="action", required=True)
    prepare = actions.add_parser("prepare", help="tokenize SOURCE into sharded token files in DIR (resumable)")
    prepare.set_defaults(func=cmd_data_prepare)
    prepare.add_argument("--data", required=True, metavar="SOURCE", help="stdlib, a file, a directory, an HF dataset")
    prepare.add_argument("--tokenizer", default="bytes", help="bytes (default) or a tokenizer file")
    prepare.add_argument("--out", required=True, metavar="DIR")
    prepare.add_argument("--text-field", default="text")
    prepare.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    prepare.add_argument("--shard-mb", type=int, default=64, help="text per shard, in MiB")
    verify = actions.add_parser("verify", help="check every shard of DIR against its manifest's checksums")
    verify.set_defaults(func=cmd_data_verify)
    verify.add_argument("dir")
    verify.add_argument("--tokenizer", default="bytes")


def cmd_data_prepare(args) -> None:
    from lmjax.data.prepare import prepare

    if (args.workers is not None and args.workers < 1) or args.shard_mb < 1:
        raise ConfigError("--workers and --shard-mb must be positive.")
    manifest = prepare(args.data, args.tokenizer, Path(args.out), args.text_field,
                       args.workers or os.cpu_count() or 1, args.shard_mb << 20)
    print(f"prepared {args.out}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
          f"{len(manifest['shards'])} shards; skipped {manifest['empty_documents']:,} empty documents, replaced "
          f"invalid UTF-8 in {manifest['invalid_utf8_documents']:,}; train with --set data.path={args.out}")


def cmd_data_verify(args) -> None:
    from lmjax.data import load_tokenizer
    from lmjax.data.prepare import open_prepared

    open_prepared(args.dir, load_tokenizer(args.tokenizer), seq_len=1, verify=True)
    manifest = json.loads((Path(args.dir) / "manifest.json").read_text())
    print(f"{args.dir}: {len(manifest['shards'])} shards, {manifest['documents']:,} documents, "
          f"{manifest['tokens']:,} tokens, checksums match")


def add_convert(commands) -> None:
    """`lmjax convert from-hf | to-hf` (see docs/interop.md)."""
    convert = commands.add_parser("convert", help="import or export Hugging Face transformers checkpoints")
    actions = convert.add_subparsers(dest="action", required=True)
    from_hf = actions.add_parser("from-hf", help="a transformers directory (config.json, safetensors, tokenizer.json) "
                                 "-> an lmjax run directory")
    from_hf.set_defaults(func=cmd_convert_from_hf)
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("--out", required=True, metavar="RUN_DIR")
    from_hf.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights' dtype")
    from_hf.add_argument("--mesh", action="append", default=[], metavar="AXIS=SIZE",
                         help="read the weights straight into this layout, e.g. fsdp=8 (default: data=-1)")
    to_hf = actions.add_parser("to-hf", help="an lmjax run directory -> a transformers directory")
    to_hf.set_defaults(func=cmd_convert_to_hf)
    to_hf.add_argument("run_dir")
    to_hf.add_argument("--out", required=True, metavar="HF_DIR")
    to_hf.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")


def cmd_convert_from_hf(args) -> None:
    from lmjax.interop.convert import from_hf

    mesh = override(Config(), [f"mesh.{o}" for o in args.mesh]).mesh
    _print_converted(from_hf(Path(args.hf_dir), Path(args.out), args.dtype, mesh), args.out)


def cmd_convert_to_hf(args) -> None:
    from lmjax.interop.convert import to_hf

    _print_converted(to_hf(Path(args.run_dir), Path(args.out), args.step), args.out)


def _print_converted(notes: list[str], out: str) -> None:
    for note in notes:
        print(f"not carried: {note}")
    print(f"wrote {out}")


def add_lora(commands) -> None:
    """`lmjax lora merge | export-peft` (see docs/after_pretraining.md)."""
    lora = commands.add_parser("lora", help="LoRA runs (train with --init-from RUN_DIR --set lora.rank=R)")
    actions = lora.add_subparsers(dest="action", required=True)
    merge = actions.add_parser(
        "merge", help="fold a LoRA run's adapters into its base: an ordinary run directory")
    merge.set_defaults(func=cmd_lora_merge)
    merge.add_argument("run_dir")
    merge.add_argument("--out", required=True, metavar="MERGED_RUN")
    export = actions.add_parser("export-peft", help="a LoRA run's adapters as a PEFT directory (adapter_config.json, "
                                "adapter_model.safetensors) for the base that `convert to-hf` exports")
    export.set_defaults(func=cmd_lora_export_peft)
    export.add_argument("run_dir")
    export.add_argument("--out", required=True, metavar="PEFT_DIR")


def cmd_lora_merge(args) -> None:
    from lmjax.tools import merge_run

    merge_run(Path(args.run_dir), Path(args.out))
    print(f"wrote {args.out}")


def cmd_lora_export_peft(args) -> None:
    from lmjax.interop.peft import export_peft

    export_peft(Path(args.run_dir), Path(args.out))
    print(f"wrote {args.out}")


def add_quantize(commands) -> None:
    quantize = commands.add_parser("quantize", help="post-training int8 weights (qwix): a run directory that load, "
                                   "eval and generate accept")
    quantize.set_defaults(func=cmd_quantize)
    quantize.add_argument("run_dir")
    quantize.add_argument("--out", required=True, metavar="RUN_Q")
    quantize.add_argument("--bits", type=int, default=8, help="8 (int8) only")
    quantize.add_argument("--granularity", default="channel", choices=("channel", "tensor"),
                          help="one scale per output unit (channel) or per matrix (tensor)")


def cmd_quantize(args) -> None:
    from lmjax.tools import quantize_run

    saved = quantize_run(Path(args.run_dir), Path(args.out), args.bits, args.granularity)
    print(f"wrote {args.out}: {saved / 2**20:.2f} MiB of weights (int8 matrices, float32 scales and vectors)")


def add_upcycle(commands) -> None:
    upcycle = commands.add_parser("upcycle", help="a dense run's weights as a MoE run: experts copied from each "
                                  "MLP, new routers (sparse upcycling, docs/moe.md)")
    upcycle.set_defaults(func=cmd_upcycle)
    upcycle.add_argument("run_dir", metavar="DENSE_RUN")
    upcycle.add_argument("--out", required=True, metavar="RUN_DIR")
    upcycle.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.moe.KEY=VALUE",
                         help="MoE settings (default: model.moe.n_experts=8, top_k 2, dropless; repeatable)")
    upcycle.add_argument("--noise", type=float, default=0.0, help="multiply each expert copy elementwise by "
                         "1 + S * N(0, 1) (default 0: exact copies)")
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the new routers and of the noise")


def cmd_upcycle(args) -> None:
    from lmjax.upcycle import upcycle_run

    cfg = upcycle_run(Path(args.run_dir), Path(args.out), args.overrides, args.noise, args.seed)
    moe = cfg.model.moe
    where = "every layer" if moe.every == 1 else f"layers {moe.every - 1}, {2 * moe.every - 1}, ..."
    print(f"wrote {args.out}: {moe.n_experts} experts (top-{moe.top_k}) in {where}; train it with "
          f"lmjax train NAME --init-from {args.out} and the same model settings")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lmjax.xla_setup import apply_gpu_preset

    apply_gpu_preset()  # before any backend starts; only on a GPU, never over the user's XLA_FLAGS
    from lmjax.data import DataError

    try:
        args.func(args)
    except (ConfigError, DataError) as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        exit_if_peer_lost(e)
        code = fault_exit_code(e)
        if code is None:
            raise
        print(f"lmjax: error: {e}", file=sys.stderr)
        exit_at_once_if_distributed(code)
        return code
    return 0


def fault_exit_code(error: Exception) -> int | None:
    """The exit code of a fault during training that has its one line: 2 for a checkpoint the disk
    refused (`SaveFailed`), 3 for a run that diverged past its roll-backs (`Diverged`); None for
    anything else. (Their modules raised them, so they are loaded; nothing is imported here.)"""
    checkpoint, rollback = sys.modules.get("lmjax.checkpoint"), sys.modules.get("lmjax.train.rollback")
    if checkpoint is not None and isinstance(error, checkpoint.SaveFailed):
        return 2
    if rollback is not None and isinstance(error, rollback.Diverged):
        return 3
    return None


if __name__ == "__main__":
    sys.exit(main())
