"""Where tokenizers come from: a spec ("bytes" or a file), and a run directory's own copy.

Above both kinds (`lmjax.data.tokenizer` for the protocol and bytes, `lmjax.data.subword` for
tokenizer files), so that neither imports the other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmjax.data.sources import DataError
from lmjax.data.subword import HFTokenizer, SentencePieceTokenizer
from lmjax.data.tokenizer import ByteTokenizer, Tokenizer
from lmjax.files import file_sha256, write_atomically

NO_TOKENIZER = "none"  # data.tokenizer of a run without one (imported without tokenizer.json)


def load_tokenizer(spec: str) -> Tokenizer:
    """"bytes", a `tokenizers` .json file or a SentencePiece .model file -> a tokenizer;
    DataError for "none" (a run without a tokenizer cannot read or write text)."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == NO_TOKENIZER:
        raise DataError("data.tokenizer='none': this run has no tokenizer (it was imported without tokenizer.json), "
                        "so it cannot read or write text; copy the model's tokenizer file into the run directory "
                        "and set data.tokenizer to it, or evaluate on prepared token shards (lmjax eval RUN --data "
                        "PREPARED_DIR).")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer {spec!r} is neither 'bytes' nor an existing tokenizer file; "
                        "train one with `lmjax tokenizer train`.")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise DataError(f"data.tokenizer {spec!r} has the unknown suffix {path.suffix!r}; give a Hugging Face "
                    "tokenizers .json file or a SentencePiece .model file.")


def save_to_run(tokenizer: Tokenizer, run_dir: Path) -> None:
    """Copy a subword tokenizer's file into `run_dir` as tokenizer.json / tokenizer.model
    (nothing for bytes), with the tokenizer_config.json beside it if there is one (the roles
    of a Hugging Face tokenizer's special tokens), so the run can be reloaded without them."""
    if tokenizer.path is None:
        return
    roles = Path(tokenizer.path).with_name("tokenizer_config.json")
    copies = [(Path(tokenizer.path), Path(run_dir) / f"tokenizer{Path(tokenizer.path).suffix}")]
    if roles.is_file():
        copies.append((roles, Path(run_dir) / roles.name))
    for source, target in copies:
        if not target.exists() or file_sha256(target) != file_sha256(source):
            with source.open("rb") as f:
                write_atomically(target, lambda out, f=f: shutil.copyfileobj(f, out))


def load_from_run(run_dir: Path, spec: str) -> Tokenizer:
    """The tokenizer a run trained with: its saved copy, or bytes when `spec` is "bytes"
    (DataError when it is "none": the run has no tokenizer)."""
    if spec in ("bytes", NO_TOKENIZER):
        return load_tokenizer(spec)
    for suffix in (".json", ".model"):
        if (Path(run_dir) / f"tokenizer{suffix}").is_file():
            return load_tokenizer(str(Path(run_dir) / f"tokenizer{suffix}"))
    raise DataError(f"{run_dir} was trained with data.tokenizer={spec!r} but holds no tokenizer.json or "
                    "tokenizer.model; copy the tokenizer file there.")
