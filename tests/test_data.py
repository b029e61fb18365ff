import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmjax.data import (
    BatchIterator,
    ByteTokenizer,
    DataError,
    PackedDataset,
    eval_batches,
    load_documents,
    split_documents,
    tokenize,
)
from lmjax.data.sources import stdlib_files

TOK = ByteTokenizer()


def test_byte_tokenizer_round_trip_multilingual():
    text = "naïve café — 日本語のテキスト, ελληνικά, emoji 🙂 and\ttabs\n"
    ids = TOK.encode(text)
    assert ids.dtype == np.uint16 and ids.tolist() == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    sentinels = {TOK.sentinel_id(i) for i in range(TOK.num_sentinels)}
    specials = {TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.mask_id} | sentinels
    assert len(specials) == 4 + TOK.num_sentinels and min(specials) >= 256 and max(specials) == TOK.vocab_size - 1
    assert TOK.vocab_size % 128 == 0
    assert TOK.decode(np.concatenate([[TOK.bos_id], ids, [TOK.eos_id, TOK.sentinel_id(0)]])) == text
    assert TOK.decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte character is replaced, not an exception
    for bad in (-1, TOK.num_sentinels):
        with pytest.raises(ValueError):
            TOK.sentinel_id(bad)


def test_stdlib_source_is_deterministic_bounded_and_shuffled():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    expected = {p for p in root.rglob("*.py") if not {"site-packages", "__pycache__"} & set(p.relative_to(root).parts)}
    assert set(files) == expected and len(files) == len(expected)
    assert files != sorted(files)  # a prefix samples the whole library, not the modules starting with "a"

    docs = load_documents("stdlib", max_bytes=2_000_000)
    assert docs == load_documents("stdlib", max_bytes=2_000_000)
    sizes = [len(d.encode()) for d in docs]
    assert sum(sizes[:-1]) < 2_000_000 <= sum(sizes)  # stops at the first document that reaches the limit
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in files[:2 * len(docs)])
    nonempty = [text for text in texts if text]
    assert docs == nonempty[: len(docs)]
    train, val = split_documents(docs, TOK, 0.05, seed=0)
    assert len(train.tokens) + len(val.tokens) == sum(sizes) + len(docs)  # one byte per token, one eos per document


def test_file_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": ""}) + "\n"
                                      + json.dumps({"text": "gamma", "id": 3}) + "\n")
    pq.write_table(pa.table({"body": ["delta", "", None, "epsilon"]}), tmp_path / "c.parquet")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.md").write_text("# zeta ü")
    (tmp_path / "sub" / "ignored.csv").write_text("a,b")
    assert load_documents(str(tmp_path / "a.txt")) == ["alpha"]
    assert load_documents(str(tmp_path / "b.jsonl")) == ["beta", "gamma"]
    assert load_documents(str(tmp_path / "c.parquet"), text_field="body") == ["delta", "epsilon"]
    (tmp_path / "c.parquet").unlink()
    assert load_documents(str(tmp_path)) == ["alpha", "beta", "gamma", "# zeta ü"]
    assert load_documents(str(tmp_path), max_bytes=9) == ["alpha", "beta"]  # 5 + 4 bytes reach the limit


