"""The three model families (decoder, encoder, encoder-decoder) and their building blocks.
Layers and the block stack are shared; `lmjax.families` says which model a config builds."""

from lmjax.models.lm import DecoderLM, EncoderDecoderLM, EncoderLM

__all__ = ["DecoderLM", "EncoderDecoderLM", "EncoderLM"]
