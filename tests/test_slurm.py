"""`launch/slurm_gpu.sbatch` under a real SLURM: a one-node cluster (slurmctld, slurmd and
munged started here, in a temporary directory) runs a 2-task CPU job with gloo collectives.
Skipped, with the reason, where the cluster cannot be started (not root, SLURM not
installed: `.ci/run` installs it with apt)."""

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lmjax.checkpoint import Checkpointer
from lmjax.records import read_metrics
from lmjax.runs import restore_params

# long enough that a signal sent after step 3 (through slurmctld, slurmd and the batch script)
# always arrives before the run ends, on an idle machine too
STEPS = 400
LAUNCHER = Path(__file__).resolve().parent.parent / "launch" / "slurm_gpu.sbatch"
TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
        "--set", "model.d_ff=64", "--set", "model.max_seq_len=32", "--set", "data.seq_len=32",
        "--set", "data.max_bytes=200000", "--set", "train.batch_size=8", "--set", f"train.steps={STEPS}",
        "--set", "train.log_every=1", "--set", "train.eval_batches=1", "--set", "train.checkpoint_every=1000",
        "--set", "train.sample_tokens=0", "--set", "log.wandb=off", "--set", "log.progress_bar=false"]
DAEMONS = ("munged", "slurmctld", "slurmd")

SLURM_CONF = """ClusterName=lmjax-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
NodeName={host} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm():
    """Environment variables (SLURM_CONF, PATH) for SLURM clients of a one-node cluster that
    lives as long as the test session; its daemons are stopped by their pids afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a SLURM cluster needs root (slurmd runs jobs as their users, munged as munge)")
    missing = [d for d in (*DAEMONS, "sbatch", "runuser") if shutil.which(d) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): "
                    "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge")
    munge = pwd.getpwnam("munge")
    root = Path(tempfile.mkdtemp(prefix="lmjax-slurm-"))
    root.chmod(0o755)  # munged checks that every directory above its socket is reachable
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for path in (munge_dir, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, root=root, socket=munge_dir / "munge.socket",
                                      ctld_port=free_port(), slurmd_port=free_port()))
    for name in ("state", "spool"):
        (root / name).mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = (root / "daemons.log").open("w")
    daemons = [subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "--foreground",
                                 f"--socket={munge_dir / 'munge.socket'}", f"--key-file={key}",
                                 f"--log-file={munge_dir / 'munged.log'}", f"--pid-file={munge_dir / 'munged.pid'}",
                                 f"--seed-file={munge_dir / 'munged.seed'}"], stdout=log, stderr=log)]
    try:
        deadline = time.time() + 30
        while not (munge_dir / "munge.socket").exists() and time.time() < deadline:
            time.sleep(0.1)
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=env, stdout=log, stderr=log))
        daemons.append(subprocess.Popen(["slurmd", "-D"], env=env, stdout=log, stderr=log))
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the SLURM cluster did not come up: {(root / 'daemons.log').read_text()[-2000:]}")
        yield env
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()  # runuser passes SIGTERM on to munged
        for daemon in reversed(daemons):
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def submit(env, *args) -> int:
    out = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().split(";")[0])


def wait_for(env, job: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", str(job)], env=env, capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.5)
    subprocess.run(["scancel", str(job)], env=env)
    pytest.fail(f"SLURM job {job} did not finish within {timeout} s")


def launch(env, tmp_path, name: str) -> int:
    """Submit the project's SLURM launcher: 2 tasks on the one node, one CPU device each."""
    return submit({**env, "LMJAX_RUN_ROOT": str(tmp_path), "LMJAX_RUN_NAME": name, "JAX_PLATFORMS": "cpu"},
                  "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10",
                  f"--output={tmp_path}/{name}-%j.out", str(LAUNCHER), *TINY)


def test_slurm_job_stops_on_sigterm_requeues_when_warned_and_ends_bit_for_bit_equal(slurm, tmp_path):
    uninterrupted = launch(slurm, tmp_path, "uninterrupted")
    stopped = launch(slurm, tmp_path, "stopped")
    run = tmp_path / "stopped"
    deadline = time.time() + 300
    while time.time() < deadline and max([0] + [r["step"] for r in read_metrics(run)]) < 3:
        time.sleep(0.1)
    for sig in ("TERM", "TERM", "CONT"):  # what a time limit sends (scancel --signal signals the tasks alone)
        subprocess.run(["scancel", f"--signal={sig}", str(stopped)], env=slurm, check=True)
    wait_for(slurm, stopped)
    output = (tmp_path / f"stopped-{stopped}.out").read_text()
    steps = re.findall(r"run stopped at step (\d+)", output)
    assert len(steps) == 2 and steps[0] == steps[1] and 3 <= int(steps[0]) < STEPS, output  # both tasks, one step
    assert Checkpointer(run).latest_step() == int(steps[0])
    resubmitted = launch(slurm, tmp_path, "stopped")  # the same command again
    while time.time() < deadline and max([0] + [r["step"] for r in read_metrics(run)]) < int(steps[0]) + 3:
        time.sleep(0.1)
    # SLURM's warning before the time limit (--signal=B:USR1@300) to the batch script: it stops
    # the tasks at a checkpoint and requeues the job, which then finishes the run
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(resubmitted)], env=slurm, check=True)
    wait_for(slurm, resubmitted)
    wait_for(slurm, uninterrupted)
    output = (tmp_path / f"stopped-{resubmitted}.out").read_text()
    assert "time limit near" in output and len(re.findall(r"run stopped at step", output)) == 2, output
    for job, name in ((resubmitted, "stopped"), (uninterrupted, "uninterrupted")):
        output = (tmp_path / f"{name}-{job}.out").read_text()
        assert output.count("run finished") == 2, output
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, STEPS + 1))
    resumed, reference = restore_params(run), restore_params(tmp_path / "uninterrupted")
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


