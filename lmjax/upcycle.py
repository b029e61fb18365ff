"""Sparse upcycling (Komatsuzaki et al. 2022): a dense run's weights as the start of a MoE run.

`lmjax upcycle DENSE_RUN --out RUN_DIR [--set model.moe.KEY=VALUE ...] [--noise S] [--seed N]`
writes a weights-only run directory (config, tokenizer, a step-0 checkpoint without optimizer
state, as `lmjax convert from-hf` and `lmjax lora merge` write) whose model is the dense one
with MoE feed-forwards (`model.moe.n_experts` 8 unless set, top-2 by default):

- every MoE layer's E experts are copies of that layer's dense MLP (w_up, w_gate, w_down),
  each multiplied elementwise by (1 + S * N(0, 1)) with `--noise S` (seeded; default exact);
- its router is new, drawn as a MoE model built from scratch with nnx.Rngs(`--seed`) draws it
  (so is any other variable only a MoE layer has);
- everything else (embeddings, attention, norms, dense layers, the head) is copied as is;
  with `model.moe.every` = p > 1, the stacked (L, ...) arrays of the dense run are re-split
  into the p - 1 dense layers of each period (`blocks`) and the MoE one (`moe_blocks`), in the
  order `lmjax.models.transformer.Stack` stacks them.

With renormalized top-k gates (they sum to 1 over copies of one MLP), dropless dispatch (no
assignment dropped), no shared experts and experts as wide as the dense MLP, the upcycled
model computes the dense model's function within float rounding: its `lmjax eval` loss is the
dense run's. Settings under which it cannot (capacity dispatch, renormalize=false, expert
choice, shared experts, another expert width or granularity) are refused: the first three
change no weight's shape, so set them when training the upcycled run (`lmjax train NAME
--init-from RUN_DIR --set ...`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.config import Config, ConfigError, LoRAConfig, ModelConfig
from lmjax.config_parse import override

DEFAULT_EXPERTS = 8  # Komatsuzaki et al.'s and Mixtral's expert count; top_k keeps MoEConfig's default, 2
EXPERT_WEIGHTS = ("w_up", "w_gate", "w_down")  # a MoE layer's expert weights, named as the dense MLP's


def upcycled_config(dense: Config, assignments: list[str], out_dir: Path) -> Config:
    """The config of the upcycled run: `dense`'s with the `model.moe.KEY=VALUE` `assignments`
    applied (`model.moe.n_experts` = 8 unless given), without LoRA, recorded at `out_dir`.
    ConfigError when `dense` is already MoE, an assignment is not a model.moe field, or the
    result cannot compute the dense function (`check_identity`)."""
    if dense.model.moe.enabled:
        raise ConfigError(f"the run is already a MoE model (model.moe.n_experts={dense.model.moe.n_experts}); "
                          "upcycle the dense run it came from.")
    keys = [a.partition("=")[0].strip() for a in assignments]
    others = [k for k in keys if not k.startswith("model.moe.")]
    if others:
        raise ConfigError(f"lmjax upcycle --set changes model.moe.* fields only, got {', '.join(others)}; change "
                          "other settings when training the upcycled run (lmjax train NAME --init-from RUN_DIR).")
    experts = [] if "model.moe.n_experts" in keys else [f"model.moe.n_experts={DEFAULT_EXPERTS}"]
    base = dataclasses.replace(dense, lora=LoRAConfig())
    cfg = override(base, [*experts, *assignments, f"train.run_dir={out_dir}"])
    if not cfg.model.moe.enabled:
        raise ConfigError("model.moe.n_experts=0 leaves the model dense; give at least 1 expert.")
    check_identity(cfg.model)
    return cfg


def check_identity(model: ModelConfig) -> None:
    """ConfigError unless copies of the dense MLP under `model.moe` compute the dense MLP: the
    gates of a token's experts must sum to 1 (renormalize), no assignment may be dropped
    (dropless), nothing may be added (no shared experts) and each expert must be the whole
    dense MLP (token choice, expert width d_ff, granularity 1)."""
    moe = model.moe
    problems = []
    if moe.dispatch != "dropless":
        problems.append(f"model.moe.dispatch={moe.dispatch!r} drops assignments past capacity (use dropless)")
    if not moe.renormalize:
        problems.append("model.moe.renormalize=false scales each token's output by its top-k probability mass")
    if moe.n_shared_experts:
        problems.append(f"model.moe.n_shared_experts={moe.n_shared_experts} adds new experts to every token's output")
    if moe.routing != "tokens_choose":
        problems.append(f"model.moe.routing={moe.routing!r} leaves tokens no expert picks without a feed-forward")
    if moe.granularity != 1:
        problems.append(f"model.moe.granularity={moe.granularity} splits the MLP into slices that a token's gates, "
                        "summing to 1, do not add back up")
    elif model.expert_d_ff != model.d_ff:
        problems.append(f"model.moe.d_ff={moe.d_ff} is not the dense MLP's width {model.d_ff} (leave it unset)")
    if problems:
        raise ConfigError("an upcycled model computes the dense model only with renormalized dropless routing over "
                          "whole copies of the MLP: " + "; ".join(problems) + ". Routing settings can change when "
                          "training it: lmjax train NAME --init-from RUN_DIR --set model.moe.KEY=VALUE.")


def source_of(path: tuple, model: ModelConfig) -> tuple[tuple | None, str]:
    """(the dense run's weight path, how) for the upcycled weight at `path`: how is "copy" (the
    same array), "layers" (the dense stack's array at this container's layers), "experts" (the
    dense MLP's at this container's layers, one copy per expert) or "new" (path None)."""
    if len(path) < 3 or path[1] not in ("blocks", "moe_blocks"):
        return path, "copy"
    stack, rest = path[0], path[2:]
    if rest[0] == "moe":
        if rest[1] in EXPERT_WEIGHTS:
            return (stack, "blocks", "mlp", rest[1]), "experts"
        return None, "new"  # the router, and any other variable a MoE layer alone has
    return (stack, "blocks", *rest), "layers"


def stacked_layers(container: str, n_layers: int, model: ModelConfig) -> list[int]:
    """The layers (0-based, execution order) whose weights `container` stacks: `blocks` the dense
    ones (all layers when every layer is MoE), `moe_blocks` the MoE ones (`transformer.Stack`)."""
    if container == "blocks" and model.moe.every == 1:
        return list(range(n_layers))
    moe = container == "moe_blocks"
    return [layer for layer in range(n_layers) if model.is_moe_layer(layer) == moe]


def _copies(array, n_experts: int, noise: float, key):
    """array (L, *w) -> (L, E, *w): E copies of each layer's matrix, each multiplied elementwise by
    (1 + noise * N(0, 1)) in float32 when noise > 0, in the array's dtype."""
    copies = jnp.broadcast_to(array[:, None], (array.shape[0], n_experts, *array.shape[1:]))
    if noise == 0:
        return copies
    scale = 1.0 + noise * jax.random.normal(key, copies.shape, jnp.float32)
    return (copies.astype(jnp.float32) * scale).astype(array.dtype)


