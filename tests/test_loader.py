"""Config refusals and checkpoint errors say what is wrong; odd but valid checkpoints load; loading costs ~1x the
weights in host memory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xqinfer.arch import ARCHITECTURES, architecture_for, llama
from xqinfer.config import MODEL_TYPES, ModelConfig
from xqinfer.errors import ConfigError, WeightsError
from xqinfer.formats import open_checkpoint
from xqinfer.loader import checkpoint_parts, load_checkpoint, random_model
from xqinfer.presets import preset_config, preset_names

from conftest import TINY_CONFIG

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread")


def _config(**changes) -> dict:
    data = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY_CONFIG}
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def _write_config(directory: Path, data) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _load(directory: Path):
    return load_checkpoint(open_checkpoint(directory), torch.float32, "cpu")


def _rewrite_weights(directory: Path, edit) -> None:
    """Applies edit(dict of tensors) to model.safetensors in place."""
    path = directory / "model.safetensors"
    # Cloned: the loaded tensors may be views of the file's mapping, which is about to be rewritten.
    tensors = {name: tensor.clone() for name, tensor in load_file(str(path)).items()}
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("changes, expected", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, ["GPT2LMHeadModel", "not supported"]),
    ({"architectures": ..., "model_type": "qwen2"}, ["None", "not supported", "LlamaForCausalLM"]),
    ({"attention_bias": True}, ["attention_bias", "not supported"]),
    ({"mlp_bias": True}, ["mlp_bias", "not supported"]),
    ({"num_local_experts": 8}, ["mixture-of-experts", "num_local_experts"]),
    ({"n_routed_experts": 64}, ["mixture-of-experts", "n_routed_experts"]),
    ({"hidden_size": ...}, ["missing", "hidden_size"]),
    ({"vocab_size": ...}, ["missing", "vocab_size"]),
    ({"hidden_size": "64"}, ["hidden_size", "positive integer"]),
    ({"num_attention_heads": 0}, ["num_attention_heads", "positive integer"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads", "multiple"]),
    ({"hidden_act": "gelu"}, ["gelu", "not supported"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["yarn", "not supported"]),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, ["longrope", "not supported"]),
    ({"rope_scaling": {"rope_type": "linear"}}, ["linear", "factor"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["llama3", "original_max_position_embeddings"]),
    ({"rope_scaling": "linear"}, ["rope_scaling", "object"]),
], ids=["unknown-arch", "unknown-model-type", "attention-bias", "mlp-bias", "moe-mixtral", "moe-deepseek",
        "missing-hidden", "missing-vocab", "string-int", "zero-heads", "bad-gqa", "gelu", "rope-yarn",
        "rope-longrope", "rope-no-factor", "llama3-no-original", "rope-not-object"])
def test_config_refusals_name_the_problem(tmp_path, changes, expected):
    path = _write_config(tmp_path, _config(**changes))
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_file(path)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert str(path) in message  # says which file


def test_config_malformed_json(tmp_path):
    path = _write_config(tmp_path, '{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(path)


def test_config_not_an_object(tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_file(_write_config(tmp_path, "[1, 2]"))


def test_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path / "config.json")


def test_config_reads_what_transformers_writes(make_hf_model):
    hf, directory = make_hf_model("mistral", num_key_value_heads=2, head_dim=32, sliding_window=16,
                                  max_position_embeddings=256,
                                  rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=5e5)
    config = ModelConfig.from_file(directory / "config.json")
    assert config.architecture == "MistralForCausalLM"
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 32)
    assert (config.sliding_window, config.max_position_embeddings, config.rope_theta) == (16, 256, 5e5)
    assert (config.rope_scaling.kind, config.rope_scaling.factor) == ("linear", 2.0)
    assert config.num_parameters == sum(p.numel() for p in hf.parameters())


def test_llama_ignores_sliding_window_and_model_type_fallback(tmp_path):
    config = ModelConfig.from_dict(_config(architectures=..., sliding_window=8))
    assert config.architecture == "LlamaForCausalLM" and config.sliding_window is None


# ------------------------------------------------------------------------------------------------------ weights


def test_missing_tensor(make_hf_model):
    _, directory = make_hf_model()
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        _load(directory)


def test_extra_tensor(make_hf_model):
    _, directory = make_hf_model()
    _rewrite_weights(directory, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(WeightsError, match=r"does not explain.*model\.layers\.0\.self_attn\.q_proj\.bias"):
        _load(directory)


def test_misshaped_tensor(make_hf_model):
    _, directory = make_hf_model(num_key_value_heads=2)
    _rewrite_weights(directory, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(WeightsError) as info:
        _load(directory)
    message = str(info.value)
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert "[64, 64]" in message and "[32, 64]" in message


def _saved_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_parts_are_what_transformers_saves(make_hf_model, tied):
    # Read from the module built on the meta device, never written down: exactly the tensors of a real checkpoint.
    _, directory = make_hf_model(num_key_value_heads=2, tie_word_embeddings=tied)
    parts = checkpoint_parts(open_checkpoint(directory).config)
    assert {name: shape for sources in parts.values() for name, shape in sources.items()} == _saved_shapes(directory)
    assert list(parts["model.layers.1.self_attn.qkv_proj.weight"]) == [
        f"model.layers.1.self_attn.{name}_proj.weight" for name in "qkv"
    ]


def test_expected_shapes_come_from_the_module(make_hf_model, monkeypatch):
    # An architecture whose module is narrower than the config says: the loader expects the module's shapes.
    _, directory = make_hf_model()
    narrow = dataclasses.replace(llama.ARCHITECTURE, build=lambda config, rotary: llama.Transformer(
        dataclasses.replace(config, intermediate_size=96), rotary))
    monkeypatch.setitem(ARCHITECTURES, "llama", narrow)
    with pytest.raises(WeightsError, match=r"model\.safetensors: model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight "
                                           r"has shape \[(128, 64|64, 128)\], the config implies \[(96, 64|64, 96)\]$"):
        _load(directory)


@pytest.mark.parametrize("preset", preset_names())
def test_checkpoint_parts_hold_the_configs_parameters(preset):
    # 7-13B presets cost nothing here: the module is built on the meta device.
    config = preset_config(preset)
    parts = checkpoint_parts(config)
    assert sum(math.prod(shape) for sources in parts.values() for shape in sources.values()) == config.num_parameters


def test_every_supported_architecture_has_a_module():
    assert set(ARCHITECTURES) == set(MODEL_TYPES.values())
    # Mistral is Llama whose cache keeps a sliding window.
    mistral = ModelConfig.from_dict(_config(architectures=["MistralForCausalLM"], sliding_window=8))
    assert mistral.model_type == "mistral" and architecture_for(mistral) is llama.ARCHITECTURE


def test_pickled_weights_only_are_refused(make_hf_model):
    hf, directory = make_hf_model()
    (directory / "model.safetensors").unlink()
    torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(WeightsError) as info:
        _load(directory)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "arbitrary code" in message


def test_no_weights_at_all(make_hf_model):
    _, directory = make_hf_model()
    (directory / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        _load(directory)


def test_truncated_safetensors(make_hf_model):
    _, directory = make_hf_model()
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated") as info:
        _load(directory)
    assert "model.safetensors" in str(info.value)


def test_garbage_safetensors(make_hf_model):
    _, directory = make_hf_model()
    (directory / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        _load(directory)


def test_shard_named_in_index_but_missing(make_hf_model):
    _, directory = make_hf_model(shard=True)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (directory / shard).unlink()
    with pytest.raises(WeightsError, match="missing") as info:
        _load(directory)
    assert shard in str(info.value) and "model.safetensors.index.json" in str(info.value)


def _assert_parameters_are_the_checkpoint(model, reference: dict[str, torch.Tensor]) -> None:
    """Every parameter equals its checkpoint tensors, fused ones their parts' rows stacked in order."""
    parts = checkpoint_parts(model.config)
    assert set(model.state_dict()) == set(parts)
    for name, tensor in model.state_dict().items():
        expected = torch.cat([reference[part] for part in parts[name]])
        torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=0, atol=0)


