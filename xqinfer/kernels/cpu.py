"""The CPU decode kernel (`kv_attention.c`): attention straight from KIVI-layout codes, or over plain fp32 K/V.

The C file is compiled on first use with the machine's C compiler (`$CC`, default `cc`; `-O3 -march=native
-fopenmp`) into `~/.cache/xqinfer/kernels/` (or `$XDG_CACHE_HOME/xqinfer/kernels/`), keyed by a hash of the source,
the flags and the CPU's features, and loaded with ctypes: no torch headers, so a build takes about a second.
Without a compiler (or with `XQINFER_CPU_KERNELS=0`) `unavailable()` says why and callers keep the torch path,
which is also the kernel's test reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kv_attention.c")
# Reassociation lets the compiler vectorize the dot products; infinities (the mask) keep their meaning.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math")
BITS = (1, 2, 4, 8)  # the code widths the kernel unpacks (3-bit codes straddle bytes: torch path)
PLAIN = 32  # the `bits` of a plain float32 K or V: rows read as they are
MAX_DIM = 512  # kv_attention.c's MAX_DIM


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xqinfer" / "kernels"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded kernel, None) or (None, why it cannot be used)."""
    if os.environ.get("XQINFER_CPU_KERNELS", "1") == "0":
        return None, "XQINFER_CPU_KERNELS=0"
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return None, f"no C compiler ({compiler}) to build the CPU kernel"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, _cpu_features())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kv_attention-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Built beside its destination and renamed into place: a concurrent build never loads half a file.
            with tempfile.TemporaryDirectory(dir=target.parent) as folder:
                partial = Path(folder) / target.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(partial, target)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            lines = detail.decode(errors="replace").strip().splitlines()
            return None, f"the CPU kernel did not build: {lines[-1] if lines else exc}"
    try:
        library = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"the CPU kernel did not load: {exc}"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    stream = [ptr, i64, i64, ctypes.c_int, i64]
    library.kv_decode_attention.argtypes = (
        [i64, i64, i64, i64, ptr, i64]
        + stream + [ptr, ptr, i64, ptr, ptr, ptr, i64]
        + stream + [i64, ptr, ptr, i64, ptr, ptr, ptr, i64]
        + [ptr, ptr, ctypes.c_int])
    library.kv_decode_attention.restype = ctypes.c_int
    return library, None


def unavailable() -> str | None:
    """Why the CPU kernel cannot run here (None: it can); builds it on the first call."""
    return _library()[1]


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _head_stride(t: Tensor | None) -> int:
    """The stride between the [.., rows, width] matrices of a [B, Hkv, rows, width] tensor (0 for None), whose rows
    must be dense (it may be a slice of a longer buffer along the rows)."""
    if t is None:
        return 0
    batch, heads, _, width = t.shape
    if t.stride(-1) != 1 or t.stride(-2) != width or (batch > 1 and t.stride(0) != heads * t.stride(1)):
        raise ValueError("kernel inputs need dense rows and a uniform head stride")
    return t.stride(1)


def kv_decode_attention(q: Tensor, keys: "StreamArrays", values: "StreamArrays", allowed: Tensor) -> Tensor:
    """Attention of q [B, Hkv, R, D] (float32, already scaled) over the keys and values of one decode step, read
    from their codes (or plain rows): -> [B, Hkv, R, D] float32. `allowed` [N] bool: the slots q may attend to."""
    library, reason = _library()
    if library is None:
        raise RuntimeError(reason)
    batch, kv_heads, rows, dim = q.shape
    span = allowed.shape[0]
    if dim > MAX_DIM:
        raise ValueError(f"head_dim {dim} is above the kernel's {MAX_DIM}")
    q = q.contiguous()
    out = torch.empty_like(q)
    args = [batch * kv_heads, rows, span, dim, q.data_ptr(), rows * dim]
    for stream in (keys, values):
        size = stream.codes.element_size()  # the kernel steps through codes in bytes
        args += [stream.codes.data_ptr(), _head_stride(stream.codes) * size, stream.codes.shape[-1] * size,
                 stream.bits, stream.group]
        if stream is values:
            args.append(stream.scale.shape[-1] if stream.scale is not None else 1)
        args += [_pointer(stream.scale), _pointer(stream.zero), _head_stride(stream.scale),
                 _pointer(stream.recent), _pointer(stream.rows), _pointer(stream.ring), _head_stride(stream.ring)]
    status = library.kv_decode_attention(*args, allowed.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if status:
        raise RuntimeError(f"kv_decode_attention failed ({status})")
    return out


class StreamArrays:
    """One stream as the kernel reads it: packed codes [B, Hkv, >= N, bytes] uint8, float32 scale and zero
    (per channel [B, Hkv, N / group, D], per token [B, Hkv, N, ceil(D / group)]), and the residual window:
    recent [N] bool, rows [N] int64 and the float32 ring [B, Hkv, ring, D] (all None when nothing reads from it).
    `plain(rows)`: a plain float32 K or V [B, Hkv, >= N, D], read as it is."""

    __slots__ = ("codes", "bits", "group", "scale", "zero", "recent", "rows", "ring")

    def __init__(self, codes: Tensor, bits: int, group: int, scale: Tensor | None, zero: Tensor | None,
                 recent: Tensor | None = None, rows: Tensor | None = None, ring: Tensor | None = None) -> None:
        if (bits, codes.dtype) != (PLAIN, torch.float32) and (bits not in BITS or codes.dtype != torch.uint8):
            raise ValueError(f"the CPU kernel reads {', '.join(map(str, BITS))}-bit uint8 codes or float32 rows")
        if any(t is not None and t.dtype != torch.float32 for t in (scale, zero, ring)):
            raise ValueError("the CPU kernel reads float32 scales, zeros and rings")
        self.codes, self.bits, self.group, self.scale, self.zero = codes, bits, group, scale, zero
        self.recent = None if recent is None else recent.contiguous()
        self.rows = None if rows is None else rows.contiguous()
        self.ring = ring

    @classmethod
    def plain(cls, rows: Tensor) -> StreamArrays:
        return cls(rows, PLAIN, 1, None, None)
