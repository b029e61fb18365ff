"""Model families. `DecoderLM` is the causal LM; layers and the block stack are shared."""

from lmjax.models.lm import DecoderLM

__all__ = ["DecoderLM"]
