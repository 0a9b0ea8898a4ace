"""GGUF files (llama.cpp's format), read through llama.cpp's own `gguf` package: the architecture from the metadata,
every tensor type that package can dequantize, the tokenizer and chat template rebuilt from the vocabulary.

Tensors are dequantized once, at load, into the run dtype. Each is read with a plain file read rather than through
the reader's memory map, so the file's pages never count as the process's memory: loading peaks at about the
dequantized weights plus one tensor in float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ConfigError, WeightsError
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from . import TensorInfo

# The one architecture this model implements; Llama 1-3, Mistral and SmolLM exports all use it.
ARCHITECTURE = "llama"

# GGUF tensor name -> Hugging Face name; `{}` is the layer index.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
# llama.cpp's converter interleaves the rows of Wq and Wk for its RoPE; the model here rotates halves (HF layout).
PERMUTED = {"self_attn.q_proj.weight": "num_heads", "self_attn.k_proj.weight": "num_kv_heads"}
# Sampling setting -> (its GGUF key, what llama.cpp samples with when the file names nothing, common/common.h), so
# the same file gives the same text in both.
SAMPLING = {
    "temperature": ("general.sampling.temp", 0.8),
    "top_k": ("general.sampling.top_k", 40),
    "top_p": ("general.sampling.top_p", 0.95),
    "min_p": ("general.sampling.min_p", 0.05),
    "repetition_penalty": ("general.sampling.penalty_repeat", 1.0),
}


class GGUFCheckpoint:
    def __init__(self, path: Path) -> None:
        self.path = path
        reader = _open(path)
        self.metadata = _metadata(reader)
        self.tensors = _tensor_table(reader, path)
        del reader  # the metadata is copied out: nothing keeps the mapping
        self.config = ModelConfig.from_dict(config_dict(self.metadata, self.tensors, path), origin=str(path))

    @contextlib.contextmanager
    def weights(self) -> Iterator[GGUFSource]:
        with self.path.open("rb") as handle:
            yield GGUFSource(self.config, self.tensors, handle, self.path)

    def tokenizer(self) -> Tokenizer:
        from .gguf_vocab import tokenizer_from_gguf

        return tokenizer_from_gguf(self.metadata, origin=str(self.path))

    def generation_defaults(self, tokenizer: Tokenizer) -> tuple[SamplingParams, tuple[int, ...]]:
        ends = [self.metadata.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")]
        eos_ids = tuple(dict.fromkeys([int(i) for i in ends if isinstance(i, int)] + list(tokenizer.eos_ids)))
        try:
            sampling = {name: type(default)(self.metadata.get(key, default))
                        for name, (key, default) in SAMPLING.items()}
            return SamplingParams(**sampling), eos_ids
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.path}: sampling defaults in the metadata are not valid ({exc})") from None


class _GGUFTensor:
    """Where one tensor's bytes lie, its type and its [out, in] shape (GGUF lists dimensions innermost first)."""

    def __init__(self, gguf_name: str, kind: Any, dims: tuple[int, ...], offset: int, nbytes: int) -> None:
        self.gguf_name, self.kind, self.offset, self.nbytes = gguf_name, kind, offset, nbytes
        self.shape = tuple(reversed(dims))


