import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmjax.data import (BatchIterator, ByteTokenizer, DataError, PackedDataset, eval_batches, load_documents,
                        split_documents, tokenize)

TOK = ByteTokenizer()


def test_byte_tokenizer_round_trip_multilingual():
    text = "naïve café — 日本語のテキスト, ελληνικά, emoji 🙂 and\ttabs\n"
    ids = TOK.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and ids.max() < 256
    assert TOK.decode(ids) == text
    specials = {TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.mask_id} | {TOK.sentinel_id(i) for i in range(TOK.num_sentinels)}
    assert len(specials) == 4 + TOK.num_sentinels and min(specials) >= 256 and max(specials) == TOK.vocab_size - 1
    assert TOK.decode(np.append(ids, [TOK.eos_id, TOK.sentinel_id(0)])) == text
    with pytest.raises(ValueError):
        TOK.sentinel_id(TOK.num_sentinels)


def test_stdlib_source_is_deterministic_and_bounded():
    docs = load_documents("stdlib", max_bytes=200_000)
    assert docs == load_documents("stdlib", max_bytes=200_000)
    sizes = [len(d.encode()) for d in docs]
    assert sum(sizes[:-1]) < 200_000 <= sum(sizes)  # stops at the first document that reaches the limit


def test_file_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    pq.write_table(pa.table({"body": ["delta", "", "epsilon"]}), tmp_path / "c.parquet")
    assert load_documents(str(tmp_path / "a.txt")) == ["alpha"]
    assert load_documents(str(tmp_path / "b.jsonl")) == ["beta", "gamma"]
    assert load_documents(str(tmp_path / "c.parquet"), text_field="body") == ["delta", "epsilon"]
    (tmp_path / "c.parquet").unlink()
    assert load_documents(str(tmp_path)) == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize("setup, source, field, message", [
    (lambda p: None, "missing.txt", "text", "does not exist"),
    (lambda p: (p / "empty.txt").write_text(""), "empty.txt", "text", "contains no text"),
    (lambda p: (p / "x.jsonl").write_text('{"body": "x"}\n'), "x.jsonl", "text", "no field 'text'"),
    (lambda p: pq.write_table(pa.table({"body": ["x"]}), p / "x.parquet"), "x.parquet", "text", "no column 'text'"),
    (lambda p: (p / "x.csv").write_text("a,b"), "x.csv", "text", "unknown suffix"),
])
def test_source_errors(tmp_path, setup, source, field, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_documents(str(tmp_path / source), text_field=field)


def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"document number {i}" for i in range(200)]
    train, val = split_documents(docs, TOK, 0.1, seed=3)
    again_train, again_val = split_documents(docs, TOK, 0.1, seed=3)
    np.testing.assert_array_equal(train.tokens, again_train.tokens)
    decoded = lambda s: [TOK.decode(s.tokens[a:b]) for a, b in zip(s.doc_starts, list(s.doc_starts[1:]) + [len(s.tokens)])]
    train_docs, val_docs = decoded(train), decoded(val)
    assert sorted(train_docs + val_docs) == sorted(docs) and not set(train_docs) & set(val_docs)
    assert 5 <= len(val_docs) <= 40
    with pytest.raises(DataError):
        split_documents(["only one"], TOK, 0.1, seed=0)


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
    docs = ["ab", "cdefghij", "k", "lmnopqrstuvwxyz", "0123"]
    stream = tokenize(docs, TOK)
    dataset = PackedDataset(stream, seq_len=5)
    inputs = np.concatenate([dataset[i]["inputs"] for i in range(len(dataset))])
    np.testing.assert_array_equal(inputs, stream.tokens[: len(inputs)])
    for i in range(len(dataset)):
        example = dataset[i]
        np.testing.assert_array_equal(example["targets"], stream.tokens[i * 5 + 1: i * 5 + 6])
        segment, position, mask = naive_window(stream, 5, i)
        np.testing.assert_array_equal(example["segment_ids"], segment)
        np.testing.assert_array_equal(example["positions"], position)
        np.testing.assert_array_equal(example["loss_mask"], mask)
    with pytest.raises(DataError, match="data.seq_len=100"):
        PackedDataset(stream, seq_len=100)


def make_dataset(n_tokens=1000, seq_len=8):
    return PackedDataset(tokenize(["x" * (n_tokens - 1)], TOK), seq_len)


def test_batch_order_epochs_resume_and_process_slices():
    dataset = make_dataset()  # 124 examples
    n = len(dataset)
    first = BatchIterator(dataset, 8, seed=5)
    batches = [next(first) for _ in range(40)]
    # an epoch visits every example exactly once
    indices = np.concatenate([first.indices(s) for s in range(40)])
    assert sorted(indices[:n]) == list(range(n)) and sorted(indices[n: 2 * n]) == list(range(n))
    # same seed -> same order; other seed -> another order
    assert np.array_equal(BatchIterator(dataset, 8, seed=5).indices(3), first.indices(3))
    assert not np.array_equal(BatchIterator(dataset, 8, seed=6).indices(3), first.indices(3))
    # resuming from a saved state continues with the very next batch
    resumed = BatchIterator(dataset, 8, seed=5)
    resumed.restore(BatchIterator(dataset, 8, seed=5, step=17).state())
    np.testing.assert_array_equal(next(resumed)["inputs"], batches[17]["inputs"])
    # two processes' slices, concatenated in process order, are the global batch
    halves = [next(BatchIterator(dataset, 8, 5, process_index=p, process_count=2, step=9)) for p in range(2)]
    for key in batches[9]:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batches[9][key])
    with pytest.raises(DataError):
        BatchIterator(dataset, 7, seed=0, process_count=2)


def test_eval_batches_are_sequential_full_batches():
    dataset = make_dataset()
    batches = list(eval_batches(dataset, 10, max_batches=None))
    assert len(batches) == len(dataset) // 10
    np.testing.assert_array_equal(batches[1]["inputs"][0], dataset[10]["inputs"])
    assert len(list(eval_batches(dataset, 10, max_batches=3))) == 3
