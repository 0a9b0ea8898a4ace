"""Test-wide paths and fixtures. Shared assets live in ../shared beside the repository checkout; tests skip when it is
absent. `make_hf_model` builds tiny random-weight transformers models on disk to compare xqinfer against."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from xqinfer.kernels import cpu as cpu_kernels

SHARED = Path(__file__).resolve().parents[2] / "shared"

# A tiny Llama: big enough to exercise every code path, small enough to build and save in milliseconds.
TINY_CONFIG = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations and logits, so that attention is sharp and any mistake shows in the logits
    (the transformers initializer's std 0.02 gives near-uniform attention and logits close to zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * (1.5 / math.sqrt(param.shape[-1])))


def hf_classes(arch: str):
    import transformers

    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}
    config_name, model_name = names[arch]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def load_hf(directory: Path, arch: str = "llama"):
    """A fresh transformers model from a saved directory (fresh: dynamic RoPE keeps state between calls)."""
    _, model_cls = hf_classes(arch)
    return model_cls.from_pretrained(str(directory), attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture
def make_hf_model(tmp_path):
    """Factory: (arch="llama"|"mistral", shard=False, seed=0, name=..., **config overrides) -> (hf_model, directory).

    The model is saved with save_pretrained as safetensors; with shard=True the weights are split over several files
    with a model.safetensors.index.json.
    """
    counter = iter(range(1_000_000))

    def factory(arch: str = "llama", *, shard: bool = False, seed: int = 0, name: str | None = None, **overrides):
        config_cls, model_cls = hf_classes(arch)
        values = dict(TINY_CONFIG, **overrides)
        config = config_cls(**values)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
        _randomize(model, seed)
        if config.tie_word_embeddings:
            model.tie_weights()
        directory = tmp_path / (name or f"{arch}-{next(counter)}")
        kwargs = {"max_shard_size": "100KB"} if shard else {}
        model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
        return model, directory

    return factory


@pytest.fixture
def load_xq():
    """directory -> xqinfer Transformer in fp32 on the CPU, through xqinfer's own config reader and loader."""
    from xqinfer.formats import open_checkpoint
    from xqinfer.loader import load_checkpoint

    def loader(directory: Path):
        return load_checkpoint(open_checkpoint(Path(directory)), torch.float32, "cpu")

    return loader


@pytest.fixture(autouse=True)
def no_columns(monkeypatch):
    """Tables fit $COLUMNS when it is set (80 columns in a pipe otherwise): the tests' own shell must not choose."""
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.fixture
def single_thread():
    """One intra-op thread for tiny-model tests: their ops take microseconds, and with two OpenMP threads on a
    shared 2-core machine each op can wait a scheduler slice for the second thread (measured: 64x64 matmul 18 us with
    one thread, 12 ms with two while another process was busy)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer():
    """transformers' own conversion of the SmolLM2 GGUF's tokenizer (~10 s): the reference, built once."""
    from gguf_files import need_smollm2

    path = need_smollm2()
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(params=["kernels", "no kernels"])
def kernels_on(request, monkeypatch) -> bool:
    """Each test runs with the C kernels and without them (as on a machine without a compiler)."""
    if request.param == "no kernels":
        monkeypatch.setenv("XQINFER_CPU_KERNELS", "0")
    cpu_kernels._library.cache_clear()
    yield request.param == "kernels"
    monkeypatch.undo()
    cpu_kernels._library.cache_clear()


def default_sigint() -> None:
    """In a child before exec: SIGINT as a shell gives it (default, unblocked), whatever the test process inherited
    or set (an ignored or blocked SIGINT survives exec, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
