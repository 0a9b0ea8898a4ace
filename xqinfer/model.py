"""The Llama/Mistral transformer. It computes q, k, v and hands them to its layer cache; it never knows the method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .rope import Rotary, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 and cast back before the gain, as the reference implementation does.
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.q_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_dim, bias=False)
        self.o_proj = nn.Linear(config.q_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, layer_cache) -> Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = layer_cache.attend(x, apply_rotary(q, cos, sin), k, v, positions)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, layer_cache) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, cos, sin, layer_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Parameter names follow the Hugging Face checkpoint layout, so a state dict loads without renaming."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def output_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(
        self, tokens: Tensor, positions: Tensor, cache, last_only: bool = False, span: int | None = None
    ) -> Tensor:
        """tokens [B, T] at absolute `positions` [T] -> logits [B, T, vocab] (or [B, 1, vocab] with last_only).

        The cache stores whatever its method stores and returns attention outputs; one call serves prefill
        chunks and single-token decode steps alike. `span` bounds the cache slots read (see `Cache.begin`).
        """
        h = self.model.embed_tokens(tokens)
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        cache.begin(positions, span)
        for index, block in enumerate(self.model.layers):
            h = block(h, positions, cos, sin, cache.layer(index))
        cache.end()
        if last_only:
            h = h[:, -1:]
        return F.linear(self.model.norm(h), self.output_weight())
