"""Subword tokenizers from local files, and training them on the user's own text.

Two libraries, one interface (see `lmjax.data.tokenizer`):
- Hugging Face `tokenizers` (.json): byte-level BPE or Unigram. Pre-tokenizing to the
  256 byte symbols makes every string encodable and decode(encode(text)) == text.
- SentencePiece (.model): BPE or Unigram over raw text with byte fallback and the
  identity normalization, so again nothing is lost.

Special tokens are reserved at training time, at the lowest ids: <pad>, <s>, </s>,
<mask>, <unk>, then the sentinels <extra_id_0> ... <extra_id_{n-1}> (T5's names), so
masked-LM and span corruption work with any trained tokenizer.

A `tokenizers` file from elsewhere (a Hugging Face model's tokenizer.json: LLaMA's BPE with
byte fallback, T5's Unigram, BERT's WordPiece) is used as is. Its special tokens' roles come
from the `tokenizer_config.json` beside it (`bos_token`, `eos_token`, ...), as in transformers.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmjax.data.sources import DataError
from lmjax.data.tokenizer import token_dtype
from lmjax.files import file_sha256

PAD, BOS, EOS, MASK, UNK = "<pad>", "<s>", "</s>", "<mask>", "<unk>"
KINDS = ("bpe", "unigram", "sentencepiece-bpe", "sentencepiece-unigram")


def sentinel_token(i: int) -> str:
    return f"<extra_id_{i}>"


class _Subword:
    """Shared behaviour; subclasses set `_id(token)`, `vocab_size`, `_encode`, `_decode`."""

    prepends_bos = False  # whether `encode_prompt` starts with bos

    def _init_specials(self, path: Path, roles: dict[str, str] | None = None) -> None:
        """Ids of pad, bos, eos and mask: lmjax's reserved tokens, or, given `roles` (a
        tokenizer_config.json's {"bos_token": "<s>", ...}), the tokens it names (None if absent)."""
        self.path, self.sha256 = Path(path), file_sha256(path)
        if roles is None:
            missing = [t for t in (PAD, BOS, EOS, MASK) if self._id(t) is None]
            if missing:
                raise DataError(f"tokenizer {path} lacks the special token(s) {', '.join(missing)}; train it with "
                                "`lmjax tokenizer train`, which reserves them.")
            self.pad_id, self.bos_id, self.eos_id, self.mask_id = (self._id(t) for t in (PAD, BOS, EOS, MASK))
        else:
            role = {name: None if roles.get(name) is None else self._id(roles[name]) for name in roles}
            self.pad_id, self.mask_id = role.get("pad_token"), role.get("mask_token")
            # BERT: [CLS] opens and [SEP] ends a sequence; T5 has no bos and starts decoding from pad
            self.bos_id = next((role[r] for r in ("bos_token", "cls_token", "pad_token") if role.get(r) is not None),
                               None)
            self.eos_id = role.get("eos_token") if role.get("eos_token") is not None else role.get("sep_token")
            if self.eos_id is None:
                raise DataError(f"tokenizer {path}: its tokenizer_config.json names no eos_token or sep_token, "
                                "which lmjax ends documents with.")
        self._sentinels = []
        while self._id(sentinel_token(len(self._sentinels))) is not None:
            self._sentinels.append(self._id(sentinel_token(len(self._sentinels))))
        self.num_sentinels = len(self._sentinels)
        self._dtype = token_dtype(self.vocab_size)

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} is outside [0, {self.num_sentinels}).")
        return self._sentinels[i]

    def encode(self, text: str) -> np.ndarray:
        """text -> (n,) uint16 (uint32 past 65,536 ids) ids, no bos/eos added."""
        return np.asarray(self._encode(text), self._dtype)

    def encode_prompt(self, text: str) -> np.ndarray:
        """`encode`, with bos first when the tokenizer's file says so (LLaMA's does)."""
        ids = self.encode(text)
        return np.concatenate([np.array([self.bos_id], ids.dtype), ids]) if self.prepends_bos else ids

    def decode(self, ids) -> str:
        """ids -> text; special, sentinel and out-of-vocabulary ids are dropped."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        return self._decode([int(i) for i in ids if not self._is_special[i]])

    def encode_with_sentinels(self, text: str) -> np.ndarray:
        """`encode`: the tokenizer holds `<extra_id_N>` as a token of its own."""
        return self.encode(text)

    def decode_with_sentinels(self, ids) -> str:
        """Like `decode`, with sentinel N written as `<extra_id_N>`."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        keep = ~self._is_special[ids.clip(0, self.vocab_size - 1)] | np.isin(ids, self._sentinels)
        return self._decode([int(i) for i in ids[keep & (ids >= 0) & (ids < self.vocab_size)]])

    def ordinary_ids(self) -> np.ndarray:
        return np.flatnonzero(~self._is_special).astype(np.int32)

    def token_byte_lengths(self) -> np.ndarray:
        return self._byte_lengths


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
ROLES = ("bos_token", "eos_token", "pad_token", "mask_token", "cls_token", "sep_token", "unk_token")


def token_roles(config_file: Path) -> dict[str, str] | None:
    """{role: token} of a transformers tokenizer_config.json (None if there is no such file)."""
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    roles = {}
    for role in ROLES:
        token = config.get(role)
        roles[role] = token.get("content") if isinstance(token, dict) else token
    return roles


