"""Data: tokenizer, document sources, packing and the deterministic batch order."""

from lmjax.data.pipeline import BatchIterator, PackedDataset, TokenStream, eval_batches, split_documents, tokenize
from lmjax.data.sources import DataError, load_documents
from lmjax.data.tokenizer import ByteTokenizer

__all__ = ["BatchIterator", "ByteTokenizer", "DataError", "PackedDataset", "TokenStream", "eval_batches",
           "load_documents", "split_documents", "tokenize"]
