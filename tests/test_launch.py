"""The launchers and their documentation: an install from a wheel finds the named
experiments, and every documented launch command validates at the device count it implies."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_wheel_install_runs_a_named_experiment(tmp_path):
    """Not editable: the wheel is built from a copy of the sources and installed without its
    dependencies (nothing is downloaded) into a venv that sees this one's packages."""
    source = tmp_path / "source"
    source.mkdir()
    for item in ("pyproject.toml", "README.md", "lmjax", "experiments"):
        copy = shutil.copytree if (REPO / item).is_dir() else shutil.copy
        copy(REPO / item, source / item, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (REPO / item).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    venv_site = next(venv.glob("lib/python*/site-packages"))
    # this environment's packages (jax, flax, ...) by path, without its .pth files: not its editable lmjax
    (venv_site / "parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = next((tmp_path / "dist").glob("lmjax-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(venv / "bin" / "lmjax"), "train", "decoder_tiny", "--set", "train.steps=2",
                             "--set", "log.wandb=off", "--set", "log.progress_bar=false", "--set",
                             "train.sample_tokens=4", "--set", "data.max_bytes=300000", "--set", "train.eval_batches=1"],
                            cwd=elsewhere, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run finished" in result.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import lmjax; print(lmjax.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), where  # the wheel's lmjax, not this checkout's
