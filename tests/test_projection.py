"""The layer-cache contract: a cache knows its attention layer only through the `KVProjection` it was built over.

A biased projection (Qwen2's q/k/v bias) and another softmax scale are one change there: every method, those that
store K and V and those that rebuild them from X or latents, attends like the plain fp16 cache over the same
tokens; with the biases left out of the projection, the rebuilding methods do not.
"""

from __future__ import annotations

import pytest
import torch

from xqinfer.attention import KVProjection
from xqinfer.cache import REGISTRY, parse_spec
from xqinfer.config import ModelConfig
from xqinfer.rope import Rotary, apply_rotary

SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
}
METHODS = ["kivi:bits=8,group=8,residual=8", "xquant:bits=8,group=8,residual=8", "xquant:bits=8,group=8,absorb=0",
           "xquant-cl:bits=8,base_bits=8,base_layers=1,group=8"]
PROMPT, DECODED = 20, 6


def one_layer(shape: str) -> ModelConfig:
    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
                                  "intermediate_size": 128, "num_hidden_layers": 1, "max_position_embeddings": 64,
                                  **SHAPES[shape]})


class BiasedAttention:
    """q, k, v of one attention layer with biases (Qwen2's layout), and the projection its cache is built over."""

    def __init__(self, config: ModelConfig, scale: float) -> None:
        g = torch.Generator().manual_seed(0)
        d, kv = config.hidden_size, config.kv_dim
        self.config, self.scale = config, scale
        self.wq = torch.randn(config.q_dim, d, generator=g) / d**0.5
        self.wk, self.wv = (torch.randn(kv, d, generator=g) / d**0.5 for _ in range(2))
        self.bq = torch.randn(config.q_dim, generator=g)
        self.bk, self.bv = (torch.randn(kv, generator=g) for _ in range(2))
        self.rotary = Rotary(config)

    def projection(self, biased: bool = True) -> KVProjection:
        bk, bv = (self.bk, self.bv) if biased else (None, None)
        return KVProjection(self.wk, self.wv, bk, bv, self.config.head_dim, self.scale, self.rotary)

    def run(self, spec: str, projection: KVProjection, x: torch.Tensor) -> torch.Tensor:
        """Attention outputs of a prefill of PROMPT tokens then single-token steps, through a fresh cache."""
        config = self.config
        cache = REGISTRY[parse_spec(spec).method](parse_spec(spec), config, [projection], capacity=32)
        outputs = []
        chunks = [range(PROMPT)] + [range(t, t + 1) for t in range(PROMPT, PROMPT + DECODED)]
        for chunk in chunks:
            positions = torch.tensor(list(chunk))
            xs = x[:, positions]
            cos, sin = self.rotary.cos_sin(positions, torch.float32)
            heads = lambda t, n: t.view(1, len(chunk), n, config.head_dim).transpose(1, 2)  # noqa: E731
            q = heads(xs @ self.wq.T + self.bq, config.num_heads)
            k = heads(xs @ self.wk.T + self.bk, config.num_kv_heads)
            v = heads(xs @ self.wv.T + self.bv, config.num_kv_heads)
            step = cache.begin(positions, (cos, sin))
            outputs.append(cache.layer(0).attend(step, xs, apply_rotary(q, cos, sin), k, v))
            cache.end()
        return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("spec", METHODS)
def test_every_method_honours_a_biased_projection_and_its_scale(shape, spec):
    config = one_layer(shape)
    attention = BiasedAttention(config, scale=0.3)  # not 1/sqrt(head_dim): the scale must come from the projection
    x = torch.randn(1, PROMPT + DECODED, config.hidden_size, generator=torch.Generator().manual_seed(1))
    exact = attention.run("fp16", attention.projection(), x)
    biased = attention.run(spec, attention.projection(), x)
    error = ((biased - exact).norm() / exact.norm()).item()
    assert error < 0.02, error  # 8-bit codes: close to the plain cache
    if not spec.startswith("kivi"):  # KIVI stores the k and v it is given; X-caching methods rebuild them
        unbiased = attention.run(spec, attention.projection(biased=False), x)
        assert ((unbiased - exact).norm() / exact.norm()).item() > 10 * error


def test_the_softmax_scale_is_the_projections():
    config = one_layer("gqa")
    x = torch.randn(1, PROMPT + DECODED, config.hidden_size, generator=torch.Generator().manual_seed(2))
    default = BiasedAttention(config, scale=config.head_dim**-0.5)
    sharper = BiasedAttention(config, scale=1.0)
    for spec in ["fp16", *METHODS]:
        a, b = default.run(spec, default.projection(), x), sharper.run(spec, sharper.projection(), x)
        assert not torch.allclose(a, b, atol=1e-3), spec
