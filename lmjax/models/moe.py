"""Mixture-of-experts feed-forward layer: float32 top-k router, two dispatch strategies,
Switch load-balancing and ST-MoE z losses, and per-layer routing statistics.

Shapes: B = batch, T = length, N = B * T tokens, D = d_model, E = experts, k = top_k,
F = one expert's hidden width, C = capacity (slots per expert and sequence).

Dispatch strategies (same interface, same result when nothing is dropped):
- "capacity" (GShard / Switch): each sequence is a group; expert e takes at most
  C = ceil(capacity_factor * k * T / E) of the group's assignments. Assignments are
  served in priority order: every token's first choice before any second choice, and
  within one choice, earlier positions first. Assignments past capacity are dropped (the
  token keeps its residual path and its other experts) and counted. One-hot dispatch and
  combine tensors (B, T, E, C) turn routing into einsums, so under expert parallelism the
  compiler exchanges the (E, B, C, D) expert inputs between devices with all-to-alls.
- "dropless" (MegaBlocks-style): the N * k assignments are sorted by expert and run
  through grouped matmuls; nothing is dropped. Two kernels: `jax.lax.ragged_dot`, or
  "blocks": groups padded to whole blocks of rows, each block multiplied by its expert's
  weights in one batched matmul (faster than ragged_dot on CPU, see docs/benchmarks.md). Under a mesh whose
  rules shard the `expert` logical axis the experts are split across those devices: each
  device gathers the tokens of its expert group, runs its own experts on the assignments
  routed to them, and the partial outputs are summed back onto the tokens' devices with a
  reduce-scatter.

Expert choice (Zhou et al. 2022, `routing="experts_choose"`, only in bidirectional stacks):
in each sequence every expert picks the C = ceil(capacity_factor * k * T / E) tokens with
the highest router probability for it (never padding); a token may be picked by several
experts or none (then it keeps only its residual path) and gets sum_e p_e * Expert_e(x).
The picked rows are gathered into (E, B, C, D) expert inputs (constrained to be split by
expert, so XLA exchanges them with all-to-alls, as in capacity dispatch) and the outputs
scattered back onto their tokens: no (B, T, E, C) one-hot.

Fine-grained experts (`granularity` G): the layer holds G * n_experts experts of width
F = d_ff / G and routes each token to G * top_k of them; `n_experts`/`top_k` below and in
the code are those G-fold numbers (`MoEConfig.n_routed_experts`, `experts_per_token`).

Router scores (`route`): softmax over experts, or one sigmoid per expert (DeepSeek-V3); the top k
are chosen on scores plus the layer's selection bias (`RouterBias`, when the config has one) and
weighted by the unbiased scores. The bias follows `bias_update` after each optimizer step.

Statistics kept per layer as an `nnx.Intermediate` "routing" (`pop_routing_statistics` collects them),
over the tokens that are not padding: `counts` (E,) assignments each expert received,
`load` (E,) share of assignments each expert received (sums to 1), `dropped` share of
assignments dropped, `unrouted` share of (non-padding) tokens no expert serves,
`entropy` mean router entropy (nats), `load_balance_loss`
E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4; f over all k choices, 1.0 when uniform),
`z_loss` mean_tokens logsumexp(router logits)^2 (Zoph et al. 2022, eq. 5), and
`experts` (B, T, k) the experts each token was routed to (before any drop) under token
choice, or `picked` (B, T, E) 1 where expert e picked the token under expert choice.
With a bias, `bias` (E,) the one this pass routed with; with `sequence_balance_coef` > 0, `sequence_balance_loss`.
Balancing losses and entropy read the scores as a distribution (`score_distribution`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from lmjax.axis_rules import constrain, logical_to_mesh, mesh_axes
from lmjax.config import ModelConfig
from lmjax.models.kernels import select_grouped_matmul
from lmjax.models.layers import MLP, param
from lmjax.models.weights import FactoredWeight, matmul, weight


class RouterBias(nnx.Variable):
    """A MoE layer's per-expert selection bias (E,) float32: added to the scores to choose the
    top k, never to the gate weights. Not a parameter: no gradient, optimizer state, weight decay
    or master copy; the train step moves it by the balancing rule (`update_router_bias`)."""


def route(logits, top_k: int, renormalize: bool, score: str = "softmax", bias=None):
    """logits (N, E) float32 -> (scores (N, E), weights (N, k), experts (N, k) int32).

    scores: softmax over experts ("softmax") or an independent sigmoid per expert ("sigmoid").
    The k experts are the largest of scores + bias (bias (E,) or None), in descending order;
    their weights are the unbiased scores, rescaled to sum to 1 with `renormalize`."""
    scores = jax.nn.softmax(logits, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits)
    if bias is None:
        weights, experts = jax.lax.top_k(scores, top_k)
    else:
        experts = jax.lax.top_k(scores + bias.astype(scores.dtype), top_k)[1]
        weights = jnp.take_along_axis(scores, experts, axis=-1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return scores, weights, experts


def score_distribution(scores, score: str):
    """Scores (..., E) as a distribution over experts: softmax scores as they are, sigmoid
    scores divided by their sum (DeepSeek-V3's normalised scores); what the balancing losses
    and the router entropy read."""
    return scores if score == "softmax" else scores / jnp.sum(scores, axis=-1, keepdims=True)


def router_statistics(logits, probs, experts, n_experts: int, token_mask=None) -> dict:
    """Balancing and z losses, assignment counts and load per expert, and router entropy of the
    tokens where token_mask (N,) is true (default: all); padding is left out. logits, probs (N, E)
    (probs: `score_distribution`), experts (N, k). See the module docstring."""
    mask = jnp.ones(logits.shape[:1], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    counts = jnp.tensordot(mask, jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32), axis=1), axes=1)
    return _balance_terms(logits, probs, counts, counts / jnp.maximum(jnp.sum(counts), 1.0), mask)


def _balance_terms(logits, probs, counts, load, mask) -> dict:
    """counts and load (E,), with the Switch balancing loss, z loss and router entropy averaged over
    the tokens where mask (the leading dims of logits and probs, float) is 1; padding (0) is left out."""
    tokens = jnp.maximum(jnp.sum(mask), 1.0)

    def token_mean(values):  # (*mask.shape, ...) -> mean over the tokens counted
        return jnp.tensordot(mask, values, axes=mask.ndim) / tokens

    return {
        "counts": counts,
        "load": load,
        "load_balance_loss": counts.shape[0] * jnp.sum(load * token_mean(probs)),
        "z_loss": token_mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        "entropy": -token_mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-20)), axis=-1)),
    }


def sequence_balance_loss(probs, experts, n_experts: int, token_mask=None):
    """DeepSeek-V3's sequence-wise balancing loss (Liu et al. 2024, eqs. 17-19): per row,
    E * sum_i f_i * P_i with f_i the share of the row's k * T assignments routed to expert i and
    P_i the row's mean of `score_distribution`, averaged over rows; padding (token_mask false) is
    left out. probs (B, T, E), experts (B, T, k), token_mask (B, T) or None -> scalar (1.0 when
    every row is balanced)."""
    mask = jnp.ones(probs.shape[:2], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    tokens = jnp.sum(mask, axis=1)  # (B,)
    counts = jnp.einsum("bt,bte->be", mask, jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32), axis=2))
    share = counts / jnp.maximum(tokens * experts.shape[-1], 1.0)[:, None]
    mean_probs = jnp.einsum("bt,bte->be", mask, probs) / jnp.maximum(tokens, 1.0)[:, None]
    per_row = n_experts * jnp.sum(share * mean_probs, axis=-1)
    rows = tokens > 0
    return jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(jnp.sum(rows), 1)


def max_violation(load):
    """MaxVio (Wang et al. 2024): E * max_i load_i - 1 of loads (..., E) given as shares of the
    assignments; 0 when balanced, E / k - 1 when every token's k choices are the same k experts."""
    return load.shape[-1] * jnp.max(load, axis=-1) - 1.0


def bias_update(bias, counts, rate: float):
    """The auxiliary-loss-free balancing rule: bias + rate * sign(mean_i counts_i - counts),
    bias and counts (..., E) (counts: assignments per expert in the step, any common scale)."""
    return bias + rate * jnp.sign(jnp.mean(counts, axis=-1, keepdims=True) - counts).astype(bias.dtype)


def update_router_bias(state: nnx.State, counts_by_stack: dict, rate: float) -> nnx.State:
    """`state` with every `RouterBias` (L_moe, E) moved by `bias_update` with its stack's
    assignment counts (L_moe, E) (`counts_by_stack[name]`, name the stack's attribute in the
    model: "stack", or "encoder"/"decoder")."""

    def update(path, variable):
        if not isinstance(variable, RouterBias):
            return variable
        return variable.replace(bias_update(variable[...], counts_by_stack[path[0].key], rate))

    return jax.tree_util.tree_map_with_path(update, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def expert_capacity(capacity_factor: float, top_k: int, length: int, n_experts: int) -> int:
    """Slots per expert and sequence: ceil(capacity_factor * k * T / E), at least 1."""
    return max(1, math.ceil(capacity_factor * top_k * length / n_experts))


def experts_choose(probs, valid, capacity: int):
    """Expert-choice routing, one group per row: probs (B, T, E) router probabilities, valid
    (B, T) bool (False: padding), capacity C <= T -> (token (B, E, C) int32 the positions each
    expert picks, highest probability first; weight (B, E, C) their probability, 0 where a row
    has fewer than C real tokens and the pick is padding, which is thus never served)."""
    scores = jnp.where(valid[..., None], probs, -1.0)  # padding below every probability
    weight, token = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)
    return token, jnp.where(weight >= 0, weight, 0.0)


def expert_choice_statistics(logits, probs, token, weight, valid) -> dict:
    """Routing statistics of `experts_choose` (module docstring): logits, probs (B, T, E),
    token, weight (B, E, C), valid (B, T). An expert's load counts its served picks; the
    means over tokens leave padding out, as under token choice."""
    b, t, n_experts = probs.shape
    served = (weight > 0).astype(jnp.float32)
    picked = jax.vmap(lambda i, s: jnp.zeros((n_experts, t)).at[jnp.arange(n_experts)[:, None], i].add(s))(
        token, served)  # (B, E, T)
    counts = jnp.sum(picked, axis=(0, 2))
    load = counts / jnp.maximum(jnp.sum(served), 1.0)
    unserved = valid & (jnp.sum(picked, axis=1) == 0)
    return {
        **_balance_terms(logits, probs, counts, load, valid.astype(jnp.float32)),
        "dropped": jnp.zeros((), jnp.float32),
        "unrouted": jnp.sum(unserved) / jnp.maximum(jnp.sum(valid), 1),
        "picked": jnp.swapaxes(picked, 1, 2).astype(jnp.int8),
    }


def capacity_dispatch(experts, weights, n_experts: int, capacity: int):
    """Dispatch and combine tensors of capacity routing.

    experts, weights (B, T, k) -> dispatch (B, T, E, C) 0/1 in float32, combine (B, T, E, C)
    routing weight of each kept assignment, and the number of kept assignments.
    """
    b, t, k = experts.shape
    choice = jax.nn.one_hot(experts, n_experts, dtype=jnp.int32)  # (B, T, k, E)
    by_priority = jnp.swapaxes(choice, 1, 2).reshape(b, k * t, n_experts)  # choice rank major, position minor
    slot = jnp.cumsum(by_priority, axis=1) - 1
    slot = jnp.swapaxes(slot.reshape(b, k, t, n_experts), 1, 2)  # (B, T, k, E)
    kept = choice * (slot < capacity)
    slots = jax.nn.one_hot(jnp.where(kept == 1, slot, -1), capacity, dtype=jnp.float32)  # (B, T, k, E, C)
    dispatch = jnp.sum(slots, axis=2)
    combine = jnp.einsum("btkec,btk->btec", slots, weights.astype(jnp.float32))
    return dispatch, combine, jnp.sum(kept)


def expert_matmul(equation: str, x, w):
    """jnp.einsum(equation, x, w) in x's dtype, for expert weights w (E', in, out) whose
    subscripts are the equation's second operand; a `FactoredWeight` (a LoRA-adapted weight)
    computes the product itself."""
    if isinstance(w, FactoredWeight):
        return w.expert_matmul(equation, x)
    return jnp.einsum(equation, x, w.astype(x.dtype))


def _ragged_matmul(x, w, group_sizes):
    """`jax.lax.ragged_dot` of sorted rows x (M, in) with expert weights w (E, in, out) in x's
    dtype; a `FactoredWeight` computes the product itself."""
    if isinstance(w, FactoredWeight):
        return w.ragged_dot(x, group_sizes)
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def _expert_mlp(x, w_up, w_gate, w_down, equation_in: str, equation_out: str):
    """The experts' feed-forward by einsum; w_gate None means GELU."""
    up = expert_matmul(equation_in, x, w_up)
    hidden = jax.nn.gelu(up) if w_gate is None else jax.nn.silu(expert_matmul(equation_in, x, w_gate)) * up
    return expert_matmul(equation_out, hidden, w_down)


def _ragged_combine(x, token, scale, group_sizes, w_up, w_gate, w_down):
    """Assignments sorted by expert (token (M,) their token, scale (M,) their routing weight,
    group_sizes (E,) how many go to each expert) through their expert's feed-forward with
    `jax.lax.ragged_dot`, summed onto the tokens: x (N, D) -> (N, D). Sorted rows past
    sum(group_sizes) come out zero."""
    x_sorted = jnp.take(x, token, axis=0)
    up = _ragged_matmul(x_sorted, w_up, group_sizes)
    if w_gate is None:
        hidden = jax.nn.gelu(up)
    else:
        hidden = jax.nn.silu(_ragged_matmul(x_sorted, w_gate, group_sizes)) * up
    out = _ragged_matmul(hidden, w_down, group_sizes)
    return jnp.zeros_like(x).at[token].add(out * scale[:, None].astype(x.dtype))


def block_size(rows: int, n_experts: int) -> int:
    """Rows per block of the blocked grouped matmul: a power of two in [8, 128] near
    rows / (4 E), so padding every group to whole blocks adds at most ~1/4 of the rows.
    (Fewer, larger blocks mean fewer per-block weight copies: on CPU, 128-row blocks ran
    the moe_tiny layer 1.25x faster than 64-row ones.)"""
    return int(min(128, max(8, 2 ** math.floor(math.log2(max(rows / (4 * n_experts), 1))))))


def _blocked_combine(x, token, scale, group_sizes, w_up, w_gate, w_down):
    """The same contract as `_ragged_combine`, as dense batched matmuls over fixed-size blocks.

    Each expert's group is padded to whole blocks of b rows; block n holds the tokens of one
    expert and is multiplied by that expert's weights, gathered per block. Rows: M + E (b - 1)
    at most, so the shapes are static and the work is within E * b rows of the exact grouped
    product. Tokens are gathered straight into the blocks and the outputs scattered straight
    back onto the tokens. (On CPU several times faster than `ragged_dot`; docs/benchmarks.md.)
    """
    n, d = x.shape
    m, n_experts = token.shape[0], group_sizes.shape[0]
    b = block_size(m, n_experts)
    n_blocks = -(-(m + n_experts * (b - 1)) // b)
    padded_sizes = -(-group_sizes // b) * b
    padded_start = jnp.cumsum(padded_sizes) - padded_sizes  # (E,) first padded row of each group
    group_start = jnp.cumsum(group_sizes) - group_sizes  # (E,) first sorted row of each group
    row = jnp.arange(n_blocks * b)
    expert = jnp.clip(jnp.searchsorted(padded_start + padded_sizes, row, side="right"), 0, n_experts - 1)
    rank = row - padded_start[expert]
    valid = rank < group_sizes[expert]
    sorted_row = jnp.where(valid, group_start[expert] + rank, 0)
    row_token = jnp.where(valid, token[sorted_row], n)  # n: an all-zero input row / a discarded output row
    row_scale = jnp.where(valid, scale[sorted_row], 0).astype(x.dtype)
    x_blocks = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[row_token].reshape(n_blocks, b, d)
    block_expert = expert[::b]

    def per_block(w):  # (E, ...) -> (n_blocks, ...): each block's expert's weights (every leaf of a form)
        return jax.tree.map(lambda leaf: jnp.take(leaf, block_expert, axis=0).astype(x.dtype), w)

    out = _expert_mlp(x_blocks, per_block(w_up), None if w_gate is None else per_block(w_gate), per_block(w_down),
                      "nbd,ndf->nbf", "nbf,nfd->nbd").reshape(n_blocks * b, d)
    return jnp.zeros((n + 1, d), x.dtype).at[row_token].add(out * row_scale[:, None])[:n]


_GROUPED_COMBINE = {"ragged_dot": _ragged_combine, "blocks": _blocked_combine}


def dropless_combine(x, experts, weights, w_up, w_gate, w_down, first_expert=0, grouped_matmul="blocks"):
    """Sum over each token's routed experts of weight * Expert(x), for the experts held here.

    x (N, D); experts, weights (N, k); w_* hold experts first_expert .. first_expert + E_here
    - 1 along axis 0. Assignments to other experts contribute nothing. `grouped_matmul`:
    "ragged_dot" (`_ragged_combine`) or "blocks" (`_blocked_combine`). Returns (N, D).
    """
    k = experts.shape[1]
    n_here = w_up.shape[0]
    local = experts.reshape(-1) - first_expert
    here = (local >= 0) & (local < n_here)
    sort_key = jnp.where(here, local, n_here)
    order = jnp.argsort(sort_key, stable=True)
    group_sizes = jnp.bincount(sort_key, length=n_here + 1)[:n_here].astype(jnp.int32)
    scale = jnp.where(here, weights.reshape(-1), 0.0)[order]
    return _GROUPED_COMBINE[grouped_matmul](x, order // k, scale, group_sizes, w_up, w_gate, w_down)


def _expert_parallel_dropless(x, experts, weights, w_up, w_gate, w_down, mesh, grouped_matmul: str):
    """`dropless_combine` with the experts split over the mesh axes that shard the `expert`
    logical axis (see module docstring); x (B, T, D) and the routing (B, T, k) are sharded like
    activations. Every mesh axis named here comes from the logical-axis rules."""
    activation_axes = ("batch", "activation_length", None)
    (token_axes, _, _), (expert_axes, embed_axes, mlp_axes) = (mesh_axes(activation_axes, mesh),
                                                               mesh_axes(("expert", "embed", "mlp"), mesh))
    # expert axes that also split the tokens: gather the tokens over them, reduce-scatter the outputs back;
    # expert axes that do not: every device there already holds the same tokens, so the outputs are summed
    gathered = tuple(a for a in expert_axes if a in token_axes)
    summed = tuple(a for a in expert_axes if a not in token_axes) + mlp_axes  # + partial sums over hidden units
    batch_spec = logical_to_mesh(activation_axes, mesh)
    gated = w_gate is not None
    up_axes, down_axes = _leaf_axes(w_up, ("expert", "embed", "mlp")), _leaf_axes(w_down, ("expert", "mlp", "embed"))
    gate_axes = _leaf_axes(w_gate, ("expert", "embed", "mlp")) if gated else ()

    def all_gather(a, axes, axis):
        return jax.lax.all_gather(a, axes, axis=axis, tiled=True) if axes else a

    def whole_width(w, axes):  # every leaf of an expert weight gathered along its `embed` axis
        return jax.tree.map(lambda leaf, names: all_gather(leaf, embed_axes, names.index("embed"))
                            if "embed" in names else leaf, w, axes, is_leaf=lambda a: isinstance(a, tuple))

    def local(x, experts, weights, w_up, w_gate, w_down):
        b, t, d = x.shape

        def tokens(a):  # (B, T, ...) -> (B * T * gathered devices, ...): the tokens of this expert group
            return all_gather(a.reshape(b * t, *a.shape[2:]), gathered, 0)

        w_up, w_down = whole_width(w_up, up_axes), whole_width(w_down, down_axes)
        w_gate = whole_width(w_gate, gate_axes) if gated else None
        first = jax.lax.axis_index(expert_axes) * w_up.shape[0] if expert_axes else 0
        y = dropless_combine(tokens(x), tokens(experts), tokens(weights), w_up, w_gate, w_down, first,
                             grouped_matmul)
        if summed:
            y = jax.lax.psum(y, summed)
        if gathered:
            y = jax.lax.psum_scatter(y, gathered, tiled=True)
        return y.reshape(b, t, d)

    def specs(axes):
        return jax.tree.map(lambda names: logical_to_mesh(names, mesh), axes, is_leaf=lambda a: isinstance(a, tuple))

    w_gate_arg = w_gate if gated else jnp.zeros(())
    in_specs = (batch_spec, batch_spec, batch_spec, specs(up_axes), specs(gate_axes) if gated else PartitionSpec(),
                specs(down_axes))
    run = jax.shard_map(lambda x, e, w, u, g, dn: local(x, e, w, u, g if gated else None, dn),
                        mesh=mesh, in_specs=in_specs, out_specs=batch_spec, check_vma=False)
    return run(x, experts, weights, w_up, w_gate_arg, w_down)


def _leaf_axes(w, axes: tuple):
    """Logical axes of an expert weight w (E, in, out) named `axes`, in w's pytree shape (a
    `FactoredWeight` names its leaves' axes)."""
    return w.leaf_axes(axes) if isinstance(w, FactoredWeight) else axes


class MoE(nnx.Module):
    """Routed experts plus optional always-on shared experts. (B, T, D) -> (B, T, D).

    Expert weights are (E, D, F) / (E, F, D) with logical axes (expert, embed, mlp), so the
    `expert` mesh axis splits the experts, fsdp the width and tensor the hidden units. The
    router (D, E) is replicated; its logits are multiplied by `model.output_multiplier` (µP).
    `deterministic` (set by `model.eval()`) switches to the evaluation capacity factor and
    turns router jitter off.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        moe = cfg.moe
        self.n_experts, self.top_k, self.dispatch = moe.n_routed_experts, moe.experts_per_token, moe.dispatch
        self.routing_kind = moe.routing
        self.grouped_matmul = moe.grouped_matmul
        self.capacity_factor, self.eval_capacity_factor = moe.capacity_factor, moe.eval_capacity_factor
        self.jitter, self.renormalize = moe.router_jitter, moe.renormalize
        self.score, self.sequence_balance = moe.router, moe.sequence_balance_coef > 0
        self.deterministic = False
        self.router_multiplier = cfg.output_multiplier  # µP: the router is output-like
        d, f, e = cfg.d_model, cfg.expert_d_ff, moe.n_routed_experts
        std, out_std = cfg.hidden_init_std, cfg.residual_init_std
        self.router = param(rngs, (d, e), ("embed", None), cfg.output_init_std, cfg.param_dtype, role="output")
        if moe.router_bias:
            self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,), eager_sharding=False)
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, cfg.param_dtype, role="hidden")
        if cfg.mlp == "swiglu":
            self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, cfg.param_dtype, role="hidden")
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), out_std, cfg.param_dtype, role="hidden")
        if moe.n_shared_experts:
            self.shared = MLP(cfg, rngs=rngs, d_ff=cfg.shared_d_ff)

    def __call__(self, x, jitter_key=None, segment_ids=None):
        """x (B, T, D), segment_ids (B, T) (0: padding, left out of the routing statistics) or None
        -> (B, T, D)."""
        b, t, _ = x.shape
        logits = self._router_logits(x, jitter_key)  # (B, T, E) float32
        if self.routing_kind == "experts_choose":
            return self._experts_choose(x, logits, segment_ids)
        bias = self.router_bias[...] if hasattr(self, "router_bias") else None
        scores, weights, experts = route(logits.reshape(b * t, -1), self.top_k, self.renormalize, self.score, bias)
        probs = score_distribution(scores, self.score)
        token_mask = None if segment_ids is None else segment_ids != 0
        mask = None if token_mask is None else token_mask.reshape(b * t)
        stats = router_statistics(logits.reshape(b * t, -1), probs, experts, self.n_experts, mask)
        if self.sequence_balance:
            stats["sequence_balance_loss"] = sequence_balance_loss(probs.reshape(b, t, -1), experts.reshape(b, t, -1),
                                                                   self.n_experts, token_mask)
        if bias is not None:
            stats["bias"] = bias
        experts, weights = experts.reshape(b, t, -1), weights.reshape(b, t, -1)
        w_up, w_down = weight(self.w_up[...], x.dtype), weight(self.w_down[...], x.dtype)
        w_gate = weight(self.w_gate[...], x.dtype) if hasattr(self, "w_gate") else None
        if self.dispatch == "capacity":
            y, kept, served = self._capacity(x, experts, weights, w_up, w_gate, w_down)
            stats["dropped"] = 1.0 - kept / (b * t * self.top_k)
            valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
            stats["unrouted"] = jnp.sum(valid & (served == 0)) / jnp.maximum(jnp.sum(valid), 1)
        else:
            y = self._dropless(x, experts, weights, w_up, w_gate, w_down)
            stats["dropped"] = stats["unrouted"] = jnp.zeros((), jnp.float32)
        stats["experts"] = experts
        self.routing = nnx.Intermediate(stats)
        if hasattr(self, "shared"):
            y = y + self.shared(x)
        return y

    def _router_logits(self, x, jitter_key):
        """Router logits (B, T, E) in float32 (float64 if x is), with jitter while training."""
        router_dtype = jnp.promote_types(x.dtype, jnp.float32)
        router_in = x.astype(router_dtype)
        if self.jitter and jitter_key is not None and not self.deterministic:
            router_in = router_in * jax.random.uniform(jitter_key, x.shape, router_dtype, 1 - self.jitter,
                                                       1 + self.jitter)
        logits = matmul(router_in, weight(self.router[...], router_dtype))  # (B, T, E)
        if self.router_multiplier != 1.0:
            logits = logits * self.router_multiplier
        return logits

    def _capacity(self, x, experts, weights, w_up, w_gate, w_down):
        factor = self.eval_capacity_factor if self.deterministic else self.capacity_factor
        capacity = expert_capacity(factor, self.top_k, x.shape[1], self.n_experts)
        dispatch, combine, kept = capacity_dispatch(experts, weights, self.n_experts, capacity)
        expert_in = jnp.einsum("btec,btd->ebcd", dispatch.astype(x.dtype), x)
        expert_in = constrain(expert_in, ("expert", "expert_batch", None, None))
        expert_out = _expert_mlp(expert_in, w_up, w_gate, w_down, "ebcd,edf->ebcf",
                                 "ebcf,efd->ebcd")
        expert_out = constrain(expert_out, ("expert", "expert_batch", None, None))
        y = jnp.einsum("btec,ebcd->btd", combine.astype(x.dtype), expert_out)
        return constrain(y, ("batch", "activation_length", None)), kept, jnp.sum(dispatch, axis=(2, 3))

    def _expert_weights(self, dtype):
        """(w_up, w_gate or None, w_down) in the compute dtype."""
        w_gate = weight(self.w_gate[...], dtype) if hasattr(self, "w_gate") else None
        return weight(self.w_up[...], dtype), w_gate, weight(self.w_down[...], dtype)

    def _experts_choose(self, x, logits, segment_ids):
        """Expert-choice layer output (B, T, D) from router logits (B, T, E) (module docstring);
        shared experts are added as under token choice."""
        b, t, d = x.shape
        probs = jax.nn.softmax(logits, axis=-1)
        valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
        factor = self.eval_capacity_factor if self.deterministic else self.capacity_factor
        capacity = min(t, expert_capacity(factor, self.top_k, t, self.n_experts))
        token, gate = experts_choose(probs, valid, capacity)  # (B, E, C)
        self.routing = nnx.Intermediate(expert_choice_statistics(logits, probs, token, gate, valid))
        w_up, w_gate, w_down = self._expert_weights(x.dtype)
        expert_in = constrain(jnp.swapaxes(jax.vmap(lambda rows, i: rows[i])(x, token), 0, 1),
                              ("expert", "expert_batch", None, None))  # (E, B, C, D)
        expert_out = _expert_mlp(expert_in, w_up, w_gate, w_down, "ebcd,edf->ebcf", "ebcf,efd->ebcd")
        expert_out = constrain(expert_out, ("expert", "expert_batch", None, None))
        weighted = (jnp.swapaxes(expert_out, 0, 1) * gate[..., None].astype(x.dtype)).reshape(b, -1, d)
        y = jax.vmap(lambda out, i: jnp.zeros((t, d), x.dtype).at[i].add(out))(weighted, token.reshape(b, -1))
        y = constrain(y, ("batch", "activation_length", None))
        return y + self.shared(x) if hasattr(self, "shared") else y

    def _dropless(self, x, experts, weights, w_up, w_gate, w_down):
        kernel = select_grouped_matmul(self.grouped_matmul)
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or math.prod(mesh.shape.values()) == 1:
            b, t, d = x.shape
            y = dropless_combine(x.reshape(b * t, d), experts.reshape(b * t, -1), weights.reshape(b * t, -1),
                                 w_up, w_gate, w_down, grouped_matmul=kernel)
            return y.reshape(b, t, d)
        return _expert_parallel_dropless(x, experts, weights, w_up, w_gate, w_down, mesh, kernel)


# Routing statistics with a row per token ((B, T, k) expert ids; (B, T, E) picks under expert
# choice), for analysis: the training step and a pipelined stack leave them out.
PER_TOKEN_STATISTICS = ("experts", "picked")
# Routing statistics that count tokens (per expert): a batch's are the sum of its parts'; the
# others are shares and means, a batch's the mean of its (equal-sized) parts'.
SUMMED_STATISTICS = ("counts",)


def pop_routing_by_stack(model: nnx.Module) -> dict:
    """Remove and return the routing statistics the last forward pass sowed, per block stack:
    {stack attribute name ("stack", or "encoder" and "decoder"): dict of arrays stacked over that
    stack's MoE layers (L_moe, ...)} (see the module docstring); empty for a dense model."""
    sown = nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))
    return {name: sown[name]["routing"] for name in sorted(sown) if "routing" in sown[name]}


def concatenate_stacks(by_stack: dict) -> dict | None:
    """Per-stack routing statistics (`pop_routing_by_stack`) as one dict stacked over all MoE
    layers, the stacks in name order (statistics whose shapes differ between the stacks, such as
    `experts`, are left out); None when there are none."""
    stacks = list(by_stack.values())
    if len(stacks) <= 1:
        return stacks[0] if stacks else None
    return {key: jnp.concatenate([s[key] for s in stacks]) for key in stacks[0]
            if all(key in s and s[key].shape[1:] == stacks[0][key].shape[1:] for s in stacks)}


def pop_routing_statistics(model: nnx.Module) -> dict | None:
    """Remove and return the routing statistics the last forward pass sowed: a dict of
    arrays stacked over MoE layers (L_moe, ...) (see the module docstring), or None for a
    dense model. An encoder-decoder's two stacks are concatenated along L_moe (`concatenate_stacks`)."""
    return concatenate_stacks(pop_routing_by_stack(model))
