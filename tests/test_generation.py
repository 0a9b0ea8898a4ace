"""Generation end to end: greedy tokens against golden files and transformers, seeded sampling, sampling filters
against transformers' logits processors, and stop strings over streamed chunks."""

from __future__ import annotations

import json
import platform
import random
import subprocess
import sys

import pytest
import torch

import xqinfer
from xqinfer.api import StopMatcher, build_prompt
from xqinfer.engine import Engine
from xqinfer.errors import SamplingError, XQInferError
from xqinfer.formats import open_checkpoint
from xqinfer.loader import load_checkpoint
from xqinfer.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)

from conftest import SHARED, load_hf

STORIES = SHARED / "models" / "stories260K"
AIDREAMS = SHARED / "models" / "aidreams260K"
GREEDY = SamplingParams(temperature=0)

pytestmark = pytest.mark.usefixtures("single_thread")


def _need(path):
    if not path.exists():
        pytest.skip(f"shared asset {path} is absent (tests expect ../shared beside the repository)")
    return path


# ------------------------------------------------------------------------------------------- greedy, real models


def test_stories260k_greedy_matches_golden():
    golden = json.loads((_need(STORIES) / "golden-greedy.json").read_text(encoding="utf-8"))
    llm = xqinfer.load(STORIES, dtype="fp32", device="cpu")
    assert build_prompt(llm, golden["prompt"], chat=False) == golden["prompt_ids"]  # BOS included, as in the golden
    result = xqinfer.generate(llm, golden["prompt"], max_tokens=len(golden["new_ids"]), sampling=GREEDY, chat=False)
    assert result.tokens == golden["new_ids"]
    assert result.text == golden["new_text"]
    assert result.finish_reason == "length"


def test_aidreams260k_greedy_matches_transformers():
    _need(AIDREAMS)
    prompt, new_tokens = "The machine dreamed of a city", 60
    llm = xqinfer.load(AIDREAMS, dtype="fp32", device="cpu")
    ids = build_prompt(llm, prompt, chat=False)
    assert ids[0] == llm.config.bos_token_id and len(ids) + new_tokens <= llm.config.max_position_embeddings
    hf = load_hf(AIDREAMS)
    with torch.inference_mode():
        output = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, pad_token_id=llm.config.eos_token_ids[0])
    expected = output[0, len(ids):].tolist()
    result = xqinfer.generate(llm, prompt, max_tokens=new_tokens, sampling=GREEDY, chat=False)
    assert result.tokens == expected
    assert len(expected) == new_tokens or expected[-1] in llm.eos_ids


# ------------------------------------------------------------------------------------------------ seeded sampling


@pytest.fixture
def tiny_engine(make_hf_model):
    _, directory = make_hf_model(num_key_value_heads=2)
    return Engine(load_checkpoint(open_checkpoint(directory), torch.float32, "cpu"), "fp16", capacity=64)


PROMPT = [1, 17, 99, 204, 5, 63]


def _run(engine: Engine, params: SamplingParams, count: int = 30) -> list[int]:
    return list(engine.generate(PROMPT, params, count))


