"""Hugging Face interop: transformers checkpoints and tokenizers <-> lmjax runs (docs/interop.md)."""
