"""Memory of a training step and of inference, per device, computed from a Config.

Everything is in bytes. Weights, gradients and the two Adam moments are stored in
`model.param_dtype` (optax keeps the moments in the parameters' dtype); with
`optim.master_weights` the optimizer also holds a float32 copy of the weights, and the
moments are float32 like it. Activations and the KV cache are in `model.dtype`.

Sharding follows `lmjax.axis_rules.LOGICAL_AXIS_RULES`: weight matrices have an `embed`
axis (fsdp) and a heads/mlp/vocab axis (tensor), so they are divided by fsdp x tensor;
routed experts are further divided by the expert axis; norm scales, the router and the
learned position table (`embed` only) by fsdp; the relative-bias tables (`heads`) by
tensor. The blocks are those of every stack the family spec lists (an encoder-decoder's
decoder blocks with their cross-attention included); their weights (and so gradients, master
copy and Adam moments) are further divided by the pipeline stages (the `layers` axis). The batch
is divided by data x fsdp x expert, and each sequence by context (context parallelism also holds
the keys and values gathered from the other devices: `context_parallel_bytes`). Rounding of
uneven shards is ignored.

Activations saved for the backward pass, per layer and per token, in elements (our own
count for lmjax's block, following the method of Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", sec. 4.1, which gives
34*h + 5*a*s bytes per token and layer for GPT in 16-bit with dropout):

- remat "none":  5*d (block input, two norm outputs, attention context, mid-block residual)
  + q, k, v (d + 2*kv*hd) + feed-forward hidden (SwiGLU 3*f, GELU 2*f; MoE layers: f_expert
  x (top_k + shared), plus n_experts router logits in float32) + attention probabilities
  n_heads * T in float32 and again in `dtype` (the einsum kernel; flash attention on GPU
  keeps none of these, so this term is an upper bound there).
- remat "dots" (matmul outputs saved): q, k, v, the attention and MLP output projections
  (2*d), the feed-forward matmul outputs (SwiGLU 2*f, GELU f) and the block input d.
- remat "full": the block input d per layer, plus one layer's "none" activations while it
  is recomputed.
- remat "minimal_with_context": as "dots", plus the attention context (n_heads * head_dim).
- remat "save_dot_except_mlp" / "save_qkv_proj" / "save_out_proj": the block input plus,
  respectively, q, k, v, the context and the attention output projection / q, k, v / the
  attention output projection, and (as "full") one layer's "none" activations while recomputed.

A LoRA run (`lora.rank` > 0) holds its adapters, and their gradients, master copy and Adam
moments alone (their bytes come from the LoRA code): its step applies x W + (alpha / r) (x A) B,
so nothing the size of the frozen weights is formed or differentiated.

Plus the float32 logits and their gradient (2 * V * 4 bytes per position), of one chunk of
`model.loss_chunk` positions at a time (`lmjax.models.head`): per token of the batch, that
times chunk / seq_len.
Activations are per micro-batch (train.batch_size / optim.grad_accum_steps).
"""

from __future__ import annotations

from lmjax.config import Config, ModelConfig
from lmjax.families import family_of
from lmjax.models.head import chunk_positions
from lmjax.scaling.counting import attention_params, mlp_params, norm_params, relative_bias_params

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def mesh_sizes(cfg: Config, n_devices: int) -> dict[str, int]:
    """{axis: size} of cfg.mesh over `n_devices` (-1 filled), for every axis of MESH_AXES."""
    return cfg.mesh.axis_sizes(n_devices)


def param_elements_per_device(m: ModelConfig, sizes: dict[str, int]) -> float:
    """Weights each device stores under the sharding rules (see the module docstring)."""
    fsdp, tensor, expert, stages = sizes["fsdp"], sizes["tensor"], sizes["expert"], sizes["pipeline"]
    matrices = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    vectors = m.max_seq_len * m.d_model if m.position == "learned" else 0
    block_matrices = block_vectors = experts = 0  # the stacked blocks': split over the pipeline stages too
    for stack in family_of(m).stacks(m):
        vectors += norm_params(m)  # the stack's final norm
        for layer in range(stack.n_layers):
            block_matrices += attention_params(m) * (2 if stack.cross else 1)
            block_vectors += (3 if stack.cross else 2) * norm_params(m)
            if m.is_moe_layer(layer):
                block_vectors += m.d_model * m.moe.n_routed_experts  # router
                experts += m.moe.n_routed_experts * mlp_params(m, m.expert_d_ff)
                block_matrices += mlp_params(m, m.shared_d_ff) if m.moe.n_shared_experts else 0
            else:
                block_matrices += mlp_params(m, m.d_ff)
    matrices += block_matrices / stages
    vectors += block_vectors / stages
    return (matrices / (fsdp * tensor) + experts / (fsdp * tensor * expert * stages) + vectors / fsdp
            + relative_bias_params(m) / tensor)