class GGUFSource:
    """The file's tensors under Hugging Face names, dequantized into the tensors the loader allocates."""

    def __init__(self, config: ModelConfig, tensors: dict[str, _GGUFTensor], handle, path: Path) -> None:
        self.config, self.entries, self.handle = config, tensors, handle
        self.tensors = {name: TensorInfo(entry.shape, path) for name, entry in tensors.items()}

    def as_stored(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
        return None  # every tensor is converted: the file keeps llama.cpp's layout and block formats

    def copy_into(self, name: str, destination: torch.Tensor) -> None:
        import gguf

        entry = self.entries[name]
        raw = np.empty(entry.nbytes, dtype=np.uint8)
        self.handle.seek(entry.offset)
        if self.handle.readinto(raw) != entry.nbytes:
            raise WeightsError(f"{self.handle.name}: tensor {entry.gguf_name} could not be read whole")
        rows = math.prod(entry.shape[:-1])
        values = torch.from_numpy(gguf.quants.dequantize(raw.reshape(rows, -1), entry.kind)).view(entry.shape)
        layer_part = name.split(".", 3)[-1]
        if layer_part in PERMUTED:
            values = _unpermute(values, getattr(self.config, PERMUTED[layer_part]))
        destination.copy_(values)


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undoes llama.cpp's row order (each head's rotary pairs interleaved) back to rotate-half."""
    out, width = weight.shape
    return weight.view(heads, out // heads // 2, 2, width).transpose(1, 2).reshape(out, width)


def config_dict(metadata: dict[str, Any], tensors: dict[str, _GGUFTensor], path: Path) -> dict[str, Any]:
    """The metadata as a Hugging Face config.json, so one set of checks (config.py) covers both formats."""
    arch = metadata.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (xqinfer runs {ARCHITECTURE!r}: "
                          "Llama 1-3, Mistral and SmolLM exports)")

    def get(key: str, default: Any = ...) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is ...:
            raise ConfigError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    if "rope_freqs.weight" in tensors:
        raise ConfigError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, as Llama 3.1+ exports carry) are "
                          "not supported yet; load the Hugging Face checkpoint of this model instead")
    if get("expert_count", 0):
        raise ConfigError(f"{path}: mixture-of-experts models ({arch}.expert_count={get('expert_count')}) "
                          "are not supported")
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", None)
    rotary = get("rope.dimension_count", None)
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        head_dim = head_dim or hidden // heads
        if rotary is not None and rotary != head_dim:
            raise ConfigError(f"{path}: rotary embeddings over {rotary} of {head_dim} head dimensions "
                              "(partial RoPE) are not supported")
    tokens = metadata.get("tokenizer.ggml.tokens")
    window = get("attention.sliding_window", None)
    data: dict[str, Any] = {
        "architectures": ["MistralForCausalLM" if window else "LlamaForCausalLM"],
        "vocab_size": get("vocab_size", len(tokens) if isinstance(tokens, list) else ...),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        "sliding_window": window,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "rope_scaling": _rope_scaling(get),
    }
    return data


def _rope_scaling(get) -> dict[str, Any] | None:
    kind = get("rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling = {"rope_type": kind}
    factor = get("rope.scaling.factor", None)
    if factor is not None:
        scaling["factor"] = factor
    original = get("rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling  # config.py accepts the kinds it runs and names the others


def read_metadata(path: Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value as Python data (str, int, float, bool, lists)."""
    return _metadata(_open(path))


def _metadata(reader) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items()}


def _open(path: Path):
    """The file's reader; errors say whether it is no GGUF, a truncated one, or one this `gguf` cannot read."""
    import gguf

    class Reader(gguf.GGUFReader):
        # np.memmap's bookkeeping on every slice is most of the reader's time on a 49k-token vocabulary (3.8 s ->
        # 1.7 s for SmolLM2): a plain array over the same mapping reads the same bytes.
        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._data = mapped.view(np.ndarray)

    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise WeightsError(f"{path} is not a GGUF file (pass a .gguf file or a model directory)")
    try:
        return Reader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path} is truncated or corrupt: the gguf package cannot read it ({exc})") from None


def _tensor_table(reader, path: Path) -> dict[str, _GGUFTensor]:
    """Hugging Face name -> tensor, once every tensor is known, whole in the file, and of a type `gguf` reads."""
    import gguf

    size = path.stat().st_size
    tensors: dict[str, _GGUFTensor] = {}
    readable: dict[Any, bool] = {}
    for tensor in reader.tensors:
        entry = _GGUFTensor(tensor.name, tensor.tensor_type, tuple(int(d) for d in tensor.shape),
                            int(tensor.data_offset), int(tensor.n_bytes))
        if entry.offset + entry.nbytes > size:
            raise WeightsError(f"{path} is truncated: tensor {tensor.name} extends past the end of the file")
        if entry.kind not in readable:
            readable[entry.kind] = _dequantizable(gguf, entry.kind)
        if not readable[entry.kind]:
            raise WeightsError(f"{path}: tensor {tensor.name} is of type {entry.kind.name}, which the installed "
                               f"gguf {_version()} cannot dequantize")
        tensors[_hf_name(tensor.name)] = entry
    return tensors


def _hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor; names it does not know pass through (the loader refuses them)."""
    if gguf_name in TENSOR_NAMES:
        return TENSOR_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, part = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and f"blk.{{}}.{part}" in TENSOR_NAMES:
        return TENSOR_NAMES[f"blk.{{}}.{part}"].format(layer)
    return gguf_name


def _dequantizable(gguf, kind) -> bool:
    try:
        _, type_size = gguf.GGML_QUANT_SIZES[kind]
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), kind)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "package"
