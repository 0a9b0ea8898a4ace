"""The Llama/Mistral transformer. It computes q, k, v and hands them to its layer cache; it never knows the method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVProjection
from .config import ModelConfig
from .rope import Rotary, apply_rotary

# A one-token product x·Wᵀ is a matrix-vector product, which MKL runs on one thread however many torch has. Split
# into one block of output rows per thread, as a batched product that torch spreads over its threads, it reads an fp32
# W 1.4-1.6x faster on 2 cores; below this size the split costs more than it saves, and in fp16/bf16 it is slower.
SPLIT_MIN_BYTES = 1 << 18


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., in] @ weightᵀ -> [..., out], as F.linear; a single fp32 row on a multi-threaded CPU uses every thread."""
    threads = torch.get_num_threads()
    out, width = weight.shape
    if (x.shape[:-1].numel() != 1 or threads == 1 or x.device.type != "cpu" or weight.dtype != torch.float32
            or out % threads or weight.nbytes < SPLIT_MIN_BYTES):
        return F.linear(x, weight)
    blocks = weight.view(threads, out // threads, width).transpose(1, 2)  # [threads, in, out / threads], no copy
    return torch.bmm(x.reshape(1, 1, width).expand(threads, 1, width), blocks).view(*x.shape[:-1], out)


class Linear(nn.Linear):
    """nn.Linear without bias whose one-token products use every intra-op thread (see `linear`)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)


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
        # q, k and v come from one [q_dim + 2 kv_dim, d] matrix: one matmul (one pass over x, one kernel) per layer.
        self.qkv_sizes = (config.q_dim, config.kv_dim, config.kv_dim)
        self.qkv_proj = Linear(config.hidden_size, sum(self.qkv_sizes))
        self.o_proj = Linear(config.q_dim, config.hidden_size)

    @property
    def wk(self) -> Tensor:
        """The key projection Wk [kv_dim, d]: a view of the fused weight's rows, sharing its storage and layout."""
        q_dim, kv_dim, _ = self.qkv_sizes
        return self.qkv_proj.weight[q_dim : q_dim + kv_dim]

    @property
    def wv(self) -> Tensor:
        """The value projection Wv [kv_dim, d]: a view of the fused weight's rows, sharing its storage and layout."""
        q_dim, kv_dim, _ = self.qkv_sizes
        return self.qkv_proj.weight[q_dim + kv_dim :]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer_cache, step) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = layer_cache.attend(step, x, apply_rotary(q, cos, sin), k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # gate and up stacked in one [2 f, d] matrix, for one matmul instead of two.
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, layer_cache, step) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, layer_cache, step)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Parameter names follow the Hugging Face checkpoint layout, except the fused `qkv_proj` (q|k|v rows) and
    `gate_up_proj` (gate|up rows) that the loader builds from the checkpoint's separate projections."""

    def __init__(self, config: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        # Given its (empty) weight, the embedding skips its random init: on the meta device, where the loader builds
        # the model, that init alone would load torch's meta kernels (~2.5 s, once per process).
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                               _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.model.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.rotary = rotary

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def output_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def kv_projections(self) -> list[KVProjection]:
        """Each layer's attention as a cache may know it (views of the weights, no copy)."""
        return [KVProjection.plain(block.self_attn.wk, block.self_attn.wv, self.config.head_dim, self.rotary)
                for block in self.model.layers]

    def forward(
        self, tokens: Tensor, positions: Tensor, cache, last_only: bool = False, span: int | None = None
    ) -> Tensor:
        """tokens [B, T] at absolute `positions` [T] -> logits [B, T, vocab] (or [B, 1, vocab] with last_only).

        The cache stores whatever its method stores and returns attention outputs; one call serves prefill
        chunks and single-token decode steps alike. `span` bounds the cache slots read (see `Cache.begin`).
        """
        h = self.model.embed_tokens(tokens)
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        step = cache.begin(positions, (cos, sin), span)
        for index, block in enumerate(self.model.layers):
            h = block(h, cos, sin, cache.layer(index), step)
        cache.end()
        if last_only:
            h = h[:, -1:]
        return linear(self.model.norm(h), self.output_weight())