def test_seeded_sampling_is_reproducible(tiny_engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    first = _run(tiny_engine, params)
    second = _run(tiny_engine, params)  # same engine: the cache is reset because the prompt does not extend it
    assert first == second
    assert _run(Engine(tiny_engine.model, "fp16", capacity=64), params) == first
    others = [_run(tiny_engine, params.updated(seed=seed)) for seed in (1, 2)]
    assert any(other != first for other in others), "different seeds gave the same 30 tokens"


def test_top_k_1_equals_greedy(tiny_engine):
    greedy = _run(tiny_engine, GREEDY)
    assert _run(tiny_engine, SamplingParams(temperature=1.3, top_k=1, seed=7)) == greedy
    assert _run(tiny_engine, SamplingParams(temperature=0.7, top_k=1, top_p=0.5, min_p=0.2, seed=8)) == greedy
    assert len(set(greedy)) > 1


@pytest.mark.parametrize("settings, fragment", [
    ({"temperature": "0.5"}, "temperature must be a number, got str '0.5'"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_k": True}, "top_k must be an integer, got bool"),
    ({"seed": "7"}, "seed must be an integer"),
    ({"seed": 2**64}, "seed must be in 0..18446744073709551615"),
    ({"seed": -1}, "seed must be in 0..18446744073709551615"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
])
def test_bad_sampling_settings_are_clear_errors(settings, fragment):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**settings)
    assert fragment in str(info.value)
    assert isinstance(info.value, XQInferError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1])
def test_every_accepted_seed_seeds_a_generator(seed):
    assert Sampler(SamplingParams(seed=seed), "cpu").generator.initial_seed() == seed


def test_sampling_may_be_a_dict_of_settings_over_the_model_defaults():
    llm = xqinfer.load(_need(STORIES))
    as_dict = xqinfer.generate(llm, "Once upon a time", max_tokens=8, sampling={"temperature": 0}, chat=False)
    as_params = xqinfer.generate(llm, "Once upon a time", max_tokens=8, sampling=GREEDY, chat=False)
    assert as_dict.tokens == as_params.tokens
    with pytest.raises(SamplingError, match="unknown sampling setting temp"):
        xqinfer.generate(llm, "Once", max_tokens=2, sampling={"temp": 0})
    with pytest.raises(SamplingError, match="sampling must be a SamplingParams or a dict"):
        xqinfer.generate(llm, "Once", max_tokens=2, sampling=0.5)


def test_a_str_stop_is_one_stop_string_not_its_characters():
    llm = xqinfer.load(_need(STORIES))
    full = xqinfer.generate(llm, "Once upon a time", max_tokens=40, sampling=GREEDY, chat=False).text
    stop = "Lily"  # the example: its letters L, i, l, y come earlier ("little", "girl") than the name
    assert stop in full and any(letter in full[: full.index(stop)] for letter in stop)
    cut = xqinfer.generate(llm, "Once upon a time", max_tokens=40, sampling=GREEDY, chat=False, stop=stop)
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_sampler_draws_only_from_the_kept_set():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 300, generator=generator).repeat(2000, 1)
    allowed = set(logits[0].topk(5).indices.tolist())
    draws = Sampler(SamplingParams(temperature=2.0, top_k=5, seed=3), "cpu")(logits)
    assert set(draws.tolist()) == allowed  # all five are drawn at temperature 2 over 2000 rows, nothing else


# --------------------------------------------------------------------------- filters vs transformers' processors


def _random_logits(rows: int = 64, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=generator) * 4 + 0.25  # flat to peaked distributions
    return torch.randn(rows, vocab, generator=generator) * scale


def _assert_same_filter(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    kept_ours, kept_theirs = torch.isfinite(ours), torch.isfinite(theirs)
    assert torch.equal(kept_ours, kept_theirs), f"kept sets differ in {int((kept_ours != kept_theirs).sum())} places"
    assert torch.equal(ours[kept_ours], theirs[kept_theirs])
    assert bool((kept_ours.sum(-1) >= 1).all())


@pytest.mark.parametrize("k", [1, 2, 10, 299, 300, 1000])
def test_top_k_matches_transformers(k):
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = _random_logits()
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    _assert_same_filter(top_k_filter(logits, k), TopKLogitsWarper(top_k=k)(ids, logits.clone()))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.9, 0.95, 0.999])
def test_top_p_matches_transformers(p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = _random_logits(seed=1)
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    _assert_same_filter(top_p_filter(logits, p), TopPLogitsWarper(top_p=p)(ids, logits.clone()))


@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.1, 0.5, 0.9, 1.0])
def test_min_p_matches_transformers(min_p):
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = _random_logits(seed=2)
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    _assert_same_filter(min_p_filter(logits, min_p), MinPLogitsWarper(min_p=min_p)(ids, logits.clone()))


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = _random_logits(rows=8, seed=3)
    generator = torch.Generator().manual_seed(4)
    context = torch.randint(0, 40, (8, 25), generator=generator)  # repeats within a row, positive and negative logits
    expected = RepetitionPenaltyLogitsProcessor(penalty=penalty)(context, logits.clone())
    ours = apply_repetition_penalty(logits, context, penalty)
    assert torch.equal(ours, expected)
    if penalty != 1.0:
        assert not torch.equal(ours, logits)


def test_sampler_keeps_what_transformers_chain_keeps():
    # transformers' sampling order: repetition penalty, temperature, top-k, top-p, min-p. The Sampler's draws over
    # many identical rows must cover exactly the set the same chain of transformers processors keeps.
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = _random_logits(rows=1, seed=5) * 0.5
    context = torch.tensor([[int(logits.argmax()), 4, 9, 4]])
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5), TemperatureLogitsWarper(0.8),
                                 TopKLogitsWarper(40), TopPLogitsWarper(0.6), MinPLogitsWarper(0.02)])
    kept = set(torch.isfinite(chain(context, logits.clone()))[0].nonzero().flatten().tolist())
    assert 3 <= len(kept) < 40
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.6, min_p=0.02, repetition_penalty=1.5, seed=11)
    draws = Sampler(params, "cpu")(logits.repeat(4000, 1), context.repeat(4000, 1))
    drawn = set(draws.tolist())
    assert drawn <= kept, f"drew {sorted(drawn - kept)} that transformers filters out"
    assert len(drawn) >= len(kept) - 1  # over 4000 draws, all but perhaps the rarest kept token appear


