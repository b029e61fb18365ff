"""A run's tokenizer as the files transformers reads: tokenizer.json and tokenizer_config.json.

A SentencePiece .model (trained by `lmjax tokenizer train --kind sentencepiece-*`) becomes a
tokenizer.json by transformers' own converter, which follows the model's settings (byte
fallback, identity normalization, no dummy prefix, user-defined pieces kept whole); the .model
is copied beside it as tokenizer.model.

lmjax's byte tokenizer becomes a `tokenizers` byte-level BPE with no merges: the 256 byte
symbols at ids 0..255 (GPT-2's byte-to-character table), then <pad>, <s>, </s>, <mask> at
256..259 and the sentinels <extra_id_123> ... <extra_id_0> at 260..383, so that
`transformers.AutoTokenizer` encodes every text to the ids lmjax does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmjax.config import ConfigError
from lmjax.data.subword import BOS, EOS, MASK, PAD, UNK, sentinel_token
from lmjax.data.tokenizer import ByteTokenizer


def _byte_symbols() -> list[str]:
    """The character GPT-2's byte-level alphabet uses for each byte 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer_json() -> str:
    """tokenizer.json text of lmjax's byte tokenizer (same ids for every text)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(_byte_symbols())}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    byte = ByteTokenizer()
    sentinels = [sentinel_token(byte.vocab_size - 1 - token_id) for token_id in range(260, byte.vocab_size)]
    specials = [PAD, BOS, EOS, MASK] + sentinels  # ids 256, 257, ... in this order
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer.to_str()


def sentencepiece_tokenizer_json(model_file: Path) -> str:
    """tokenizer.json text of a SentencePiece model: the same ids as `SentencePieceProcessor.encode`,
    with control pieces (pad, bos, eos) and user-defined ones (mask, sentinels) as special tokens."""
    from tokenizers import AddedToken

    try:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    except ImportError:
        raise ConfigError(f"exporting the SentencePiece tokenizer {model_file} needs transformers' converter; "
                          "pip install transformers.") from None

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    pieces = proto.pieces
    bpe = proto.trainer_spec.model_type == proto.trainer_spec.BPE
    vocab = {p.piece: i for i, p in enumerate(pieces)} if bpe else [(p.piece, p.score) for p in pieces]
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    specials = [p.piece for p in pieces if p.type in (p.CONTROL, p.USER_DEFINED)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer.to_str()


def _config(roles: dict[str, str | None], max_length: int) -> str:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length}
    return json.dumps(config | {k: v for k, v in roles.items() if v is not None}, indent=2)


def write_tokenizer(run_dir: Path, tokenizer, hf_dir: Path, max_length: int) -> None:
    """Write `tokenizer` (a run's) into `hf_dir`, created here, as tokenizer.json +
    tokenizer_config.json (and tokenizer.model for SentencePiece)."""
    sentencepiece = tokenizer.path is not None and Path(tokenizer.path).suffix == ".model"
    converted = sentencepiece_tokenizer_json(tokenizer.path) if sentencepiece else None  # may refuse: nothing written
    hf_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer.path is None:
        (hf_dir / "tokenizer.json").write_text(byte_tokenizer_json())
        (hf_dir / "tokenizer_config.json").write_text(_config(
            {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "mask_token": MASK}, max_length))
        return
    if sentencepiece:  # roles: lmjax's reserved names, as SentencePiece is trained
        shutil.copyfile(tokenizer.path, hf_dir / "tokenizer.model")
        (hf_dir / "tokenizer.json").write_text(converted)
        (hf_dir / "tokenizer_config.json").write_text(_config(
            {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "mask_token": MASK, "unk_token": UNK},
            max_length))
        return
    shutil.copyfile(tokenizer.path, hf_dir / "tokenizer.json")
    if (Path(run_dir) / "tokenizer_config.json").is_file():
        shutil.copyfile(Path(run_dir) / "tokenizer_config.json", hf_dir / "tokenizer_config.json")
    else:  # trained by `lmjax tokenizer train`, with lmjax's reserved names
        (hf_dir / "tokenizer_config.json").write_text(_config(
            {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "mask_token": MASK, "unk_token": "<unk>"},
            max_length))