def _upcycled(path: tuple, dense: dict, fresh: dict, model: ModelConfig, noise: float, key):
    """The upcycled weight at `path` from the dense run's weights `dense` and the fresh ones."""
    source, how = source_of(path, model)
    if how == "new":
        return fresh[path]
    value = dense[source]
    if how != "copy":
        value = value[jnp.asarray(stacked_layers(path[1], value.shape[0], model))]
    if how == "experts":
        value = _copies(value, model.moe.n_experts, noise, key)
    return value


def upcycle_params(dense_params: nnx.State, model: ModelConfig, mesh, noise: float = 0.0, seed: int = 0) -> nnx.State:
    """The weights (nnx.State, sharded over `mesh` by their logical axes) of the MoE model
    `model` made from the dense model's `dense_params` as the module docstring says: in one jit
    whose outputs are laid out as the upcycled model's weights, whose new weights are drawn as a
    model built with nnx.Rngs(seed) draws them (the compiler drops the other initialisers)."""
    from lmjax.families import family_of
    from lmjax.parallel import state_shardings
    from lmjax.train.state import abstract_model

    target = list(nnx.to_flat_state(abstract_model(model)[1]))
    shardings = {path: s.get_value() for path, s in nnx.to_flat_state(state_shardings(abstract_model(model)[1], mesh))}
    dense = {tuple(path): v[...] for path, v in nnx.to_flat_state(dense_params)}
    noise_key = jax.random.fold_in(jax.random.key(seed), 1)

    def build(dense):
        state = nnx.to_flat_state(nnx.state(family_of(model).build(model, nnx.Rngs(seed))))
        fresh = {path: v[...] for path, v in state if source_of(path, model)[1] == "new"}
        return {path: _upcycled(path, dense, fresh, model, noise, jax.random.fold_in(noise_key, index))
                for index, (path, _) in enumerate(target)}

    shapes = jax.eval_shape(build, dense)
    for path, variable in target:
        if shapes[path].shape != variable.shape:
            raise ConfigError(f"upcycled weight {'/'.join(map(str, path))} {variable.shape} does not fit the dense "
                              f"run's {shapes[path].shape}.")
    values = jax.jit(build, out_shardings=shardings)(dense)
    return nnx.from_flat_state([(path, variable.replace(values[path])) for path, variable in target])


def upcycle_run(run_dir: Path, out_dir: Path, assignments: list[str] = (), noise: float = 0.0,
                seed: int = 0) -> Config:
    """Write the dense run `run_dir`'s newest weights, upcycled, as the run directory `out_dir`;
    returns its config. Every check runs before anything is written."""
    from lmjax.adapters.int8 import is_quantized
    from lmjax.checkpoint import write_weights_run
    from lmjax.data import load_from_run, save_to_run
    from lmjax.runs import load_config, restore_weights

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"--out {out_dir} already exists; give a new directory.")
    if not noise >= 0:
        raise ConfigError(f"--noise must be >= 0 (a relative standard deviation), got {noise}.")
    if is_quantized(run_dir):
        raise ConfigError(f"{run_dir} is quantized (int8); upcycle the float run it came from.")
    cfg = upcycled_config(load_config(run_dir), list(assignments), out_dir)
    _, _, dense, _, mesh = restore_weights(run_dir)
    tokenizer = load_from_run(run_dir, cfg.data.tokenizer)
    params = upcycle_params(dense, cfg.model, mesh, noise, seed)
    out_dir.mkdir(parents=True)
    save_to_run(tokenizer, out_dir)
    write_weights_run(out_dir, cfg.to_dict(), params)
    return cfg
