"""Hugging Face checkpoints: a directory with config.json, safetensors shards, tokenizer.json and
generation_config.json, local or fetched from the hub."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..errors import ConfigError, WeightsError
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from . import TensorInfo

HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class HFCheckpoint:
    def __init__(self, directory: Path) -> None:
        self.path = directory
        self.config = ModelConfig.from_file(directory / "config.json")

    @contextlib.contextmanager
    def weights(self) -> Iterator[SafetensorsSource]:
        with SafetensorsSource(weight_files(self.path)) as source:
            yield source

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_dir(self.path)

    def generation_defaults(self, tokenizer: Tokenizer) -> tuple[SamplingParams, tuple[int, ...]]:
        path = self.path / "generation_config.json"
        data: dict = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        eos = data.get("eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        eos_ids = tuple(dict.fromkeys(eos_ids + self.config.eos_token_ids + tokenizer.eos_ids))
        # transformers samples only when do_sample is true; its temperature/top_k/top_p then apply, top_k
        # defaulting to 50 as in its GenerationConfig.
        sampling = SamplingParams(
            temperature=float(data.get("temperature", 1.0)) if data.get("do_sample") else 0.0,
            top_k=int(data.get("top_k", 50) or 0) if data.get("do_sample") else 0,
            top_p=float(data.get("top_p", 1.0) or 1.0),
            min_p=float(data.get("min_p", 0.0) or 0.0),
            repetition_penalty=float(data.get("repetition_penalty", 1.0) or 1.0),
        )
        return sampling, eos_ids


def download(repo_id: str) -> Path:
    """A hub id fetched (only the files xqinfer reads) into the local Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise ConfigError(f"{repo_id} is not in the local Hugging Face cache and {where}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{repo_id}: no such model on the Hugging Face hub (or it is gated: log in first)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ConfigError(f"could not fetch {repo_id}: {str(exc).splitlines()[0]}") from None


def weight_files(directory: Path) -> list[Path]:
    """The safetensors shards of a model directory, from the index when there is one."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"{index} is malformed: {exc}") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{directory} holds only pickled weights ({', '.join(pickles)}); xqinfer loads safetensors only, because "
            "unpickling can run arbitrary code. Convert them first (e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise WeightsError(f"no *.safetensors weights in {directory}")


class SafetensorsSource:
    """Reads shards so that loading costs about the weights' size in host memory, not twice that.

    safetensors maps the whole file once per handle, and the pages a read touched stay resident until that handle
    is closed and no tensor references the mapping. So a tensor used as stored is a zero-copy view from one handle
    per shard, held open for the model's lifetime through its views, while a tensor that is copied (cast, moved,
    re-laid or fused) is read through a handle of its own, closed right after the copy: its source leaves the
    resident set before the next one is read.
    """

    def __init__(self, files: list[Path]) -> None:
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            _check_header(path)
            with _reading(path), safe_open(str(path), framework="pt", device="cpu") as shard:
                for name in shard.keys():
                    stored = shard.get_slice(name)
                    _check_float(path, name, stored.get_dtype())
                    self.tensors[name] = TensorInfo(tuple(stored.get_shape()), path)
        self.view_handles: dict[Path, safe_open] = {}
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stack.close()  # the views already handed out keep their mapping alive

    def as_stored(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
        if torch.device(device).type != "cpu":
            return None
        path = self.tensors[name].file
        with _reading(path):
            if path not in self.view_handles:
                self.view_handles[path] = self.stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            view = self.view_handles[path].get_tensor(name)
        return view if view.dtype == dtype else None

    def copy_into(self, name: str, destination: torch.Tensor) -> None:
        path = self.tensors[name].file
        with _reading(path), safe_open(str(path), framework="pt", device="cpu") as handle:
            destination.copy_(handle.get_tensor(name))


# What a weight may be stored as: cast to the run dtype, these are the same numbers. Integer or 8-bit float tensors
# are the codes of a quantization scheme (bitsandbytes, GPTQ, FP8 with scales) whose dequantization is elsewhere:
# cast as they are, they would load as garbage.
FLOAT_TYPES = ("F64", "F32", "F16", "BF16")


def _check_float(path: Path, name: str, stored: str) -> None:
    if stored not in FLOAT_TYPES:
        raise WeightsError(f"{path.name}: {name} is stored as {stored}; xqinfer reads float weights "
                           f"({', '.join(FLOAT_TYPES)}) only, not quantized checkpoints: use the original float "
                           "model or a GGUF file")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except SafetensorError as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None


def _check_header(path: Path) -> None:
    # safetensors reports a truncated file obscurely; comparing the header's declared extent with the file size
    # gives the user a message that says what happened.
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_len = struct.unpack("<Q", handle.read(8))[0]
            if header_len > size - 8:
                raise WeightsError(f"{path} is truncated or not a safetensors file (header extends past the end)")
            header = json.loads(handle.read(header_len))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{path} is not a safetensors file (unreadable header)") from None
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise WeightsError(f"{path} is truncated: {size} bytes on disk, its header describes {8 + header_len + end}")
