"""Platform tricks behind one seam. The loader asks `backend_for(device, dtype)` how to lay out each weight and lets
it adapt the loaded model; nothing else in xqinfer applies a platform's trick."""

from __future__ import annotations

import torch

from .base import Backend
from .cpu import CpuBackend


def backend_for(device: torch.device | str, dtype: torch.dtype) -> Backend:
    return CpuBackend(dtype) if torch.device(device).type == "cpu" else Backend()


__all__ = ["Backend", "CpuBackend", "backend_for"]
