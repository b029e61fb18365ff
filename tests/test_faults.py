"""Faults during training: bad steps are not applied, too many roll back and then stop (exit 3),
no checkpoint holds NaN or inf, and a disk that refuses a save ends with one line (exit 2)."""

import errno
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from test_resume import TINY, run_cli

import lmjax
from lmjax.checkpoint import Checkpointer, NonFiniteState, SaveFailed
from lmjax.config import SPIKE_WINDOW, ConfigError, MeshConfig
from lmjax.data.pipeline import BatchIterator
from lmjax.exits import PEER_LOST_EXIT_CODE
from lmjax.parallel import make_mesh
from lmjax.records import read_metrics
from lmjax.runs import restore_params
from lmjax.train.datasets import load_datasets
from lmjax.train.goodput import PARTS
from lmjax.train.guard import BadStepRule, init_guard
from lmjax.train.loop import train
from lmjax.train.optimizer import learning_rate_schedule, make_optimizer
from lmjax.train.rollback import Rollback, read_rollbacks, restore_train_state
from lmjax.train.state import init_train_state
from lmjax.train.step import make_train_step
from lmjax.train.watchdog import AUTO_FACTOR, AUTO_FLOOR_SECONDS, HANG_EXIT_CODE, StepTimeout


def test_spike_judgment_equals_a_numpy_window():
    """Losses are judged against the mean and (population) deviation of the last SPIKE_WINDOW good
    ones, once spike_min_steps are in; non-finite values are bad and never enter the window."""
    rule = BadStepRule(spike_sigmas=3.0, spike_min_steps=5)
    judge = jax.jit(rule.judge)
    rng = np.random.default_rng(0)
    losses = list(4.0 + 0.1 * rng.standard_normal(SPIKE_WINDOW + 30))
    losses[3] = 9.0  # too early to judge: applied
    losses[40], losses[41], losses[70] = 4.0 + 5.0, np.nan, np.inf
    guard, kept, skipped = init_guard(), [], 0
    for loss in losses:
        apply, guard = judge(guard, jnp.float32(loss), jnp.float32(1.0))
        window = np.asarray(kept[-SPIKE_WINDOW:], np.float32)
        expected = np.isfinite(loss) and (len(window) < 5 or loss <= window.mean() + 3.0 * window.std())
        assert bool(apply) == expected
        kept += [np.float32(loss)] if expected else []
        skipped += not expected
    assert int(guard.skipped) == skipped == 3 and int(guard.good) == len(kept)
    assert int(guard.most_in_a_row) == 2 and int(guard.bad_in_a_row) == 0
    _, nan_grads = judge(guard, jnp.float32(4.0), jnp.float32(np.nan))
    assert int(nan_grads.skipped) == 4 and int(nan_grads.bad_in_a_row) == 1


