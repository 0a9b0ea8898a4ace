"""Decode floors: the least time a decode step can take on a device, so a measured speed reads as a fraction of it.

A batch-1 decode step must read every streamed weight and everything cached once, and a method that rebuilds K
(and V) from what it stores must also do that matrix work. Its floor is the larger of the two times:

    memory_seconds  = bytes_per_step / bandwidth        bytes_per_step = weights read + batch·context·bytes_per_token
    compute_seconds = flops_per_step / matmul_rate      flops_per_step = 2·weights·batch + batch·context·Σ rebuild

with the device's own rates measured in the same run (`measure_peaks`): a device-to-device copy (bytes read and
written over the time) and a large matrix product in the model dtype. The rebuild work per cached token is the
methods' own accounting (`Cache.rebuild_flops_per_token`), which counts what the implementation computes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .accounting import bytes_per_token, rebuild_flops_per_token, streamed_parameters
from .cache import CacheSpec
from .config import ModelConfig
from .device import synchronize


@dataclass(frozen=True)
class Peaks:
    """What the device sustains, measured: copy bandwidth (bytes/s, read + write) and matmul rate (flop/s)."""

    bandwidth: float
    matmul: float
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecodeFloor:
    bytes_per_step: float
    flops_per_step: float
    memory_seconds: float
    compute_seconds: float

    @property
    def seconds(self) -> float:
        return max(self.memory_seconds, self.compute_seconds)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds > self.memory_seconds else "memory"


def decode_floor(
    config: ModelConfig, spec: CacheSpec, context: int, batch: int, dtype: torch.dtype, peaks: Peaks
) -> DecodeFloor:
    """The floor of one decode step over `context` cached tokens per sequence."""
    parameters = streamed_parameters(config)
    weights = parameters * torch.finfo(dtype).bits / 8
    cached = batch * context * bytes_per_token(spec, config, dtype)
    flops = 2 * parameters * batch + batch * context * rebuild_flops_per_token(spec, config)
    return DecodeFloor(weights + cached, flops, (weights + cached) / peaks.bandwidth, flops / peaks.matmul)


def measure_peaks(
    device: torch.device, dtype: torch.dtype, copy_bytes: int | None = None, matmul_size: int | None = None,
    repeats: int = 5,
) -> Peaks:
    """The device's copy bandwidth and matmul rate in `dtype`, best of `repeats` timed runs after a warm-up.

    Sizes default to what reaches the plateau on each kind of device without taking long: 2 GiB and 8192³ on
    CUDA, 256 MiB and 1024³ on a CPU.
    """
    cuda = device.type == "cuda"
    copy_bytes = copy_bytes or (2 << 30 if cuda else 256 << 20)
    matmul_size = matmul_size or (8192 if cuda else 1024)
    source = torch.ones(copy_bytes // 2, dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    copy_seconds = _best_seconds(lambda: target.copy_(source), device, repeats)
    a = torch.randn(matmul_size, matmul_size, device=device).to(dtype)
    b = torch.randn(matmul_size, matmul_size, device=device).to(dtype)
    out = torch.empty(matmul_size, matmul_size, device=device, dtype=dtype)
    matmul_seconds = _best_seconds(lambda: torch.matmul(a, b, out=out), device, repeats)
    return Peaks(2 * copy_bytes / copy_seconds, 2 * matmul_size**3 / matmul_seconds, str(dtype).removeprefix("torch."))


def _best_seconds(run, device: torch.device, repeats: int) -> float:
    run()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return min(samples)
