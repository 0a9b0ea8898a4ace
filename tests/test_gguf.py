"""GGUF checkpoints: tiny files written here load to the same weights (and logits) as the same weights saved as
safetensors, for every tensor type and layout; bad files get one designed line; the real SmolLM2-135M-Instruct file
gives transformers' logits and greedy tokens."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xqinfer
from xqinfer.cache import REGISTRY
from xqinfer.errors import ConfigError, WeightsError
from xqinfer.formats import open_checkpoint
from xqinfer.formats.gguf import GGUFCheckpoint
from xqinfer.loader import load_checkpoint
from xqinfer.ppl import perplexity
from xqinfer.sampling import SamplingParams

from conftest import SHARED, TINY_CONFIG
from gguf_files import need_smollm2, write_gguf
from test_cli import assert_one_line_error, call_main, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")


def _ids(count: int, seed: int, vocab: int = 300) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count,), generator=generator).tolist()


@torch.inference_mode()
def _logits(model, ids: list[int]) -> torch.Tensor:
    from xqinfer.cache import make_cache

    return model(torch.tensor([ids]), torch.arange(len(ids)), make_cache("fp16", model, len(ids)))[0]


# ----------------------------------------------------------------------------------- tiny files, every layout


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("kv_heads, tied", [(4, False), (2, True)], ids=["mha-output", "gqa-tied"])
def test_gguf_loads_the_weights_safetensors_would(make_hf_model, tmp_path, kind, kv_heads, tied):
    hf, directory = make_hf_model(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    config = dict(TINY_CONFIG, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    state = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    held = write_gguf(tmp_path / "tiny.gguf", state, config, kind)
    # The same (dequantized) weights as a Hugging Face checkpoint: the two formats must load alike.
    hf.load_state_dict(held, strict=False)
    hf.save_pretrained(str(directory), safe_serialization=True)

    from_gguf = load_checkpoint(open_checkpoint(tmp_path / "tiny.gguf"), torch.float32, "cpu")
    from_safetensors = load_checkpoint(open_checkpoint(directory), torch.float32, "cpu")
    assert from_gguf.config.tie_word_embeddings == tied
    for (name, a), (_, b) in zip(from_gguf.state_dict().items(), from_safetensors.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ids = _ids(24, seed=1)
    torch.testing.assert_close(_logits(from_gguf, ids), _logits(from_safetensors, ids), rtol=0, atol=0)


def test_gguf_written_here_is_read_by_transformers_alike(make_hf_model, tmp_path):
    """The files follow llama.cpp's conventions: transformers' own GGUF reader gives the same logits."""
    from transformers import AutoModelForCausalLM

    hf, _ = make_hf_model(num_key_value_heads=2)
    config = dict(TINY_CONFIG, num_key_value_heads=2)
    write_gguf(tmp_path / "tiny.gguf", hf.state_dict(), config, "Q8_0")
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    ours = load_checkpoint(open_checkpoint(tmp_path / "tiny.gguf"), torch.float32, "cpu")
    ids = _ids(20, seed=2)
    with torch.inference_mode():
        expected = reference(input_ids=torch.tensor([ids])).logits[0]
    assert (_logits(ours, ids) - expected).abs().max().item() < 1e-4


def test_config_comes_from_the_metadata(make_hf_model, tmp_path):
    hf, _ = make_hf_model(num_key_value_heads=2, rope_theta=5e5, max_position_embeddings=96)
    config = dict(TINY_CONFIG, num_key_value_heads=2, rope_theta=5e5, max_position_embeddings=96)
    write_gguf(tmp_path / "m.gguf", hf.state_dict(), config)
    loaded = GGUFCheckpoint(tmp_path / "m.gguf").config
    assert (loaded.num_layers, loaded.hidden_size, loaded.intermediate_size) == (2, 64, 128)
    assert (loaded.num_heads, loaded.num_kv_heads, loaded.head_dim) == (4, 2, 16)
    assert (loaded.rope_theta, loaded.max_position_embeddings, loaded.vocab_size) == (5e5, 96, 300)
    assert loaded.rms_norm_eps == pytest.approx(1e-5) and not loaded.tie_word_embeddings


def test_a_directory_holding_one_gguf_is_that_file(make_hf_model, tmp_path):
    hf, _ = make_hf_model()
    folder = tmp_path / "folder"
    folder.mkdir()
    write_gguf(folder / "only.gguf", hf.state_dict(), TINY_CONFIG)
    assert open_checkpoint(folder).path == folder / "only.gguf"


# ------------------------------------------------------------------------------------------------ bad files


def _tiny_gguf(make_hf_model, path, **kwargs):
    hf, _ = make_hf_model()
    write_gguf(path, hf.state_dict(), TINY_CONFIG, **kwargs)
    return path


def test_truncated_gguf(make_hf_model, tmp_path):
    path = _tiny_gguf(make_hf_model, tmp_path / "t.gguf", kind="Q8_0")
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size - 1000)
    with pytest.raises(WeightsError, match="truncated"):
        open_checkpoint(path)
    with path.open("r+b") as handle:  # cut inside the metadata
        handle.truncate(200)
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        open_checkpoint(path)


def test_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(WeightsError, match="is not a GGUF file"):
        open_checkpoint(path)


@pytest.mark.parametrize("architecture", ["gemma3", "qwen2"])
def test_another_architecture_is_named(make_hf_model, tmp_path, architecture):
    path = _tiny_gguf(make_hf_model, tmp_path / "other.gguf", architecture=architecture)
    with pytest.raises(ConfigError) as info:
        open_checkpoint(path)
    assert architecture in str(info.value) and "llama" in str(info.value)


def test_a_tensor_type_gguf_cannot_dequantize(make_hf_model, tmp_path):
    import gguf

    path = _tiny_gguf(make_hf_model, tmp_path / "q81.gguf", kind="Q8_0")
    # One tensor's type rewritten in its info record (name, n_dims, dims, type) as Q8_1, whose blocks have Q8_0's
    # element count: the installed gguf has no dequantizer for it.
    raw = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = raw.index(name) + len(name)
    dims = int.from_bytes(raw[at:at + 4], "little")
    type_at = at + 4 + 8 * dims
    assert int.from_bytes(raw[type_at:type_at + 4], "little") == gguf.GGMLQuantizationType.Q8_0
    raw[type_at:type_at + 4] = int(gguf.GGMLQuantizationType.Q8_1).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="Q8_1, which the installed gguf .* cannot dequantize"):
        open_checkpoint(path)


@pytest.mark.parametrize("key", ["llama.embedding_length", "llama.block_count", "llama.attention.head_count"])
def test_missing_metadata_is_named(make_hf_model, tmp_path, key):
    path = _tiny_gguf(make_hf_model, tmp_path / "m.gguf", drop_keys=(key,))
    with pytest.raises(ConfigError, match=f"lacks {key}"):
        open_checkpoint(path)


def test_shapes_that_disagree_with_the_metadata(make_hf_model, tmp_path):
    hf, _ = make_hf_model()
    wrong = dict(TINY_CONFIG, intermediate_size=96)  # the file's FFN tensors say 128
    write_gguf(tmp_path / "s.gguf", hf.state_dict(), wrong)
    with pytest.raises(WeightsError, match="has shape .* the config implies"):
        load_checkpoint(open_checkpoint(tmp_path / "s.gguf"), torch.float32, "cpu")


def test_a_directory_with_two_ggufs(make_hf_model, tmp_path):
    _tiny_gguf(make_hf_model, tmp_path / "a.gguf")
    _tiny_gguf(make_hf_model, tmp_path / "b.gguf")
    with pytest.raises(ConfigError, match="holds 2 GGUF files .*a.gguf, b.gguf"):
        open_checkpoint(tmp_path)


# --------------------------------------------------------------------------------- the real default model

WIKITEXT = SHARED / "data" / "wikitext2-test.txt"


@pytest.fixture(scope="module")
def smollm2():
    return xqinfer.load(need_smollm2(), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def transformers_smollm2(hf_smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    path = need_smollm2()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, hf_smollm2_tokenizer


def test_default_model_is_the_packaged_gguf():
    path = need_smollm2()
    assert xqinfer.api.default_model() == path
    config = GGUFCheckpoint(path).config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.vocab_size, config.max_position_embeddings, config.rope_theta) == (49152, 8192, 1e5)
    assert config.tie_word_embeddings


def test_logits_of_a_wikitext_window_match_transformers(smollm2, transformers_smollm2):
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is absent")
    reference, _ = transformers_smollm2
    ids = smollm2.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8")[:4000], add_bos=False)[:256]
    assert len(ids) == 256
    with torch.inference_mode():
        expected = reference(input_ids=torch.tensor([ids])).logits[0]
    difference = (_logits(smollm2.model, ids) - expected).abs().max().item()
    assert difference < 1e-4, f"max abs logit difference {difference:.3g}"


def _transformers_greedy(reference, ids: list[int], count: int) -> list[int]:
    with torch.inference_mode():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=count, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt, chat", [("The history of the Roman Empire", False),
                                          ("What is the capital of France?", True),
                                          ("Write a haiku about memory.", True)])
def test_greedy_tokens_match_transformers(smollm2, transformers_smollm2, prompt, chat):
    reference, tokenizer = transformers_smollm2
    messages = [{"role": "user", "content": prompt}]
    ids = xqinfer.api.build_prompt(smollm2, prompt, chat=chat)
    expected_ids = (tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False) if chat else tokenizer(prompt).input_ids)
    assert ids == list(expected_ids)
    session = xqinfer.Session(smollm2, "fp16", capacity=len(ids) + 24)
    for _ in session.stream(ids, max_tokens=24, sampling=SamplingParams(temperature=0)):
        pass
    tokens = session.last.tokens
    assert tokens == _transformers_greedy(reference, ids, len(tokens))
    if chat and "France" in prompt:
        assert session.last.text.strip() == "The capital of France is Paris."


def test_generation_defaults_of_a_gguf(smollm2):
    assert 2 in smollm2.eos_ids  # <|im_end|>
    assert smollm2.sampling.temperature == pytest.approx(0.8) and smollm2.sampling.top_k == 40
    assert json.dumps(smollm2.tokenizer.render_chat([{"role": "user", "content": "hi"}])).count("im_start") == 3


def _case_truncated(make_hf_model, tmp_path):
    path = _tiny_gguf(make_hf_model, tmp_path / "t.gguf", kind="Q8_0")
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    return path, "truncated"


def _case_not_gguf(make_hf_model, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello", encoding="utf-8")
    return path, "is not a GGUF file"


def _case_qwen2(make_hf_model, tmp_path):
    return _tiny_gguf(make_hf_model, tmp_path / "q.gguf", architecture="qwen2"), "'qwen2' is not supported"


def _case_missing_key(make_hf_model, tmp_path):
    path = _tiny_gguf(make_hf_model, tmp_path / "m.gguf", drop_keys=("llama.feed_forward_length",))
    return path, "lacks llama.feed_forward_length"


def _case_wrong_shapes(make_hf_model, tmp_path):
    hf, _ = make_hf_model()
    write_gguf(tmp_path / "s.gguf", hf.state_dict(), dict(TINY_CONFIG, intermediate_size=96))
    return tmp_path / "s.gguf", "the config implies"


def _case_two_files(make_hf_model, tmp_path):
    _tiny_gguf(make_hf_model, tmp_path / "a.gguf")
    _tiny_gguf(make_hf_model, tmp_path / "b.gguf")
    return tmp_path, "holds 2 GGUF files"


@pytest.mark.parametrize("case", [_case_truncated, _case_not_gguf, _case_qwen2, _case_missing_key,
                                  _case_wrong_shapes, _case_two_files], ids=lambda case: case.__name__[6:])
@pytest.mark.parametrize("command", ["generate", "plan"])
def test_bad_gguf_is_one_line_on_the_command_line(make_hf_model, tmp_path, monkeypatch, capsys, case, command):
    path, needle = case(make_hf_model, tmp_path)
    if command == "plan" and needle == "the config implies":
        pytest.skip("plan reads the metadata only, never the tensors")
    before = snapshot(tmp_path)
    capsys.readouterr()  # what building the files printed
    args = ["generate", path, "-p", "hi", "-n", "2"] if command == "generate" else ["plan", "-m", path, "--memory",
                                                                                      "8GB"]
    code, out, err = call_main(monkeypatch, capsys, *args)
    assert code == 1
    assert_one_line_error(code, out, err, needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_with_its_defaults_runs_on_the_real_model(smollm2, method, tmp_path):
    """Real widths (K/V 3 x 64 = 192, hidden 576) that the default groups do not divide: every method prefills,
    decodes and scores (both protocols) with its defaults."""
    ids = xqinfer.api.build_prompt(smollm2, "What is the capital of France?", chat=True)
    session = xqinfer.Session(smollm2, method, capacity=len(ids) + 8)
    for _ in session.stream(ids, max_tokens=8, sampling=SamplingParams(temperature=0)):
        pass
    assert len(session.last.tokens) >= 2 and session.last.text.strip()
    text = tmp_path / "text.txt"
    text.write_text(WIKITEXT.read_text(encoding="utf-8")[:3000] if WIKITEXT.is_file() else "word " * 600,
                    encoding="utf-8")
    for protocol in ("sim", "stream"):
        report = perplexity(smollm2, text, [method], ctx=96, protocol=protocol, chunk=32, limit=1)
        row = report.rows()[-1]
        assert row["spec"].startswith(method) and math.isfinite(row["ppl"]) and row["ppl"] > 1


GGUF_MEMORY_PROBE = """
import json, sys
import torch
from xqinfer.formats import open_checkpoint
from xqinfer.loader import load_checkpoint

def status():
    with open("/proc/self/status") as handle:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in handle)
                if k in ("VmHWM", "VmRSS")}

checkpoint = open_checkpoint(sys.argv[1])
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # VmHWM := VmRSS
before = status()
model = load_checkpoint(checkpoint, torch.float32, "cpu")
after = status()
weights = sum(p.nbytes for p in model.parameters())
print(json.dumps({"increase": after["VmHWM"] - before["VmRSS"], "weights": weights}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs /proc/self/clear_refs (Linux)")
def test_loading_the_real_gguf_peaks_near_the_dequantized_weights():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", GGUF_MEMORY_PROBE, str(need_smollm2())], capture_output=True,
                            text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = report["increase"] / report["weights"]
    print(f"\nGGUF load peak: +{report['increase'] / 2**20:.0f} MiB for {report['weights'] / 2**20:.0f} MiB of fp32 "
          f"weights (ratio {ratio:.2f})")
    assert 0.8 < ratio < 1.3, f"loading peaked at {ratio:.2f}x the dequantized weights"
