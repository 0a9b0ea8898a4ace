"""A checkpoint's tensors (any format's `WeightSource`) -> a Transformer, every tensor checked against the config,
fused and laid out as the model and the device want it."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from .config import ModelConfig
from .errors import WeightsError
from .formats import Checkpoint, WeightSource
from .model import Transformer
from .rope import Rotary

# Buffers some checkpoints carry that are recomputed here rather than loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (config.q_dim, d),
            p + "self_attn.k_proj.weight": (config.kv_dim, d),
            p + "self_attn.v_proj.weight": (config.kv_dim, d),
            p + "self_attn.o_proj.weight": (d, config.q_dim),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


# Checkpoint tensors the model holds as one matrix, their rows stacked in this order: one matmul per layer where the
# checkpoint has three (attention) or two (MLP).
FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
LAYER_NAME = re.compile(r"(model\.layers\.\d+\.)(.+)")


def parameter_sources(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Each model parameter -> the checkpoint tensors whose rows, stacked in this order, make it."""
    fused_of = {part: fused for fused, parts in FUSED.items() for part in parts}
    sources: dict[str, tuple[str, ...]] = {}
    for name in expected_shapes(config):
        match = LAYER_NAME.fullmatch(name)
        if match and match[2] in fused_of:
            prefix, fused = match[1], fused_of[match[2]]
            sources[prefix + fused] = tuple(prefix + part for part in FUSED[fused])
        else:
            sources[name] = (name,)
    return sources


def load_model(
    source: WeightSource, config: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> Transformer:
    """Checks every checkpoint tensor against the config, then builds each parameter once, in its final dtype,
    device and layout; host memory peaks at about the weights plus one source tensor."""
    shapes = expected_shapes(config)
    _check_names(source, config, shapes)
    parameters: dict[str, torch.Tensor] = {}
    # Largest first: the peak is then the largest copy beside its source, or all the weights beside the last
    # (smallest) source, whichever is more; in checkpoint order it could be all the weights beside the largest.
    for name, parts in sorted(parameter_sources(config).items(), key=lambda item: -_numel(item[1], shapes)):
        kept = len(parts) == 1 and not _stored_transposed(config, name, shapes[name], dtype, device)
        view = source.as_stored(name, dtype, device) if kept else None
        parameters[name] = view if view is not None else _filled(
            config, name, parts, shapes, dtype, device, source.copy_into
        )
    return _assemble(config, parameters, device)


def load_checkpoint(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device | str) -> Transformer:
    """`load_model` over the checkpoint's own tensors and config."""
    with checkpoint.weights() as source:
        return load_model(source, checkpoint.config, dtype, device)


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Transformer:
    """Seeded random weights generated directly on the device in the target dtype, for presets and benchmarks."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shapes = expected_shapes(config)

    def generate(name: str, destination: torch.Tensor) -> None:
        if name.endswith("norm.weight"):
            destination.fill_(1)
        else:
            std = 0.02 if "embed" in name or "lm_head" in name else shapes[name][-1] ** -0.5
            destination.copy_(torch.randn(shapes[name], generator=generator, dtype=dtype, device=device) * std)

    # Generated in checkpoint order, so a seed gives the same weights however the model stores them.
    parameters = {
        name: _filled(config, name, parts, shapes, dtype, device, generate)
        for name, parts in parameter_sources(config).items()
    }
    return _assemble(config, parameters, device)


def _stored_transposed(
    config: ModelConfig, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> bool:
    """Whether parameter `name` is kept physically [in, out], a transposed view keeping its logical [out, in] shape.

    A one-token fp32 matmul on the CPU (MKL's GEMV) streams W 1.4-1.8x faster stored [in, out] when W is at least as
    tall as it is wide (q|k|v, o, gate|up, lm_head or the tied embedding); down_proj [d, f] is slower that way, and
    in fp16 (10x slower) or bf16 the checkpoint layout wins. CUDA keeps the checkpoint layout.
    """
    multiplied = name.endswith("_proj.weight") or name == "lm_head.weight" or (
        name == "model.embed_tokens.weight" and config.tie_word_embeddings
    )
    return multiplied and shape[0] >= shape[1] and dtype == torch.float32 and torch.device(device).type == "cpu"


def _filled(
    config: ModelConfig,
    name: str,
    parts: tuple[str, ...],
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device | str,
    fill: Callable[[str, torch.Tensor], None],
) -> torch.Tensor:
    """Parameter `name` allocated once in its storage layout, then `fill`ed part by part (a block of rows each)."""
    rows = [shapes[part][0] for part in parts]
    shape = (sum(rows), *shapes[parts[0]][1:])
    if _stored_transposed(config, name, shape, dtype, device):
        destination = torch.empty(shape[::-1], dtype=dtype, device=device).t()
    else:
        destination = torch.empty(shape, dtype=dtype, device=device)
    for part, block in zip(parts, destination.split(rows)):
        fill(part, block)
    return destination


def _numel(parts: tuple[str, ...], shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shapes[part]) for part in parts)


def _check_names(source: WeightSource, config: ModelConfig, expected: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint's tensor names and shapes are exactly those the config implies."""
    extra: list[str] = []
    for name, info in source.tensors.items():
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if name not in expected:
            extra.append(name)
        elif info.shape != expected[name]:
            raise WeightsError(
                f"{info.file.name}: {name} has shape {list(info.shape)}, the config implies {list(expected[name])}"
            )
    missing = sorted(set(expected) - set(source.tensors))
    if missing:
        raise WeightsError(f"checkpoint lacks {len(missing)} tensor(s) the config needs: {_first(missing)}")
    if extra:
        raise WeightsError(
            f"checkpoint has {len(extra)} tensor(s) the config does not explain: {_first(sorted(extra))}"
        )


def _assemble(config: ModelConfig, parameters: dict[str, torch.Tensor], device: torch.device | str) -> Transformer:
    # Built on the meta device so no throwaway initialization is allocated; the tensors are adopted as they are.
    # RoPE's float32 frequencies are computed on the model's device, outside it.
    rotary = Rotary(config, device)
    with torch.device("meta"):
        model = Transformer(config, rotary)
    model.load_state_dict(parameters, strict=True, assign=True)
    return model.eval()


def _first(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