@pytest.mark.parametrize("setup, source, field, message", [
    (lambda p: None, "missing.txt", "text", "data.source .* does not exist"),
    (lambda p: (p / "empty.txt").write_text(""), "empty.txt", "text", "data.source .* contains no text"),
    (lambda p: (p / "x.jsonl").write_text('{"body": "x"}\n'), "x.jsonl", "text", "no field 'text'.*data.text_field"),
    (lambda p: (p / "x.jsonl").write_text('{"text": "x"\n'), "x.jsonl", "text", "x.jsonl:1 is not valid JSON"),
    (lambda p: (p / "x.jsonl").write_text('{"text": 7}\n'), "x.jsonl", "text", "data.text_field 'text' holds int"),
    (lambda p: pq.write_table(pa.table({"body": ["x"]}), p / "x.parquet"), "x.parquet", "text",
     "no column 'text' \\(columns: body\\).*data.text_field"),
    (lambda p: (p / "x.csv").write_text("a,b"), "x.csv", "text", "unknown suffix '.csv'"),
    (lambda p: (p / "d").mkdir() or (p / "d" / "x.csv").write_text("a,b"), "d", "text", "directory .* holds no"),
])
def test_source_errors(tmp_path, setup, source, field, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_documents(str(tmp_path / source), text_field=field)


def documents_of(stream):
    ends = list(stream.doc_starts[1:]) + [len(stream.tokens)]
    assert all(stream.tokens[end - 1] == TOK.eos_id for end in ends)
    return [TOK.decode(stream.tokens[start:end]) for start, end in zip(stream.doc_starts, ends)]


def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"document number {i} ü" for i in range(200)]
    train, val = split_documents(docs, TOK, 0.1, seed=3)
    again_train, again_val = split_documents(docs, TOK, 0.1, seed=3)
    np.testing.assert_array_equal(train.tokens, again_train.tokens)
    np.testing.assert_array_equal(val.doc_starts, again_val.doc_starts)
    train_docs, val_docs = documents_of(train), documents_of(val)
    assert sorted(train_docs + val_docs) == sorted(docs) and not set(train_docs) & set(val_docs)
    assert train_docs == [d for d in docs if d in set(train_docs)]  # document order is kept
    assert 5 <= len(val_docs) <= 40
    assert documents_of(split_documents(docs, TOK, 0.1, seed=4)[1]) != val_docs
    # a document's side depends on (seed, its index) only, not on how many documents follow
    assert documents_of(split_documents(docs[:100], TOK, 0.1, seed=3)[1]) == [d for d in val_docs if d in docs[:100]]
    # tiny fractions still hold one document out; 0 holds none out
    train, val = split_documents(docs[:2], TOK, 1e-9, seed=0)
    assert len(train.doc_starts) == len(val.doc_starts) == 1
    train, val = split_documents(docs[:1], TOK, 0.0, seed=0)
    assert documents_of(train) == docs[:1] and len(val.tokens) == 0
    with pytest.raises(DataError, match="data.val_fraction"):
        split_documents(["only one"], TOK, 0.1, seed=0)
    with pytest.raises(DataError, match="data.val_fraction"):
        split_documents(docs, TOK, 1.0, seed=0)


def naive_window(stream, seq_len, i):
    """Per-token loop: which document each token belongs to, and its offset."""
    doc_of, offset_in_doc = [], []
    for d, start in enumerate(stream.doc_starts):
        end = stream.doc_starts[d + 1] if d + 1 < len(stream.doc_starts) else len(stream.tokens)
        doc_of += [d] * (end - start)
        offset_in_doc += list(range(end - start))
    lo = i * seq_len
    segment, position, seen = [], [], {}
    for j in range(lo, lo + seq_len + 1):
        seen.setdefault(doc_of[j], len(seen) + 1)
        segment.append(seen[doc_of[j]])
        position.append(min(offset_in_doc[j], j - lo))
    mask = [1.0 if segment[j + 1] == segment[j] else 0.0 for j in range(seq_len)]
    return segment[:-1], position[:-1], mask


def test_packed_windows_match_naive_loop():
    docs = ["ab", "cdefghij", "k", "lmnopqrstuvwxyz", "0123", "ü"]  # a document starts exactly at window 6
    stream = tokenize(docs, TOK)
    dataset = PackedDataset(stream, seq_len=5)
    assert len(dataset) == (len(stream.tokens) - 1) // 5
    inputs = np.concatenate([dataset[i]["inputs"] for i in range(len(dataset))])
    np.testing.assert_array_equal(inputs, stream.tokens[: len(inputs)])
    for i in range(len(dataset)):
        example = dataset[i]
        assert {k: (v.shape, v.dtype.name) for k, v in example.items()} == {
            "inputs": ((5,), "int32"), "targets": ((5,), "int32"), "segment_ids": ((5,), "int32"),
            "positions": ((5,), "int32"), "loss_mask": ((5,), "float32")}
        np.testing.assert_array_equal(example["targets"], stream.tokens[i * 5 + 1: i * 5 + 6])
        segment, position, mask = naive_window(stream, 5, i)
        np.testing.assert_array_equal(example["segment_ids"], segment)
        np.testing.assert_array_equal(example["positions"], position)
        np.testing.assert_array_equal(example["loss_mask"], mask)
    with pytest.raises(DataError, match=f"data.seq_len=100 .* but the split has {len(stream.tokens)}"):
        PackedDataset(stream, seq_len=100)


