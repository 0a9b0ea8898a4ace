"""Next-token selection: repetition penalty, temperature, top-k, top-p, min-p, with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from numbers import Integral, Real
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import SamplingError

# What torch.Generator.manual_seed takes without remapping: it also accepts negatives down to -2**63 but folds them
# onto 2**64 + seed, so -1 would silently be the same run as 18446744073709551615.
SEED_LIMIT = 2**64


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; 1.0 for the penalty and top_p, 0 for top_k and min_p switch a filter off.

    A setting of the wrong type (`temperature="0.5"`) or out of range raises SamplingError, which is both an
    XQInferError and a ValueError. The seed is an int in [0, 2**64), or None for a fresh random one.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            integral = item.name in ("top_k", "seed")
            # bool is an int to Python, but `top_k=True` is a mistake, not a setting.
            accepted = isinstance(value, Integral if integral else Real)
            if isinstance(value, bool) or not (accepted or (item.name == "seed" and value is None)):
                kind = "an integer" if integral else "a number"
                raise SamplingError(f"{item.name} must be {kind}, got {type(value).__name__} {value!r}")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.seed is None or 0 <= self.seed < SEED_LIMIT, f"seed must be in 0..{SEED_LIMIT - 1}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, **changes: Any) -> "SamplingParams":
        """These settings with `changes` applied; a change of None keeps the setting, an unknown name is refused."""
        unknown = sorted(set(changes) - {item.name for item in fields(self)})
        if unknown:
            accepted = ", ".join(item.name for item in fields(self))
            raise SamplingError(f"unknown sampling setting {', '.join(unknown)} (accepted: {accepted})")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def resolve_sampling(default: SamplingParams, sampling: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
    """What a request samples with: `sampling` itself, or the model's defaults with a dict's settings applied."""
    if sampling is None:
        return default
    if isinstance(sampling, SamplingParams):
        return sampling
    if isinstance(sampling, Mapping):
        return default.updated(**sampling)
    raise SamplingError(f"sampling must be a SamplingParams or a dict of its settings, got {type(sampling).__name__}")


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