SWEEP = '''
from lmjax.config import Config, DataConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig
from lmjax.drivers.sweep import Sweep, grid_sweep, wsd_branches


def config():
    return Config(model=ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=32),
                  optim=OptimConfig(lr=3e-3, warmup_steps=1),
                  data=DataConfig(source="stdlib", seq_len=32, max_bytes=100_000, val_fraction=0.05),
                  train=TrainConfig(batch_size=4, steps=2, eval_every=100, eval_batches=1, log_every=1,
                                    sample_tokens=0),
                  log=LogConfig(wandb="off", progress_bar=False))


def sweep():
    grid = grid_sweep(__file__, {"model.d_model": [16, 24, 32], "train.steps": [2, 3]})
    branches = wsd_branches(__file__, [{"model.d_model": 16}], tokens=[4 * 32 * 4, 4 * 32 * 8])
    return Sweep(__file__, grid.runs + (branches.runs if WSD else ()))


WSD = WSD_PLACEHOLDER
'''


def test_wsd_branches_are_submitted_as_dependent_jobs(tmp_path):
    """The submission script with a stand-in `sbatch` that records its arguments: the grid is
    one array, each trunk's branches a chain (shortest first), the collection after all."""
    (tmp_path / "sweep.py").write_text(SWEEP.replace("WSD_PLACEHOLDER", "True"))
    script = subprocess.run([sys.executable, "-m", "lmjax.cli", "sweep", str(tmp_path / "sweep.py"), "--dir",
                             str(tmp_path / "out"), "--slurm"], capture_output=True, text=True, check=True).stdout
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nn=$(( $(wc -l < "$LOG" 2>/dev/null || echo 0) + 100 ))\n'
                    'echo "$n $*" >> "$LOG"\necho "$n"\n')
    fake.chmod(0o755)
    log = tmp_path / "sbatch.log"
    subprocess.run(["bash", "-c", script], check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "LOG": str(log)})
    jobs = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert "--array=0,1,2,3,4,5" in jobs[0][1]
    assert "--only-index 6" in jobs[1][1] and "--dependency" not in jobs[1][1]  # the shorter branch first
    assert "--dependency=afterok:101" in jobs[2][1] and "--only-index 7" in jobs[2][1]
    assert "--dependency=afterok:100:102" in jobs[3][1] and "--collect" in jobs[3][1]


def test_slurm_sweep_job_array_through_to_fit(slurm, tmp_path):
    (tmp_path / "sweep.py").write_text(SWEEP.replace("WSD_PLACEHOLDER", "False"))
    env = {**slurm, "JAX_PLATFORMS": "cpu"}
    script = subprocess.run(["lmjax", "sweep", str(tmp_path / "sweep.py"), "--dir", str(tmp_path / "out"),
                             "--slurm"], env=env, capture_output=True, text=True, check=True).stdout
    submitted = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    collect = int(re.search(r"job (\d+) writes", submitted).group(1))
    wait_for(slurm, collect)
    results = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(results) == 7, results + [p.read_text() for p in (tmp_path / "out").glob("slurm-*.out")]
    fit = subprocess.run(["lmjax", "fit", str(tmp_path / "out" / "results.csv"), "--bootstrap", "0"], env=env,
                         capture_output=True, text=True)
    assert fit.returncode == 0, fit.stdout + fit.stderr
