"""Checkpoint formats: what a model path holds, behind one interface the loader and the API read.

A `Checkpoint` gives the architecture (`config`), the tokenizer, the generation defaults and a `WeightSource`: the
checkpoint's tensors under their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`), each copied into a
tensor the loader allocated. Neither the model, the caches nor the commands know which format a model came in;
adding one is a module here with a `Checkpoint` and a `WeightSource`, and a line in `open_checkpoint`.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class TensorInfo:
    """One checkpoint tensor: its logical shape ([out, in] for a weight) and the file that holds it."""

    shape: tuple[int, ...]
    file: Path


class WeightSource(Protocol):
    """A checkpoint's tensors by Hugging Face name; open only inside `Checkpoint.weights()`."""

    tensors: dict[str, TensorInfo]

    def as_stored(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
        """The tensor as the file stores it, without a copy, or None where that would need a cast or a move."""

    def copy_into(self, name: str, destination: torch.Tensor) -> None:
        """Writes the tensor into `destination` (its logical shape), converting to its dtype and device."""


class Checkpoint(Protocol):
    path: Path
    config: ModelConfig

    def weights(self) -> AbstractContextManager[WeightSource]:
        """The tensors, open for the duration of a `with` block."""

    def tokenizer(self) -> Tokenizer: ...

    def generation_defaults(self, tokenizer: Tokenizer) -> tuple[SamplingParams, tuple[int, ...]]:
        """Sampling defaults and every id that ends a reply."""


def open_checkpoint(model: str | os.PathLike) -> Checkpoint:
    """A `.gguf` file, a directory holding a Hugging Face checkpoint or exactly one `.gguf`, or a hub id."""
    from .gguf import GGUFCheckpoint
    from .safetensors import HFCheckpoint, download

    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors" or path.name == "config.json":
            raise ConfigError(f"{model} is a file of a Hugging Face checkpoint: pass the directory that holds it")
        return GGUFCheckpoint(path)  # the one format that is a single file; it refuses anything else
    if path.is_dir():
        if (path / "config.json").is_file():
            return HFCheckpoint(path)
        ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(ggufs) == 1:
            return GGUFCheckpoint(ggufs[0])
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise ConfigError(f"{path} holds {len(ggufs)} GGUF files ({names}); pass the one to load")
        raise ConfigError(f"{path} holds neither a config.json (a Hugging Face checkpoint) nor a .gguf file")
    text = str(model)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ConfigError(f"model {model} does not exist (a directory, a .gguf file or a Hugging Face hub id)")
    return HFCheckpoint(download(text))

