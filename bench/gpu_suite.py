"""lmjax's GPU measurement in one command: at most ~6 minutes on one H100/H200.

    PYTHONPATH=. python3 bench/gpu_suite.py --out gpu_out      # on the GPU (see docs/benchmarks.md)
    python bench/gpu_suite.py --smoke --out /tmp/smoke          # every row at tiny shapes, CPU, < 2 min

Writes gpu_suite.json (every row, every number) and gpu_suite.md (the tables) into --out,
rewritten after each row, so a run stopped early keeps what it measured. Shapes, batch sizes
and step counts are fixed here beforehand; rows run in order of importance and those that
would start after --budget-seconds are recorded as skipped. A row that fails (e.g. out of
memory) records its error and the suite goes on. Imports neither grain nor wandb.

Rows (all steps on random tokens, one sequence per row, no data loading in the timing):
- peak: a bf16 matmul's FLOP/s and a device copy's bandwidth (bytes read + written / s),
  measured here as the ceilings the other rows are compared with.
- compile: `jit(...).lower().compile()` seconds of the dense training step at 12 and 24 layers
  (JAX's persistent compilation cache is on, in --cache-dir; these rows run first, cold on a
  fresh machine, and the dense row of the same shape then reads its executable from the cache).
- dense: a ~1.3B decoder (d_model 2048, 24 layers, 16 heads, d_ff 5632, vocab 32000, seq 2048,
  bf16 compute, fp32 params, remat minimal_with_context), per `model.attention` setting, and
  once more (last) with bf16 params and fp32 master weights in the optimizer; step
  time, tokens/s, MFU against the vendor's bf16 peak (989 TFLOP/s on H100/H200) and the achieved
  FLOP/s as a fraction of the measured matmul peak. FLOPs: `train_flops_per_token` (6N + attention).
- moe: 8 experts, top-2, expert d_ff = d_ff / 2 (active parameters equal to the dense model's),
  each dispatch; step time over the dense step of the same depth, and MFU (active FLOPs). On a
  GPU with under 100 GB the MoE rows and their dense reference use 12 layers (recorded).
- decode: greedy decoding with the KV cache at batch 1 and 32 (bf16 weights), tokens/s against
  the bandwidth bound (weight bytes + KV-cache bytes read per step) at the spec bandwidth and
  at the measured copy bandwidth. lmjax's attention reads the whole cache buffer (prompt + new
  tokens) at every step, and the bound counts that whole buffer.
- packing: a tiny decoder's packed documents against each document alone (bench/packing.py):
  with `auto` in bfloat16 the lone rows run cuDNN flash attention and the packed rows XLA
  (cuDNN's public API takes no segment ids), so the losses differ by bfloat16 rounding (~1e-2)
  and a dropped segment mask would show as ~1; `dot_product` in float32 compares XLA with
  itself (CPU: under 1e-5).
- long: the dense decoder on one row of 16384 positions (remat full, `attention=auto`, the
  loss chunked by size), its sequence split over every device of the machine (`mesh.context`:
  1 on one GPU); step time, tokens/s, MFU (attention FLOPs included) and XLA's temporaries.
- pipeline (more than one device; one: skipped): the dense row's step in GPipe stages over the
  devices (the most stages that divide the devices and the layers, at most the batch; the rest
  data parallel; one sequence per microbatch and device): step time over the dense row's (all
  devices data parallel) beside the bubble (P-1)/(M+P-1).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path

from lmjax.xla_setup import apply_gpu_preset, enable_compilation_cache

FULL = {
    "dense": dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, d_ff=5632, max_seq_len=2048,
                  tie_embeddings=False, dtype="bfloat16", remat="minimal_with_context"),
    "batch": 8, "seq": 2048, "steps": 8, "warmup": 2, "compile_layers": (12, 24),
    "matmul_size": 8192, "copy_bytes": 4 << 30, "decode_prompt": 128, "decode_new": 256, "decode_batches": (1, 32),
    "long_seq": 16384,
}
SMOKE = {
    "dense": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64, tie_embeddings=False,
                  dtype="bfloat16", remat="minimal_with_context"),
    "batch": 2, "seq": 32, "steps": 2, "warmup": 1, "compile_layers": (1, 2),
    "matmul_size": 256, "copy_bytes": 8 << 20, "decode_prompt": 8, "decode_new": 8, "decode_batches": (1, 4),
    "long_seq": 128,
}
ATTENTION = ("auto", "dot_product", "einsum")
MOE_DISPATCH = (("dropless", "ragged_dot"), ("dropless", "blocks"), ("capacity", "auto"))


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn (each waited for), after one warm-up call."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_peaks(shapes: dict) -> dict:
    """bf16 matmul FLOP/s (n x n x n) and copy bandwidth (bytes read + written per second)."""
    import jax
    import jax.numpy as jnp

    n = shapes["matmul_size"]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul_seconds = timed(lambda: matmul(a, b), 10)
    x = jnp.zeros((shapes["copy_bytes"] // 2 // 1024, 1024), jnp.bfloat16)  # 2-D: no 2**31-element axis
    copy = jax.jit(lambda v: v + 1)
    copy_seconds = timed(lambda: copy(x), 10)
    return {"matmul_bf16_flops": 2 * n**3 / matmul_seconds, "matmul_size": n,
            "copy_bytes_per_s": 2 * x.nbytes / copy_seconds, "copy_bytes": x.nbytes}


def random_batch(batch: int, seq: int, vocab: int) -> dict:
    """Random tokens (B, T): one sequence per row, so no segment ids."""
    import jax
    import jax.numpy as jnp

    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, vocab)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq)),
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}


def attention_kernel(model) -> str:
    """The kernel `model.attention` selects here for a causal, unpadded batch."""
    import jax.numpy as jnp

    from lmjax.models.kernels import AttentionMask, select_attention

    mask = AttentionMask(jnp.ones((1, 1, 1, 1), bool), causal=True)
    return select_attention(model.attention, mask, False, model.dtype, model.head_dim)


def _step_function(model, mesh):
    from lmjax.config import OptimConfig
    from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
    from lmjax.train.state import abstract_train_state
    from lmjax.train.step import make_train_step

    optim = OptimConfig(warmup_steps=10, master_weights=model.param_dtype == "bfloat16")
    make = lambda params: make_optimizer(optim, 1000, params)  # noqa: E731
    graphdef, abstract, optimizer = abstract_train_state(model, make, mesh)
    step = make_train_step(graphdef, optimizer, learning_rate_schedule(optim, 1000), 1, False, model.moe)
    return step, abstract, make


def compile_training(model, batch: int, seq: int, mesh) -> float:
    """Seconds to lower and compile one training step, from abstract shapes (nothing allocated)."""
    import jax

    step, abstract, _ = _step_function(model, mesh)
    batch_shapes = jax.eval_shape(lambda: random_batch(batch, seq, model.vocab_size))
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # the same program as time_training's, so that one reads it from the cache
        jax.jit(step, donate_argnums=0, out_shardings=(shardings, None, None)).lower(abstract, batch_shapes).compile()
    return time.perf_counter() - start


def time_training(model, shapes: dict, mesh, peaks: dict) -> dict:
    """Compile, warm up and time training steps of `model`; tokens/s, MFU, loss."""
    import jax

    from lmjax.scaling.counting import param_counts, train_flops_per_token
    from lmjax.train.metrics import peak_flops_per_device
    from lmjax.train.state import init_train_state

    batch, seq = shapes["batch"], shapes["seq"]
    step, _, make = _step_function(model, mesh)
    _, state, shardings, _ = init_train_state(model, make, 0, mesh)
    data = random_batch(batch, seq, model.vocab_size)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=0, out_shardings=(shardings, None, None)).lower(state, data).compile()
    compile_seconds = time.perf_counter() - start
    times = []
    for i in range(shapes["warmup"] + shapes["steps"]):
        start = time.perf_counter()
        state, metrics, _ = compiled(state, data)
        jax.block_until_ready(metrics)
        if i >= shapes["warmup"]:
            times.append(time.perf_counter() - start)
    step_seconds = statistics.median(times)
    tokens_per_s = batch * seq / step_seconds
    flops_per_s = tokens_per_s * train_flops_per_token(model, seq)
    counts = param_counts(model)
    return {"layers": model.n_layers, "batch": batch, "seq": seq, "params_total": counts["params_total"],
            "params_active": counts["params_active"], "compile_s": compile_seconds, "step_ms": step_seconds * 1e3,
            "tokens_per_s": tokens_per_s, "mfu": flops_per_s / peak_flops_per_device("bfloat16"),
            "fraction_of_matmul_peak": flops_per_s / peaks["matmul_bf16_flops"], "loss": float(metrics["loss"]),
            "xla_temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


def time_decode(model, batch: int, shapes: dict, peaks: dict) -> dict:
    """Greedy decoding tokens/s with the KV cache, against the memory-bandwidth bound."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lmjax.families import family_of
    from lmjax.hardware import PEAK_BANDWIDTH
    from lmjax.scaling.counting import embedding_params, param_counts
    from lmjax.scaling.memory import DTYPE_BYTES, kv_cache_bytes_per_sequence

    prompt, new = shapes["decode_prompt"], shapes["decode_new"]
    graphdef, params = nnx.split(family_of(model).build(model, nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (batch, prompt), 0, model.vocab_size)

    @jax.jit
    def prefill(params, tokens):
        lm = nnx.merge(graphdef, params)
        cache = lm.init_cache(batch, prompt + new)
        logits, cache = lm.decode(tokens, jnp.broadcast_to(jnp.arange(prompt), tokens.shape), cache)
        return jnp.argmax(logits[:, -1], axis=-1), cache

    @functools.partial(jax.jit, donate_argnums=2)
    def decode(params, token, cache):
        lm = nnx.merge(graphdef, params)

        def step(carry, position):
            token, cache = carry
            logits, cache = lm.decode(token[:, None], jnp.full((batch, 1), position), cache)
            return (jnp.argmax(logits[:, 0], axis=-1), cache), None

        return jax.lax.scan(step, (token, cache), jnp.arange(prompt, prompt + new))[0]

    first, cache = prefill(params, tokens)
    state = decode(params, first, cache)  # compile and warm up
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        state = jax.block_until_ready(decode(params, *state))
        seconds.append(time.perf_counter() - start)
    tokens_per_s = batch * new / statistics.median(seconds)
    # bytes read per decoding step: every weight but the input embedding table (only B rows of it
    # are read; a tied table is read whole as the output head), and the whole cache buffer
    weights = param_counts(model)["params_total"] - (0 if model.tie_embeddings else embedding_params(model))
    weight_bytes = weights * DTYPE_BYTES[model.param_dtype]
    cache_bytes = kv_cache_bytes_per_sequence(model, prompt + new) * batch  # sliding windows: their rings
    kind = jax.devices()[0].device_kind
    spec = next((b for name, b in PEAK_BANDWIDTH.items() if name in kind), None)
    bound = lambda bandwidth: batch * bandwidth / (weight_bytes + cache_bytes)  # noqa: E731
    return {"batch": batch, "prompt_tokens": prompt, "new_tokens": new, "tokens_per_s": tokens_per_s,
            "weight_bytes_per_step": weight_bytes, "kv_cache_bytes_per_step": cache_bytes,
            "kv_cache_read": "whole buffer (prompt + new tokens) every step",
            "bound_spec_tokens_per_s": spec and bound(spec),
            "fraction_of_spec_bound": spec and tokens_per_s / bound(spec),
            "bound_measured_tokens_per_s": bound(peaks["copy_bytes_per_s"]),
            "fraction_of_measured_bound": tokens_per_s / bound(peaks["copy_bytes_per_s"])}


def moe_model(dense, layers: int, dispatch: str, grouped_matmul: str):
    from lmjax.config import MoEConfig

    moe = MoEConfig(n_experts=8, top_k=2, d_ff=dense.d_ff // 2, dispatch=dispatch, grouped_matmul=grouped_matmul)
    return dataclasses.replace(dense, n_layers=layers, moe=moe)


def plan_rows(shapes: dict, dense, moe_layers: int) -> list[tuple[str, str, callable]]:
    """(section, variant, run(context) -> dict) in the order they run; `context` holds the mesh,
    the measured peaks and the dense step the MoE rows are compared with."""

    def compile_row(layers):
        model = dataclasses.replace(dense, n_layers=layers)
        return lambda c: {"layers": layers, "compile_s": compile_training(model, shapes["batch"], shapes["seq"],
                                                                          c["mesh"])}

    def dense_row(attention, reference=False, **change):
        model = dataclasses.replace(dense, attention=attention, **change)

        def run(c):
            row = {"attention": attention, "kernel": attention_kernel(model), "param_dtype": model.param_dtype,
                   **time_training(model, shapes, c["mesh"], c["peaks"])}
            if reference:
                c["dense_step_ms"] = row["step_ms"]
            c.setdefault("data_parallel_step_ms", row["step_ms"])  # the first dense row: attention=auto
            return row
        return run

    def moe_reference(c):
        model = dataclasses.replace(dense, n_layers=moe_layers)
        row = {"note": "fewer layers: the 24-layer MoE does not fit this GPU's memory",
               **time_training(model, shapes, c["mesh"], c["peaks"])}
        c["dense_step_ms"] = row["step_ms"]
        return row

    def moe_row(dispatch, kernel):
        def run(c):
            row = time_training(moe_model(dense, moe_layers, dispatch, kernel), shapes, c["mesh"], c["peaks"])
            ratio = row["step_ms"] / c["dense_step_ms"] if "dense_step_ms" in c else None
            return {"dispatch": dispatch, "grouped_matmul": kernel, "step_over_dense": ratio, **row}
        return run

    decode_model = dataclasses.replace(dense, param_dtype="bfloat16", remat="none")
    rows = [("compile", f"{n} layers", compile_row(n)) for n in shapes["compile_layers"]]
    rows.append(("dense", "attention=auto", dense_row("auto", reference=moe_layers == dense.n_layers)))
    rows += [("decode", f"batch {b}", lambda c, b=b: time_decode(decode_model, b, shapes, c["peaks"]))
             for b in shapes["decode_batches"]]
    if moe_layers != dense.n_layers:
        rows.append(("moe", f"dense reference, {moe_layers} layers", moe_reference))
    rows += [("moe", f"{dispatch} {kernel}", moe_row(dispatch, kernel)) for dispatch, kernel in MOE_DISPATCH]
    rows += [("dense", f"attention={a}", dense_row(a)) for a in ATTENTION if a != "auto"]
    rows.append(("dense", "attention=auto, bf16 params + fp32 master", dense_row("auto", param_dtype="bfloat16")))
    rows += [("packing", f"decoder, attention={a}, {dtype}", lambda c, a=a, dtype=dtype: packing_row(a, dtype))
             for a, dtype in (("auto", "bfloat16"), ("dot_product", "float32"))]
    rows.append(("long", f"seq {shapes['long_seq']}, batch 1", lambda c: long_row(dense, shapes, c["peaks"])))
    rows.append(("pipeline", "stages over every device", lambda c: pipeline_row(dense, shapes, c)))
    return rows


def pipeline_layout(devices: int, layers: int, batch: int) -> tuple[int, int, int]:
    """(stages P, data-parallel devices, microbatches M) for `devices`: the most stages that
    divide the devices and the layers, at most `batch` of them; the rest of the devices data
    parallel; every data-parallel device's rows one sequence per microbatch."""
    stages = max(p for p in range(1, min(devices, batch) + 1) if devices % p == 0 and layers % p == 0)
    data = devices // stages
    return stages, data, batch // data


def pipeline_row(dense, shapes: dict, c: dict) -> dict:
    """The dense row's step in pipeline stages over the devices (`pipeline_layout`, GPipe; one
    device: skipped), against the dense row on the same devices all data parallel and the
    bubble (P-1)/(M+P-1)."""
    import jax

    from lmjax.axis_rules import pipeline_schedule
    from lmjax.config import MeshConfig
    from lmjax.parallel import make_mesh

    stages, data, microbatches = pipeline_layout(jax.device_count(), dense.n_layers, shapes["batch"])
    if stages == 1:
        return {"skipped": f"skipped: no stage count > 1 divides the {jax.device_count()} device(s) and the "
                           f"{dense.n_layers} layers"}
    mesh = make_mesh(MeshConfig(pipeline=stages, data=data))
    with pipeline_schedule(microbatches):
        row = time_training(dense, shapes, mesh, c["peaks"])
    bubble = (stages - 1) / (microbatches + stages - 1)
    reference = c.get("data_parallel_step_ms")
    return {"stages": stages, "data": data, "microbatches": microbatches, "bubble": bubble,
            "step_over_data_parallel": reference and row["step_ms"] / reference, **row}


def long_row(dense, shapes: dict, peaks: dict) -> dict:
    """The dense decoder trained on one row of shapes["long_seq"] positions, the sequence split
    over every device (`mesh.context`, data 1)."""
    import jax

    from lmjax.config import MeshConfig
    from lmjax.parallel import make_mesh

    seq, context = shapes["long_seq"], jax.device_count()
    model = dataclasses.replace(dense, max_seq_len=seq, remat="full")
    mesh = make_mesh(MeshConfig(data=1, context=context))
    return {"context": context, **time_training(model, {**shapes, "batch": 1, "seq": seq}, mesh, peaks)}


def packing_row(attention: str, dtype: str) -> dict:
    """bench/packing.py's packed-against-alone differences for a tiny decoder, with the kernel
    `attention` selects for the lone rows (the packed ones are never fusable)."""
    import runpy

    packing = runpy.run_path(str(Path(__file__).with_name("packing.py")))
    cfg = packing["packing_config"]("decoder", attention, dtype)
    return {"attention": attention, "dtype": dtype, "kernel_alone": attention_kernel(cfg),
            **packing["packed_minus_alone"](cfg)}


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


TABLE_COLUMNS = {
    "peak": ("matmul_bf16_flops", "copy_bytes_per_s"),
    "compile": ("layers", "compile_s"),
    "dense": ("kernel", "param_dtype", "layers", "step_ms", "tokens_per_s", "mfu", "fraction_of_matmul_peak",
              "compile_s", "loss"),
    "moe": ("layers", "step_ms", "step_over_dense", "tokens_per_s", "mfu", "fraction_of_matmul_peak", "compile_s",
            "loss"),
    "decode": ("tokens_per_s", "bound_spec_tokens_per_s", "fraction_of_spec_bound", "bound_measured_tokens_per_s",
               "fraction_of_measured_bound"),
    "packing": ("kernel_alone", "dtype", "loss_max_abs_diff", "grad_max_abs_diff_over_max", "mean_loss"),
    "long": ("seq", "context", "step_ms", "tokens_per_s", "mfu", "xla_temp_bytes", "compile_s", "loss"),
    "pipeline": ("stages", "data", "microbatches", "bubble", "step_ms", "step_over_data_parallel", "mfu", "compile_s",
                 "loss"),
}


def markdown(report: dict) -> str:
    """One table per section; failed and skipped rows show their reason."""
    lines = [f"# lmjax GPU suite: {report['device']}, jax {report['jax']}, {report['date']}", "",
             f"XLA_FLAGS: `{report['xla_flags'] or '(none)'}`", ""]
    for section, columns in TABLE_COLUMNS.items():
        rows = [r for r in report["rows"] if r["section"] == section]
        if not rows:
            continue
        lines += [f"## {section}", "", "| variant | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for r in rows:
            if "error" in r or "skipped" in r:
                lines.append(f"| {r['variant']} | {r.get('error') or r['skipped']} |" + " |" * (len(columns) - 1))
            else:
                lines.append(f"| {r['variant']} | " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
        if section == "moe" and report["moe_layers"] != report["dense_config"]["n_layers"]:
            memory_gb = report["device_memory_bytes"] / 1e9
            lines += ["", f"MoE rows and their dense reference use {report['moe_layers']} layers: the "
                      f"{report['dense_config']['n_layers']}-layer MoE does not fit {memory_gb:.0f} GB."]
        lines.append("")
    lines.append("The decode bound counts the whole KV-cache buffer read at every step (lmjax reads all of it).")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_suite.md").write_text(markdown(report))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_out", help="directory for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any backend (the test runs this)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="start no row after this many seconds (default 330; smoke: none)")
    parser.add_argument("--cache-dir", default=None, help="JAX compilation cache (default: OUT/jax_cache)")
    parser.add_argument("--skip", action="append", default=[], metavar="SECTION:VARIANT",
                        help="record this row as skipped instead of running it (repeatable; the CPU test "
                             "skips rows whose code another row already runs)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    xla_flags = apply_gpu_preset()  # before the backend starts
    enable_compilation_cache(args.cache_dir or str(out / "jax_cache"))
    import jax

    from lmjax.config import MeshConfig, ModelConfig
    from lmjax.parallel import make_mesh

    shapes = SMOKE if args.smoke else FULL
    budget = args.budget_seconds or (float("inf") if args.smoke else 330.0)
    dense = ModelConfig(**shapes["dense"])
    device = jax.devices()[0]
    memory = (device.memory_stats() or {}).get("bytes_limit", float("inf"))
    moe_layers = dense.n_layers if args.smoke or memory >= 100e9 else dense.n_layers // 2
    report = {"device": device.device_kind, "devices": jax.device_count(), "jax": jax.__version__,
              "versions": {name: importlib.metadata.version(name) for name in ("jaxlib", "flax", "optax")},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": args.smoke,
              "xla_flags": " ".join(xla_flags), "device_memory_bytes": memory, "dense_config": shapes["dense"],
              "moe_layers": moe_layers, "rows": []}
    context = {"mesh": make_mesh(MeshConfig())}
    context["peaks"] = measure_peaks(shapes)
    report["rows"].append({"section": "peak", "variant": "measured", **context["peaks"]})
    write(report, out)
    for section, variant, run in plan_rows(shapes, dense, moe_layers):
        row = {"section": section, "variant": variant}
        elapsed = time.perf_counter() - start
        if f"{section}:{variant}" in args.skip:
            row["skipped"] = "skipped: --skip"
        elif elapsed > budget:
            row["skipped"] = f"skipped: {elapsed:.0f} s > budget {budget:.0f} s"
        else:
            try:
                row.update(run(context))
            except Exception as e:  # e.g. out of memory: record it, measure the rest
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row["elapsed_s"] = time.perf_counter() - start
        report["rows"].append(row)
        write(report, out)
        print(json.dumps(row), flush=True)
        gc.collect()
    report["total_s"] = time.perf_counter() - start
    write(report, out)
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} in {report['total_s']:.0f} s")
    return 1 if any("error" in r for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
