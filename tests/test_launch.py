"""The launchers and their documentation: an install from a wheel finds the named
experiments, and every documented launch command validates at the device count it implies."""

import math
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from jax.sharding import AbstractMesh

from lmjax.config import ConfigError
from lmjax.config_parse import override
from lmjax.experiment import load_experiment
from lmjax.parallel import MESH_AXES, check_dcn, mesh_axis_sizes, validate_layout

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
    small = ["--set", "log.wandb=off", "--set", "log.progress_bar=false", "--set", "train.sample_tokens=4",
             "--set", "data.max_bytes=300000", "--set", "train.eval_batches=1", "--set", "model.n_layers=1",
             "--set", "train.batch_size=4", "--set", "data.seq_len=32"]  # 1 layer unrolled: quick to compile
    result = subprocess.run([str(venv / "bin" / "lmjax"), "train", "decoder_tiny", "--set", "train.steps=2", *small],
                            cwd=elsewhere, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run finished" in result.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import lmjax; print(lmjax.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), where  # the wheel's lmjax, not this checkout's


def documented_commands() -> list[str]:
    """Every launch command in docs/launch.md's code blocks and in the launchers' headers
    (continuation lines joined), except the by-hand ones with `...` placeholders."""
    text = (REPO / "docs" / "launch.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    headers = ["\n".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#   "))
               for path in sorted((REPO / "launch").glob("*.s*"))]
    commands = []
    for chunk in blocks + headers:
        for line in chunk.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if re.search(r"(^|\s)(lmjax train|\S*launch/\S+\.s\S*)( |$)", line) and "..." not in line \
                    and "ARGUMENTS" not in line.upper() and "TPU_NAME" not in line:
                commands.append(line)
    return commands


def implied_layout(command: str) -> tuple[list[str], int, int]:
    """(lmjax train arguments, devices, nodes or slices) a documented command implies: SLURM
    nodes x 8 GPUs (the script's --gpus-per-node), a v5p-N slice's N/2 chips, a local run's
    processes x devices, XLA's forced CPU device count, or else the product of the mesh axes."""
    tokens = shlex.split(command)
    if "launch/slurm_gpu.sbatch" in tokens:
        nodes = int(next((t.split("=")[1] for t in tokens if t.startswith("--nodes=")), 2))
        return tokens[tokens.index("launch/slurm_gpu.sbatch") + 1:], nodes * 8, nodes
    if "launch/tpu_vm.sh" in tokens:
        i = tokens.index("launch/tpu_vm.sh")
        return tokens[i + 4:], int(re.search(r"v5p-(\d+)", tokens[i + 1]).group(1)) // 2, 1
    if "launch/local_multiprocess.sh" in tokens:
        i = tokens.index("launch/local_multiprocess.sh")
        return tokens[i + 3:], int(tokens[i + 1]) * int(tokens[i + 2]), int(tokens[i + 1])
    arguments = tokens[tokens.index("train") + 1:]
    forced = re.search(r"device_count=(\d+)", command)
    if forced:
        return arguments, int(forced.group(1)), 1
    sizes = [int(a.split("=")[1]) for a in arguments if re.match(rf"mesh\.({'|'.join(MESH_AXES)})=", a)]
    return arguments, math.prod(sizes), 1


def validate(arguments: list[str], devices: int, nodes: int) -> None:
    """The config and mesh arithmetic of `lmjax train ARGUMENTS` on that many devices and nodes."""
    experiment = next((a for a in arguments if not a.startswith("-")
                       and arguments[arguments.index(a) - 1] not in ("--set", "--resume")), "decoder_tiny")
    overrides = [arguments[i + 1] for i, a in enumerate(arguments) if a == "--set"]
    cfg = override(load_experiment(experiment), overrides)
    sizes = mesh_axis_sizes(cfg.mesh, devices)
    validate_layout(cfg, AbstractMesh(tuple(sizes), MESH_AXES))
    dcn = list(cfg.mesh.dcn_sizes().values())
    if math.prod(dcn) > 1:
        check_dcn(sizes, dcn, nodes, "nodes")


def test_every_documented_launch_command_validates_at_the_devices_it_implies():
    commands = documented_commands()
    assert sum("slurm_gpu.sbatch" in c for c in commands) >= 4 and any("tpu_vm.sh" in c for c in commands)
    for command in commands:
        try:
            validate(*implied_layout(command))
        except ConfigError as e:
            raise AssertionError(f"{command}: {e}") from None


def test_validation_fails_for_the_examples_that_did_not_divide():
    with pytest.raises(ConfigError, match="does not split over the 32 data-parallel devices"):
        validate(*implied_layout("sbatch --nodes=4 launch/slurm_gpu.sbatch decoder_tiny --set mesh.fsdp=-1 "
                                 "--set mesh.data=1"))
    with pytest.raises(ConfigError, match="mesh.dcn_pipeline=4 does not divide mesh.pipeline=2"):
        validate(*implied_layout("sbatch --nodes=4 launch/slurm_gpu.sbatch decoder_tiny --set train.batch_size=64 "
                                 "--set mesh.pipeline=2 --set mesh.dcn_pipeline=4 --set mesh.data=2 --set mesh.fsdp=8"))
    with pytest.raises(ConfigError, match="the devices span 32 nodes"):  # dcn counts nodes, not processes
        validate(*implied_layout("launch/local_multiprocess.sh 32 1 decoder_tiny --set train.batch_size=64 "
                                 "--set mesh.data=4 --set mesh.dcn_data=4 --set mesh.fsdp=8"))


def test_gke_jobset_mounts_one_shared_volume_and_runs_the_dockerfile_image():
    documents = list(yaml.safe_load_all((REPO / "launch" / "gke_jobset.yaml").read_text()))
    claim = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    jobset = next(d for d in documents if d["kind"] == "JobSet")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every host writes into one run directory
    job = jobset["spec"]["replicatedJobs"][0]
    pod = job["template"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"])
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    arguments = shlex.split(container["args"][0])
    run_dir = next(a.split("=", 1)[1] for a in arguments if a.startswith("train.run_dir="))
    assert run_dir.startswith(mount["mountPath"] + "/")
    hosts = job["replicas"] * job["template"]["spec"]["parallelism"]
    chips = hosts * int(container["resources"]["limits"]["google.com/tpu"])
    topology = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    assert chips == math.prod(int(n) for n in topology.split("x"))
    assert arguments[:2] == ["lmjax", "train"]
    validate(arguments[2:], chips, 1)
    # the image it names is the one launch/Dockerfile builds, and the Dockerfile copies files that exist
    dockerfile = (REPO / "launch" / "Dockerfile").read_text()
    tag = re.search(r"docker build -f launch/Dockerfile -t (\S+) \.", dockerfile).group(1)
    assert container["image"] == tag
    for line in dockerfile.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            assert all((REPO / source).exists() for source in line.split()[1:-1]), line
    assert re.search(r'pip install .*lmjax-\*\.whl\)\[tpu\]', dockerfile)
    assert "tpu" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
