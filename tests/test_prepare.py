import json

import numpy as np
import pytest

from lmjax.config import Config, ConfigError
from lmjax.config_parse import override
from lmjax.data import BatchIterator, DataError, Mixture, PackedDataset, load_documents, load_tokenizer, tokenize
from lmjax.data.prepare import open_prepared, prepare
from lmjax.data.subword import train_tokenizer

MULTILINGUAL = ["naïve café — 日本語のテキスト 🙂", "Привет, мир! 你好，世界。", "ελληνικά και Grüße 🎉 ¿Qué tal?"]


def write_corpus(root, n_files=6, docs_per_file=40):
    """JSONL files of multilingual and code documents, with empty documents sprinkled in."""
    root.mkdir(parents=True, exist_ok=True)
    stdlib = load_documents("stdlib", max_bytes=60_000)
    for f in range(n_files):
        lines = []
        for d in range(docs_per_file):
            k = f * docs_per_file + d
            text = "" if k % 17 == 0 else f"{MULTILINGUAL[k % 3]} #{k}\n" + stdlib[k % len(stdlib)][: 50 + 7 * k]
            lines.append(json.dumps({"text": text}))
        (root / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def shard_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "plan.json"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "bytes"
    prepare(str(corpus), "bytes", out, workers=2, shard_bytes=10_000, progress=False)
    return out


def test_prepared_windows_equal_the_in_memory_pipeline(corpus, prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    documents = load_documents(str(corpus))
    assert len(manifest["shards"]) > 3 and manifest["documents"] == len(documents)
    assert manifest["empty_documents"] == sum(1 for k in range(240) if k % 17 == 0)
    assert manifest["tokens"] == sum(len(d.encode()) + 1 for d in documents)
    tok = load_tokenizer("bytes")
    reference = PackedDataset(tokenize(documents, tok), 32)  # one in-memory stream: the independent reference
    windows = open_prepared(prepared, tok, 32, verify=True)
    assert len(windows) == len(reference)
    for i in [0, 1, len(windows) // 2, len(windows) - 1] + list(range(5, len(windows), 37)):
        for key, value in reference[i].items():
            np.testing.assert_array_equal(windows[i][key], value)


def test_killed_prepare_resumes_to_byte_identical_shards(corpus, prepared, tmp_path):
    out = tmp_path / "resumed"
    assert prepare(str(corpus), "bytes", out, workers=2, shard_bytes=10_000, progress=False,
                   stop_after_shards=2) == {}
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="unfinished `lmjax data prepare`"):
        open_prepared(out, load_tokenizer("bytes"), 32)
    # what a kill leaves behind: a shard whose arrays were written but not its .json, and a half-written file
    (out / "shard-00002.tokens.npy").write_bytes(b"partial")
    (out / "shard-00003.tokens.npy.tmp").write_bytes(b"half")
    with pytest.raises(DataError, match="unfinished prepare with other settings"):
        prepare(str(corpus), "bytes", out, workers=2, shard_bytes=20_000, progress=False)
    prepare(str(corpus), "bytes", out, workers=2, shard_bytes=10_000, progress=False)
    assert shard_files(out) == shard_files(prepared)


def test_bad_prepared_data_is_a_clear_error(prepared, tmp_path, corpus):
    tok = load_tokenizer("bytes")
    with pytest.raises(DataError, match="not a prepared dataset"):
        open_prepared(tmp_path, tok, 32)
    other = train_tokenizer(load_documents(str(corpus)), tmp_path / "tok.json", 400, "bpe", num_sentinels=4)
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        open_prepared(prepared, load_tokenizer(str(other)), 32)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name, data in shard_files(prepared).items():
        (broken / name).write_bytes(data)
    shard = broken / "shard-00001.tokens.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # one flipped bit in the token data: only the checksum sees it
    shard.write_bytes(bytes(data))
    open_prepared(broken, tok, 32)
    with pytest.raises(DataError, match="shard-00001.tokens.npy fails its checksum"):
        open_prepared(broken, tok, 32, verify=True)
    shard.write_bytes(bytes(data[:-100]))  # truncated
    with pytest.raises(DataError, match="shard-00001.tokens.npy is unreadable"):
        open_prepared(broken, tok, 32)
    (broken / "shard-00002.docs.npy").unlink()
    shard.write_bytes((prepared / "shard-00001.tokens.npy").read_bytes())
    with pytest.raises(DataError, match="shard-00002.docs.npy is missing"):
        open_prepared(broken, tok, 32)


def test_invalid_utf8_and_empty_documents_are_counted(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"good \xe6\x97 bad bytes")
    (tmp_path / "src" / "b.txt").write_bytes(b"")
    (tmp_path / "src" / "c.txt").write_text("fine ü")
    manifest = prepare(str(tmp_path / "src"), "bytes", tmp_path / "out", workers=1, progress=False)
    assert (manifest["documents"], manifest["empty_documents"], manifest["invalid_utf8_documents"]) == (2, 1, 1)
    tokens = np.load(tmp_path / "out" / "shard-00000.tokens.npy")
    assert bytes(tokens[:18].astype(np.uint8)).decode() == "good \ufffd bad bytes" and tokens[18] == 258  # eos
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="contains no text"):
        prepare(str(tmp_path / "empty"), "bytes", tmp_path / "out2", workers=1, progress=False)


def test_batches_identical_across_process_counts_and_resume(prepared, corpus, tmp_path):
    tok = load_tokenizer("bytes")
    small = tmp_path / "small"
    prepare(str(write_corpus(tmp_path / "c2", n_files=2, docs_per_file=20)), "bytes", small, workers=1,
            progress=False)
    mixture = Mixture([open_prepared(prepared, tok, 16), open_prepared(small, tok, 16)], [0.7, 0.3])
    single = BatchIterator(mixture, 8, seed=3)
    reference = [next(single) for _ in range(12)]
    for processes in (2, 4):
        rows = 8 // processes
        iterators = [BatchIterator(mixture, 8, seed=3, rows=slice(p * rows, (p + 1) * rows)) for p in range(processes)]
        for step in range(12):
            local = [next(it) for it in iterators]
            for key in reference[step]:
                np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), reference[step][key])
    # resume from the state saved after step 5, by one process or by two, continues with batch 6
    state = json.loads(json.dumps({**single.state(), "step": 6}))
    for rows in (slice(0, 8), slice(0, 4), slice(4, 8)):
        resumed = BatchIterator(mixture, 8, seed=3, rows=rows)
        resumed.restore(state)
        for step in (6, 7):
            np.testing.assert_array_equal(next(resumed)["inputs"], reference[step]["inputs"][rows])
    with pytest.raises(DataError, match="weights"):
        BatchIterator(Mixture(mixture.datasets, [0.5, 0.5]), 8, seed=3).restore(state)
    with pytest.raises(DataError, match="one positive number per dataset"):
        BatchIterator(mixture.datasets, 8, seed=3, weights=[1.0, 0.0])


