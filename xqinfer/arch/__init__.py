"""Architectures, one module each, keyed by config.json's model_type. Adding one: a module declaring its
`Architecture` (see base.py) and an entry here."""

from __future__ import annotations

from ..config import ModelConfig
from . import llama
from .base import Architecture, CausalLM

# Mistral is Llama with a sliding window, which the cache keeps (`config.sliding_window`); the module is the same.
ARCHITECTURES: dict[str, Architecture] = {"llama": llama.ARCHITECTURE, "mistral": llama.ARCHITECTURE}


def architecture_for(config: ModelConfig) -> Architecture:
    return ARCHITECTURES[config.model_type]


__all__ = ["ARCHITECTURES", "Architecture", "CausalLM", "architecture_for"]
