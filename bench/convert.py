"""Import throughput and peak host memory of `lmjax convert from-hf` on a synthetic LLaMA.

    python bench/convert.py write DIR              # a ~2 GB float32 LLaMA-shaped HF directory
    python bench/convert.py measure DIR --devices 8 [--fsdp 8]

`write` makes config.json and one safetensors shard per layer (random weights, nothing
downloaded). `measure` runs the import in a fresh process with N CPU devices and prints one
JSON line: seconds and GB/s to read every weight into its sharding (`import_params`), and
the peak resident memory above the process's baseline, sampled every 20 ms, split into
anonymous memory (arrays) and file-backed pages (the memory-mapped safetensors, which the
kernel may drop at any time), each also as a multiple of (largest tensor + this process's
share of the model). The whole `from_hf` (with its weights-only step-0 checkpoint) is
timed too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=7,
             num_attention_heads=16, num_key_value_heads=4, head_dim=128, max_position_embeddings=2048,
             rms_norm_eps=1e-5, tie_word_embeddings=False)


def write(directory: Path) -> None:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    s, rng = SHAPE, np.random.default_rng(0)
    d, f, v, kv = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_key_value_heads"] * s["head_dim"]
    q = s["num_attention_heads"] * s["head_dim"]
    normal = lambda *shape: (0.02 * rng.standard_normal(shape, np.float32))  # noqa: E731
    shards = [{"model.embed_tokens.weight": normal(v, d), "lm_head.weight": normal(v, d),
               "model.norm.weight": np.ones(d, np.float32)}]
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": normal(q, d), p + "self_attn.k_proj.weight": normal(kv, d),
                       p + "self_attn.v_proj.weight": normal(kv, d), p + "self_attn.o_proj.weight": normal(d, q),
                       p + "mlp.gate_proj.weight": normal(f, d), p + "mlp.up_proj.weight": normal(f, d),
                       p + "mlp.down_proj.weight": normal(d, f), p + "input_layernorm.weight": np.ones(d, np.float32),
                       p + "post_attention_layernorm.weight": np.ones(d, np.float32)})
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(a.nbytes for a in shard.values())
        shards[n] = None
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                         "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **SHAPE}))
    print(f"wrote {directory}: {total / 1e9:.2f} GB")


def _memory() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024


def _measure_here(directory: Path, fsdp: int) -> dict:
    import shutil
    import tempfile

    import jax

    from lmjax.config import MeshConfig
    from lmjax.interop.convert import from_hf, import_params, model_config_from_hf
    from lmjax.interop.tensors import open_checkpoint
    from lmjax.parallel import make_mesh

    mesh_cfg = MeshConfig(data=-1, fsdp=fsdp)
    mesh = make_mesh(mesh_cfg)
    cfg = model_config_from_hf(directory, [])
    tensors = open_checkpoint(directory)
    model_bytes = sum(a.nbytes for a in tensors.values())
    largest = max(a.nbytes for a in tensors.values())
    del tensors
    base_anon, base_file = _memory()
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            anon, file = _memory()
            peak[0], peak[1] = max(peak[0], anon - base_anon), max(peak[1], file - base_file)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    params = import_params(directory, cfg, mesh, [])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    del params
    share = model_bytes  # all devices of the mesh are this process's: its share is the whole model
    out = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    from_hf(directory, out / "run", mesh_cfg=mesh_cfg)
    from_hf_seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {"devices": len(jax.devices()), "fsdp": fsdp, "model_gb": model_bytes / 1e9,
            "largest_tensor_gb": largest / 1e9,
            "import_seconds": seconds, "import_gb_per_s": model_bytes / 1e9 / seconds,
            "peak_anon_gb": peak[0] / 1e9, "peak_file_gb": peak[1] / 1e9,
            "peak_anon_over_largest_plus_share": peak[0] / (largest + share),
            "from_hf_seconds_with_checkpoint": from_hf_seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=("write", "measure", "_here"))
    parser.add_argument("dir")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=1)
    args = parser.parse_args()
    if args.action == "write":
        write(Path(args.dir))
    elif args.action == "_here":
        print(json.dumps(_measure_here(Path(args.dir), args.fsdp)))
    else:
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
        subprocess.run([sys.executable, __file__, "_here", args.dir, "--fsdp", str(args.fsdp)], env=env, check=True)


if __name__ == "__main__":
    main()
