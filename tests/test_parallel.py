"""Sharded and multi-process training equal the single-device run.

Each layout runs `lmjax train` in a subprocess with 8 CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8, set before jax is imported); the
reference is the same run on this process's single CPU device.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import xla_flags

import lmjax
from lmjax.checkpoint import Checkpointer
from lmjax.cli import main
from lmjax.config import Config, ConfigError, MeshConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig
from lmjax.generate import generate
from lmjax.parallel import MESH_AXES, initialize_distributed, make_mesh, mesh_axis_sizes, validate_layout
from lmjax.records import read_metrics, read_routing

TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
        "--set", "model.n_kv_heads=4", "--set", "model.d_ff=64", "--set", "model.max_seq_len=32",
        "--set", "data.seq_len=32", "--set", "data.max_bytes=200000", "--set", "train.batch_size=8",
        "--set", "train.steps=5", "--set", "train.log_every=1", "--set", "train.eval_batches=1",
        "--set", "train.sample_tokens=0", "--set", "log.wandb=off", "--set", "log.progress_bar=false"]


def lmjax_subprocess(args, devices=8, cwd=None, **env):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu", **env}
    return subprocess.Popen([sys.executable, "-m", "lmjax.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)


def finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def mesh_args(**axes):
    return [a for k, v in axes.items() for a in ("--set", f"mesh.{k}={v}")]


def metric(run_dir, name):
    return [r[name] for r in read_metrics(run_dir) if name in r]


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    """The TINY run on this process's one CPU device: the reference of the sharded runs."""
    run = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *TINY, "--set", f"train.run_dir={run}"]) == 0
    return run


@pytest.fixture(scope="module")
def single_device_losses(single_device_run):
    return losses(single_device_run)


CLI_RUNS = """
import json, sys, traceback
from lmjax.cli import main
for name, args in json.loads(sys.argv[1]).items():
    print(f"=== {name}", file=sys.stderr, flush=True)
    try:
        code = main(args)
    except BaseException:
        traceback.print_exc()
        code = 1
    print(f"=== {name} exit {code}", file=sys.stderr, flush=True)
"""


def start_cli_runs(runs: dict, devices=8) -> subprocess.Popen:
    """`lmjax`'s main on each argument list of {name: args} in turn, in one subprocess with `devices`
    CPU devices (one process start and import for all of them)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", CLI_RUNS, json.dumps(runs)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def cli_run_results(process: subprocess.Popen, timeout=1800) -> dict:
    """{name: (exit code, output)} of the runs `start_cli_runs` started, once all have ended."""
    output, _ = process.communicate(timeout=timeout)
    results = {name: (int(code), text) for name, text, code in
               re.findall(r"^=== (\S+)\n(.*?)^=== \1 exit (-?\d+)$", output, re.S | re.M)}
    return results or {"": (process.returncode, output)}


LAYOUTS = {"data8": dict(data=8), "fsdp8": dict(data=1, fsdp=8), "data2-fsdp2-tensor2": dict(data=2, fsdp=2, tensor=2),
           "tensor4-data2": dict(data=2, tensor=4)}
MOE = ["--set", "model.moe.n_experts=8", "--set", "model.moe.top_k=2"]
MOE_LAYOUTS = {"dropless-expert8": ("dropless", dict(data=1, expert=8)),
               "dropless-expert2-fsdp2-tensor2": ("dropless", dict(data=1, fsdp=2, tensor=2, expert=2)),
               "capacity-expert4-data2": ("capacity", dict(data=2, expert=4)),
               "dropless-circular-pipeline2x2-expert2-data2": ("dropless", dict(pipeline=2, data=2, expert=2,
                                                                                  pipeline_repeats=2))}
LAYOUT_ERRORS = [
    (mesh_args(data=2, tensor=4) + ["--set", "model.n_kv_heads=2"], "mesh.tensor=4 does not divide model.n_kv_heads=2"),
    (mesh_args(data=2, tensor=4) + ["--set", "model.n_heads=2", "--set", "model.n_kv_heads=none"],
     "mesh.tensor=4 does not divide model.n_heads=2"),
    (mesh_args(data=2, tensor=4) + ["--set", "model.d_ff=66"], "mesh.tensor=4 does not divide model.d_ff=66"),
    (mesh_args(data=8) + ["--set", "train.batch_size=12"], "does not split over the 8 data-parallel devices"),
    (mesh_args(pipeline=4, data=2, pipeline_microbatches=8) + ["--set", "model.n_layers=4"],
     "do not split into mesh.pipeline_microbatches=8"),
]


def moe_args(dispatch, axes=None):
    """The MoE runs' arguments; under pipeline stages 4 layers (2 stages x 2 repeats of one layer)."""
    layers = ["--set", "model.n_layers=4"] if axes and "pipeline" in axes else []
    return [*TINY, *MOE, "--set", f"model.moe.dispatch={dispatch}", *layers]


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """name -> (exit code, output, run dir) of `lmjax train` on each bad layout (first) and on each
    dense and MoE layout, all in one 8-device subprocess, started when first asked for (the
    single-device references train in this process meanwhile)."""
    root = tmp_path_factory.mktemp("layouts")
    runs = {f"error{i}": ["train", *TINY, *args] for i, (args, _) in enumerate(LAYOUT_ERRORS)}
    runs |= {name: ["train", *TINY, *mesh_args(**axes)] for name, axes in LAYOUTS.items()}
    runs |= {name: ["train", *moe_args(dispatch, axes), *mesh_args(**axes)]
             for name, (dispatch, axes) in MOE_LAYOUTS.items()}
    runs = {name: [*args, "--set", f"train.run_dir={root / name}"] for name, args in runs.items()}
    process, results = start_cli_runs(runs), {}

    def result(name):
        if not results:
            results.update(cli_run_results(process))
        code, output = results.get(name, results.get("", (None, f"{name} did not run")))
        return code, output, root / name

    yield result
    process.kill()
    process.communicate()