def make_dataset(n_tokens=1000, seq_len=8):
    return PackedDataset(tokenize(["x" * (n_tokens - 1)], TOK), seq_len)


def test_batch_order_epochs_resume_and_process_slices():
    dataset = make_dataset()  # 124 examples: batches of 8 straddle epochs
    n = len(dataset)
    first = BatchIterator(dataset, 8, seed=5)
    batches = [next(first) for _ in range(40)]
    assert first.step == 40 and json.loads(json.dumps(first.state())) == {"step": 40, "seed": 5, "weights": [1.0]}
    # the order is the concatenation of per-epoch permutations, each visiting every example once
    indices = np.array([i for s in range(40) for _, i in first.indices(s)])
    assert sorted(indices[:n]) == list(range(n)) and sorted(indices[n: 2 * n]) == list(range(n))
    assert not np.array_equal(indices[:n], indices[n: 2 * n]) and not np.array_equal(indices[:n], np.arange(n))
    np.testing.assert_array_equal(batches[20]["inputs"], np.stack([dataset[i]["inputs"] for i in indices[160:168]]))
    # same seed -> same order, even jumping straight to a later step; another seed -> another order
    np.testing.assert_array_equal(BatchIterator(dataset, 8, seed=5).indices(31), first.indices(31))
    assert not np.array_equal(BatchIterator(dataset, 8, seed=6).indices(3), first.indices(3))
    # resuming from a saved state continues with the very next batch
    interrupted = BatchIterator(dataset, 8, seed=5)
    for _ in range(17):
        next(interrupted)
    resumed = BatchIterator(dataset, 8, seed=5)
    resumed.restore(json.loads(json.dumps(interrupted.state())))
    for key in batches[17]:
        np.testing.assert_array_equal(next(resumed)[key], batches[17][key])
    with pytest.raises(DataError, match="data.seed=5"):
        BatchIterator(dataset, 8, seed=6).restore(interrupted.state())
    # two processes' slices, concatenated in process order, are the global batch
    halves = [next(BatchIterator(dataset, 8, 5, rows=slice(4 * p, 4 * p + 4), step=9)) for p in range(2)]
    for key in batches[9]:
        assert halves[0][key].shape[0] == 4
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batches[9][key])


def test_batch_larger_than_dataset_repeats_epochs():
    dataset = make_dataset(n_tokens=25, seq_len=8)  # 3 examples
    rows = [i for _, i in BatchIterator(dataset, 8, seed=0).indices(0)]
    assert sorted(rows[:3]) == sorted(rows[3:6]) == [0, 1, 2] and set(rows[6:]) <= {0, 1, 2}
    assert [e["inputs"].tolist() for e in map(dataset.__getitem__, rows)] == \
        next(BatchIterator(dataset, 8, seed=0))["inputs"].tolist()


def test_eval_batches_are_sequential_full_batches():
    dataset = make_dataset()
    batches = list(eval_batches(dataset, 10, max_batches=None))
    assert len(batches) == len(dataset) // 10 and all(b["inputs"].shape == (10, 8) for b in batches)
    np.testing.assert_array_equal(batches[1]["inputs"][3], dataset[13]["inputs"])
    assert len(list(eval_batches(dataset, 10, max_batches=3))) == 3
    small = make_dataset(n_tokens=25, seq_len=8)
    assert [b["inputs"].shape for b in eval_batches(small, 10, max_batches=None)] == [(3, 8)]


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets  # in the [test] extra; optional for users
    datasets.Dataset.from_dict({"content": ["first doc", "", "second doc"]}).save_to_disk(str(tmp_path / "hf"))
    assert load_documents(str(tmp_path / "hf"), text_field="content") == ["first doc", "second doc"]
    with pytest.raises(DataError, match="no column 'text'"):
        load_documents(str(tmp_path / "hf"))
