"""Model id or directory -> files; safetensors shards -> a Transformer, every tensor checked against the config."""

from __future__ import annotations

import json
import os
import struct
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


def load_model(
    directory: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> Transformer:
    """Builds the model without allocating, then fills it shard by shard, each tensor cast once on its way in."""
    expected = expected_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    extra: list[str] = []
    for path in weight_files(directory):
        _check_header(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for name in shard.keys():
                    if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
                        continue
                    if name not in expected:
                        extra.append(name)
                        continue
                    shape = tuple(shard.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise WeightsError(f"{path.name}: {name} has shape {list(shape)}, the config implies {list(expected[name])}")
                    tensors[name] = shard.get_tensor(name).to(device=device, dtype=dtype)
        except SafetensorError as exc:
            raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise WeightsError(f"checkpoint lacks {len(missing)} tensor(s) the config needs: {_first(missing)}")
    if extra:
        raise WeightsError(f"checkpoint has {len(extra)} tensor(s) the config does not explain: {_first(sorted(extra))}")
    return _assemble(config, tensors, device)


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Transformer:
    """Seeded random weights generated directly on the device in the target dtype, for presets and benchmarks."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            std = 0.02 if "embed" in name or "lm_head" in name else shape[-1] ** -0.5
            tensors[name] = torch.randn(shape, generator=generator, dtype=dtype, device=device) * std
    return _assemble(config, tensors, device)


def _assemble(config: ModelConfig, tensors: dict[str, torch.Tensor], device: torch.device | str) -> Transformer:
    # Built on the meta device so no throwaway initialization is allocated; the tensors are adopted as they are.
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(tensors, strict=True, assign=True)
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
