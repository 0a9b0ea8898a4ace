"""The CPU decode kernels: attention straight from KIVI-layout codes or over plain fp32 K/V (`kv_attention.c`), and
the dense part of a one-token step, a Llama block around its attention in two calls (`dense.c`).

The C files are compiled on first use with the machine's C compiler (`$CC`, default `cc`; `-O3 -march=native
-fopenmp`) into one library in `~/.cache/xqinfer/kernels/` (or `$XDG_CACHE_HOME/xqinfer/kernels/`), keyed by a hash
of the sources, the flags and the CPU's features, and loaded with ctypes (no torch headers). A build takes about ten
seconds (the attention loops are specialized by code width and head size), said on stderr when it is a terminal.
Without a compiler (or with `XQINFER_CPU_KERNELS=0`) `unavailable()` says why and callers keep the torch
path, which is also the kernels' test reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCES = tuple(Path(__file__).with_name(name) for name in ("kv_attention.c", "dense.c"))
# Reassociation lets the compiler vectorize the dot products; infinities (the mask) keep their meaning.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math")
BITS = (1, 2, 4, 8)  # the code widths the kernel unpacks (3-bit codes straddle bytes: torch path)
PLAIN = 32  # the `bits` of a plain float32 K or V: rows read as they are
MAX_DIM = 512  # kv_attention.c's MAX_DIM
LANES = 8  # kv_attention.c's LANES: head_dim and per-token value groups are multiples of it
MAX_ROWS = 16  # dense.c's MAX_ROWS: the most rows (sequences of a decode step) one dense call multiplies
DENSE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # dense.c's dtype codes


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
        return None, f"no C compiler ({compiler}) to build the CPU kernels"
    sources = b"".join(source.read_bytes() for source in SOURCES)
    key = hashlib.sha256(sources + " ".join((compiler, *FLAGS, _cpu_features())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    if not target.exists():
        if sys.stderr.isatty():
            print("xqinfer: building the CPU kernels (once per machine, about ten seconds)", file=sys.stderr)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Built beside its destination and renamed into place: a concurrent build never loads half a file.
            with tempfile.TemporaryDirectory(dir=target.parent) as folder:
                partial = Path(folder) / target.name
                subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(partial), "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(partial, target)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            lines = detail.decode(errors="replace").strip().splitlines()
            return None, f"the CPU kernels did not build: {lines[-1] if lines else exc}"
    try:
        library = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"the CPU kernels did not load: {exc}"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    stream = ctypes.POINTER(Stream)
    library.kv_decode_attention.argtypes = [i64, i64, i64, i64, ptr, i64, ctypes.c_float, stream, stream, ptr, ptr,
                                            ctypes.c_int]
    library.kv_decode_attention.restype = ctypes.c_int
    library.latent_decode_attention.argtypes = [i64, i64, i64, i64, i64, i64, ptr, ctypes.c_float, stream, ptr, ptr,
                                                ptr, stream, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
    library.matrix_tiles_ready.restype = ctypes.c_int
    library.latent_decode_attention.restype = ctypes.c_int
    library.plain_store.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64]
    library.plain_store.restype = ctypes.c_int
    library.kivi_store.argtypes = [i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int, i64, ptr, i64, ptr, ptr,
                                   i64, i64, ptr, i64, i64]
    library.kivi_store.restype = ctypes.c_int
    library.store_key_group.argtypes = [i64, i64, i64, ptr, i64, ctypes.c_int, ptr, i64, ptr, ptr, i64]
    library.store_key_group.restype = ctypes.c_int
    f32, flag = ctypes.c_float, ctypes.c_int
    library.dense_linear.argtypes = [flag, i64, i64, i64, ptr, ptr, ptr, flag]
    library.dense_attention_input.argtypes = [flag, i64, i64, i64, i64, i64, ptr, ptr, f32, ptr, ptr, ptr,
                                              ptr, ptr, ptr, ptr, flag]
    library.dense_block_output.argtypes = [flag, i64, i64, i64, i64, ptr, ptr, ptr, ptr, f32, ptr, ptr, ptr, flag]
    library.dense_rotate.argtypes = [flag, i64, i64, ptr, ptr, ptr, ptr]
    for function in (library.dense_linear, library.dense_attention_input, library.dense_block_output,
                     library.dense_rotate):
        function.restype = ctypes.c_int
    return library, None


def unavailable() -> str | None:
    """Why the CPU kernels cannot run here (None: they can); builds them on the first call."""
    return _library()[1]


@functools.cache
def matrix_tiles() -> bool:
    """Whether `latent_decode_attention` rebuilds keys on the CPU's matrix tiles (AMX, granted by Linux), as exact
    as its vector path and faster; `XQINFER_CPU_TILES=0` keeps the vectors."""
    library, _ = _library()
    return library is not None and os.environ.get("XQINFER_CPU_TILES", "1") != "0" and library.matrix_tiles_ready() == 1


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


def kv_decode_attention(q: Tensor, keys: "StreamArrays", values: "StreamArrays", allowed: Tensor,
                        scale: float) -> Tensor:
    """Attention of q [B, Hkv, R, D] (float32) with softmax scale `scale` over the keys and values of one decode
    step, read from their codes (or plain rows): -> [B, Hkv, R, D] float32. `allowed` [N] bool: the slots q may
    attend to."""
    library, reason = _library()
    if library is None:
        raise RuntimeError(reason)
    batch, kv_heads, rows, dim = q.shape
    span = allowed.shape[0]
    if dim > MAX_DIM:
        raise ValueError(f"head_dim {dim} is above the kernel's {MAX_DIM}")
    q = q.contiguous()
    out = torch.empty_like(q)
    status = library.kv_decode_attention(batch * kv_heads, rows, span, dim, q.data_ptr(), rows * dim, scale,
                                         keys.struct, values.struct, allowed.data_ptr(), out.data_ptr(),
                                         torch.get_num_threads())
    if status:
        raise RuntimeError(f"kv_decode_attention failed ({status})")
    return out


REBUILD_PANEL = 64  # latent_decode_attention's REBUILD_PANEL on AVX-512 (32 elsewhere): KV widths are multiples of it


def latent_decode_attention(q: Tensor, keys: "StreamArrays", mk: Tensor, cos: Tensor, sin: Tensor,
                            values: "StreamArrays", mv: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Attention of q [B, H, D] (float32, rotated) with softmax scale `scale` over one decode step of XQuant's GQA
    latents: keys rebuilt as RoPE(L̂k·mk) (mk [C, Hkv·D], the slots' tables cos, sin [N, D]) from the key stream,
    values absorbed: -> (Σ_n p_n L̂v_n)·mv [B, H, D] float32 (mv [C, Hkv·D], each head through its KV head's columns;
    a bias is the caller's). The streams hold C-channel rows of B sequences ([B, 1, >= N, bytes], one "head");
    `allowed` [N] bool."""
    library, reason = _library()
    if library is None:
        raise RuntimeError(reason)
    batch, heads, dim = q.shape
    channels, width = mk.shape
    q, mk, cos, sin, mv = (t.contiguous() for t in (q, mk, cos, sin, mv))
    out = q.new_empty(batch, heads, dim)
    status = library.latent_decode_attention(batch, heads, width // dim, dim, channels, allowed.shape[0],
                                             q.data_ptr(), scale, keys.struct, mk.data_ptr(), cos.data_ptr(),
                                             sin.data_ptr(), values.struct, mv.data_ptr(), allowed.data_ptr(),
                                             out.data_ptr(), torch.get_num_threads(), int(matrix_tiles()))
    if status:
        raise RuntimeError(f"latent_decode_attention failed ({status})")
    return out


