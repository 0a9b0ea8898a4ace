"""Model id or directory -> files; safetensors shards -> a Transformer, every tensor checked against the config,
fused and laid out as the model and the device want it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .errors import ConfigError, WeightsError
from .model import Transformer
from .rope import Rotary

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
# Buffers some checkpoints carry that are recomputed here rather than loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve(model: str | os.PathLike) -> Path:
    """A local directory as is, else a Hugging Face hub id fetched (only the files xqinfer reads) into the cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{model} is a file; pass the model directory that holds config.json")
    text = str(model)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ConfigError(f"model directory {model} does not exist")
    return _download(text)


def _download(repo_id: str) -> Path:
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
    directory: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> Transformer:
    """Checks every checkpoint tensor against the config, then builds each parameter once, in its final dtype,
    device and layout; host memory peaks at about the weights plus one source tensor (see `_Shards`)."""
    shapes = expected_shapes(config)
    with _Shards(_locate(directory, config, shapes)) as shards:
        parameters: dict[str, torch.Tensor] = {}
        # Largest first: the peak is then the largest copy beside its source, or all the weights beside the last
        # (smallest) source, whichever is more; in checkpoint order it could be all the weights beside the largest.
        for name, parts in sorted(parameter_sources(config).items(), key=lambda item: -_numel(item[1], shapes)):
            kept = len(parts) == 1 and not _stored_transposed(config, name, shapes[name], dtype, device)
            view = shards.as_stored(name, dtype, device) if kept else None
            parameters[name] = view if view is not None else _filled(
                config, name, parts, shapes, dtype, device, shards.copy_into
            )
    return _assemble(config, parameters, device)


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


def _locate(directory: Path, config: ModelConfig, expected: dict[str, tuple[int, ...]]) -> dict[str, Path]:
    """Checkpoint tensor name -> its shard, once the names and shapes are exactly those the config implies. Reads
    the headers only."""
    located: dict[str, Path] = {}
    extra: list[str] = []
    for path in weight_files(directory):
        _check_header(path)
        with _reading(path), safe_open(str(path), framework="pt", device="cpu") as shard:
            for name in shard.keys():
                if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                if name not in expected:
                    extra.append(name)
                    continue
                shape = tuple(shard.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise WeightsError(
                        f"{path.name}: {name} has shape {list(shape)}, the config implies {list(expected[name])}"
                    )
                located[name] = path
    missing = sorted(set(expected) - set(located))
    if missing:
        raise WeightsError(f"checkpoint lacks {len(missing)} tensor(s) the config needs: {_first(missing)}")
    if extra:
        raise WeightsError(
            f"checkpoint has {len(extra)} tensor(s) the config does not explain: {_first(sorted(extra))}"
        )
    return located


class _Shards:
    """Reads checkpoint tensors so that loading costs about the weights' size in host memory, not twice that.

    safetensors maps the whole file once per handle, and the pages a read touched stay resident until that handle
    is closed and no tensor references the mapping. So a tensor used as stored is a zero-copy view from one handle
    per shard, held open for the model's lifetime through its views, while a tensor that is copied (cast, moved,
    re-laid or fused) is read through a handle of its own, closed right after the copy: its source leaves the
    resident set before the next one is read.
    """

    def __init__(self, located: dict[str, Path]) -> None:
        self.located = located
        self.view_handles: dict[Path, safe_open] = {}
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stack.close()  # the views already handed out keep their mapping alive

    def as_stored(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
        """Checkpoint tensor `name` as a view of its shard's mapping (nothing is read until it is used), or None
        where it would need a cast or a move."""
        if torch.device(device).type != "cpu":
            return None
        path = self.located[name]
        with _reading(path):
            if path not in self.view_handles:
                self.view_handles[path] = self.stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            view = self.view_handles[path].get_tensor(name)
        return view if view.dtype == dtype else None

    def copy_into(self, name: str, destination: torch.Tensor) -> None:
        """Copies checkpoint tensor `name` into `destination`, casting and moving it as `copy_` does."""
        path = self.located[name]
        with _reading(path), safe_open(str(path), framework="pt", device="cpu") as handle:
            destination.copy_(handle.get_tensor(name))


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except SafetensorError as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None


def _assemble(config: ModelConfig, parameters: dict[str, torch.Tensor], device: torch.device | str) -> Transformer:
    # Built on the meta device so no throwaway initialization is allocated; the tensors are adopted as they are.
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(parameters, strict=True, assign=True)
    model.rotary = Rotary(config, device)
    return model.eval()


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


def _first(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
