"""Files written whole or not at all, and their checksums (a leaf module: standard library only)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` whole or not at all: `write(f)` fills a temporary file beside it, which
    then replaces `path` in one step (`os.replace`), so a reader or a crash never sees half a file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as f:
        write(f)
    os.replace(temporary, path)


def write_json_atomically(path: Path, data) -> None:
    """`data` as indented JSON, written with `write_atomically`."""
    write_atomically(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