def _float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


class PlainStore:
    """What a plain KV cache stores of one decode token (kv_attention.c's plain_store), bound to its float32 buffers
    keys, values [B, Hkv, capacity, D] once (they never move)."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        if not (keys.is_contiguous() and values.is_contiguous()) or keys.dtype != torch.float32:
            raise ValueError("plain_store writes dense float32 buffers")
        self.buffers = keys, values  # kept alive for the pointers
        batch, kv_heads, capacity, self.dim = keys.shape
        self.heads, self.head_stride = batch * kv_heads, capacity * self.dim
        self.pointers = keys.data_ptr(), values.data_ptr()

    def __call__(self, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, slot: int) -> None:
        """keys[:, :, slot] = RoPE(k) and values[:, :, slot] = v for k, v [B, Hkv, 1, D], rotated by the token's
        cos, sin [1, D] (as `rope.apply_rotary`)."""
        k, v, cos, sin = _float32(k), _float32(v), _float32(cos), _float32(sin)
        status = _library()[0].plain_store(self.heads, self.dim, k.data_ptr(), v.data_ptr(), cos.data_ptr(),
                                           sin.data_ptr(), *self.pointers, self.head_stride, slot)
        if status:
            raise RuntimeError(f"plain_store failed ({status})")


class KiviStore:
    """What a KIVI-layout cache stores of one decode token (kv_attention.c's kivi_store), with one layer's buffers
    bound once (they never move): the key ring [B, Hkv, ring, D] float32; the value's codes [B, Hkv, capacity, bytes]
    uint8 (None: the layer shares another's), float16 scale and zero [B, Hkv, capacity, groups], quantized per token
    (`bits`, groups of `group` channels, as `quant.Layout.quantize`); the value ring (None: there is none). Every
    buffer dense."""

    def __init__(self, key_ring: Tensor, codes: Tensor | None, scale: Tensor, zero: Tensor, bits: int, group: int,
                 value_ring: Tensor | None) -> None:
        buffers = [t for t in (key_ring, codes, scale, zero, value_ring) if t is not None]
        dtypes = (key_ring.dtype, scale.dtype)
        if not all(t.is_contiguous() for t in buffers) or dtypes != (torch.float32, torch.float16):
            raise ValueError("kivi_store writes dense buffers: float32 rows, float16 scales and zeros")
        self.buffers = buffers  # kept alive for the pointers
        batch, kv_heads, _, self.dim = key_ring.shape
        self.heads = batch * kv_heads
        self.key_ring = (key_ring.data_ptr(), _head_stride(key_ring))
        self.values = (bits, group, _pointer(codes), _head_stride(codes), scale.data_ptr(), zero.data_ptr(),
                       _head_stride(scale))
        self.value_ring = (_pointer(value_ring), _head_stride(value_ring))

    def __call__(self, k: Tensor, v: Tensor, cos: Tensor | None, sin: Tensor | None, key_row: int, slot: int,
                 value_row: int) -> None:
        """Stores k, v [B, Hkv, 1, D] float32: RoPE(k) (cos, sin [1, D]; None: k as it is) into row `key_row` of the
        key ring, v quantized into `slot` and into row `value_row` of the value ring."""
        k, v = _float32(k), _float32(v)
        cos, sin = (None, None) if cos is None else (_float32(cos), _float32(sin))
        status = _library()[0].kivi_store(self.heads, self.dim, k.data_ptr(), _pointer(cos), _pointer(sin),
                                          *self.key_ring, key_row, v.data_ptr(), *self.values, slot,
                                          *self.value_ring, value_row)
        if status:
            raise RuntimeError(f"kivi_store failed ({status})")


def store_key_group(ring: Tensor, bits: int, codes: Tensor | None, scale: Tensor, zero: Tensor) -> None:
    """One closed group of per-channel keys: its rows ring [..., G, D] float32 quantized per channel (as
    `quant.Layout.quantize` with axis "channel") into codes [..., G, bytes] (None: the layer shares another's) and
    the float16 scale and zero [..., 1, D]; views of the caller's buffers with dense rows, any leading dimensions
    (heads, sequences) flattened."""
    if scale.dtype != torch.float16 or ring.dtype != torch.float32:
        raise ValueError("store_key_group writes float16 scales and zeros from float32 rows")
    ring, codes, scale, zero = (None if t is None else t.view(1, -1, *t.shape[-2:]) for t in (ring, codes, scale, zero))
    _, heads, group, dim = ring.shape
    status = _library()[0].store_key_group(heads, group, dim, ring.data_ptr(), _head_stride(ring), bits,
                                           _pointer(codes), _head_stride(codes), scale.data_ptr(), zero.data_ptr(),
                                           _head_stride(scale))
    if status:
        raise RuntimeError(f"store_key_group failed ({status})")


class Stream(ctypes.Structure):
    """kv_attention.c's stream_t: one stream's buffers as the kernels read them."""

    _fields_ = [("codes", ctypes.c_void_p), ("code_stride", ctypes.c_int64), ("row_bytes", ctypes.c_int64),
                ("bits", ctypes.c_int), ("group", ctypes.c_int64), ("groups", ctypes.c_int64),
                ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p), ("param_stride", ctypes.c_int64),
                ("half", ctypes.c_int), ("cal_scale", ctypes.c_float), ("cal_shift", ctypes.c_float),
                ("recent", ctypes.c_void_p), ("rows", ctypes.c_void_p), ("ring", ctypes.c_void_p),
                ("ring_stride", ctypes.c_int64)]


class StreamArrays:
    """One stream as the kernel reads it: packed codes [B, Hkv, >= N, bytes] uint8, scale and zero as stored (float32
    or float16; per channel [B, Hkv, >= N / group, D], per token [B, Hkv, >= N, ceil(D / group)]), the calibration
    (a, b) that the kernel applies to them (s' = a s, z' = z + b s; see `quant.calibrated_params`), and the float32
    residual ring [B, Hkv, ring, D]. Made once per buffer (they never move: the argument the kernels take is built
    here, once); each step says which slots it reads from the ring (`read_ring`). `plain(rows)`: a plain float32 K
    or V [B, Hkv, >= N, D], read as it is."""

    __slots__ = ("codes", "scale", "zero", "ring", "recent", "rows", "struct")

    def __init__(self, codes: Tensor, bits: int, group: int, scale: Tensor | None, zero: Tensor | None,
                 ring: Tensor | None = None, calibration: tuple[float, float] = (1.0, 0.0)) -> None:
        if (bits, codes.dtype) != (PLAIN, torch.float32) and (bits not in BITS or codes.dtype != torch.uint8):
            raise ValueError(f"the CPU kernel reads {', '.join(map(str, BITS))}-bit uint8 codes or float32 rows")
        if any(t is not None and t.dtype not in (torch.float32, torch.float16) for t in (scale, zero)):
            raise ValueError("the CPU kernel reads float32 or float16 scales and zeros")
        if scale is not None and (scale.dtype != zero.dtype or scale.stride() != zero.stride()):
            raise ValueError("the CPU kernel reads a scale and a zero of one dtype and layout")
        if ring is not None and ring.dtype != torch.float32:
            raise ValueError("the CPU kernel reads float32 rings")
        self.codes, self.scale, self.zero, self.ring = codes, scale, zero, ring  # kept alive for the pointers
        self.recent = self.rows = None
        size = codes.element_size()  # the kernel steps through codes in bytes
        self.struct = Stream(
            codes.data_ptr(), _head_stride(codes) * size, codes.shape[-1] * size, bits, group,
            scale.shape[-1] if scale is not None else 1, _pointer(scale), _pointer(zero), _head_stride(scale),
            int(scale is not None and scale.dtype == torch.float16), *calibration, None, None, _pointer(ring),
            _head_stride(ring))

    @classmethod
    def plain(cls, rows: Tensor) -> StreamArrays:
        return cls(rows, PLAIN, 1, None, None)

    def read_ring(self, recent: Tensor, rows: Tensor, ring: Tensor | None = None) -> StreamArrays:
        """This step's ring reads: recent [N] bool (slot n read from the ring), rows [N] int64 (at row rows[n]);
        `ring`: a float32 copy to read instead of the one given at construction (rings of another dtype)."""
        if not (recent.is_contiguous() and rows.is_contiguous()):
            raise ValueError("the CPU kernel reads dense ring reads")
        self.recent, self.rows = recent, rows
        self.struct.recent, self.struct.rows = recent.data_ptr(), rows.data_ptr()
        if ring is not None:
            self.ring = ring
            self.struct.ring, self.struct.ring_stride = ring.data_ptr(), _head_stride(ring)
        return self


def dense_usable(x: Tensor, *weights: Tensor) -> bool:
    """Whether the dense kernels take x [..., in] with these weights: a few rows (a decode step), a dtype the
    kernels read, dense row-major operands on the CPU."""
    return (x.shape[:-1].numel() <= MAX_ROWS and x.dtype in DENSE_DTYPES and x.device.type == "cpu"
            and all(w.dtype == x.dtype and w.is_contiguous() for w in weights) and _library()[0] is not None)


def _call(function: str, *args) -> None:
    status = getattr(_library()[0], function)(*args, torch.get_num_threads())
    if status:
        raise RuntimeError(f"{function} failed ({status})")


def dense_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., in] @ weight[out, in]ᵀ -> [..., out], as F.linear without bias (see `dense_usable`)."""
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    _call("dense_linear", DENSE_DTYPES[x.dtype], x.shape[:-1].numel(), weight.shape[1], weight.shape[0],
          x.data_ptr(), weight.data_ptr(), out.data_ptr())
    return out


def dense_rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`rope.apply_rotary(x, cos, sin)` for x [..., 1, D] at one position (cos, sin [1, D]) in one call."""
    x = x.contiguous()
    out = torch.empty_like(x)
    status = _library()[0].dense_rotate(DENSE_DTYPES[x.dtype], x.numel() // x.shape[-1], x.shape[-1], x.data_ptr(),
                                        cos.contiguous().data_ptr(), sin.contiguous().data_ptr(), out.data_ptr())
    if status:
        raise RuntimeError(f"dense_rotate failed ({status})")
    return out


def dense_attention_input(h: Tensor, norm_weight: Tensor, eps: float, qkv_weight: Tensor, cos: Tensor,
                          sin: Tensor, heads: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One decode step's h [B, 1, d] -> x = RMSNorm(h) [B, 1, d] and, from x·Wqkvᵀ, q rotated by the step's
    cos, sin [1, D] as [B, H, 1, D], k and v [B, Hkv, 1, D] (see `dense_usable`)."""
    h = h.contiguous()
    batch, _, width = h.shape
    dim = cos.shape[-1]
    x = torch.empty_like(h)
    q = h.new_empty(batch, heads, 1, dim)
    k, v = h.new_empty(batch, kv_heads, 1, dim), h.new_empty(batch, kv_heads, 1, dim)
    _call("dense_attention_input", DENSE_DTYPES[h.dtype], batch, width, heads, kv_heads, dim, h.data_ptr(),
          norm_weight.data_ptr(), eps, qkv_weight.data_ptr(), cos.contiguous().data_ptr(),
          sin.contiguous().data_ptr(), x.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr())
    return x, q, k, v


def dense_block_output(h: Tensor, attention: Tensor, o_weight: Tensor, norm_weight: Tensor, eps: float,
                       gate_up_weight: Tensor, down_weight: Tensor) -> Tensor:
    """The rest of a Llama block for one decode step: h [B, 1, d] and the attention output [B, H, 1, D] ->
    h1 + MLP(RMSNorm(h1)) for h1 = h + attention·Woᵀ, with the MLP's gate|up weight [2 F, d] (see `dense_usable`)."""
    h = h.contiguous()
    batch, _, width = h.shape
    attention = attention.transpose(1, 2).contiguous()  # [B, 1, H, D]: the rows o_proj reads
    out = torch.empty_like(h)
    _call("dense_block_output", DENSE_DTYPES[h.dtype], batch, width, o_weight.shape[1], down_weight.shape[1],
          h.data_ptr(), attention.data_ptr(), o_weight.data_ptr(), norm_weight.data_ptr(), eps,
          gate_up_weight.data_ptr(), down_weight.data_ptr(), out.data_ptr())
    return out
