"""Named experiments: Python files in `experiments/`, each defining `config() -> Config`.

`lmjax train NAME` looks for `NAME.py` in `./experiments/` (the current directory's),
then in the `experiments/` folder of this checkout, then in `<prefix>/share/lmjax/experiments`
where a wheel (a non-editable install, a container image) puts them; a path to a .py file
also works.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from lmjax.config import Config, ConfigError

PACKAGE_EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
INSTALLED_EXPERIMENTS = Path(sys.prefix) / "share" / "lmjax" / "experiments"


def experiment_dirs() -> list[Path]:
    dirs = [Path.cwd() / "experiments", PACKAGE_EXPERIMENTS, INSTALLED_EXPERIMENTS]
    unique = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def list_experiments() -> dict[str, Path]:
    """{name: file} of every experiment found, first directory wins."""
    found: dict[str, Path] = {}
    for directory in experiment_dirs():
        for path in sorted(directory.glob("*.py")):
            if not path.name.startswith("_"):
                found.setdefault(path.stem, path)
    return found


def experiment_summary(path: Path) -> str:
    """First line of the experiment file's docstring."""
    for line in path.read_text().splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line
    return ""


def load_experiment_module(name: str, unknown: str):
    """(module, path) of experiments/NAME.py or of a .py path; ConfigError `unknown` (with
    the known names appended) when there is no such file."""
    path = Path(name) if name.endswith(".py") else list_experiments().get(name)
    if path is None or not path.is_file():
        known = ", ".join(list_experiments()) or "none"
        raise ConfigError(f"{unknown}; known experiments: {known} (see `lmjax experiments`).")
    spec = importlib.util.spec_from_file_location(f"lmjax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def load_experiment(name: str) -> Config:
    """The Config of experiment `name` (or of a path to an experiment .py file)."""
    module, path = load_experiment_module(name, f"unknown experiment {name!r}")
    if not hasattr(module, "config"):
        raise ConfigError(f"experiment file {path} does not define config() -> Config.")
    cfg = module.config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"config() in {path} returned {type(cfg).__name__}, not lmjax.config.Config.")
    return cfg if cfg.name != "default" else dataclasses.replace(cfg, name=path.stem)
