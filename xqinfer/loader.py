"""A checkpoint's tensors (any format's `WeightSource`) -> a model of the config's architecture, every tensor checked
against the module, fused and laid out as the model and the device want it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .arch import Architecture, CausalLM, architecture_for
from .backends import Backend, backend_for
from .config import ModelConfig
from .errors import WeightsError
from .formats import Checkpoint, WeightSource
from .rope import Rotary

# Each model parameter -> the checkpoint tensors whose rows, stacked in this order, make it, with their shapes.
Parts = dict[str, dict[str, tuple[int, ...]]]


def checkpoint_parts(config: ModelConfig) -> Parts:
    """What the config's architecture reads from a checkpoint, parameter by parameter (see `Architecture`)."""
    architecture, model = _meta_model(config, "cpu")
    return architecture.checkpoint_parts(model)


def load_model(source: WeightSource, config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    """Checks every checkpoint tensor against the config, then builds each parameter once, in its final dtype,
    device and layout; host memory peaks at about the weights plus one source tensor."""
    architecture, model = _meta_model(config, device)
    parts = architecture.checkpoint_parts(model)
    _check_names(source, architecture, config, _shapes(parts))
    backend = backend_for(device, dtype)
    transposed = backend.stored_transposed(model)
    parameters: dict[str, torch.Tensor] = {}
    # Largest first: the peak is then the largest copy beside its source, or all the weights beside the last
    # (smallest) source, whichever is more; in checkpoint order it could be all the weights beside the largest.
    for name, sources in sorted(parts.items(), key=lambda item: -_numel(item[1])):
        kept = len(sources) == 1 and name not in transposed
        view = source.as_stored(next(iter(sources)), dtype, device) if kept else None
        parameters[name] = view if view is not None else _filled(
            sources, name in transposed, dtype, device, source.copy_into
        )
    return _assemble(model, parameters, backend)


def load_checkpoint(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    """`load_model` over the checkpoint's own tensors and config."""
    with checkpoint.weights() as source:
        return load_model(source, checkpoint.config, dtype, device)


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> CausalLM:
    """Seeded random weights generated directly on the device in the target dtype, for presets and benchmarks."""
    generator = torch.Generator(device=device).manual_seed(seed)
    architecture, model = _meta_model(config, device)
    parts = architecture.checkpoint_parts(model)
    shapes = _shapes(parts)
    backend = backend_for(device, dtype)
    transposed = backend.stored_transposed(model)

    def generate(name: str, destination: torch.Tensor) -> None:
        if name.endswith("norm.weight"):
            destination.fill_(1)
        else:
            std = 0.02 if "embed" in name or "lm_head" in name else shapes[name][-1] ** -0.5
            destination.copy_(torch.randn(shapes[name], generator=generator, dtype=dtype, device=device) * std)

    # Generated part by part in the module's order, so a seed gives the same weights however the model stores them.
    parameters = {
        name: _filled(sources, name in transposed, dtype, device, generate) for name, sources in parts.items()
    }
    return _assemble(model, parameters, backend)


def _meta_model(config: ModelConfig, device: torch.device | str) -> tuple[Architecture, nn.Module]:
    # Built on the meta device so no throwaway initialization is allocated; the loaded tensors are adopted as they
    # are. RoPE's float32 frequencies are computed on the model's device, outside it.
    architecture = architecture_for(config)
    rotary = Rotary(config, device)
    with torch.device("meta"):
        model = architecture.build(config, rotary)
    return architecture, model


def _filled(
    sources: dict[str, tuple[int, ...]],
    transposed: bool,
    dtype: torch.dtype,
    device: torch.device | str,
    fill: Callable[[str, torch.Tensor], None],
) -> torch.Tensor:
    """A parameter allocated once in its storage layout, then `fill`ed part by part (a block of rows each)."""
    rows = [shape[0] for shape in sources.values()]
    shape = (sum(rows), *next(iter(sources.values()))[1:])
    if transposed:
        destination = torch.empty(shape[::-1], dtype=dtype, device=device).t()
    else:
        destination = torch.empty(shape, dtype=dtype, device=device)
    for part, block in zip(sources, destination.split(rows)):
        fill(part, block)
    return destination


def _shapes(parts: Parts) -> dict[str, tuple[int, ...]]:
    return {name: shape for sources in parts.values() for name, shape in sources.items()}


def _numel(sources: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in sources.values())


def _check_names(
    source: WeightSource, architecture: Architecture, config: ModelConfig, expected: dict[str, tuple[int, ...]]
) -> None:
    """The checkpoint's tensor names and shapes are exactly those the model built from the config has."""
    extra: list[str] = []
    for name, info in source.tensors.items():
        if architecture.ignores(name, config):
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


def _assemble(model: nn.Module, parameters: dict[str, torch.Tensor], backend: Backend) -> CausalLM:
    model.load_state_dict(parameters, strict=True, assign=True)
    backend.prepare(model)
    return model.eval()


def _first(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