def activation_bytes_per_token(m: ModelConfig, seq_len: int, remat: str | None = None, tensor: int = 1,
                               rows: float = 1, stages: int = 1, bubble: float = 0.0) -> float:
    """Bytes of activations kept for the backward pass per token of a training batch of `rows`
    sequences per device (the layers and one chunk of the logits), with the tensor-sharded
    parts divided by `tensor`. With pipeline `stages`, a device runs 1/stages of the layers, for
    every microbatch of the batch (GPipe keeps all M in flight until the backward pass), and
    the schedule's idle steps (the `bubble` share) keep theirs too: the layers' part is times
    1 / (stages * (1 - bubble)) = (M*R + P - 1) / (M*R*P)."""
    remat = remat or m.remat
    b = DTYPE_BYTES[m.dtype]
    d, q_width, kv_width = m.d_model, m.n_heads * m.head_dim, 2 * m.kv_heads * m.head_dim
    gated = m.gated_mlp

    def layer_bytes(layer: int, policy: str) -> float:
        if m.is_moe_layer(layer):
            f = m.expert_d_ff * m.moe.experts_per_token + m.shared_d_ff
            router = m.moe.n_routed_experts * 4
        else:
            f, router = m.d_ff, 0
        if policy == "none":
            probs = m.n_heads * seq_len * (4 + b)
            per_tensor = (d + kv_width + (3 if gated else 2) * f) * b + probs  # heads and mlp parts
            return 5 * d * b + router + per_tensor / tensor
        dots = 4 * d * b + router + (kv_width + (2 if gated else 1) * f) * b / tensor
        saved = {  # the block input, plus what each policy keeps (lmjax.models.transformer.REMAT_POLICIES)
            "dots": dots,
            "minimal_with_context": dots + q_width * b / tensor,
            "save_dot_except_mlp": 2 * d * b + (2 * q_width + kv_width) * b / tensor,
            "save_qkv_proj": d * b + (q_width + kv_width) * b / tensor,
            "save_out_proj": 2 * d * b,
        }
        return saved.get(policy, d * b)  # full: the block input only

    layers = sum(layer_bytes(i, remat) for i in range(m.n_layers))
    if remat in ("full", "save_dot_except_mlp", "save_qkv_proj", "save_out_proj"):  # one layer recomputed at a time
        layers += max(layer_bytes(i, "none") for i in range(m.n_layers))
    layers /= stages * (1 - bubble)
    logits_per_position = m.vocab_size * 4 / tensor
    chunk = chunk_positions(m.loss_chunk, seq_len, rows * logits_per_position)
    return layers + 2 * logits_per_position * chunk / seq_len


def kv_cache_bytes_per_token(m: ModelConfig) -> int:
    """Decoding-cache bytes per cached position: 2 (keys and values) * decoding layers *
    kv_heads * head_dim * bytes(model.dtype). Decoding layers: n_layers for a decoder,
    n_decoder_layers for an encoder-decoder (whose cross-attention cache holds as much per
    encoder position as its self-attention cache per target), none for an encoder: the layers
    of the family's causal stacks."""
    layers = sum(stack.n_layers for stack in family_of(m).stacks(m) if stack.causal)
    return 2 * layers * m.kv_heads * m.head_dim * DTYPE_BYTES[m.dtype]


def kv_cache_positions(m: ModelConfig) -> int:
    """Cached positions of one sequence of model.max_seq_len tokens: the context of a decoder;
    the targets and the encoder inputs (cross-attention) of an encoder-decoder."""
    cross = any(stack.cross for stack in family_of(m).stacks(m) if stack.causal)
    return m.max_seq_len * (2 if cross else 1)


def kv_cache_bytes_per_sequence(m: ModelConfig, length: int | None = None) -> int:
    """Decoding-cache bytes of one sequence of `length` positions (default: model.max_seq_len, and
    for an encoder-decoder as many encoder inputs), as `init_cache` allocates them: every decoding
    layer caches each position, except that a
    sliding-window layer (`model.sliding_window` W, decoder only) keeps a ring of min(W, length)
    (plus, not counted here, one int32 position per ring slot and row)."""
    per_token = kv_cache_bytes_per_token(m)
    if m.sliding_window is None:
        return per_token * (kv_cache_positions(m) if length is None else length)
    length = length or m.max_seq_len
    held = sum(min(m.attention_window(i) or length, length) for i in range(m.n_layers))
    return per_token // m.n_layers * held


