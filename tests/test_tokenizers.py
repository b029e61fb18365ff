import numpy as np
import pytest

from lmjax.data import (
    ByteTokenizer,
    DataError,
    load_documents,
    load_from_run,
    load_tokenizer,
    padded_vocab_size,
    save_to_run,
)
from lmjax.data.denoising import MaskedLMDataset
from lmjax.data.subword import BOS, EOS, KINDS, MASK, PAD, UNK, sentinel_token, train_tokenizer

SAMPLE = "naïve café — 日本語のテキスト, ελληνικά, Grüße, emoji 🙂🎉 and\ttabs\n  two  spaces\r\nend"
CORPUS = [SAMPLE, "def f(x):\n    return x + 1\n" * 8, "Привет, мир! 你好，世界。 ¿Qué tal?" * 4,
          "The quick brown fox jumps over the lazy dog. " * 10]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny tokenizer of each kind (vocab <= 400, 8 sentinels), trained on CORPUS."""
    root = tmp_path_factory.mktemp("tokenizers")
    corpus = CORPUS + load_documents("stdlib", max_bytes=200_000)  # Unigram needs some variety to learn pieces
    return {kind: train_tokenizer(corpus, root / f"{kind}{'.model' if 'sentencepiece' in kind else '.json'}", 400,
                                  kind, num_sentinels=8) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_special_ids(trained, kind):
    tok = load_tokenizer(str(trained[kind]))
    unseen = "Ünïcödé ☃ 𝔘 \x00 ok"  # characters the training text never had: byte-level / byte fallback
    for text in (SAMPLE, unseen, ""):
        ids = tok.encode(text)
        assert ids.dtype == np.uint16 and tok.decode(ids) == text
        # token_byte_lengths (bits per byte) adds up to the UTF-8 length
        assert tok.token_byte_lengths()[ids.astype(int)].sum() == len(text.encode("utf-8"))
    assert len(tok.encode(CORPUS[1])) < 0.9 * len(CORPUS[1])  # pieces learned: fewer tokens than characters
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id] + [tok.sentinel_id(i) for i in range(8)]
    assert tok.num_sentinels == 8 and len(set(specials)) == 12 and max(specials) < tok.vocab_size
    assert all(tok.token_byte_lengths()[i] == 0 for i in specials)
    ids = tok.encode(SAMPLE)
    assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.sentinel_id(3), tok.eos_id, tok.pad_id]])) == SAMPLE
    assert tok.vocab_size <= 400 and padded_vocab_size(tok.vocab_size) == 512
    spans = "a cat<extra_id_0> on the mat<extra_id_7>."
    assert tok.encode_with_sentinels(spans).tolist().count(tok.sentinel_id(7)) == 1
    assert tok.decode_with_sentinels(np.append(tok.encode_with_sentinels(spans), tok.eos_id)) == spans
    with pytest.raises(ValueError):
        tok.sentinel_id(8)


def test_bytes_tokenizer_has_the_same_interface():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.path is None and tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_saved_with_the_run(trained, tmp_path):
    tok = load_tokenizer(str(trained["bpe"]))
    save_to_run(tok, tmp_path)
    restored = load_from_run(tmp_path, str(trained["bpe"]))
    assert (tmp_path / "tokenizer.json").is_file() and restored.sha256 == tok.sha256
    assert restored.encode(SAMPLE).tolist() == tok.encode(SAMPLE).tolist()
    assert isinstance(load_from_run(tmp_path / "other", "bytes"), ByteTokenizer)
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        load_from_run(tmp_path / "other", "some.json")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="neither 'bytes' nor an existing tokenizer file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match="unknown suffix '.txt'"):
        load_tokenizer(str(tmp_path / "x.txt"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable `tokenizers` file"):
        load_tokenizer(str(tmp_path / "bad.json"))
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="not a readable SentencePiece model"):
        load_tokenizer(str(tmp_path / "bad.model"))
    with pytest.raises(DataError, match="leaves no room"):
        train_tokenizer(CORPUS, tmp_path / "t.json", 300, "bpe", num_sentinels=100)
    with pytest.raises(DataError, match="must end in .model"):
        train_tokenizer(CORPUS, tmp_path / "t.json", 400, "sentencepiece-bpe")
    with pytest.raises(DataError, match="kind 'wordpiece' is unknown"):
        train_tokenizer(CORPUS, tmp_path / "t.json", 400, "wordpiece")


def _special_ids_by_name(tok, path) -> set[int]:
    """pad/bos/eos/mask/unk and the sentinels, looked up by name in the library's own file."""
    names = [PAD, BOS, EOS, MASK, UNK] + [sentinel_token(i) for i in range(8)]
    if path.suffix == ".json":
        from tokenizers import Tokenizer

        library = Tokenizer.from_file(str(path))
        return {library.token_to_id(n) for n in names}
    import sentencepiece as spm

    library = spm.SentencePieceProcessor(model_file=str(path))
    return {library.piece_to_id(n) for n in names}


@pytest.mark.parametrize("kind", ["bytes", *KINDS])
def test_bert_replacements_are_uniform_over_the_ordinary_ids(trained, kind):
    """Masking a long run of mask tokens at rate 1: every position that is not the mask token
    afterwards holds a random replacement. ~10^5 of them must cover exactly the ids that are
    not special (by name in the tokenizer file; for bytes the 256 bytes) and pass a chi-square
    test for uniformity."""
    from scipy.stats import chisquare

    tok = load_tokenizer("bytes" if kind == "bytes" else str(trained[kind]))
    expected = set(range(256)) if kind == "bytes" else set(range(tok.vocab_size)) - _special_ids_by_name(
        tok, trained[kind])
    n = 1_000_000
    window = {"inputs": np.full(n, tok.mask_id, np.int32), "segment_ids": np.ones(n, np.int32),
              "positions": np.arange(n, dtype=np.int32)}
    inputs = MaskedLMDataset([window], tok, 1.0, seed=0)[0]["inputs"]
    drawn = inputs[inputs != tok.mask_id]
    assert 0.09 * n < len(drawn) < 0.11 * n
    assert set(np.unique(drawn).tolist()) == expected
    counts = np.bincount(drawn, minlength=tok.vocab_size)[sorted(expected)]
    assert chisquare(counts).pvalue > 0.001
