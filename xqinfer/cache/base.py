"""The model <-> cache seam: spec parsing, the method registry, token-slot bookkeeping and what methods declare.

A cache is one model-level object holding one layer cache per transformer layer, built over the layers'
`KVProjection`s (never the model itself). For each forward the model calls `step = cache.begin(positions, rope)`,
then `cache.layer(i).attend(step, x, q, k, v)` for every layer, then `cache.end()`. Everything a method stores
lives in tensors allocated once at construction (capacity tokens), so the decode step has static shapes: the
current fill is carried by `slot_positions`, a tensor, never by a Python int.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ..attention import KVProjection
from ..config import ModelConfig
from ..errors import CacheSpecError, XQInferWarning
from ..rope import Rotary

EMPTY_SLOT = -1
# The key of `Step.shared` under which a CPU step keeps its first position as a Python int (absent elsewhere).
FIRST_POSITION = ("host: first position",)


@dataclass(frozen=True)
class Option:
    """One `key=value` of a cache spec: its default and the values it accepts."""

    default: Any
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    kind: type | None = None  # the value's type, when the default (None: "the model decides") does not say it

    def parse(self, method: str, key: str, text: str) -> Any:
        kind = self.kind or type(self.default)
        try:
            value = kind(text)
        except ValueError:
            message = f"{method}: {key}={text!r} is not a valid {kind.__name__}; {self.describe()}"
            raise CacheSpecError(message) from None
        if self.choices is not None and value not in self.choices:
            raise CacheSpecError(f"{method}: {key}={text} is not accepted; {self.describe()}")
        if self.minimum is not None and value < self.minimum:
            raise CacheSpecError(f"{method}: {key}={text} is not accepted; {self.describe()}")
        if self.maximum is not None and value > self.maximum:
            raise CacheSpecError(f"{method}: {key}={text} is not accepted; {self.describe()}")
        return value

    def describe(self) -> str:
        if self.choices is not None:
            return "accepted: " + ", ".join(str(c) for c in self.choices)
        if self.minimum is not None and self.maximum is not None:
            return f"accepted: {self.minimum}..{self.maximum}"
        if self.minimum is not None:
            return f"accepted: >= {self.minimum}"
        return f"default {self.default}"




@dataclass(frozen=True)
class CacheSpec:
    """A parsed `NAME[:key=value,...]`, with every option of the method filled in."""

    method: str
    options: dict[str, Any]

    def __str__(self) -> str:
        return self._written({k: v for k, v in self.options.items() if v is not None})

    def label(self) -> str:
        """Only the options that differ from the method's defaults (`xquant:bits=2`): the short name tables show.

        Compared as written, so a default like 1/6 read back from its printed form still counts as the default.
        """
        defaults = REGISTRY[self.method].OPTIONS
        return self._written({k: v for k, v in self.options.items()
                              if v is not None and (k not in defaults or _value(v) != _value(defaults[k].default))})

    def display_name(self, dtype: torch.dtype) -> str:
        """What tables, stats lines and banners call this cache in a run of `dtype`: its method's choice."""
        return REGISTRY[self.method].display_name(self, dtype)

    def _written(self, options: dict[str, Any]) -> str:
        if not options:
            return self.method
        return self.method + ":" + ",".join(f"{k}={_value(v)}" for k, v in options.items())


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


REGISTRY: dict[str, type["Cache"]] = {}


def register(name: str) -> Callable[[type["Cache"]], type["Cache"]]:
    def decorate(cls: type["Cache"]) -> type["Cache"]:
        cls.method = name
        REGISTRY[name] = cls
        return cls

    return decorate


