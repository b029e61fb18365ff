"""Is the compiled training step the same program before and after a refactor?

    python bench/hlo_equal.py dump OUT_DIR        # this checkout's decoder_tiny and LoRA train steps
    python bench/hlo_equal.py compare A_DIR B_DIR # instruction for instruction; else the first difference
    python bench/hlo_equal.py check A_DIR         # dump this checkout to a temporary folder, compare with A_DIR

`dump` runs `lmjax train` as a user would (decoder_tiny for one step, then a LoRA run of rank 4 on
that run for one step, on a small slice of the stdlib corpus) with XLA's dump on, and keeps the
optimized HLO of the module `jit_train_step` of each, as text with source-location metadata
(`metadata={...}`: op names, file and line, which any moved code changes) removed. Run it from
the root of the checkout to dump: the subprocesses import `lmjax` from there (PYTHONPATH).
Prints one line per program: `same (N instructions)` or the first differing instruction of each.
Exit code 1 when a program differs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROGRAMS = ("decoder_tiny", "lora")
# one train step on little data: the same small settings in every checkout compared
SMALL = ["--set", "train.steps=1", "--set", "train.sample_tokens=0", "--set", "train.eval_batches=1",
         "--set", "data.max_bytes=300000", "--set", "log.wandb=off"]
_METADATA = re.compile(r',?\s*metadata=\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\}')


_LOCATION_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def strip_metadata(hlo: str) -> str:
    """HLO text without source locations: no `metadata={...}` attributes (op names, file and
    line), no stack-frame tables (FileNames ... StackFrames: numbered rows under their header),
    no comment or blank lines."""
    kept, in_table = [], False
    for line in hlo.splitlines():
        if line in _LOCATION_TABLES:
            in_table = True
            continue
        if in_table and re.match(r"\d+ ", line):
            continue
        in_table = False
        line = _METADATA.sub("", line).rstrip()
        if line and not line.lstrip().startswith("//"):
            kept.append(line)
    return "\n".join(kept) + "\n"


def _train(args: list[str], dump_dir: Path, cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(cwd), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*")
    result = subprocess.run([sys.executable, "-m", "lmjax.cli", "train", *args, *SMALL], env=env, cwd=cwd,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"lmjax train {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def _optimized_step(dump_dir: Path) -> str:
    files = sorted(dump_dir.glob("*jit_train_step*after_optimizations.txt"))
    if len(files) != 1:
        sys.exit(f"expected one optimized jit_train_step module in {dump_dir}, found {[f.name for f in files]}")
    return strip_metadata(files[0].read_text())


def dump(out_dir: Path, cwd: Path = Path.cwd()) -> None:
    """Write OUT_DIR/{decoder_tiny,lora}.hlo: the optimized train-step HLO of this checkout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        _train(["decoder_tiny", "--set", f"train.run_dir={base}"], tmp / "dump_base", cwd)
        _train(["decoder_tiny", "--init-from", str(base), "--set", "lora.rank=4",
                "--set", f"train.run_dir={tmp / 'lora'}"], tmp / "dump_lora", cwd)
        (out_dir / "decoder_tiny.hlo").write_text(_optimized_step(tmp / "dump_base"))
        (out_dir / "lora.hlo").write_text(_optimized_step(tmp / "dump_lora"))


def compare(a_dir: Path, b_dir: Path) -> bool:
    """Print, per program, whether A and B are the same instruction for instruction; True if all are."""
    same = True
    for name in PROGRAMS:
        a = (a_dir / f"{name}.hlo").read_text().splitlines()
        b = (b_dir / f"{name}.hlo").read_text().splitlines()
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) == len(b):
            print(f"{name}: same ({len(a)} lines of HLO)")
            continue
        same = False
        first = min(len(a), len(b)) if first is None else first
        line = lambda lines: lines[first] if first < len(lines) else "<end of module>"  # noqa: E731
        print(f"{name}: differs at line {first + 1} ({len(a)} vs {len(b)} lines)\n  A: {line(a)}\n  B: {line(b)}")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dump").add_argument("out_dir", type=Path)
    pair = commands.add_parser("compare")
    pair.add_argument("a_dir", type=Path)
    pair.add_argument("b_dir", type=Path)
    commands.add_parser("check").add_argument("a_dir", type=Path)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.out_dir)
        return
    if args.command == "check":
        with tempfile.TemporaryDirectory() as tmp:
            dump(Path(tmp))
            sys.exit(0 if compare(args.a_dir, Path(tmp)) else 1)
    sys.exit(0 if compare(args.a_dir, args.b_dir) else 1)


if __name__ == "__main__":
    main()
