"""Memory planning from the accounting alone: no weights are loaded, only the config and the cache specs."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .accounting import (
    bytes_per_token,
    cache_bytes,
    equivalent_bits,
    normalized_size,
    residual_bytes,
    weights_bytes,
    workspace_bytes,
)
from .cache import CacheSpec, parse_spec
from .config import ModelConfig
from .errors import XQInferError
from .roofline import Peaks, decode_floor

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """`80GB`, `80G`, `141GiB`, `512MB`, `4096B` -> bytes (GB = 10^9, GiB = 2^30); a bare number is refused."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?[iI]?[bB]?)\s*", text)
    if not match:
        raise XQInferError(f"--memory {text!r} is not a size (examples: 80GB, 24GiB, 512MB)")
    if not match.group(2):
        # `--memory 80` means 80 GB to a person and 80 bytes to a parser: neither guess is safe.
        number = match.group(1)
        raise XQInferError(f"--memory {text!r} has no unit: write {number}GB or {number}GiB ({number}B for bytes)")
    unit = match.group(2).lower()
    unit = unit if unit.endswith("b") else unit + "b"
    if unit not in UNITS:
        raise XQInferError(f"--memory {text!r}: unknown unit (accepted: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    value = int(float(match.group(1)) * UNITS[unit])
    if value <= 0:
        raise XQInferError("--memory must be at least one byte")
    return value


@dataclass
class PlanRow:
    method: str
    label: str  # what tables call it (CacheSpec.display_name)
    normalized_size: float
    bytes_per_token: float
    equivalent_bits: float | None
    cache_bytes_at_context: int
    weights_bytes: int
    workspace_bytes: int
    fits_at_context: bool
    max_context_batch_1: int
    max_batch_at_context: int
    # Given a device's rates (`--bandwidth`, `--matmul`): the decode floor at the context and batch (roofline.py).
    decode_floor_tokens_per_s: float | None = None
    decode_floor_bound: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def plan(
    config: ModelConfig,
    methods: Sequence[str | CacheSpec],
    *,
    memory: int,
    context: int,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    peaks: Peaks | None = None,
) -> list[PlanRow]:
    """For each method: its size, whether `batch` sequences of `context` fit in `memory`, and the largest that do;
    with a device's `peaks`, also the fastest a decode step could run there."""
    weights = weights_bytes(config, dtype)
    rows = []
    for method in methods:
        spec = parse_spec(method) if isinstance(method, str) else method
        per_token = bytes_per_token(spec, config, dtype)
        fixed = residual_bytes(spec, config, dtype)
        free = memory - weights
        per_sequence = context * per_token + fixed
        workspace = workspace_bytes(config, context, batch, dtype)
        max_context = _largest(lambda n: n * per_token + fixed + workspace_bytes(config, n, 1, dtype) <= free,
                               config.max_position_embeddings)
        max_batch = _largest(lambda b: b * per_sequence + workspace_bytes(config, context, b, dtype) <= free, 1 << 20)
        reachable = context <= config.max_position_embeddings
        floor = decode_floor(config, spec, context, batch, dtype, peaks) if peaks is not None else None
        rows.append(PlanRow(
            method=str(spec),
            label=spec.display_name(dtype),
            normalized_size=normalized_size(spec, config, dtype),
            bytes_per_token=per_token,
            equivalent_bits=equivalent_bits(spec, config),
            cache_bytes_at_context=cache_bytes(spec, config, context, batch, dtype),
            weights_bytes=weights,
            workspace_bytes=workspace,
            fits_at_context=reachable and weights + batch * per_sequence + workspace <= memory,
            max_context_batch_1=max_context,
            max_batch_at_context=max_batch if reachable else 0,
            decode_floor_tokens_per_s=batch / floor.seconds if floor else None,
            decode_floor_bound=floor.bound if floor else None,
        ))
    return rows


def _largest(fits, upper: int) -> int:
    """The largest n in [0, upper] with fits(n), for a monotone predicate (binary search)."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low