def parse_spec(text: str) -> CacheSpec:
    """Parses `xquant:bits=4,group=128` into a CacheSpec, refusing unknown methods, keys, values and repeated keys."""
    from . import METHODS  # noqa: F401  (importing the package registers every method)

    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in REGISTRY:
        raise CacheSpecError(f"unknown cache method {name!r} (accepted: {', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[name]
    options = {key: option.default for key, option in cls.OPTIONS.items()}
    given: set[str] = set()
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise CacheSpecError(f"{name}: expected key=value, got {item!r}")
        if key not in cls.OPTIONS:
            accepted = ", ".join(cls.OPTIONS) or "none"
            raise CacheSpecError(f"{name}: unknown option {key!r} (accepted: {accepted})")
        if key in given:  # `bits=2,bits=4` would otherwise keep the last silently
            raise CacheSpecError(f"{name}: option {key!r} is given more than once")
        given.add(key)
        options[key] = cls.OPTIONS[key].parse(name, key, value.strip())
    spec = CacheSpec(name, options)
    cls.validate(spec)
    return spec


def refuse(spec: CacheSpec, message: str) -> None:
    raise CacheSpecError(f"{spec}: {message}")


@dataclass
class Step:
    """What every layer of one forward shares: where the new tokens go and who may attend to whom.

    Two ways to attend, chosen by shape alone (never by data):
    - `concat` (prefill chunks of compressed methods, ring prefill): attend over the history as it was before this
      step ++ the exact new tokens. METHODS.md section 2: prefill attention uses the exact K and V.
    - otherwise (decode): write the new token first, then attend over the buffer, reading it back like any other
      token (exact while it is in the residual window, quantized otherwise, as `residual=0` promises).
    """

    positions: Tensor  # [T] absolute positions of the new tokens
    length: Tensor  # scalar: tokens held before this step (= positions[0], positions being contiguous)
    slots: Tensor  # [min(T, capacity)] buffer slots of the last min(T, capacity) new tokens
    concat: bool
    span: int  # the method reads slots [0, span) only
    stored_positions: Tensor  # [span] positions of those slots as the method reads them (EMPTY_SLOT if none)
    stored_length: Tensor  # scalar: tokens held when the method reads the buffer
    key_positions: Tensor  # positions of the keys attended over
    mask: Tensor  # [T, keys] True where attention is allowed
    cos: Tensor  # RoPE tables for the new tokens [T, head_dim], the model's own (computed once per forward)
    sin: Tensor
    rotary: Rotary
    dtype: torch.dtype
    # Index work every layer of the step does alike (slots, ring rows, which slots read in full precision), done by
    # the first layer and reused by the others: QuantStream's `shared`.
    shared: dict[tuple, Any] = field(default_factory=dict)

    @cached_property
    def stored_rope(self) -> tuple[Tensor, Tensor]:
        """RoPE tables at the stored slots' positions, for methods that rotate keys after rebuilding them."""
        # Computed over the stored and the new positions together so that dynamic scaling sees the current length.
        cos, sin = self.rotary.cos_sin(torch.cat((self.stored_positions.clamp(min=0), self.positions)), self.dtype)
        return cos[: self.span], sin[: self.span]

    def key_rope(self, count: int) -> tuple[Tensor, Tensor]:
        """RoPE tables for `count` rebuilt keys: the stored slots', then the new tokens' when they were appended."""
        cos, sin = self.stored_rope
        if count > cos.shape[0]:
            cos, sin = torch.cat((cos, self.cos)), torch.cat((sin, self.sin))
        return cos, sin

    def read_around_write(self, write: Callable[[], None], read: Callable[[], Any]) -> Any:
        """Runs a layer's write and read in the order this step attends in: read first when concatenating."""
        if self.concat:
            stored = read()
            write()
            return stored
        write()
        return read()


class Cache:
    """Model-level cache: owns the per-layer caches and the token-slot table they share."""

    method: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Option]] = {}
    # The specs `bench` and `plan` compare when none is given (the method's headline settings).
    BENCHMARKED: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        spec: CacheSpec,
        config: ModelConfig,
        projections: list[KVProjection],
        capacity: int,
        batch_size: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        spec = type(self).resolve(spec, config)
        self.spec = spec
        self.config = config
        self.projections = projections
        self.batch_size = batch_size
        self.dtype = dtype or projections[0].wk.dtype
        self.device = torch.device(device) if device is not None else projections[0].wk.device
        # A sliding-window model only ever needs its window: the buffers become a ring that wraps around.
        self.window = config.sliding_window
        self.is_ring = self.window is not None and capacity > self.window
        needed = self.window if self.is_ring else capacity
        # Quantized groups must tile the buffer, and a ring keeps `slack` spare slots so that one chunk's writes
        # (whole groups around it included) never land on slots another part of the same chunk uses.
        multiple = self.capacity_multiple()
        self.slack = 2 * multiple if self.is_ring and multiple > 1 else 0
        self.capacity = -(-(needed + self.slack) // multiple) * multiple
        # What the layers size their residual rings by (None for methods without one); the spec stays as given.
        self.residual: int | None = self.fit_residual(spec)
        self.rotary: Rotary = projections[0].rotary
        self.slot_positions = torch.full((self.capacity,), EMPTY_SLOT, dtype=torch.long, device=self.device)
        # A CPU step is never captured in a graph: it may read a position on the host and call a kernel outside
        # torch (kv_decode). False keeps every step capturable, as on CUDA (tests/test_capture.py checks that path).
        self.host_steps = self.device.type == "cpu"
        self.step: Step | None = None  # the forward in progress, between begin and end
        # The papers' `sim` protocol: the new tokens, too, are attended through their quantized form.
        self.simulate = False
        # Built in order, so a layer may refer to the one before it (XQuant-KV's shared codes).
        self.layers: list[LayerCache] = []
        try:
            for index in range(config.num_layers):
                self.layers.append(self.make_layer(index))
        except CacheSpecError as exc:
            message = str(exc)
            raise CacheSpecError(message if message.startswith(str(spec)) else f"{spec}: {message}") from None

    def fit_residual(self, spec: CacheSpec) -> int | None:
        """The spec's residual window, clamped to the capacity plus one group when it is longer.

        Every token the buffer holds already reads in full precision there (a multiple of the group, as per-channel
        residuals must be), so the clamp changes no result; it only spares the rows no token can reach
        (`kivi:residual=100000` on a 100-token run). A residual the user wrote gets a warning; the default one, on
        a short run, is clamped quietly. A ring is left as it is: its positions run past the buffer, and which of
        them read in full precision depends on the residual itself.
        """
        residual = spec.options.get("residual")
        most = self.capacity + self.capacity_multiple()
        if self.is_ring or residual is None or residual <= most:
            return residual
        if residual != self.OPTIONS["residual"].default:
            warnings.warn(f"{spec}: residual={residual} is longer than the cache's {self.capacity} tokens; "
                          f"using residual={most}", XQInferWarning, stacklevel=3)
        return most

    @property
    def max_chunk(self) -> int:
        """The most tokens one forward may write."""
        return self.capacity - self.slack

    def capacity_multiple(self) -> int:
        """Buffers hold a whole number of this many tokens (a per-channel method's group size)."""
        return 1

    @property
    def always_concat(self) -> bool:
        """Methods that rebuild the history attend over history ++ exact new tokens (METHODS.md section 2)."""
        return False

    @classmethod
    def display_name(cls, spec: CacheSpec, dtype: torch.dtype) -> str:
        """The name shown for this cache: by default its label (the spec without its default options)."""
        return spec.label()

    @classmethod
    def validate(cls, spec: CacheSpec) -> None:
        """Checks option combinations that single options cannot; raises CacheSpecError."""

    @classmethod
    def resolve(cls, spec: CacheSpec, config: ModelConfig) -> CacheSpec:
        """The spec with the options that depend on the model (left as None when parsed) filled in and checked."""
        return spec

    def make_layer(self, index: int) -> "LayerCache":
        raise NotImplementedError

    def layer(self, index: int) -> "LayerCache":
        return self.layers[index]

    def begin(self, positions: Tensor, rope: tuple[Tensor, Tensor], span: int | None = None) -> Step:
        """Prepares one forward over `positions` whose RoPE tables are `rope` (the model's, [T, head_dim] each),
        reading only the first `span` slots (all by default); returns the step every layer attends in.

        A span is how rebuild cost follows the real length rather than the capacity: the caller guarantees that
        every filled slot and every slot written lies below it (true of a non-ring buffer filled from slot 0).
        """
        if self.slack and positions.shape[0] > self.max_chunk:
            raise ValueError(f"a forward may write at most {self.max_chunk} tokens to this cache")
        span = self.capacity if span is None or self.is_ring else self.fit_span(span)
        # Of a chunk longer than a ring, only the tail is kept (its head is attended to within the chunk).
        written = positions[-self.capacity :]
        slots = written % self.capacity
        history = self.slot_positions[:span]
        updated = history.index_copy(0, slots, written)
        length = positions.shape[0]
        concat = length > 1 and (self.always_concat or self.is_ring)
        key_positions = torch.cat((history, positions)) if concat else updated
        stored_positions, stored_length = (history, positions[0]) if concat else (updated, positions[-1] + 1)
        mask = attention_mask(positions, key_positions, self.window)
        self.step = Step(positions, positions[0], slots, concat, span, stored_positions, stored_length,
                         key_positions, mask, *rope, self.rotary, self.dtype)
        if self.host_steps:
            # Read on the host for free: streams skip work a step would discard.
            self.step.shared[FIRST_POSITION] = int(positions[0])
        self._updated_slots = updated
        return self.step

    def fit_span(self, span: int) -> int:
        """`span` rounded up to whole quantization groups, at most the capacity."""
        multiple = self.capacity_multiple()
        return min(-(-span // multiple) * multiple, self.capacity)

    def end(self) -> None:
        self.slot_positions[: self.step.span].copy_(self._updated_slots)
        self.step = None
        self._updated_slots = None

    def reset(self) -> None:
        self.slot_positions.fill_(EMPTY_SLOT)
        for layer in self.layers:
            layer.reset()

    def decode_path(self) -> str:
        """How the last decode step attended: the same path ("torch", "triton", "cpu") in every layer, else "mixed"."""
        paths = {layer.decode_path for layer in self.layers}
        return paths.pop() if len(paths) == 1 else "mixed"

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache holds (its actual memory)."""
        return [self.slot_positions] + [t for layer in self.layers for t in layer.tensors()]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def layer_nbytes(self) -> list[int]:
        return [sum(t.nbytes for t in layer.tensors()) for layer in self.layers]

    # --- what the method declares about itself: read by `accounting`, `plan`, `ppl` and `bench`, which never name it

    @classmethod
    def layer_bits_per_element(cls, spec: CacheSpec, config: ModelConfig, index: int, dtype: torch.dtype) -> float:
        """Stored bits per K/V-equivalent element of layer `index`: codes, scales and zeros, not the residual."""
        raise NotImplementedError

    @classmethod
    def residual_elements(cls, spec: CacheSpec, config: ModelConfig, index: int) -> int:
        """Full-precision elements (in the model dtype) that layer `index` holds per sequence beyond its codes."""
        return 0

    @classmethod
    def rebuild_flops_per_token(cls, spec: CacheSpec, config: ModelConfig, index: int) -> float:
        """Matrix flops a decode query spends per cached token of layer `index` rebuilding K and V from what is
        stored: none for methods that store K and V (dequantizing is elementwise)."""
        return 0.0

    @classmethod
    def code_bits(cls, spec: CacheSpec, config: ModelConfig) -> float | None:
        """[Y]'s "equivalent bits" of a KV method: code bits per K/V element over all layers, scales and zeros not
        counted; None for methods that do not store K and V."""
        return None

    @classmethod
    def bits_label(cls, spec: CacheSpec, config: ModelConfig) -> str:
        """The bit width tables show: the `bits` option by default."""
        return str(spec.options["bits"])


class LayerCache:
    """One layer's storage; `attend` stores the new tokens and returns attention outputs [B, H, T, head_dim]."""

    def __init__(self, parent: Cache, index: int) -> None:
        self.parent = parent
        self.index = index
        self.projection: KVProjection = parent.projections[index]
        # How the last single-token step attended: "torch", or the kernel a method ran ("triton" on CUDA, "cpu"
        # for the C kernel). Set while the step is traced (also under CUDA-graph capture), so it describes what a
        # replay runs.
        self.decode_path = "torch"

    def note_decode_path(self, step: Step, path: str) -> None:
        if step.positions.shape[0] == 1:
            self.decode_path = path

    def attend(self, step: Step, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Stores the step's new tokens and attends: x [B, T, d] the layer's post-norm input, q [B, H, T, D]
        rotated, k and v [B, Hkv, T, D] not rotated (as the projection gives them)."""
        raise NotImplementedError

    def tensors(self) -> list[Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        for tensor in self.tensors():
            tensor.zero_()


def attention_mask(query_positions: Tensor, key_positions: Tensor, window: int | None) -> Tensor:
    """[T, S] boolean mask: causal over absolute positions, empty slots excluded, sliding window applied."""
    q = query_positions[:, None]
    k = key_positions[None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    return allowed

