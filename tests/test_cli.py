import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lmjax.cli import main
from lmjax.records import read_metrics

TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "model.d_ff=64",
        "--set", "model.max_seq_len=32", "--set", "data.seq_len=32", "--set", "data.max_bytes=200000",
        "--set", "train.batch_size=4", "--set", "log.wandb=off", "--set", "log.progress_bar=false",
        "--set", "train.sample_tokens=4", "--set", "train.eval_batches=2"]


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args, message", [
    (["train", "no_such_experiment"],
     "unknown experiment 'no_such_experiment'; known experiments: bert_tiny, decoder_narrow, decoder_tiny"),
    (["train", "--set", "model.colour=red"], "unknown config key 'model.colour'"),
    (["train", "--set", "model.d_model=wide"], "model.d_model: cannot use 'wide'"),
    (["train", "--set", "model.n_heads=3"], "does not divide model.d_model"),
    (["train", "--set", "model.n_kv_heads=3"], "does not divide model.n_heads"),
    (["train", "--set", "data.seq_len=4096"], "exceeds model.max_seq_len"),
    (["train", "--set", "model.sliding_window=0"], "model.sliding_window must be a positive number of positions"),
    (["train", "--set", "model.rope_scaling=ntk"], "model.rope_scaling: cannot use 'ntk'"),
    (["train", "--set", "model.rope_scaling=linear", "--set", "model.rope_scaling_factor=0"],
     "needs model.rope_scaling_factor > 0"),
    (["train", "--set", "model.vocab_size=256"], "smaller than the bytes tokenizer"),
    (["train", "--set", "data.source=/no/such/corpus"], "data.source '/no/such/corpus' does not exist"),
])
def test_bad_input_is_one_clear_error(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("lmjax: error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_empty_data_is_an_error(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_cli(capsys, "train", "--set", f"data.source={tmp_path / 'empty.txt'}")
    assert code == 2 and "contains no text" in err


def test_train_resume_and_eval_from_the_cli(capsys, tmp_path):
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", *TINY, "--set", "train.steps=4", "--set", f"train.run_dir={run}",
                           "--set", "train.halt_at_step=2")
    assert code == 0 and "stopped at step 2" in out
    # resuming with another model shape is refused before anything is compiled, and nothing saved is lost
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--set", "model.d_model=64")
    assert code == 2 and "model.d_model: saved 32, now 64" in err
    assert (run / "checkpoints" / "2").is_dir()
    # a save cut off mid-write (Orbax writes to a temporary name, renamed when complete) is never resumed
    partial = run / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000"
    partial.mkdir()
    (partial / "state").write_text("half-written")
    code, out, _ = run_cli(capsys, "train", "--resume", str(run), "--set", "train.halt_at_step=none")
    assert code == 0 and "resumed at step 2" in out and "run finished" in out
    code, out, _ = run_cli(capsys, "eval", str(run), "--json", "--max-batches", "2")
    result = json.loads(out)
    assert code == 0 and result["step"] == 4
    assert set(result) >= {"loss", "perplexity", "bits_per_byte", "tokens"} and result["loss"] > 0
    # any data source, with every position's loss saved; their mean is the reported loss
    text = "def f(x):\n    return x * 2\n" * 200
    (tmp_path / "other.txt").write_text(text)
    windows = len(text.encode()) // 32  # one stream of len + 1 tokens (eos) cut into windows of 33
    sequences = windows // 4 * 4  # whole batches of train.batch_size=4
    losses_file = tmp_path / "losses.npy"
    code, out, _ = run_cli(capsys, "eval", str(run), "--json", "--data", str(tmp_path / "other.txt"),
                           "--token-losses", str(losses_file))
    result = json.loads(out)
    token_losses = np.load(losses_file)
    assert code == 0 and token_losses.shape == (sequences, 32)
    np.testing.assert_allclose(token_losses.sum() / result["tokens"], result["loss"], rtol=1e-5)
    code, out, _ = run_cli(capsys, "generate", str(run), "--prompt", "def ", "--prompt", "x = ",
                           "--max-new-tokens", "5", "--temperature", "0")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("def ") and any(line.startswith("x = ") for line in lines)
    code, _, err = run_cli(capsys, "generate", str(run), "--prompt", "def ", "--max-new-tokens", "500")
    assert code == 2 and "--max-new-tokens 500 does not fit" in err


def test_experiments_are_listed(capsys):
    code, out, _ = run_cli(capsys, "experiments")
    assert code == 0 and "decoder_tiny" in out and "gpt_small_bench" in out


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lmjax.cli", "train", *TINY, "--set", "train.steps=100000",
         "--set", "train.log_every=1", "--set", f"train.run_dir={run}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    stop = int(re.search(r"stopped at step (\d+)", output)[1])
    saved = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert stop > 0 and max(saved) == stop  # the checkpoint is the stop step itself
    # every step up to the stop was logged (log_every=1), and none after it
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, stop + 1))


WSD_SWEEP = '''
from lmjax.drivers.sweep import wsd_branches

def sweep():
    return wsd_branches("decoder_tiny", [{"model.d_model": 32}], tokens=[1024, 2048])
'''


@pytest.mark.parametrize("args, message", [
    (["generate", "{run}", "--prompt", "def ", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "{run}", "--prompt", ""], "--prompt is empty"),
    (["generate", "{run}", "--prompt", "def ", "--top-k", "0"], "--top-k must be at least 1"),
    (["generate", "{run}", "--prompt", "def ", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "{run}", "--prompt", "def ", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["eval", "{run}", "--max-batches", "0"], "--max-batches must be at least 1"),
    (["eval", "{run}", "--token-losses", "{run}/missing/losses.npy"], "/missing does not exist; create it first"),
    (["eval", "{run}"], "has no checkpoint yet"),
    (["eval", "{corrupt}"], "config.json is corrupt"),
    (["generate", "{corrupt}", "--prompt", "def "], "config.json is corrupt"),
    (["train", "--resume", "{corrupt}"], "config.json is corrupt"),
    (["train", "--coordinator", "127.0.0.1:1"], "needs --num-processes and --process-id"),
    (["train", "--num-processes", "2", "--process-id", "0"], "need --coordinator HOST:PORT"),
    (["train", "--set", "train.sample_prompt="], "train.sample_prompt is empty"),
    (["train", *TINY, "--set", "train.sample_prompt=" + "x" * 40], "train.sample_prompt is 40 tokens"),
    (["train", *TINY, "--set", "model.loss_chunk=7"], "model.loss_chunk=7 does not divide the 32 target positions"),
    (["sweep", "{sweep}", "--commands"], "has WSD branches, which must run after their trunk"),
])
def test_more_bad_input_is_one_clear_error_and_changes_nothing(capsys, tmp_path, args, message):
    from lmjax.config import Config

    run, corrupt = tmp_path / "run", tmp_path / "corrupt"
    run.mkdir()
    corrupt.mkdir()
    (run / "config.json").write_text(json.dumps(Config().to_dict()))  # a run with no checkpoint yet
    (corrupt / "config.json").write_text('{"model": {"d_model": ')
    (tmp_path / "wsd.py").write_text(WSD_SWEEP)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [a.format(run=run, corrupt=corrupt, sweep=tmp_path / "wsd.py") for a in args]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("lmjax: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created or removed
