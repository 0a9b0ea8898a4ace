"""The Python API the CLI is built on: load a model, open a session over a cache, stream or generate text."""

from __future__ import annotations

import json
import os
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .cache import CacheSpec
from .config import ModelConfig
from .device import pick_device, pick_dtype
from .engine import Engine, GenerationStats
from .errors import ConfigError
from .loader import load_model, random_model, resolve
from .model import Transformer
from .presets import preset_config
from .sampling import SamplingParams
from .tokenizer import Tokenizer

DEFAULT_PRESET = "llama-tiny"


@dataclass
class LLM:
    """A loaded model with its tokenizer and the sampling defaults its generation_config.json gives."""

    name: str
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    sampling: SamplingParams
    eos_ids: tuple[int, ...]
    path: Path | None = None
    random_weights: bool = False

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
    """A Hugging Face model directory or hub id, or a preset with seeded random weights (no download).

    With neither, the embedded default preset (`llama-tiny`) is built: a way to exercise the engine anywhere.
    """
    target = pick_device(device)
    if model is not None and preset is not None:
        raise ConfigError("give a model or a preset, not both")
    if model is None:
        name = preset or DEFAULT_PRESET
        config = preset_config(name)
        torch_dtype = pick_dtype(dtype, target)
        weights = random_model(config, torch_dtype, target, seed=seed)
        tokenizer = Tokenizer.byte_level(config.vocab_size)
        eos = config.eos_token_ids or tokenizer.eos_ids
        return LLM(name, config, weights, tokenizer, SamplingParams(), eos, random_weights=True)
    directory = resolve(model)
    config = ModelConfig.from_file(directory / "config.json")
    torch_dtype = pick_dtype(dtype, target)
    weights = load_model(directory, config, torch_dtype, target)
    tokenizer = Tokenizer.from_dir(directory)
    sampling, eos = _generation_defaults(directory, config, tokenizer)
    return LLM(str(model), config, weights, tokenizer, sampling, eos, path=directory)


def _generation_defaults(
    directory: Path, config: ModelConfig, tokenizer: Tokenizer
) -> tuple[SamplingParams, tuple[int, ...]]:
    path = directory / "generation_config.json"
    data: dict = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    eos = data.get("eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    eos_ids = tuple(dict.fromkeys(eos_ids + config.eos_token_ids + tokenizer.eos_ids))
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
    tokens, not the whole history.
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
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Streams text for prompt ids; `self.last` holds the result (text, tokens, stats) once it ends."""
        stats = GenerationStats()
        detokenizer = self.llm.tokenizer.detokenizer()
        stops = StopMatcher(stop)
        tokens: list[int] = []
        self.last = GenerationResult("", tokens, stats, "interrupted")
        params = sampling or self.llm.sampling
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

    def chat(self, user: str, **kwargs) -> Iterator[str]:
        """Adds a user turn, streams the reply, and records it as an assistant turn (also when interrupted)."""
        self.messages.append({"role": "user", "content": user})
        prompt = self.llm.tokenizer.encode_chat(self.messages, add_generation_prompt=True)
        try:
            yield from self.stream(prompt, **kwargs)
        finally:
            reply = self.last.text if self.last is not None else ""
            self.messages.append({"role": "assistant", "content": reply})


class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop string is never printed."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
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


def stream(
    llm: LLM,
    prompt: str,
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    cache: str | CacheSpec = "fp16",
    chat: bool | None = None,
    system: str | None = None,
) -> Iterator[str]:
    """Streams the continuation of `prompt` as text chunks."""
    ids = build_prompt(llm, prompt, chat=chat, system=system)
    session = Session(llm, cache, capacity=len(ids) + max_tokens)
    yield from session.stream(ids, max_tokens=max_tokens, sampling=sampling, stop=stop)


def generate(
    llm: LLM,
    prompt: str,
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    cache: str | CacheSpec = "fp16",
    chat: bool | None = None,
    system: str | None = None,
) -> GenerationResult:
    """The whole continuation of `prompt`, with its stats."""
    ids = build_prompt(llm, prompt, chat=chat, system=system)
    session = Session(llm, cache, capacity=len(ids) + max_tokens)
    for _ in session.stream(ids, max_tokens=max_tokens, sampling=sampling, stop=stop):
        pass
    return session.last