class HFTokenizer(_Subword):
    """A Hugging Face `tokenizers` file (.json): trained by `train_tokenizer`, or a model's own
    (roles of its special tokens from the tokenizer_config.json beside it)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (the library raises a bare Exception on malformed files)
            raise DataError(f"tokenizer {path} is not a readable `tokenizers` file ({e}).") from None
        self.name, self.vocab_size = Path(path).name, self._tokenizer.get_vocab_size()
        self._init_specials(path, token_roles(Path(path).with_name("tokenizer_config.json")))
        with_specials = self._tokenizer.encode("a", add_special_tokens=True).ids
        self.prepends_bos = self.bos_id is not None and with_specials[:1] == [self.bos_id]
        special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special}
        byte_level = "ByteLevel" in self._tokenizer.to_str()
        self._is_special = np.zeros(self.vocab_size, bool)
        self._byte_lengths = np.zeros(self.vocab_size, np.int32)
        for token, i in self._tokenizer.get_vocab().items():
            self._is_special[i] = token in special
            self._byte_lengths[i] = 0 if token in special else _byte_length(token, byte_level)

    def _id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


def _byte_length(token: str, byte_level: bool) -> int:
    """UTF-8 bytes of text a vocabulary entry stands for: byte-level symbols are one byte
    each; a byte-fallback token <0xHH> is one byte; otherwise the text itself, with
    SentencePiece's ▁ a space and WordPiece's ## continuation prefix dropped."""
    if byte_level:
        return len(token)
    if _BYTE_FALLBACK.fullmatch(token):
        return 1
    return len(token.removeprefix("##").replace("\u2581", " ").encode())


class SentencePieceTokenizer(_Subword):
    """A SentencePiece model file (.model) trained by `train_tokenizer`."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self._model = spm.SentencePieceProcessor()
        try:
            self._model.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer {path} is not a readable SentencePiece model ({e}).") from None
        self.name, self.vocab_size = Path(path).name, self._model.GetPieceSize()
        self._init_specials(path)
        m = self._model
        reserved = {PAD, BOS, EOS, MASK, UNK} | {sentinel_token(i) for i in range(self.num_sentinels)}
        self._is_special = np.array([m.IsControl(i) or m.IsUnknown(i) or m.IdToPiece(i) in reserved
                                     for i in range(self.vocab_size)])
        self._byte_lengths = np.array(
            [0 if self._is_special[i] else 1 if m.IsByte(i) else len(m.IdToPiece(i).replace("\u2581", " ").encode())
             for i in range(self.vocab_size)], np.int32)

    def _id(self, token: str) -> int | None:
        i = self._model.PieceToId(token)
        return None if i == self._model.unk_id() and token != UNK else i

    def _encode(self, text: str) -> list[int]:
        return self._model.EncodeAsIds(text)

    def _decode(self, ids: list[int]) -> str:
        return self._model.DecodeIds(ids)


def _lines(documents: Iterable[str], max_chars: int = 4000) -> Iterator[str]:
    """SentencePiece trains on lines of bounded length; newlines are covered by byte fallback."""
    for doc in documents:
        for line in doc.split("\n"):
            for start in range(0, len(line), max_chars):
                yield line[start:start + max_chars]


def train_tokenizer(documents: Iterable[str], out: Path, vocab_size: int, kind: str = "bpe",
                    num_sentinels: int = 100) -> Path:
    """Train a `kind` tokenizer (one of KINDS) of `vocab_size` ids on `documents`, write it
    to `out` (.json for bpe/unigram, .model for sentencepiece-*), and return `out`."""
    out = Path(out)
    if kind not in KINDS:
        raise DataError(f"tokenizer kind {kind!r} is unknown; use one of {', '.join(KINDS)}.")
    suffix = ".model" if kind.startswith("sentencepiece") else ".json"
    if out.suffix != suffix:
        raise DataError(f"--out {out} must end in {suffix} for a {kind} tokenizer.")
    specials = [PAD, BOS, EOS, MASK, UNK] + [sentinel_token(i) for i in range(num_sentinels)]
    floor = len(specials) + (256 if kind in ("bpe", "unigram") else 259)
    if vocab_size <= floor:
        raise DataError(f"--vocab-size {vocab_size} leaves no room for merges: {len(specials)} special tokens and "
                        f"256 byte symbols need more than {floor}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        _train_hf(documents, out, vocab_size, kind, specials)
    else:
        _train_sentencepiece(documents, out, vocab_size, kind.split("-")[1], specials)
    return out


def _train_hf(documents, out: Path, vocab_size: int, kind: str, specials: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                      show_progress=False)
    else:
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=UNK,
                                          initial_alphabet=alphabet, show_progress=False)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(documents, trainer)
    tokenizer.save(str(out))


def _train_sentencepiece(documents, out: Path, vocab_size: int, model_type: str, specials: list[str]) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_lines(documents), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK,
            user_defined_symbols=[MASK] + specials[5:], byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            character_coverage=0.9995, hard_vocab_limit=False, max_sentence_length=16384, minloglevel=2)
    except RuntimeError as e:  # e.g. more distinct characters than --vocab-size leaves room for
        raise DataError(f"SentencePiece could not train a {vocab_size}-id model ({str(e).strip()}); "
                        "raise --vocab-size.") from None
    out.write_bytes(model.getvalue())
