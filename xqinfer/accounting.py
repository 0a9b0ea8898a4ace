"""What a cache method costs, from its spec and the model config alone (no weights): the one home of the accounting.

Every figure is the sum over layers of what the method declares for one layer (`Cache.layer_bits_per_element`,
`Cache.residual_elements`, `Cache.rebuild_flops_per_token`), after `resolve` has filled in and checked the options
that depend on the model. `plan`, `roofline`, `bench` and `ppl` all read their sizes here; none names a method.
"""

from __future__ import annotations

import torch

from .cache.base import REGISTRY, CacheSpec
from .config import ModelConfig


def resolved(spec: CacheSpec, config: ModelConfig) -> CacheSpec:
    """The spec checked against the model, its model-dependent options filled in (refuses what the model cannot run)."""
    return REGISTRY[spec.method].resolve(spec, config)


def layer_bits(spec: CacheSpec, config: ModelConfig, dtype: torch.dtype = torch.float16) -> list[float]:
    """Per layer, stored bits per K/V element the method keeps for a token (codes, scales, zeros; no residual)."""
    method, spec = REGISTRY[spec.method], resolved(spec, config)
    return [method.layer_bits_per_element(spec, config, i, dtype) for i in range(config.num_layers)]


def normalized_size(spec: CacheSpec, config: ModelConfig, dtype: torch.dtype = torch.float16) -> float:
    """The papers' convention (METHODS.md section 7): bits stored per cached token over a 16-bit KV cache's."""
    per_layer = layer_bits(spec, config, dtype)
    return sum(per_layer) / len(per_layer) / 16.0


def bytes_per_token(spec: CacheSpec, config: ModelConfig, dtype: torch.dtype) -> float:
    """Bytes stored per token of one sequence, all layers: codes, scales and zeros (the residual window aside)."""
    return sum(bits * 2 * config.kv_dim for bits in layer_bits(spec, config, dtype)) / 8


def residual_bytes(spec: CacheSpec, config: ModelConfig, dtype: torch.dtype) -> int:
    """Full-precision residual a sequence holds on top of its codes, all layers (bounded, whatever the length)."""
    method, spec = REGISTRY[spec.method], resolved(spec, config)
    elements = sum(method.residual_elements(spec, config, i) for i in range(config.num_layers))
    return elements * torch.finfo(dtype).bits // 8


def cache_bytes(spec: CacheSpec, config: ModelConfig, context: int, batch: int, dtype: torch.dtype) -> int:
    """Bytes the cache of `batch` sequences of `context` tokens holds: codes, scales and zeros plus the residual."""
    return int(batch * (context * bytes_per_token(spec, config, dtype) + residual_bytes(spec, config, dtype)))


def equivalent_bits(spec: CacheSpec, config: ModelConfig) -> float | None:
    """[Y]'s convention for KV methods: code bits per K/V element, scales and zeros not counted (None: not a KV
    method, so the figure has no meaning)."""
    return REGISTRY[spec.method].code_bits(resolved(spec, config), config)


def bits_label(spec: CacheSpec, config: ModelConfig) -> str:
    """The short bit width tables show for the method (`2`, `2 (first 3 at 4)`, `1.375`)."""
    return REGISTRY[spec.method].bits_label(resolved(spec, config), config)


def rebuild_flops_per_token(spec: CacheSpec, config: ModelConfig) -> float:
    """Matrix work one decode query spends per cached token, all layers, to rebuild what the method does not store."""
    method, spec = REGISTRY[spec.method], resolved(spec, config)
    return sum(method.rebuild_flops_per_token(spec, config, index) for index in range(config.num_layers))


def workspace_bytes(config: ModelConfig, context: int, batch: int, dtype: torch.dtype) -> int:
    """Transient memory of one decode step at `context`: one layer's rebuilt K/V (or X) plus the logits.

    An estimate: layers run one after another, so only one layer's rebuilt history is alive at a time.
    """
    width = max(config.hidden_size, 2 * config.kv_dim)
    element = torch.finfo(dtype).bits // 8
    return batch * (context * width * 2 + config.vocab_size * 2) * element


def streamed_parameters(config: ModelConfig) -> int:
    """Weights a decode step reads: all of them but the embedding table, of which it gathers one row per token."""
    untied_embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.num_parameters - untied_embedding


def weights_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    return config.num_parameters * torch.finfo(dtype).bits // 8