def test_mixture_weights_hold_over_many_batches():
    datasets = [PackedDataset(tokenize([c * 40_000], load_tokenizer("bytes")), 8) for c in "abc"]  # 5,000 windows each
    weights = [0.5, 0.3, 0.2]
    iterator = BatchIterator(datasets, 32, seed=0, weights=weights)
    pairs = [p for step in range(320) for p in iterator.indices(step)]
    drawn = np.array([d for d, _ in pairs])
    share = np.bincount(drawn, minlength=3) / len(drawn)
    sigma = np.sqrt(np.array(weights) * (1 - np.array(weights)) / len(drawn))
    assert np.all(np.abs(share - weights) < 4 * sigma), share
    first = next(iterator)["inputs"][:, 0]  # the batch holds the datasets' own tokens in the drawn proportions
    assert sorted(chr(c) for c in first) == sorted("abc"[d] for d, _ in iterator.indices(0))
    # every dataset is read through whole epochs: within a dataset, the first len(d) draws are a permutation
    first_a = [i for d, i in pairs if d == 0][: len(datasets[0])]
    assert sorted(first_a) == list(range(len(datasets[0])))


def test_mixture_config_parsing_and_errors():
    cfg = override(Config(), ["data.path=/data/web:0.7,/data/code:0.3"])
    assert cfg.data.mixture() == [("/data/web", 0.7), ("/data/code", 0.3)]
    assert override(Config(), ["data.path=/data/web"]).data.mixture() == [("/data/web", 1.0)]
    for bad in ("/a:0.5,/b:0", "/a:-1"):
        with pytest.raises(ConfigError, match="must be > 0"):
            override(Config(), [f"data.path={bad}"])


TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "model.d_ff=64",
        "--set", "model.max_seq_len=32", "--set", "data.seq_len=32", "--set", "train.batch_size=4",
        "--set", "log.wandb=off", "--set", "log.progress_bar=false", "--set", "train.sample_tokens=4",
        "--set", "train.eval_batches=2", "--set", "data.val_fraction=0.1"]


def test_tokenizer_train_prepare_train_resume_eval_from_the_cli(capsys, corpus, tmp_path):
    from lmjax import load
    from lmjax.cli import main

    tokenizer = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--sentinels", "4",
                 "--out", str(tokenizer)]) == 0
    assert "--set model.vocab_size=384" in capsys.readouterr().out
    data = tmp_path / "data"
    assert main(["data", "prepare", "--data", str(corpus), "--tokenizer", str(tokenizer), "--out", str(data)]) == 0
    out = capsys.readouterr().out
    assert "skipped 15 empty documents" in out and f"data.path={data}" in out
    assert main(["data", "verify", str(data), "--tokenizer", str(tokenizer)]) == 0
    assert "checksums match" in capsys.readouterr().out

    run, data_args = tmp_path / "run", ["--set", f"data.path={data}", "--set", f"data.tokenizer={tokenizer}"]
    assert main(["train", *TINY, *data_args, "--set", "model.vocab_size=256"]) == 2
    assert "set model.vocab_size=384" in capsys.readouterr().err
    assert main(["train", *TINY, "--set", f"data.path={data}", "--set", f"train.run_dir={run}"]) == 2
    assert "prepared with another tokenizer" in capsys.readouterr().err
    assert main(["train", *TINY, *data_args, "--set", "train.steps=4", "--set", "train.halt_at_step=2",
                 "--set", f"train.run_dir={run}"]) == 0
    assert (run / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    run_tokenizer_sha = load_tokenizer(str(tokenizer)).sha256
    tokenizer.unlink()  # the run keeps its own copy: resuming, evaluating and loading need nothing else
    assert main(["train", "--resume", str(run), "--set", "train.halt_at_step=none"]) == 0
    assert "run finished" in capsys.readouterr().out
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    _, _, restored = load(run)
    assert restored.sha256 == run_tokenizer_sha and restored.decode(restored.encode(MULTILINGUAL[0])) == MULTILINGUAL[0]


def test_worker_processes_deliver_the_same_batches(prepared):
    dataset = open_prepared(prepared, load_tokenizer("bytes"), 32)
    threads = BatchIterator(dataset, 8, seed=1, rows=slice(4, 8))
    expected = [next(threads)["inputs"] for _ in range(6)]
    workers = BatchIterator(dataset, 8, seed=1, rows=slice(4, 8), workers=2)
    for batch in expected:
        np.testing.assert_array_equal(next(workers)["inputs"], batch)
    workers.restore({"step": 2, "seed": 1, "weights": [1.0]})
    np.testing.assert_array_equal(next(workers)["inputs"], expected[2])


@pytest.mark.slow  # test_killed_prepare_resumes_to_byte_identical_shards covers the same with a stop hook
def test_sigkilled_prepare_resumes_to_byte_identical_shards(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(load_documents("stdlib", max_bytes=4 << 20)):
        (corpus / f"{i:05d}.txt").write_text(doc)
    tokenizer = train_tokenizer(load_documents("stdlib", max_bytes=500_000), tmp_path / "tok.json", 2000, "bpe")
    command = [sys.executable, "-m", "lmjax.cli", "data", "prepare", "--data", str(corpus), "--tokenizer",
               str(tokenizer), "--workers", "1", "--shard-mb", "1"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / "shard-00000.json").exists() and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its worker process, mid-way through shard 1
    process.wait()
    assert not (killed / "manifest.json").exists()
    subprocess.run([*command, "--out", str(killed)], check=True, capture_output=True)
    subprocess.run([*command, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    assert shard_files(killed) == shard_files(tmp_path / "whole")
    assert len(json.loads((killed / "manifest.json").read_text())["shards"]) >= 3