@pytest.mark.parametrize("name", LAYOUTS)
def test_layouts_match_single_device(layout_runs, single_device_losses, name):
    code, output, run = layout_runs(name)
    assert code == 0, output
    np.testing.assert_allclose(losses(run), single_device_losses, rtol=1e-5)


@pytest.fixture(scope="module")
def moe_single_device_runs(tmp_path_factory):
    """The single-device reference run of each set of arguments, trained once per module."""
    runs = {}

    def run(args):
        if tuple(args) not in runs:
            runs[tuple(args)] = tmp_path_factory.mktemp("moe") / "run"
            assert main(["train", *args, "--set", f"train.run_dir={runs[tuple(args)]}"]) == 0
        return runs[tuple(args)]

    return run


@pytest.mark.parametrize("name", MOE_LAYOUTS)
def test_moe_layouts_match_single_device(layout_runs, moe_single_device_runs, name):
    """Each layout's 5 losses and busiest-expert loads equal one device's. With pipeline stages (the
    circular schedule, 4 layers over 2 stages x 2 repeats) the balancing loss is that of each
    microbatch (a product of means, as under gradient accumulation), so the weights drift apart by
    its small gradient difference: the losses still agree to 1e-5, the loads are compared at the
    first step (same weights), as a near tie may flip one token later, and there layer by layer
    (each layer's MaxVio), so the stages' statistics come back in layer order.
    The dropless expert all-to-all over an expert axis that also splits the batch (expert 2 x data
    2) runs inside the stages there."""
    dispatch, axes = MOE_LAYOUTS[name]
    single = moe_single_device_runs(moe_args(dispatch, axes))
    code, output, run = layout_runs(name)
    assert code == 0, output
    np.testing.assert_allclose(losses(run), losses(single), rtol=1e-5)
    pipelined = "pipeline" in axes
    steps = 1 if pipelined else None
    names = ["moe_max_load"] + [f"moe_max_violation_{layer}" for layer in range(4)] * pipelined
    for key in names:
        np.testing.assert_allclose(metric(run, key)[:steps], metric(single, key)[:steps], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("family", [pytest.param("encoder", marks=pytest.mark.slow), "encoder_decoder"])
def test_encoder_families_shard_like_single_device(tmp_path, family):
    """The other families run in pipeline stages (2) beside fsdp 2 x tensor 2 (the encoder: data 2 x
    tensor 2) like one device: the relative position biases and padding masks, and the
    encoder-decoder's encoder output and cross-attention mask, are cut into microbatches with the
    activations; each of its two stacks runs its own pipeline. The encoder-decoder also accumulates
    gradients over 2 micro-steps (each cut into M = 2 microbatches) and keeps bf16 params with fp32
    master weights, on both sides. (The encoder-decoder's encoder is the encoder family's stack, so
    the fast run covers both.)"""
    args = [*TINY, "--set", f"model.family={family}", "--set", "model.position=relative", "--set", "train.steps=3"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    axes = dict(pipeline=2, data=2, tensor=2) if family == "encoder" else dict(pipeline=2, data=1, fsdp=2, tensor=2)
    if family == "encoder_decoder":  # and stages compose with gradient accumulation and bf16 params + fp32 master
        args += ["--set", "optim.grad_accum_steps=2", "--set", "model.param_dtype=bfloat16",
                 "--set", "optim.master_weights=true"]
    process = lmjax_subprocess(["train", *args, *mesh_args(**axes), "--set", f"train.run_dir={sharded}"])
    assert main(["train", *args, "--set", f"train.run_dir={single}"]) == 0
    assert "pipeline 2 stages x 2 microbatches" in finish(process)
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(metric(sharded, name), metric(single, name), rtol=1e-5, err_msg=name)


DUMP_PARAMS = """
import sys, numpy as np, jax
from lmjax.runs import restore_params
for spec in sys.argv[1:]:  # run,step,dump[,mesh override...]
    run, step, dump, *overrides = spec.split(",")
    params = restore_params(run, int(step), mesh_overrides=overrides)
    np.savez(dump, *[np.asarray(x) for x in jax.tree.leaves(params)])
    print([x.sharding.spec for x in jax.tree.leaves(params)])
"""


PIPELINE = ["--set", "model.n_layers=4", "--set", "train.batch_size=16", "--set", "train.eval_every=2"]


def test_pipeline_matches_single_device_resumes_on_another_layout_and_restores_anywhere(tmp_path):
    """GPipe over pipeline 4 x data 2 with M = 8 for 3 steps, resumed as the circular schedule (R = 2)
    over pipeline 2 x fsdp 2 x tensor 2: the 5 losses and gradient norms equal one device's, and so do
    the validation losses of the evaluations during training (steps 2 and 4, through the stages) and
    at the end. The checkpoint the pipeline-4 run saved restores bitwise-equal onto pipeline 2 x fsdp 2
    (x data 2) and onto this process's one CPU, the one-device run's onto pipeline 4 (x data 2), and
    the pipelined run loads as a model that generates."""
    run, single = tmp_path / "run", tmp_path / "single"
    process = lmjax_subprocess(["train", *TINY, *PIPELINE, *mesh_args(pipeline=4, data=2, pipeline_microbatches=8),
                                "--set", f"train.run_dir={run}", "--set", "train.halt_at_step=3"])
    assert main(["train", *TINY, *PIPELINE, "--set", f"train.run_dir={single}"]) == 0
    assert "pipeline 4 stages x 8 microbatches, bubble 27.3%" in finish(process)
    finish(lmjax_subprocess(["train", "--resume", str(run), *mesh_args(pipeline=2, data=1, fsdp=2, tensor=2,
                                                                       pipeline_repeats=2),
                             "--set", "train.halt_at_step=none"]))
    for name in ("loss", "grad_norm", "val_loss"):
        np.testing.assert_allclose(metric(run, name), metric(single, name), rtol=1e-5, err_msg=name)
    assert len(metric(run, "val_loss")) == 3
    # the step-3 checkpoint (pipeline 4) read onto pipeline 2 x fsdp 2 x data 2 and onto this process's one
    # CPU, and the reverse: the one-device run's step-5 checkpoint read onto pipeline 4 x data 2
    dumps = {(run, 3): ("pipeline=2", "fsdp=2", "tensor=1"), (single, 5): ("pipeline=4", "tensor=1")}
    specs = [",".join([str(d), str(step), str(tmp_path / f"{d.name}.npz"), *over]) for (d, step), over in dumps.items()]
    env = {**os.environ, "XLA_FLAGS": xla_flags(8)}
    out = subprocess.run([sys.executable, "-c", DUMP_PARAMS, *specs], env=env, check=True, capture_output=True,
                         text=True).stdout
    assert out.count("'pipeline'") >= 2  # the stacked blocks were sharded over the pipeline axis, both times
    from lmjax.runs import restore_params

    for d, step in dumps:
        here = [np.asarray(x) for x in jax.tree.leaves(restore_params(d, step))]
        there = np.load(tmp_path / f"{d.name}.npz")
        assert len(here) == len(there.files)
        for i, x in enumerate(here):
            np.testing.assert_array_equal(x, there[f"arr_{i}"])
    # and a notebook in this one-device process loads the newest as a model that generates
    model, cfg, tokenizer = lmjax.load(run)
    assert cfg.mesh.tensor == 2 and len(generate(model, [tokenizer.encode("def ")], 3, temperature=0.0)[0]) == 3


# Weight transforms that change how the model reads its weights, each trained 3 steps pipelined
# (pipeline 2, M = 2, on 2 devices) and on one device. (Gradient accumulation and bf16 params with
# fp32 master weights under stages: test_encoder_families_shard_like_single_device; evaluation
# during training: test_pipeline_matches_single_device_...)
TRANSFORMS = {"LoRA": ["--set", "lora.rank=4"], "QAT": ["--set", "quant.weights=int8"]}


def test_pipeline_composes_with_lora_and_qat(tmp_path, single_device_run):
    """LoRA and QAT trained pipelined (one process, one after the other) give the losses, gradient
    norms and validation losses of the same runs on one device. LoRA's adapters train on the frozen
    weights of the single-device TINY run; QAT fake-quantizes inside the stages (a weight qwix
    missed there would change the loss)."""
    def args(name, where, *mesh):
        base = ["--init-from", str(single_device_run)] if name == "LoRA" else []
        return ["train", *TINY, "--set", "train.steps=3", *TRANSFORMS[name], *base, *mesh,
                "--set", f"train.run_dir={tmp_path / where / name}"]

    process = start_cli_runs({name: args(name, "piped", *mesh_args(pipeline=2, data=1)) for name in TRANSFORMS},
                             devices=2)
    for name in TRANSFORMS:
        assert main(args(name, "single")) == 0, name
    results = cli_run_results(process)
    assert set(results) == set(TRANSFORMS), results
    for code, output in results.values():
        assert code == 0 and "pipeline 2 stages x 2 microbatches" in output, output
    for name in TRANSFORMS:
        for key in ("loss", "grad_norm", "val_loss"):
            np.testing.assert_allclose(*[metric(tmp_path / where / name, key) for where in ("piped", "single")],
                                       rtol=1e-5, err_msg=f"{name}: {key}")


FSDP_SHARDS = """
import json, jax
from lmjax.config import Config, MeshConfig, ModelConfig
from lmjax.parallel import make_mesh
from lmjax.train.optimizer import make_optimizer
from lmjax.train.state import init_train_state
cfg = Config(model=ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128))
mesh = make_mesh(MeshConfig(data=1, fsdp=8))
_, state, _, _ = init_train_state(cfg.model, lambda p: make_optimizer(cfg.optim, 10, p), 0, mesh)
adam = state.opt_state[1][0]
def fractions(tree):
    return [max(s.data.size for s in x.addressable_shards) / x.size for x in jax.tree.leaves(tree)]
print(json.dumps({"params": fractions(state.params), "mu": fractions(adam.mu), "nu": fractions(adam.nu)}))
"""


def test_fsdp_shards_params_and_adam_moments():
    env = {**os.environ, "XLA_FLAGS": xla_flags(8)}
    out = subprocess.run([sys.executable, "-c", FSDP_SHARDS], env=env, check=True, capture_output=True, text=True)
    fractions = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("params", "mu", "nu"):
        assert all(f == pytest.approx(1 / 8) for f in fractions[name]), (name, fractions[name])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(args, devices=4, cwd=None, apart=0.0) -> list[subprocess.Popen]:
    """`lmjax train args` as processes 0 and 1 of one run (gloo on this host), `apart` seconds apart."""
    port = free_port()
    processes = []
    for i in range(2):
        processes.append(lmjax_subprocess(["train", *args, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                           "2", "--process-id", str(i)], devices=devices, cwd=cwd))
        time.sleep(apart)
    return processes


def test_two_processes_started_apart_share_one_run_dir_update_the_router_bias_alike_and_resume_in_one(tmp_path):
    """A sigmoid router whose bias moves every step, under expert parallelism on 2 gloo processes x 4
    devices (data 2 x expert 4, the data axis across them: each process holds one contiguous half of
    every batch), to step 3, resumed in one process with one device: the 5 losses, router biases and
    max violations equal one device's. Each process updates its replicated copy of the bias from the
    same global counts (a process with another bias would route its half of the batch differently and
    change the loss). The processes start 3 s apart without a run dir: the default one is named by the
    time, and each would pick its own, so process 0's name is sent to the others once jax.distributed
    is up."""
    args = [*TINY, *MOE, "--set", "model.moe.router=sigmoid", "--set", "model.moe.bias_update_rate=0.01",
            "--set", "model.moe.load_balance_coef=0"]
    single, apart = tmp_path / "single", tmp_path / "apart"
    apart.mkdir()
    processes = start_two_processes([*args, "--set", "train.halt_at_step=3", *mesh_args(data=2, expert=4, dcn_data=2)],
                                    cwd=apart, apart=3)
    assert main(["train", *args, "--set", f"train.run_dir={single}"]) == 0
    for p in processes:
        finish(p)
    runs = list((apart / "runs").iterdir())
    assert len(runs) == 1, runs
    sharded = runs[0]
    assert (sharded / "config.json").is_file() and (sharded / "checkpoints" / "3").is_dir()
    assert main(["train", "--resume", str(sharded), "--set", "train.halt_at_step=none", *mesh_args(data=-1, expert=1),
                 "--set", "mesh.dcn_data=1"]) == 0
    np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-5)
    biases = [read_routing(run)["bias"] for run in (single, sharded)]
    assert np.abs(biases[0][-1]).max() > 0 and len(biases[1]) == 5
    np.testing.assert_allclose(biases[1], biases[0], atol=1e-7)
    violation = [[r["moe_max_violation"] for r in read_metrics(run) if "moe_max_violation" in r]
                 for run in (single, sharded)]
    np.testing.assert_allclose(violation[1], violation[0], rtol=1e-5)


def test_single_process_checkpoint_resumes_in_two_processes(tmp_path, single_device_losses):
    """One process trains to step 2; 2 processes x 4 devices resume it over data 2 x fsdp 4 with the
    fsdp axis across them (each process holds every other quarter of every batch: rows not one block;
    the weights are sharded across both) and finish with a sample; the 5 losses equal one device's."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--set", f"train.run_dir={run}", "--set", "train.halt_at_step=2"]) == 0
    for p in start_two_processes(["--resume", str(run), "--set", "train.halt_at_step=none", "--set",
                                  "train.sample_tokens=4", *mesh_args(data=2, fsdp=4, dcn_fsdp=2)]):
        finish(p)
    np.testing.assert_allclose(losses(run), single_device_losses, rtol=1e-5)
    assert (run / "sample.txt").exists()  # weights sharded across both processes are gathered for the sample


LAUNCHER = Path(__file__).resolve().parent.parent / "launch" / "local_multiprocess.sh"


def test_ctrl_c_stops_a_two_process_run_at_one_step_and_it_resumes_to_the_uninterrupted_run(tmp_path):
    """Ctrl-C at the launcher (SIGINT to its process group): both processes save the same step
    and exit 0, without the final evaluation or sample; the same command then continues to the
    losses of an uninterrupted single-device run, each step once. The two processes are the two
    stages of a pipeline across them (mesh.dcn_pipeline=2), so the stop lands between pipelined
    steps. (SIGTERM, twice, with SIGCONT as at a time limit, is tests/test_slurm.py's.)"""
    run, reference = tmp_path / "run", tmp_path / "reference"
    # the signal goes out once step 3 is logged and lands a few steps later (step 7 at ~0.15 s a step on
    # a loaded 2-core machine): 40 steps leave a margin of ~30 for it to reach both processes
    steps = 40
    length = ["--set", f"train.steps={steps}", "--set", "train.checkpoint_every=1000"]
    assert main(["train", *TINY, *length, "--set", f"train.run_dir={reference}"]) == 0
    command = ["bash", str(LAUNCHER), "2", "1", *TINY, *length, *mesh_args(pipeline=2, dcn_pipeline=2, data=1),
               "--set", f"train.run_dir={run}"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**env, "LMJAX_PORT": str(free_port())}, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and max([0] + [r["step"] for r in read_metrics(run)]) < 3:
        time.sleep(0.02)
    os.killpg(launcher.pid, signal.SIGINT)
    output = finish(launcher)
    stops = re.findall(r"run stopped at step (\d+)", output)
    assert len(stops) == 2 and stops[0] == stops[1] and 3 <= int(stops[0]) < steps, output
    assert "Traceback" not in output and "sample:" not in output  # no final evaluation or sample
    assert Checkpointer(run).latest_step() == int(stops[0])
    finish(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "LMJAX_PORT": str(free_port())}))
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, steps + 1))
    np.testing.assert_allclose(losses(run), losses(reference), rtol=1e-5)