def test_a_step_with_nan_gradients_is_not_applied(tiny, tmp_path):
    """A NaN in one batch's loss mask makes that step's loss and gradients NaN: params and Adam state
    end equal, bit for bit, to those of a run that never saw that batch; the step is counted. Both
    start from a checkpoint written before the guard existed (no `guard` in its state)."""
    cfg = tiny()
    mesh = make_mesh(MeshConfig())
    train_set, _, _ = load_datasets(cfg)
    batches = [next(iter(BatchIterator(train_set, 8, 0, step=s))) for s in range(4)]
    poisoned = {**batches[2], "loss_mask": batches[2]["loss_mask"].copy()}
    poisoned["loss_mask"][0, 5] = np.nan

    def optimizer_for(params):
        return make_optimizer(cfg.optim, 6, params, cfg.model)

    graphdef, state, _, optimizer = init_train_state(cfg.model, optimizer_for, 0, mesh)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(0, {k: v for k, v in state._asdict().items() if k != "guard"}, {}, {})  # the old layout
    checkpointer.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    step = jax.jit(make_train_step(graphdef, optimizer, learning_rate_schedule(cfg.optim, 6), 1, False),
                   donate_argnums=0)
    finals = []
    for sequence in ([batches[0], batches[1], poisoned, batches[3]], [batches[0], batches[1], batches[3]]):
        s = restore_train_state(checkpointer, abstract)[0]
        assert int(s.guard.skipped) == 0 and int(s.guard.good) == 0
        for batch in sequence:
            s, metrics, _ = step(s, batch)
        finals.append((s, metrics))
    checkpointer.close()
    (skipped, metrics), (clean, _) = finals
    assert int(metrics["skipped_steps"]) == 1 and int(metrics["bad_steps_in_a_row"]) == 0
    assert int(skipped.step) == 4 and int(clean.step) == 3  # the bad step used its batch up
    for x, y in zip(jax.tree.leaves((skipped.params, skipped.opt_state)), jax.tree.leaves((clean.params,
                                                                                           clean.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    first_weights = [np.asarray(jax.tree.leaves(s.params)[0]) for s in (clean, state)]
    assert not np.array_equal(*first_weights)  # the steps did train


@pytest.fixture
def poisoned_batches(monkeypatch):
    """Batches at the data positions in the returned set get targets no text has (a loss spike);
    the list returned beside it records the data position of every batch trained on."""
    bad, seen = set(), []
    original = BatchIterator.__next__

    def next_batch(self):
        position = self.step
        batch = original(self)
        seen.append(position)
        if position in bad:
            batch = {**batch, "targets": np.full_like(batch["targets"], 383)}  # an id bytes never use
        return batch

    monkeypatch.setattr(BatchIterator, "__next__", next_batch)
    return bad, seen


def test_loss_spikes_roll_back_to_the_newest_checkpoint_and_skip_batches(tiny, poisoned_batches):
    bad, seen = poisoned_batches
    bad.update({6, 7})
    cfg = tiny(steps=10, eval_every=100, spike_min_steps=3, spike_sigmas=1.0, max_bad_steps=2,
               rollback_skip_batches=3, checkpoint_every=3, sample_tokens=0)
    start = time.perf_counter()
    assert train(cfg, cfg.train.run_dir)["finished"]
    elapsed = time.perf_counter() - start
    # steps 7 and 8 (batches 6, 7) spike; after step 8 the run restores step 6 (data position 6),
    # skips batches 6, 7, 8 and trains steps 7..10 on batches 9..12
    assert seen == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12]
    assert read_rollbacks(cfg.train.run_dir) == [{"step": 8, "checkpoint": 6, "data_step": 9}]
    records = [r for r in read_metrics(cfg.train.run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 11))  # the rolled-back steps' records are dropped
    assert records[-1]["skipped_steps"] == 0  # the restored state never saw the bad steps
    # goodput: the parts sum to the wall time; steps 7 and 8 were done twice
    goodput = json.loads((Path(cfg.train.run_dir) / "goodput.json").read_text())
    assert goodput["steps"] == {"productive_steps": 10, "redone_steps": 2} and goodput["invocations"] == 1
    assert set(goodput["seconds"]) == set(PARTS) and all(v >= 0 for v in goodput["seconds"].values())
    assert sum(goodput["seconds"].values()) == pytest.approx(goodput["wall_seconds"], rel=1e-12)
    assert 0 < goodput["wall_seconds"] <= elapsed
    ratio = goodput["seconds"]["redone_steps"] / goodput["seconds"]["productive_steps"]
    assert ratio == pytest.approx(2 / 10)
    # a run resubmitted from checkpoint 6 (as after a crash before step 9's save) continues from batch 9,
    # as the rolled-back run did, and counts the roll-back as done
    restored = []
    resubmitted = types.SimpleNamespace(cfg=cfg, run_dir=Path(cfg.train.run_dir), step=6, resuming=True,
                                        data_state=lambda: {"step": 6, "seed": 0},
                                        batches=types.SimpleNamespace(restore=restored.append))
    assert Rollback(resubmitted).done == read_rollbacks(cfg.train.run_dir) and restored == [{"step": 9, "seed": 0}]


def test_divergence_stops_with_exit_3_and_leaves_only_finite_checkpoints(capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--set", f"train.run_dir={run}", "--set", "optim.lr=1e8",
                           "--set", "optim.clip_norm=none", "--set", "optim.warmup_steps=0", "--set",
                           "train.steps=40", "--set", "train.max_bad_steps=3", "--set", "train.max_rollbacks=1",
                           "--set", "train.rollback_skip_batches=2", "--set", "train.eval_every=1000")
    assert code == 3 and err.count("\n") == 1, err
    assert "diverged at step" in err and "lower optim.lr (now 1e+08) or set optim.clip_norm" in err
    assert len(read_rollbacks(run)) == 1
    checkpointer = Checkpointer(run, async_save=False)
    steps = checkpointer.manager.all_steps()
    assert steps and f"the newest good checkpoint is step {max(steps)}" in err
    for step in steps:
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restore_params(run, step)))
    # saves refuse NaN; a checkpoint of NaN weights (as written before saves were checked) is named by
    # `lmjax eval` in one line
    nan = jax.tree.map(lambda x: x * np.nan, restore_params(run, max(steps)))
    with pytest.raises(NonFiniteState):
        checkpointer.save_weights(100, nan, {})
    config = json.loads((run / "config.json").read_text())
    weights_only = ocp.args.Composite(state=ocp.args.StandardSave({"params": nan}), data=ocp.args.JsonSave({}),
                                      config=ocp.args.JsonSave(config))
    checkpointer.manager.save(100, args=weights_only)
    checkpointer.wait()
    checkpointer.close()
    code, _, err = run_cli(capsys, "eval", str(run))
    assert code == 2 and err.count("\n") == 1 and "checkpoint step 100 hold NaN or inf" in err, err
    with pytest.raises(ConfigError, match=f"checkpoint step 100 hold NaN or inf.*earlier checkpoints: steps "
                                          f"{max(steps)} ") as refused:  # (keep_checkpoints=2)
        lmjax.load(run)
    assert "\n" not in str(refused.value)


