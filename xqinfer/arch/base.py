"""What an architecture declares: the module it builds, and how a checkpoint's tensors become that module's parameters.

Checkpoint tensor names are the module's parameter names, except where the module fuses several checkpoint
projections into one matrix (`Fusion`); buffers some checkpoints carry are ignored, and so is the copy of the output
matrix that some tied-embedding checkpoints keep. Shapes are never written down: they are read from the module,
built on the meta device, where building it costs no memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import KVProjection
from ..config import ModelConfig
from ..rope import Rotary


class CausalLM(Protocol):
    """What the engine, the caches and the commands use of a model, whatever its architecture."""

    config: ModelConfig
    rotary: Rotary

    @property
    def layers(self) -> nn.ModuleList: ...

    def output_weight(self) -> Tensor: ...

    def kv_projections(self) -> list[KVProjection]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def __call__(
        self, tokens: Tensor, positions: Tensor, cache, last_only: bool = False, span: int | None = None
    ) -> Tensor: ...


@dataclass(frozen=True)
class Fusion:
    """One module holding several checkpoint projections as one matrix, their rows stacked in order."""

    parts: tuple[str, ...]  # the checkpoint's modules, siblings of the fused one, in row order
    sizes: str  # the attribute of the owning module giving each part's rows (what its forward splits by)


@dataclass(frozen=True)
class Architecture:
    build: Callable[[ModelConfig, Rotary], nn.Module]
    fusions: Mapping[str, Fusion] = field(default_factory=dict)  # keyed by the fused module's name
    ignored_suffixes: tuple[str, ...] = ()
    tied_output: str | None = None  # the output matrix's name, redundant in a checkpoint with tied embeddings

    def ignores(self, name: str, config: ModelConfig) -> bool:
        """Whether checkpoint tensor `name` is recomputed or redundant rather than loaded."""
        return name.endswith(self.ignored_suffixes) or (config.tie_word_embeddings and name == self.tied_output)

    def checkpoint_parts(self, model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
        """Each parameter of `model` -> the checkpoint tensors whose rows, stacked in this order, make it, with their
        shapes; in the module's parameter order."""
        parts: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, parameter in model.named_parameters():
            module_path, _, leaf = name.rpartition(".")
            owner_path, _, module_name = module_path.rpartition(".")
            fusion = self.fusions.get(module_name)
            if fusion is None:
                parts[name] = {name: tuple(parameter.shape)}
                continue
            rows = getattr(model.get_submodule(owner_path), fusion.sizes)
            prefix = owner_path + "." if owner_path else ""
            parts[name] = {
                f"{prefix}{part}.{leaf}": (size, *parameter.shape[1:])
                for part, size in zip(fusion.parts, rows, strict=True)
            }
        return parts


class Embedding(nn.Embedding):
    """A token embedding that can double as the output matrix (tied embeddings)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        # Given its (empty) weight, it skips its random init: on the meta device, where models are built, that init
        # alone would load torch's meta kernels (~2.5 s, once per process).
        super().__init__(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))

    def as_linear(self, x: Tensor) -> Tensor:
        """x [..., dim] -> logits [..., num_embeddings]."""
        return F.linear(x, self.weight)