@pytest.mark.parametrize("axes, message", [
    (dict(data=3), "mesh {'pipeline': 1, 'data': 3, 'fsdp': 1, 'context': 1, 'tensor': 1, 'expert': 1} needs 3 "
     "devices, but 1 are available"),
    (dict(data=-1, tensor=3), "do not divide the 1 devices"),
    (dict(data=1, dcn_data=2), "mesh.dcn_data=2 does not divide mesh.data=1"),
])
def test_mesh_not_matching_devices(axes, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        make_mesh(MeshConfig(**axes))


@pytest.mark.parametrize("index", range(len(LAYOUT_ERRORS)), ids=[message for _, message in LAYOUT_ERRORS])
def test_layout_errors_before_compiling(layout_runs, index):
    code, output, _ = layout_runs(f"error{index}")
    assert code == 2 and LAYOUT_ERRORS[index][1] in output and "lmjax: error:" in output, output
    assert "Traceback" not in output


@pytest.mark.parametrize("model, mesh, message", [
    (dict(n_layers=6), dict(pipeline=4, data=2), "model.n_layers=6 does not split into mesh.pipeline=4 x "
     "mesh.pipeline_repeats=1 stages"),
    (dict(n_layers=8, moe=MoEConfig(n_experts=4, every=4)), dict(pipeline=4, data=2),
     "stages of whole cycles of 4 blocks"),
    (dict(n_layers=8), dict(pipeline=2, data=4, pipeline_repeats=2, pipeline_microbatches=3),
     "make mesh.pipeline_microbatches=3 a multiple of mesh.pipeline=2"),
    (dict(n_layers=8), dict(pipeline=4, data=2, pipeline_microbatches=2), "mesh.pipeline_microbatches=2 is fewer "
     "than the 4 stages"),
    (dict(n_layers=8), dict(pipeline=2, data=4, pipeline_microbatches=8), "the 4 sequences per data-parallel "
     "device of each micro-step"),
    (dict(n_layers=8, n_decoder_layers=6, family="encoder_decoder"), dict(pipeline=4, data=2),
     "model.n_decoder_layers=6 does not split into mesh.pipeline=4 x mesh.pipeline_repeats=1 stages"),
])
def test_pipeline_layout_errors(model, mesh, message):
    """Each bad pipeline layout is one ConfigError from `validate_layout`, before any compile; the
    good one next to it passes (batch 32 = grad_accum 2 x data 4 x M 4, 8 layers over 2 x 2 stages)."""
    from jax.sharding import AbstractMesh

    def check(model, mesh):
        cfg = Config(model=ModelConfig(d_model=32, n_heads=4, d_ff=64, **model), train=TrainConfig(batch_size=32),
                     optim=OptimConfig(grad_accum_steps=2), mesh=MeshConfig(**mesh))
        validate_layout(cfg, AbstractMesh(tuple(mesh_axis_sizes(cfg.mesh, 8)), MESH_AXES))

    with pytest.raises(ConfigError, match=re.escape(message)):
        check(model, mesh)
    check(dict(n_layers=8), dict(pipeline=2, data=4, pipeline_repeats=2, pipeline_microbatches=4))


def test_unreachable_coordinator_is_a_clear_error():
    port = free_port()  # nothing listens there
    args = ["train", *TINY, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
            "--coordinator-timeout", "3"]
    output, _ = lmjax_subprocess(args, devices=1).communicate(timeout=120)
    assert f"could not join the multi-process run at coordinator 127.0.0.1:{port} within 3 s" in output


def test_scheduler_environment_is_detected(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    waited = []
    monkeypatch.setattr("lmjax.parallel._wait_for_coordinator", lambda address, timeout: waited.append(address))
    for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JOBSET_NAME", "MEGASCALE_COORDINATOR_ADDRESS",
                 "LMJAX_COORDINATOR", "LMJAX_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    initialize_distributed()
    assert calls == []  # one process: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "16")
    initialize_distributed()
    assert calls[-1][0] == (None, None, None)  # jax.distributed detects SLURM's coordinator and ranks itself
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    initialize_distributed()
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("JOBSET_NAME", "lmjax-train")
    initialize_distributed()
    monkeypatch.delenv("JOBSET_NAME")
    monkeypatch.setenv("LMJAX_DISTRIBUTED", "auto")
    initialize_distributed()
    monkeypatch.delenv("LMJAX_DISTRIBUTED")
    monkeypatch.setenv("LMJAX_COORDINATOR", "host0:1234")
    monkeypatch.setenv("LMJAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("LMJAX_PROCESS_ID", "3")
    initialize_distributed()
    assert len(calls) == 5 and calls[-1][0] == ("host0:1234", 4, 3) and waited == ["host0:1234"]
