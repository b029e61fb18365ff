"""Data: tokenizers, document sources, prepared shards, packing and the deterministic batch order."""

from lmjax.data.pipeline import (
    BatchIterator,
    Concat,
    Mixture,
    PackedDataset,
    Subset,
    TokenStream,
    eval_batches,
    split_documents,
    tokenize,
)
from lmjax.data.sources import DataError, iter_documents, load_documents
from lmjax.data.tokenizer import ByteTokenizer, padded_vocab_size
from lmjax.data.tokenizer_store import load_from_run, load_tokenizer, save_to_run

__all__ = ["BatchIterator", "ByteTokenizer", "Concat", "DataError", "Mixture", "PackedDataset", "Subset",
           "TokenStream", "eval_batches", "iter_documents", "load_documents", "load_from_run", "load_tokenizer",
           "padded_vocab_size", "save_to_run", "split_documents", "tokenize"]
