"""Safetensors files of a Hugging Face checkpoint: read lazily, written in shards.

Reading maps each file into memory (`np.memmap`) from its JSON header, so a tensor is a
view and only the bytes a caller slices out are read from disk. This also reads BF16, which
`safetensors.safe_open(..., framework="numpy")` cannot (numpy has no bfloat16; `ml_dtypes`
gives it one). Writing goes through `safetensors.numpy.save_file`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from lmjax.config import ConfigError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _map_file(path: Path) -> dict[str, np.ndarray]:
    """{name: read-only memmap view} of every tensor of one .safetensors file."""
    with open(path, "rb") as f:
        (header_bytes,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_bytes))
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ConfigError(f"{path}: tensor {name} has dtype {info['dtype']}, which lmjax cannot read.")
        start, stop = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        if stop == start:
            tensors[name] = np.zeros(info["shape"], dtype)
        else:
            tensors[name] = np.memmap(path, dtype, "r", offset=8 + header_bytes + start, shape=tuple(info["shape"]))
    return tensors


def open_checkpoint(hf_dir: Path) -> dict[str, np.ndarray]:
    """{tensor name: lazy view} of a transformers directory's `model.safetensors`, or of all
    shards its `model.safetensors.index.json` names (ConfigError if one is missing)."""
    hf_dir = Path(hf_dir)
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ConfigError(f"{hf_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}; give a directory written by "
                          "transformers' save_pretrained (safetensors).")
    tensors = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise ConfigError(f"{hf_dir / INDEX_FILE} names the shard {name}, which is missing; download or copy "
                              "every shard the index lists.")
        tensors.update(_map_file(hf_dir / name))
    return tensors


def save_checkpoint(tensors: dict[str, np.ndarray], hf_dir: Path, max_shard_bytes: int) -> list[str]:
    """Write `tensors` as `model.safetensors`, or, when they exceed `max_shard_bytes`, as
    `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`. Returns the
    file names written."""
    shards, current, size = [], {}, 0
    for name, array in tensors.items():
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = np.ascontiguousarray(array)
        size += array.nbytes
    shards.append(current)
    metadata = {"format": "pt"}  # transformers reads "pt"-format safetensors
    if len(shards) == 1:
        save_file(shards[0], str(hf_dir / SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(hf_dir / name), metadata=metadata)
        weight_map.update({tensor: name for tensor in shard})
    total = sum(a.nbytes for a in tensors.values())
    (hf_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    return [*names, INDEX_FILE]
