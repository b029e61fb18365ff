"""`lmjax convert from-hf | to-hf`: a transformers directory <-> an lmjax run directory.

Import reads config.json into a `Config`, then streams every weight from the memory-mapped
safetensors straight into its sharded layout: `jax.make_array_from_callback` asks, per
device, for the slice that device holds, and only that slice is read from disk and cast.
Host memory stays near one layer's tensor plus this process's share of the model. The run
directory gets config.json, the tokenizer and a step-0 checkpoint (fresh Adam moments), so
`lmjax.load`, `generate`, `eval`, `train --resume` and `train --init-from` all accept it.

Export gathers the weights of a checkpoint onto the host and writes config.json and
safetensors that `transformers.AutoModelFor*.from_pretrained` loads. See docs/interop.md.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lmjax.checkpoint import write_weights_run
from lmjax.config import BYTE_VOCAB_SIZE, Config, ConfigError, DataConfig, MeshConfig, ModelConfig, TrainConfig
from lmjax.families import family_of
from lmjax.interop import bert, llama, t5
from lmjax.interop.tensors import open_checkpoint, save_checkpoint
from lmjax.interop.tokenizer_files import write_tokenizer
from lmjax.parallel import make_mesh, state_shardings
from lmjax.train.state import abstract_model

_ARCHITECTURES = {name: module for module in (llama, t5, bert) for name in module.ARCHITECTURES}
_FAMILY_ARCHITECTURES = {module.__name__.rsplit(".", 1)[-1]: module for module in (llama, t5, bert)}
MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size for save_pretrained


class _Recording(dict):
    """The checkpoint's tensors, remembering which names were read."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.read = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)


def architecture_of(hf: dict):
    """The translator module for config.json's `architectures` entry (ConfigError if none)."""
    names = hf.get("architectures") or []
    for name in names:
        if name in _ARCHITECTURES:
            return _ARCHITECTURES[name]
    raise ConfigError(f"config.json architectures {names} is not one lmjax converts; supported: "
                      f"{', '.join(_ARCHITECTURES)}.")


def family_architecture(cfg: ModelConfig):
    """The translator module that exports the checkpoints of `cfg`'s family (named by
    `Family.hf_architecture`)."""
    return _FAMILY_ARCHITECTURES[family_of(cfg).hf_architecture]


def layer_count(path: tuple[str, ...], cfg: ModelConfig) -> int | None:
    """Layers stacked on the leading axis of the weight at `path` (None: not per layer)."""
    if "blocks" not in path:
        return None
    return cfg.decoder_layers if path[0] == "decoder" else cfg.n_layers


