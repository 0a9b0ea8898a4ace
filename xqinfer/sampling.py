"""Next-token selection: repetition penalty, temperature, top-k, top-p, min-p, with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; 1.0 for the penalty and top_p, 0 for top_k and min_p switch a filter off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, **changes) -> "SamplingParams":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


class Sampler:
    """Applies the filters in the order transformers does, so seeded runs are comparable across engines."""

    def __init__(self, params: SamplingParams, device: torch.device | str) -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: Tensor, context: Tensor | None = None) -> Tensor:
        """logits [B, vocab] (any dtype), context [B, n] token ids seen so far -> next tokens [B]."""
        p = self.params
        logits = logits.to(torch.float32)
        if p.repetition_penalty != 1.0 and context is not None and context.numel():
            logits = apply_repetition_penalty(logits, context, p.repetition_penalty)
        if p.greedy:
            return logits.argmax(dim=-1)
        logits = logits / p.temperature
        if p.top_k:
            logits = top_k_filter(logits, p.top_k)
        if p.top_p < 1.0:
            logits = top_p_filter(logits, p.top_p)
        if p.min_p > 0.0:
            logits = min_p_filter(logits, p.min_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def apply_repetition_penalty(logits: Tensor, context: Tensor, penalty: float) -> Tensor:
    # CTRL's rule: shrink positive logits and push negative ones further down, for every token already seen.
    seen = logits.gather(-1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, context, seen)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    k = min(k, logits.shape[-1])
    threshold = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass before it already does.
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))
