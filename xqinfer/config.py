"""ModelConfig: the architecture, read straight from a Hugging Face config.json (or a preset in the same form)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

# The config.json architectures xqinfer runs, each with its model_type: the key of its module in `xqinfer.arch`.
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
ROPE_KINDS = ("default", "linear", "dynamic", "llama3")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
SHORT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    """The name --dtype takes for a dtype: fp32, fp16, bf16."""
    return SHORT_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched beyond the trained context."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str = "float32"
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_type(self) -> str:
        return MODEL_TYPES[self.architecture]

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    @property
    def num_parameters(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attention = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        per_layer = attention + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(data, origin=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> ModelConfig:
        architectures = data.get("architectures") or []
        architecture = architectures[0] if architectures else _architecture_from_model_type(data.get("model_type"))
        if architecture not in MODEL_TYPES:
            raise ConfigError(
                f"{origin}: architecture {architecture!r} is not supported "
                f"(xqinfer runs {', '.join(MODEL_TYPES)})"
            )
        _refuse_unsupported_features(data, origin)
        try:
            hidden = _positive_int(data, "hidden_size", origin)
            heads = _positive_int(data, "num_attention_heads", origin)
            kv_heads = _positive_int(data, "num_key_value_heads", origin, default=heads)
            head_dim = _positive_int(data, "head_dim", origin, default=None)
            if head_dim is None:
                if hidden % heads:
                    raise ConfigError(f"{origin}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
                head_dim = hidden // heads
            if heads % kv_heads:
                raise ConfigError(f"{origin}: num_attention_heads {heads} is not a multiple of "
                                  f"num_key_value_heads {kv_heads}")
            if head_dim % 2:
                raise ConfigError(f"{origin}: head_dim {head_dim} must be even for rotary embeddings")
            max_positions = _positive_int(data, "max_position_embeddings", origin, default=2048)
            # Only Mistral's attention reads sliding_window; Llama configs that carry one ignore it, as transformers
            # does.
            sliding_window = data.get("sliding_window") if architecture == "MistralForCausalLM" else None
            if sliding_window is not None:
                sliding_window = _positive_int(data, "sliding_window", origin)
                if sliding_window >= max_positions:
                    sliding_window = None
            eos = data.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            rope_theta, rope_scaling = _rope(data, origin)
            return cls(
                architecture=architecture,
                vocab_size=_positive_int(data, "vocab_size", origin),
                hidden_size=hidden,
                intermediate_size=_positive_int(data, "intermediate_size", origin),
                num_layers=_positive_int(data, "num_hidden_layers", origin),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=max_positions,
                sliding_window=sliding_window,
                tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
                bos_token_id=data.get("bos_token_id"),
                eos_token_ids=tuple(int(i) for i in eos_ids),
                dtype=str(data.get("torch_dtype") or data.get("dtype") or "float32"),
                source=dict(data),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: malformed value ({exc})") from None


def torch_dtype(name: str) -> torch.dtype:
    """Maps a user or config dtype name (bf16, float16, ...) to a torch dtype."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r} (accepted: bf16, fp16, fp32)") from None


def _architecture_from_model_type(model_type: Any) -> str | None:
    return next((architecture for architecture, known in MODEL_TYPES.items() if known == model_type), None)


def _refuse_unsupported_features(data: dict[str, Any], origin: str) -> None:
    refusals = {
        "attention_bias": "biases on q/k/v/o projections",
        "mlp_bias": "biases on MLP projections",
    }
    for key, what in refusals.items():
        if data.get(key):
            raise ConfigError(f"{origin}: {what} ({key}=true) are not supported")
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if data.get(key):
            raise ConfigError(f"{origin}: mixture-of-experts models ({key}={data[key]}) are not supported")
    act = data.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{origin}: activation {act!r} is not supported (xqinfer runs SwiGLU with silu)")
    if data.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{origin}: pretraining_tp={data['pretraining_tp']} is not supported")


def _positive_int(data: dict[str, Any], key: str, origin: str, default: Any = ...) -> Any:
    if key not in data or data[key] is None:
        if default is ...:
            raise ConfigError(f"{origin}: missing required field {key!r}")
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{origin}: {key} must be a positive integer, got {value!r}")
    return value


def _rope(data: dict[str, Any], origin: str) -> tuple[float, RopeScaling]:
    # transformers 5 moved rope settings into `rope_parameters` (theta included); older configs use
    # `rope_theta` plus an optional `rope_scaling` dict.
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{origin}: rope_scaling must be an object or null")
    theta = float(params.get("rope_theta", data.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise ConfigError(f"{origin}: RoPE scaling {kind!r} is not supported (accepted: {', '.join(ROPE_KINDS)})")
    if kind == "default":
        return theta, RopeScaling()
    if "factor" not in params:
        raise ConfigError(f"{origin}: RoPE scaling {kind!r} needs a 'factor'")
    original = params.get("original_max_position_embeddings")
    if kind == "llama3" and original is None:
        raise ConfigError(f"{origin}: llama3 RoPE scaling needs 'original_max_position_embeddings'")
    return theta, RopeScaling(
        kind=kind,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original) if original is not None else None,
    )