def _flat(tree) -> dict[tuple[str, ...], object]:
    return {tuple(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _read_weight(rule, tensors, shape, dtype, layers: int | None, sharding):
    """The sharded jax.Array of one lmjax weight, each device's block read from disk alone."""

    def block(index):
        if layers is None:
            return np.asarray(rule.read(tensors, shape)[index], dtype)
        return np.stack([np.asarray(rule.read(tensors, shape[1:], i=i)[index[1:]], dtype)
                         for i in range(layers)[index[0]]])

    return jax.make_array_from_callback(shape, sharding, block)


def model_config_from_hf(hf_dir: Path, notes: list[str]) -> ModelConfig:
    config_file = Path(hf_dir) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{hf_dir} has no config.json; give a directory written by transformers' save_pretrained.")
    hf = json.loads(config_file.read_text())
    return architecture_of(hf).model_config(hf, notes)


def import_params(hf_dir: Path, cfg: ModelConfig, mesh, notes: list[str]) -> nnx.State:
    """The model weights of `hf_dir` as an nnx.State sharded over `mesh` by their logical axes."""
    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    architecture = architecture_of(hf)
    rules = architecture.tensor_rules(cfg)
    tensors = _Recording(open_checkpoint(hf_dir))
    _, abstract = abstract_model(cfg)
    shardings = _flat(nnx.to_pure_dict(state_shardings(abstract, mesh)))
    arrays = {}
    for path, leaf in _flat(nnx.to_pure_dict(abstract)).items():
        try:
            shardings[path].shard_shape(leaf.shape)
        except ValueError:
            raise ConfigError(f"the mesh {dict(mesh.shape)} does not split weight {'.'.join(path)} {leaf.shape} "
                              "evenly; pick mesh sizes that divide the model's widths.") from None
        arrays[path] = _read_weight(rules[path], tensors, leaf.shape, leaf.dtype, layer_count(path, cfg),
                                    shardings[path])
    unread = sorted(set(tensors) - tensors.read - set(architecture.tied_copies(cfg)))
    if unread:
        notes.append(f"ignored {len(unread)} tensor(s) lmjax has no place for: {', '.join(unread)}.")
    pure = {}
    for path, array in arrays.items():
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    nnx.replace_by_pure_dict(abstract, pure)
    return abstract


def from_hf(hf_dir: Path, run_dir: Path, dtype: str = "float32", mesh_cfg: MeshConfig = MeshConfig()) -> list[str]:
    """Convert the transformers directory `hf_dir` into the lmjax run directory `run_dir`
    (weights in `dtype`); returns the notes on settings lmjax does not carry."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    notes: list[str] = []
    model = dataclasses.replace(model_config_from_hf(hf_dir, notes), dtype=dtype, param_dtype=dtype)
    tokenizer = "bytes" if model.vocab_size >= BYTE_VOCAB_SIZE else "none"
    if (hf_dir / "tokenizer.json").is_file():
        tokenizer = str((run_dir / "tokenizer.json").absolute())
        _check_tokenizer(hf_dir, model, notes)
    else:
        notes.append(f"no tokenizer.json: the run records data.tokenizer={tokenizer!r}; copy the model's "
                     "tokenizer.json into the run directory and set data.tokenizer to it before using text.")
    cfg = Config(name=f"hf-{hf_dir.name}", model=model,
                 data=DataConfig(tokenizer=tokenizer, seq_len=min(256, model.max_seq_len)),
                 train=TrainConfig(steps=1, run_dir=str(run_dir)))
    if (run_dir / "checkpoints").exists():
        raise ConfigError(f"{run_dir} already holds checkpoints; give a new --out directory.")
    mesh = make_mesh(mesh_cfg)
    params = import_params(hf_dir, model, mesh, notes)  # every check on the input runs before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer not in ("bytes", "none") and (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, run_dir / name)
    write_weights_run(run_dir, cfg.to_dict(), params)
    return notes


def _check_tokenizer(hf_dir: Path, model: ModelConfig, notes: list[str]) -> None:
    """Note when lmjax cannot use the directory's tokenizer.json (it is copied all the same)."""
    from lmjax.data import DataError
    from lmjax.data.subword import HFTokenizer

    try:
        tokenizer = HFTokenizer(hf_dir / "tokenizer.json")
    except DataError as e:
        notes.append(f"tokenizer.json is copied, but lmjax cannot use it: {e}")
        return
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"tokenizer.json has {tokenizer.vocab_size} ids, more than the model's vocab_size="
                          f"{model.vocab_size}; is it this model's tokenizer?")


def multiplier_folding_factors(cfg: ModelConfig) -> dict[str, float]:
    """{weight name: factor}: multiplied by these, the weights of `cfg` make the model of the
    same shape with the standard parametrization and no multipliers (logit and embedding
    multipliers 1) compute the same function, which is what transformers' models are. A weight
    name is its last path component, or the last two joined by "." ("embed.table"). The untied
    head takes `logit_scale` (the logit multiplier, and µP's 1/m); the router µP's 1/m; the
    token embedding the embedding multiplier; the attention queries the attention multiplier
    and µP's attention scale over the standard one (1.0 unless the head width grows). A tied
    table serves as both embedding and head, so it folds only when the two multipliers are
    equal: ConfigError otherwise."""
    if cfg.tie_embeddings and cfg.logit_scale != cfg.embedding_multiplier:
        raise ConfigError(f"the model multiplies its logits by {cfg.logit_scale:g} (model.logit_multiplier="
                          f"{cfg.logit_multiplier:g}{_mup_note(cfg)}) and its token embedding by "
                          f"{cfg.embedding_multiplier:g}, which a tied transformers head cannot hold; "
                          "export at the base width with equal multipliers, or train with model.tie_embeddings=false.")
    factors = {"embed.table": cfg.embedding_multiplier} if cfg.embedding_multiplier != 1.0 else {}
    if not cfg.tie_embeddings and cfg.logit_scale != 1.0:
        factors["unembed"] = cfg.logit_scale
    if cfg.attention_multiplier != 1.0:
        factors["wq"] = cfg.attention_multiplier
    if cfg.parametrization != "mup":
        return factors
    standard = unmultiplied(cfg)
    return {**factors, "unembed": cfg.logit_scale, "router": cfg.output_multiplier,
            "wq": cfg.attention_logit_scale / standard.attention_logit_scale}


def unmultiplied(cfg: ModelConfig) -> ModelConfig:
    """The model of `cfg`'s shape that transformers' models are: the standard parametrization,
    logit, embedding and attention multipliers 1 (what `multiplier_folding_factors` folds into
    the weights)."""
    return dataclasses.replace(cfg, parametrization="standard", logit_multiplier=1.0, embedding_multiplier=1.0,
                               attention_multiplier=1.0, mup_scale_adam_eps=False)


def _mup_note(cfg: ModelConfig) -> str:
    """', times 1/m = ...' for a µP model off its base width, else ''."""
    if cfg.output_multiplier == 1.0:
        return ""
    return (f", times µP's 1/m = {cfg.output_multiplier:g} at d_model={cfg.d_model}, "
            f"model.mup_base_width={cfg.mup_base_width}")


def folding_factor(factors: dict[str, float], path: tuple) -> float:
    """The factor of the weight at `path` (a tuple of keys) in `multiplier_folding_factors`' dict."""
    return factors.get(str(path[-1]), factors.get(".".join(str(p) for p in path[-2:]), 1.0))


def to_hf(run_dir: Path, hf_dir: Path, step: int | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write checkpoint `step` (default: newest) of `run_dir` as a transformers directory
    `hf_dir`; returns the notes on settings transformers does not carry."""
    from lmjax.data import load_from_run
    from lmjax.runs import load_config, restore_weights

    run_dir, hf_dir = Path(run_dir), Path(hf_dir)
    notes: list[str] = []
    cfg = load_config(run_dir)
    factors = multiplier_folding_factors(cfg.model)
    standard = unmultiplied(cfg.model)
    architecture = family_architecture(standard)
    hf_config = architecture.hf_config(standard, notes)
    rules = architecture.tensor_rules(standard)
    cfg, _, params, step, _ = restore_weights(run_dir, step)
    tensors = {}
    for path, array in _flat(nnx.to_pure_dict(params)).items():
        array = np.asarray(jax.device_get(array))
        if folding_factor(factors, path) != 1.0:
            array = array * folding_factor(factors, path)
        layers = layer_count(path, cfg.model)
        for i in [None] if layers is None else range(layers):
            tensors.update(rules[path].write(array) if i is None else rules[path].write(array[i], i=i))
    tokenizer = load_from_run(run_dir, cfg.data.tokenizer)
    hf_config.update(dtype=cfg.model.param_dtype, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.pad_id)
    decoder_start = family_of(cfg.model).decoder_start
    if decoder_start is not None:
        hf_config["decoder_start_token_id"] = decoder_start(tokenizer)  # lmjax decodes targets from bos
    write_tokenizer(run_dir, tokenizer, hf_dir, cfg.model.max_seq_len)
    save_checkpoint(tensors, hf_dir, max_shard_bytes)
    (hf_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    return notes
