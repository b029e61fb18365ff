"""A run directory is the unit of resumption: resuming checks the settings against the
checkpoint's before anything is rewritten, records allowed changes, and keeps each step once."""

import json
import shutil

from lmjax.cli import main
from lmjax.records import read_metrics

TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "model.d_ff=64",
        "--set", "model.max_seq_len=32", "--set", "data.seq_len=32", "--set", "data.max_bytes=200000",
        "--set", "train.batch_size=4", "--set", "log.wandb=off", "--set", "log.progress_bar=false",
        "--set", "train.sample_tokens=0", "--set", "train.eval_batches=1", "--set", "train.eval_every=3",
        "--set", "train.log_every=1", "--set", "train.checkpoint_every=2", "--set", "train.steps=6"]


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_resume_refuses_without_changing_anything_records_changes_and_keeps_each_step_once(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--set", f"train.run_dir={run}", "--set", "train.halt_at_step=2")[0] == 0
    saved = (run / "config.json").read_bytes()
    # another optimizer state structure: one line, and config.json is left as it was
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--set", "optim.clip_norm=none")
    assert code == 2 and err.count("\n") == 1 and "the saved optimizer state has another structure" in err
    assert "optim.clip_norm=1.0, now None" in err and (run / "config.json").read_bytes() == saved
    # a batch of another size would not continue the data order: refused unless asked for
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--set", "train.batch_size=8")
    assert code == 2 and err.count("\n") == 1 and "train.batch_size=8 (saved 4)" in err and "--new-data-order" in err
    assert (run / "config.json").read_bytes() == saved and not (run / "config_history.jsonl").exists()
    # the run still resumes with its own settings; a longer run and another lr are recorded
    code, out, _ = run_cli(capsys, "train", "--resume", str(run), "--set", "train.halt_at_step=none",
                           "--set", "train.steps=7", "--set", "optim.lr=1e-3")
    assert code == 0 and "resumed at step 2" in out and "run finished" in out
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2
    assert history[-1]["changes"] == {"train.steps": [6, 7], "train.halt_at_step": [2, None],
                                      "optim.lr": [0.003, 0.001]}
    # a new data order when asked for
    code, out, _ = run_cli(capsys, "train", "--resume", str(run), "--set", "train.steps=8", "--set",
                           "train.batch_size=8", "--new-data-order")
    assert code == 0 and "resumed at step 7" in out
    # starting over in the same directory takes a flag; the run then holds each step once
    code, out, _ = run_cli(capsys, "train", *TINY, "--set", f"train.run_dir={run}", "--fresh")
    assert code == 0 and "resumed" not in out and "--fresh: deleted" in out
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # as if the process had died after logging step 6, its newest save being step 4 (a cut-off line too):
    # the same command continues from step 4, and each step appears once
    shutil.rmtree(run / "checkpoints" / "6")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')
    code, out, _ = run_cli(capsys, "train", *TINY, "--set", f"train.run_dir={run}")
    assert code == 0 and "resumed at step 4" in out
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