def test_sharded_index_loads_every_tensor(make_hf_model):
    hf, directory = make_hf_model(shard=True)
    _assert_parameters_are_the_checkpoint(_load(directory), hf.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projections_stack_the_checkpoint_ones(make_hf_model, dtype):
    hf, directory = make_hf_model(num_key_value_heads=2)
    model = load_checkpoint(open_checkpoint(directory), dtype, "cpu")
    _assert_parameters_are_the_checkpoint(model, hf.state_dict())
    for block, reference in zip(model.layers, hf.model.layers):
        attention, expected = block.self_attn, reference.self_attn
        q_dim, kv_dim = expected.q_proj.weight.shape[0], expected.k_proj.weight.shape[0]
        assert attention.qkv_proj.weight.shape == (q_dim + 2 * kv_dim, 64)
        torch.testing.assert_close(attention.wk, expected.k_proj.weight.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(attention.wv, expected.v_proj.weight.to(dtype), rtol=0, atol=0)
        gate_up = torch.cat((reference.mlp.gate_proj.weight, reference.mlp.up_proj.weight)).to(dtype)
        torch.testing.assert_close(block.mlp.gate_up_proj.weight, gate_up, rtol=0, atol=0)


def _stored_transposed(weight: torch.Tensor) -> bool:
    """Physically [in, out]: the logical [out, in] matrix is the transpose of a contiguous tensor."""
    return weight.stride() == (1, weight.shape[0])


def _assert_the_cpu_fp32_layout(model, kernels_on: bool) -> None:
    if kernels_on:  # the C kernels read the checkpoint's [out, in] rows
        assert all(parameter.is_contiguous() for parameter in model.parameters())
        return
    # MKL's one-token GEMV reads [in, out] faster for matrices at least as tall as wide; down_proj stays [out, in].
    for block in model.layers:
        for weight in (block.self_attn.qkv_proj.weight, block.self_attn.o_proj.weight, block.mlp.gate_up_proj.weight):
            assert _stored_transposed(weight)
        assert block.mlp.down_proj.weight.is_contiguous()
        assert block.input_layernorm.weight.is_contiguous()
    assert _stored_transposed(model.output_weight())
    # The embedding is only looked up, unless it doubles as the output matrix.
    assert _stored_transposed(model.model.embed_tokens.weight) == model.config.tie_word_embeddings


@pytest.mark.parametrize("tied", [False, True])
def test_cpu_fp32_is_laid_out_as_its_backend_asks(make_hf_model, tied, kernels_on):
    hf, directory = make_hf_model(tie_word_embeddings=tied)
    model = _load(directory)
    _assert_the_cpu_fp32_layout(model, kernels_on)
    torch.testing.assert_close(model.output_weight(), hf.lm_head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_random_model_is_laid_out_as_a_loaded_one(tied, kernels_on):
    model = random_model(ModelConfig.from_dict(_config(tie_word_embeddings=tied)), torch.float32, "cpu")
    _assert_the_cpu_fp32_layout(model, kernels_on)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_the_checkpoint_layout(make_hf_model, dtype):
    # In fp16 the [in, out] layout makes CPU GEMV about 10x slower, in bf16 a few % slower.
    _, directory = make_hf_model()
    model = load_checkpoint(open_checkpoint(directory), dtype, "cpu")
    assert all(parameter.is_contiguous() for parameter in model.parameters())


def test_tied_embeddings_without_lm_head(make_hf_model):
    hf, directory = make_hf_model(tie_word_embeddings=True)
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())
    model = _load(directory)
    torch.testing.assert_close(model.output_weight(), hf.model.embed_tokens.weight, rtol=0, atol=0)


def test_tied_embeddings_with_a_redundant_lm_head(make_hf_model):
    _, directory = make_hf_model(tie_word_embeddings=True)
    _rewrite_weights(directory, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = _load(directory)
    assert model.output_weight() is model.model.embed_tokens.weight


def test_rotary_inv_freq_buffers_are_ignored(make_hf_model):
    hf, directory = make_hf_model()
    junk = torch.arange(8, dtype=torch.float32)

    def add(tensors):
        tensors["model.rotary_emb.inv_freq"] = junk.clone()
        for i in range(2):
            tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = junk.clone()

    _rewrite_weights(directory, add)
    _assert_parameters_are_the_checkpoint(_load(directory), hf.state_dict())


def test_weights_cast_to_requested_dtype(make_hf_model):
    hf, directory = make_hf_model()
    model = load_checkpoint(open_checkpoint(directory), torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(model.lm_head.weight, hf.lm_head.weight.to(torch.bfloat16), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- checkpoints


def test_open_local_directory(tmp_path):
    _write_config(tmp_path, _config())
    assert open_checkpoint(tmp_path).path == tmp_path


def test_open_nonexistent_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        open_checkpoint(tmp_path / "no" / "such" / "model")


def test_open_a_directory_with_no_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="neither a config.json .* nor a .gguf file"):
        open_checkpoint(tmp_path)


def test_open_a_file_that_is_not_gguf(tmp_path):
    with pytest.raises(ConfigError, match="pass the directory that holds it"):
        open_checkpoint(_write_config(tmp_path, _config()))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    with pytest.raises(WeightsError, match="is not a GGUF file"):
        open_checkpoint(other)


def test_open_uncached_hub_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)  # so the id is not also a relative path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # huggingface_hub reads its environment once, at import: point its constants at the empty home as well.
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as info:
        open_checkpoint("xqinfer-tests/not-a-cached-model")
    message = str(info.value)
    assert "xqinfer-tests/not-a-cached-model" in message
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message


# ---------------------------------------------------------------------------------------------- loading memory

MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from xqinfer.config import ModelConfig
    from xqinfer.formats import open_checkpoint
    from xqinfer.loader import load_checkpoint

    def status():
        fields = {}
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields

    directory = Path(sys.argv[1])
    config = ModelConfig.from_file(directory / "config.json")
    # The first random init on the meta device costs a one-time ~67 MB (torch's lazy meta-kernel setup) whatever the
    # model size; pay it before measuring so the ratio is about the weights.
    torch.empty(1, device="meta").normal_()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = status()
    model = load_checkpoint(open_checkpoint(directory), torch.float32, "cpu")
    loaded = status()
    # safetensors may hand out tensors that are views of its file mapping: touch every weight so they are resident.
    with torch.no_grad():
        checksum = float(sum(p.sum() for p in model.parameters()))
    touched = status()
    print(json.dumps({"reset": reset, "before": before, "loaded": loaded, "touched": touched, "checksum": checksum}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc/self/status (Linux) for VmHWM")
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-cast-to-fp32"])
def test_loading_peak_memory_is_about_the_weights(tmp_path, stored):
    # ~200 MB of fp32 weights in one file, or half that in bf16, loaded as fp32: every bf16 tensor is then a cast
    # copy, and the wide fp32 ones are re-laid, so their sources must not stay resident beside the copies.
    data = {"architectures": ["LlamaForCausalLM"], "vocab_size": 12000, "hidden_size": 1024,
            "intermediate_size": 2816, "num_hidden_layers": 3, "num_attention_heads": 8,
            "max_position_embeddings": 256, "tie_word_embeddings": True}
    _write_config(tmp_path, data)
    parts = checkpoint_parts(ModelConfig.from_dict(data))
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.rand(shape, generator=generator).to(stored)
               for sources in parts.values() for name, shape in sources.items()}
    weights_bytes = sum(t.numel() * 4 for t in tensors.values())  # as loaded, in fp32
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    assert 180e6 < weights_bytes < 230e6

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    try:
        result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                                env=env, timeout=120, check=False)
    finally:
        (tmp_path / "model.safetensors").unlink()  # pytest keeps the last runs' tmp dirs: do not leave 200 MB behind
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    baseline = report["before"]["VmRSS"] if report["reset"] else report["before"]["VmHWM"]
    peak_increase = max(report["loaded"]["VmHWM"], report["touched"]["VmHWM"]) - baseline
    ratio = peak_increase / weights_bytes
    print(f"\nloading peak: +{peak_increase / 1e6:.1f} MB for {weights_bytes / 1e6:.1f} MB of weights "
          f"(ratio {ratio:.3f}; right after load_model +{(report['loaded']['VmHWM'] - baseline) / 1e6:.1f} MB)")
    if not report["reset"]:
        pytest.skip(f"/proc/self/clear_refs not writable, peak not resettable (ratio seen {ratio:.3f})")
    assert ratio < 1.2, f"loading took {ratio:.2f}x the weights' size at peak"
    assert ratio > 0.8, f"only {ratio:.2f}x the weights became resident: the measurement missed them"