def memory_estimate(cfg: Config, n_devices: int = 1, inference_batch: int = 1, adapter_bytes: float = 0,
                    int8_bytes: tuple[float, float] | None = None) -> dict[str, float]:
    """Bytes per device for training (weights, grads, Adam, activations) and for inference
    (weights + a KV cache of `inference_batch` sequences of model.max_seq_len tokens, sliding-window
    layers holding their window: `kv_cache_bytes_per_sequence`).

    The weight transforms' sizes come in as plain numbers, from the transforms themselves:
    `adapter_bytes`, a LoRA run's adapters in `model.param_dtype` (counted whole on every
    device: an upper bound, their width axes are sharded like their weights'), and
    `int8_bytes`, (the weights as `lmjax quantize` stores them: int8 matrices, float32 scales;
    the same weights in `model.param_dtype`), whole model, which adds the int8 weights and
    inference bytes. ValueError when the config turns LoRA or int8 on without its size."""
    if cfg.lora.enabled != (adapter_bytes > 0) or (cfg.quant.weights == "int8") != (int8_bytes is not None):
        raise ValueError("memory_estimate needs adapter_bytes exactly for a LoRA run (lora.rank > 0) and "
                         "int8_bytes exactly for quant.weights='int8'.")
    m = cfg.model
    sizes = mesh_sizes(cfg, n_devices)
    elements = param_elements_per_device(m, sizes)
    param_bytes = elements * DTYPE_BYTES[m.param_dtype]
    master_bytes = elements * 4 if cfg.optim.master_weights else 0  # float32 master copy
    adam_bytes = 2 * (master_bytes or param_bytes)  # the moments mirror the weights being optimized
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro_batch_tokens = cfg.train.batch_size // cfg.optim.grad_accum_steps * cfg.data.seq_len
    rows = micro_batch_tokens / batch_shards / cfg.data.seq_len
    stages = sizes["pipeline"]
    activations = activation_bytes_per_token(m, cfg.data.seq_len, tensor=sizes["tensor"], rows=rows, stages=stages,
                                             bubble=cfg.mesh.bubble_fraction(stages)) * (
        micro_batch_tokens / batch_shards / sizes["context"])
    context = context_parallel_bytes(cfg, sizes, rows)
    activations += context.get("memory_context_kv_bytes", 0)
    kv_per_token = kv_cache_bytes_per_token(m)
    kv_cache = kv_cache_bytes_per_sequence(m) * inference_batch / sizes["tensor"]  # kv_heads split by tensor
    gradient_bytes = param_bytes
    if cfg.lora.enabled:  # the adapters, their gradients, master copy and moments; the weights get none
        gradient_bytes = adapter_bytes
        master_bytes = adapter_bytes * 4 / DTYPE_BYTES[m.param_dtype] if cfg.optim.master_weights else 0
        adam_bytes = 2 * (master_bytes or adapter_bytes)
    int8 = {}
    if int8_bytes is not None:  # `lmjax quantize`'s storage, which a quantized run keeps in memory
        quantized, unquantized = int8_bytes
        stored = param_bytes * quantized / unquantized
        int8 = {"memory_int8_weights_bytes": stored, "memory_int8_inference_bytes": stored + kv_cache}
    return {
        "memory_weights_bytes": param_bytes,
        **({"memory_adapters_bytes": adapter_bytes} if cfg.lora.enabled else {}),
        "memory_gradients_bytes": gradient_bytes,
        "memory_adam_bytes": adam_bytes,
        "memory_master_weights_bytes": master_bytes,
        "memory_activations_bytes": activations,
        "memory_train_bytes": (param_bytes + adapter_bytes + gradient_bytes + master_bytes + adam_bytes
                               + activations),
        "kv_cache_bytes_per_token": kv_per_token,
        "kv_cache_bytes_per_sequence": kv_cache_bytes_per_sequence(m),
        "memory_inference_bytes": param_bytes + kv_cache,
        **int8,
        **context,
    }


def context_parallel_bytes(cfg: Config, sizes: dict[str, int], rows: float) -> dict[str, float]:
    """What context parallelism (mesh.context = n > 1) adds per device, for `rows` sequences per
    device and micro-step: `memory_context_kv_bytes`, the keys and values gathered from the other
    n - 1 devices (rows x T x 2 x kv_heads x head_dim x (n-1)/n in model.dtype per layer, kept for
    every layer with remat "none", else for the one layer being recomputed), and
    `context_comm_bytes_per_step`, the bytes each device receives for them per step: a
    gather forward, the gradients' all-reduce backward (twice a gather), and one more gather per
    layer recomputed under remat. Empty when mesh.context is 1 (tensor-split heads divide both).
    With P pipeline stages a device runs L/P layers for every microbatch, idle steps included
    (times 1 / (1 - bubble), as `activation_bytes_per_token`), and recomputes one layer of one
    microbatch (rows / M) at a time."""
    n, m = sizes["context"], cfg.model
    if n == 1:
        return {}
    gathered = rows * cfg.data.seq_len * 2 * m.kv_heads * m.head_dim * DTYPE_BYTES[m.dtype] * (n - 1) / n
    gathered /= sizes["tensor"]
    stages = sizes["pipeline"]
    layers = m.n_layers / (stages * (1 - cfg.mesh.bubble_fraction(stages)))  # layer passes per device
    one_layer = gathered / (cfg.mesh.microbatches(stages) if stages > 1 else 1)
    per_layer_passes = 3 + (m.remat != "none")
    return {"memory_context_kv_bytes": gathered * layers if m.remat == "none" else one_layer,
            "context_comm_bytes_per_step": gathered * per_layer_passes * layers * cfg.optim.grad_accum_steps}
