"""Model families: DecoderLM (causal LM), EncoderLM (masked LM), EncoderDecoderLM (T5).
Layers and the block stack are shared; `build_model` picks the family of a config."""

from lmjax.models.lm import DecoderLM, EncoderDecoderLM, EncoderLM, build_model

__all__ = ["DecoderLM", "EncoderDecoderLM", "EncoderLM", "build_model"]
