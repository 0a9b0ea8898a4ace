"""What a run needs in memory, from the accounting, checked against the device's free memory before it is
allocated: a run that cannot fit is refused in a line, not after minutes of building weights it has no room for."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .accounting import bytes_per_token, weights_bytes, workspace_bytes
from .cache import CacheSpec
from .config import ModelConfig
from .device import free_memory
from .errors import MemoryLimitError


def weights_needs(config: ModelConfig, dtype: torch.dtype) -> dict[str, int]:
    """The weights in `dtype` (every tensor the config implies, as the loader builds them) and one token's step."""
    return {"weights": weights_bytes(config, dtype),
            "workspace": workspace_bytes(config, 1, 1, dtype)}


def cache_needs(
    specs: Sequence[CacheSpec], config: ModelConfig, capacity: int, batch: int, dtype: torch.dtype
) -> dict[str, int]:
    """The caches' codes, scales and zeros at `capacity` tokens of `batch` sequences and a decode step's workspace
    there: what they need at least (the residual window, clamped to a short cache's capacity, aside), so that the
    check never refuses a run that fits."""
    cache = sum(capacity * batch * bytes_per_token(spec, config, dtype) for spec in specs)
    return {"cache": int(cache), "workspace": workspace_bytes(config, capacity, batch, dtype)}


WEIGHTS_HINT = "a smaller --dtype, a smaller model or another device"
CACHE_HINT = "a compressed --cache, a shorter context or a smaller batch"


def check_memory(needs: dict[str, int], device: torch.device, what: Callable[[], str], hint: str) -> None:
    """Raises MemoryLimitError, naming `what()` needs it, what is free and `hint` (what to try), when `needs`
    exceeds the device's free memory; does nothing where that cannot be read. `what` is only asked for then."""
    from .formatting import human_bytes

    free = free_memory(device)
    total = sum(needs.values())
    if free is None or total <= free:
        return
    parts = ", ".join(f"{name} {human_bytes(size)}" for name, size in needs.items())
    where = "the CPU has" if device.type == "cpu" else f"{device} has"
    raise MemoryLimitError(f"not enough memory: {what()} needs at least {human_bytes(total)} ({parts}); {where} "
                           f"{human_bytes(free)} free (try {hint})")