def test_a_save_the_disk_refuses_gives_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """ENOSPC injected where Orbax writes a JSON item: the error of the second (asynchronous) save
    comes back at the wait as SaveFailed, its partial directory is gone, step 1 still restores."""
    state = {"w": jnp.arange(1000, dtype=jnp.float32)}
    checkpointer = Checkpointer(tmp_path, keep=2)
    checkpointer.save(1, state, {"step": 1}, {})
    checkpointer.wait()
    size = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "1").rglob("*") if f.is_file())

    async def no_space(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)
    monkeypatch.setattr("lmjax.checkpoint.shutil.disk_usage", lambda path: type("U", (), {"free": 3 * size // 2}))
    checkpointer.save(2, {"w": state["w"] + 1}, {"step": 2}, {})
    with pytest.raises(SaveFailed) as failure:
        checkpointer.wait()
    message = str(failure.value)
    assert "\n" not in message and "could not save checkpoint step 2" in message and "the disk is full" in message
    assert f"about {size:,} bytes, {3 * size // 2:,} are free" in message and "step 1 is intact" in message
    assert "room for fewer than two more checkpoints" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    checkpointer.close()
    reader = Checkpointer(tmp_path, async_save=False)
    assert reader.latest_step() == 1
    restored = reader.manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))["state"]
    np.testing.assert_array_equal(restored["w"], np.arange(1000, dtype=np.float32))


def test_a_full_tmpfs_ends_the_run_with_one_line_and_exit_2(capsys, tmp_path):
    """The run directory on a tmpfs with room for one checkpoint: the second save fails; one line,
    exit 2, no partial directory, and the same command resumes from the first checkpoint elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=480k", "tmpfs", str(disk)], check=True)
    try:
        run = disk / "run"
        code, _, err = run_cli(capsys, "train", *TINY, "--set", f"train.run_dir={run}", "--set",
                               "train.eval_every=1000")
        assert code == 2 and err.count("\n") == 1 and "could not save checkpoint step 4" in err, err
        assert "the disk is full" in err and "the checkpoint of step 2 is intact" in err
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
        assert jax.tree.leaves(restore_params(run))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


WATCHED_LOOP = """
import sys, time, types
import jax.numpy as jnp
from lmjax.train.loop import Hook, step_loop
from lmjax.train.watchdog import Watchdog


def sleeping_hook(run, metrics, routing):
    if run.step == 4:
        time.sleep(3)


def slow_evaluation(run, metrics, routing):
    if run.step == 2:
        time.sleep(1.5)  # longer than the limit, but excused


run = types.SimpleNamespace(step=0, halt=10, state=jnp.zeros(()), next_batch=lambda: None)
run.train_step = lambda state, batch: (state + 1, {"loss": state * 2}, {})
with Watchdog(sys.argv[1], step_timeout=float(sys.argv[2]), process=0) as watchdog:
    step_loop(run, [Hook(watchdog, 1), Hook(watchdog.excusing(slow_evaluation), 1), Hook(sleeping_hook, 1)], [])
print("finished")
"""


def test_a_hook_that_hangs_trips_the_watchdog_which_names_it(tmp_path):
    """A step loop whose hook sleeps: no step finishes for longer than train.step_timeout (1 s), so
    the stacks go to hang-0.txt, naming the hook, with one line and exit code 4; an excused hook
    (evaluation) as long is not a hang."""
    done = subprocess.run([sys.executable, "-c", WATCHED_LOOP, str(tmp_path), "1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == HANG_EXIT_CODE, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "no training step finished for 1 s" in done.stderr
    assert "finished" not in done.stdout
    stacks = (tmp_path / "hang-0.txt").read_text()
    assert "sleeping_hook" in stacks and "slow_evaluation" not in stacks


def test_the_automatic_step_timeout():
    """None: watched from the first finished step, at AUTO_FLOOR_SECONDS until AUTO_WARMUP intervals
    are in, then AUTO_FACTOR x their median (never below the floor); a number is the limit; 0 is off."""
    timeout = StepTimeout(None)
    assert timeout.limit() is None  # the first compile and step are not watched
    timeout.finished(0.0)
    assert timeout.limit() == AUTO_FLOOR_SECONDS
    for k in range(1, 8):  # 7 intervals of 100 s
        timeout.finished(k * 100.0)
    assert timeout.limit() == AUTO_FACTOR * 100.0
    for k in range(1, 9):  # 8 more of 1 s: the median is 1 s
        timeout.finished(700.0 + k)
    assert timeout.limit() == AUTO_FLOOR_SECONDS
    fixed, off = StepTimeout(7.0), StepTimeout(0.0)
    for t in (fixed, off):
        t.finished(0.0)
    assert fixed.limit() == 7.0 and off.limit() is None


PEER = """
import sys, time
import jax
import numpy as np
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
from jax.experimental import multihost_utils
from lmjax.exits import exit_if_peer_lost
try:
    while True:
        multihost_utils.process_allgather(np.ones(2))
        print("collective done", flush=True)
        time.sleep(0.2)
except Exception as e:
    exit_if_peer_lost(e)
    raise
"""


def test_a_dead_peer_ends_the_survivor_at_once_with_one_line(tmp_path):
    """kill -9 of one of two processes: the survivor's next collective fails (gloo), and instead of a
    traceback followed by an abort at the heartbeat timeout it prints one line and exits 5."""
    from test_parallel import free_port

    port = str(free_port())
    processes = [subprocess.Popen([sys.executable, "-c", PEER, port, str(i)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in processes:
        while "collective done" not in p.stdout.readline():  # (gloo prints its own lines first)
            assert p.poll() is None, p.stderr.read()
    processes[1].kill()
    start = time.perf_counter()
    code = processes[0].wait(timeout=90)
    err = processes[0].stderr.read().strip()
    assert code == PEER_LOST_EXIT_CODE and time.perf_counter() - start < 30, err
    assert err.splitlines()[-1].startswith("lmjax: error: another process of this run stopped (")
    assert "Traceback" not in err


NO_SPACE_FROM_THE_SECOND_SAVE = """
import errno, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from lmjax.cli import main

original, writes = json_checkpoint_handler.JsonCheckpointHandler._save_fn, []


async def no_space(self, x, directory):
    writes.append(directory)
    if len(writes) > 2:  # the first save's two JSON items (data, config) are written
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await original(self, x, directory)


json_checkpoint_handler.JsonCheckpointHandler._save_fn = no_space
sys.exit(main(sys.argv[1:]))
"""


def test_a_two_process_run_survives_a_full_disk_and_two_kills_and_ends_bitwise_equal(tmp_path):
    """bench/chaos.py's two-process run (12 steps, a checkpoint every 3). First process 0's disk refuses
    the second save (ENOSPC where Orbax writes a JSON item; process 1 writes no JSON and would wait for
    process 0 in Orbax's barrier): both processes end with the same one line and exit 2, the partial
    directory is gone, step 3 stays. Then two seeded SIGKILLs, of process 1 and then of process 0 (the
    coordinator's host) during an asynchronous save; each time the other ends by itself: lmjax's line and
    exit 5 if it was in a collective, else the coordination service's abort at the (lowered) heartbeat
    timeout. The run then finishes with params and Adam state equal to an uninterrupted run's (one process,
    two devices), bit for bit."""
    spec = importlib.util.spec_from_file_location("chaos", Path(__file__).parent.parent / "bench" / "chaos.py")
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    chaos.reference_run(tmp_path / "reference", 12)
    run = tmp_path / "chaos"
    full_disk = chaos.submit(run, 12, entries=(["-c", NO_SPACE_FROM_THE_SECOND_SAVE], chaos.CLI))
    assert [p.wait(timeout=600) for p in full_disk] == [2, 2]
    logs = [(tmp_path / f"chaos-{i}.log").read_text() for i in range(2)]
    errors = [[re.sub(r"[\d,]+ are free", "", line) for line in log.splitlines() if "error" in line.lower()]
              for log in logs]  # (the free bytes change)
    assert errors[0] == errors[1] and len(errors[0]) == 1, logs
    assert "could not save checkpoint step 6" in errors[0][0] and "the disk is full (process 0's write" in errors[0][0]
    assert "the checkpoint of step 3 is intact" in errors[0][0] and "Traceback" not in logs[0] + logs[1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3"]
    result = chaos.chaos_run(run, 12, 2, 0)
    assert result["kills"] == 2 and result["moments"][0].startswith("process 1 "), result
    assert result["moments"][1].startswith("process 0 during the save"), result
    assert all(code in (PEER_LOST_EXIT_CODE, -signal.SIGABRT) for code in result["survivor_codes"]), result
    lines = [line for i in range(2) for line in (tmp_path / f"chaos-{i}.log").read_text().splitlines()
             if "another process of this run stopped" in line]  # a survivor's one line each (none at an abort)
    assert len(lines) == result["survivor_codes"].count(PEER_LOST_EXIT_CODE), lines
    assert all(line.startswith("lmjax: error:") and line.count("lmjax") == 1 for line in lines), lines
    for x, y in zip(chaos.final_state(tmp_path / "reference"), chaos.final_state(run), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_read_only_disk_gives_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        checkpointer = Checkpointer(disk)
        checkpointer.save(1, {"w": jnp.ones(10)}, {"step": 1}, {})
        checkpointer.wait()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(SaveFailed) as failure:
            checkpointer.save(2, {"w": jnp.zeros(10)}, {"step": 2}, {})
            checkpointer.wait()
        message = str(failure.value)
        assert "could not save checkpoint step 2" in message and "the disk is read-only" in message
        assert "the checkpoint of step 1 is intact" in message and "\n" not in message
        assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["1"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