# ------------------------------------------------------------------------------------------------- stop strings


def _stream(stops, chunks):
    """Feeds chunks until a stop is hit; -> (shown text, hit)."""
    matcher = StopMatcher(stops)
    shown = []
    for chunk in chunks:
        out, hit = matcher.feed(chunk)
        shown.append(out)
        if hit:
            return "".join(shown), True
    return "".join(shown) + matcher.flush(), False


def _random_chunks(text: str, rng: random.Random, longest: int) -> list[str]:
    chunks, start = [], 0
    while start < len(text):
        size = rng.randint(0, longest)  # empty chunks too (a token whose text is not complete yet)
        chunks.append(text[start : start + size])
        start += size
    return chunks


def _check_stream(text: str, stops: list[str], chunks: list[str]) -> None:
    shown, hit = _stream(stops, chunks)
    assert text.startswith(shown), (text, chunks, shown)
    assert not any(stop in shown for stop in stops), f"a stop string was shown: {shown!r} ({chunks})"
    if hit:
        assert any(text[len(shown):].startswith(stop) for stop in stops), (text, chunks, shown)
    else:
        assert shown == text and not any(stop in text for stop in stops)


def test_stop_string_single_random_chunks():
    rng = random.Random(0)
    for stop in ("END", "aab", "\n\nUser:", "x"):
        alphabet = sorted(set(stop + "ab\n "))
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            chunks = _random_chunks(text, rng, longest=6)
            _check_stream(text, [stop], chunks)
            shown, hit = _stream([stop], chunks)
            assert hit == (stop in text)
            if hit:
                assert shown == text[: text.index(stop)]  # stops at the first occurrence, shows all before it


def test_stop_strings_multiple_character_by_character():
    rng = random.Random(1)
    stops = ["cab", "dd", "abcabd", "b\nb"]
    for _ in range(500):
        text = "".join(rng.choice("abcd\n") for _ in range(rng.randint(0, 30)))
        _check_stream(text, stops, list(text))


def test_stop_string_split_over_chunks_is_never_shown():
    assert _stream(["</s>"], ["Hello <", "/", "s", "> more"]) == ("Hello ", True)
    assert _stream(["</s>"], ["Hello <", "/", "x", "> more"]) == ("Hello </x> more", False)
    # A held-back prefix is released when the text turns out not to be a stop string.
    matcher = StopMatcher(["###"])
    assert matcher.feed("a#") == ("a", False)
    assert matcher.feed("#") == ("", False)
    assert matcher.feed("b") == ("##b", False)
    assert matcher.feed("##") == ("", False)
    assert matcher.flush() == "##"
    assert StopMatcher([]).feed("anything") == ("anything", False)
    assert StopMatcher([""]).feed("anything") == ("anything", False)


def test_stop_strings_two_stops_in_one_chunk():
    assert _stream(["cab", "dd"], ["xd", "dcab"]) == ("x", True)


def test_stop_string_through_generate():
    _need(STORIES)
    golden = json.loads((STORIES / "golden-greedy.json").read_text(encoding="utf-8"))
    llm = xqinfer.load(STORIES, dtype="fp32", device="cpu")
    result = xqinfer.generate(llm, golden["prompt"], max_tokens=60, sampling=GREEDY, chat=False, stop=["Lily"])
    assert result.finish_reason == "stop"
    assert result.text == golden["new_text"][: golden["new_text"].index("Lily")]
    assert result.tokens == golden["new_ids"][: len(result.tokens)]


_FAULTS_PER_STEP = r"""
import resource, torch
from xqinfer.config import ModelConfig
from xqinfer.engine import Engine
from xqinfer.loader import random_model
torch.set_num_threads(1)
config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 768,
                                "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 12,
                                "num_key_value_heads": 12, "max_position_embeddings": 4096})
model = random_model(config, torch.float32, "cpu")
engine = Engine(model, "kivi", capacity=4000)
token = engine.prefill([i % 256 for i in range(3900)]).argmax(dim=-1)
for _ in range(3):
    token = engine.decode(token, -1).argmax(dim=-1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    token = engine.decode(token, -1).argmax(dim=-1)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_cpu_decode_steps_reuse_their_memory_instead_of_faulting_it_in_again():
    # Each step dequantizes the whole history (here 12 MB of float32 K and as much V per layer) into fresh
    # temporaries. By default glibc gives blocks that large back to the system when they are freed, so every step
    # faults them in again (measured: about 9,000 pages per step here); a model loaded on the CPU keeps them.
    result = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    faults = float(result.stdout.strip().splitlines()[-1])
    assert faults < 300, f"{faults:.0f} page faults per decode step"
