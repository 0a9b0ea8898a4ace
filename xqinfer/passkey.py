"""Long-context retrieval: a 5-digit pass key hidden in filler text, asked back through the chat template.

Each prompt is the instruct model's chat template around one user message: an instruction, neutral filler with one
line stating the key (the needle) at a given depth, and the question. Its length is the whole templated prompt in
the model's own tokens, filled up to (at most) the length asked for. Every method answers exactly the same prompts,
each through a fresh cache of its own sized for the prompt and the answer, decoded greedily; a method scores a hit
when the key's five digits appear, in order and together, among the digits of its answer.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .accounting import bits_label, normalized_size, resolved
from .api import LLM, Session
from .cache import CacheSpec
from .errors import XQInferError
from .ppl import with_baseline
from .sampling import SEED_LIMIT, SamplingParams
from .tokenizer import Tokenizer

DEFAULT_LENGTHS = (512, 1024, 2048)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_TRIALS = 4
# SmolLM2 answers "The pass key is 60494." (11 tokens: digits are one token each) even when asked for the number.
ANSWER_TOKENS = 12
MIN_LENGTH = 64

INSTRUCTION = ("A pass key is hidden somewhere in the long text below. Read all of it and keep the pass key in "
               "mind: you will be asked for it.")
FILLER = "The river runs to the sea. The stones are grey. The birds fly south. Here we stay. Up the hill and home."
NEEDLE = "The pass key is {key}. Keep it: {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."


@dataclass(frozen=True)
class PasskeyPrompt:
    """One trial: the templated prompt ids, the key they hide and where (`key_position`: the index of the token that
    holds the needle's first character)."""

    length: int
    depth: float
    trial: int
    key: str
    ids: list[int]
    key_position: int

    def as_dict(self) -> dict:
        return {"length": self.length, "tokens": len(self.ids), "depth": self.depth, "trial": self.trial,
                "key": self.key, "key_position": self.key_position}


def check_settings(lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0) -> None:
    """Refuses what no model could run, before one is loaded (the model's own limit is checked by `passkey`)."""
    if not lengths:
        raise XQInferError("give at least one --length")
    if not depths:
        raise XQInferError("give at least one --depth")
    for length in lengths:
        if length < MIN_LENGTH:
            raise XQInferError(f"--length {length} is too short to hide a key in: use --length {MIN_LENGTH} or more")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise XQInferError(f"--depth {depth:g} is outside [0, 1] (0 hides the key at the start of the filler, "
                               f"1 at its end)")
    if trials < 1:
        raise XQInferError(f"--trials must be at least 1, got {trials}")
    if not 0 <= seed < SEED_LIMIT:
        raise XQInferError(f"seed must be in 0..{SEED_LIMIT - 1}")


def filler_words(count: int) -> list[str]:
    """The first `count` words of the filler sentences repeated without end."""
    return list(itertools.islice(itertools.cycle(FILLER.split()), count))


def render(tokenizer: Tokenizer, words: list[str], depth: float, key: str) -> tuple[list[int], int]:
    """Prompt ids with the needle after the sentence end nearest to `depth` of the words, and the needle's index."""
    ends = [i + 1 for i, word in enumerate(words) if word.endswith(".")]
    split = min([0, *ends], key=lambda end: abs(end - depth * len(words)))
    needle = NEEDLE.format(key=key)
    filler = " ".join([*words[:split], needle, *words[split:]])
    rendered = tokenizer.render_chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{filler}\n\n{QUESTION}"}],
                                     add_generation_prompt=True)
    # A template without BOS gets the tokenizer's (as Tokenizer.encode_chat does).
    bos = not tokenizer.has_chat_template
    return tokenizer.encode(rendered, add_bos=bos), tokenizer.token_at(rendered, rendered.index(needle), add_bos=bos)


def build_prompt(tokenizer: Tokenizer, length: int, depth: float, key: str, trial: int = 0) -> PasskeyPrompt:
    """The longest prompt of at most `length` tokens (filler whole words at a time) hiding `key` at `depth`."""
    bare, _ = render(tokenizer, [], depth, key)
    if len(bare) >= length:
        raise XQInferError(f"--length {length} leaves no room for filler: the instruction, key and question "
                           f"already take {len(bare)} of this model's tokens")
    # Every word adds at least one token, so at most `length - len(bare)` words fit: the search starts there.
    low, high = 0, length - len(bare)
    while low < high:
        middle = (low + high + 1) // 2
        if len(render(tokenizer, filler_words(middle), depth, key)[0]) <= length:
            low = middle
        else:
            high = middle - 1
    ids, position = render(tokenizer, filler_words(low), depth, key)
    return PasskeyPrompt(length, depth, trial, key, ids, position)


def build_prompts(
    tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0
) -> list[PasskeyPrompt]:
    """Every (trial, length, depth) prompt, trial by trial, so that a run cut short still covers every length and
    depth; the keys come from `seed` alone, so the same arguments always give the same prompts."""
    check_settings(lengths, depths, trials, seed)
    generator = random.Random(seed)
    return [build_prompt(tokenizer, length, depth, str(generator.randrange(10_000, 100_000)), trial)
            for trial in range(trials) for length in lengths for depth in depths]


def is_hit(answer: str, key: str) -> bool:
    """The key's digits appear, in order and together, among the answer's digits ("12,345" finds 12345)."""
    return key in "".join(character for character in answer if character.isdigit())


@dataclass
class MethodAnswers:
    spec: CacheSpec
    bits: str
    normalized_size: float
    answers: list[str] = field(default_factory=list)
    seconds: float = 0.0


def rate(hits: int, trials: int) -> dict:
    return {"hits": hits, "trials": trials, "hit_rate": hits / trials if trials else None}


@dataclass
class PasskeyReport:
    model: str
    seed: int
    max_new_tokens: int
    lengths: list[int]
    depths: list[float]
    trials: int
    prompts_total: int
    prompts: list[PasskeyPrompt]  # those every method answered, in the order they ran
    methods: list[MethodAnswers]
    interrupted: bool = False

    def hits(self, method: MethodAnswers, length: int | None = None, depth: float | None = None) -> dict:
        """Hits, trials and hit rate of one method over the answered prompts of a length and/or depth."""
        chosen = [is_hit(answer, prompt.key) for prompt, answer in zip(self.prompts, method.answers)
                  if (length is None or prompt.length == length) and (depth is None or prompt.depth == depth)]
        return rate(sum(chosen), len(chosen))

    def as_dict(self) -> dict:
        methods = []
        for method in self.methods:
            methods.append({
                "spec": str(method.spec),
                "bits": method.bits,
                "normalized_size": method.normalized_size,
                **self.hits(method),
                "by_length": [{"length": length, **self.hits(method, length)} for length in self.lengths],
                "by_depth": [{"depth": depth, **self.hits(method, depth=depth)} for depth in self.depths],
                "by_length_and_depth": [{"length": length, "depth": depth, **self.hits(method, length, depth)}
                                        for length in self.lengths for depth in self.depths],
                "answers": list(method.answers),
                "seconds": method.seconds,
            })
        return {
            "model": self.model,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "lengths": self.lengths,
            "depths": self.depths,
            "trials": self.trials,
            "prompts_total": self.prompts_total,
            "interrupted": self.interrupted,
            "prompts": [prompt.as_dict() for prompt in self.prompts],
            "methods": methods,
        }


def answer(llm: LLM, spec: CacheSpec, prompt: PasskeyPrompt, max_new_tokens: int) -> str:
    """The method's greedy answer through a fresh cache holding exactly the prompt and the answer."""
    session = Session(llm, spec, capacity=len(prompt.ids) + max_new_tokens)
    for _ in session.stream(prompt.ids, max_tokens=max_new_tokens, sampling=SamplingParams(temperature=0)):
        pass
    return session.last.text


def passkey(
    llm: LLM,
    specs: Iterable[str | CacheSpec],
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    max_new_tokens: int = ANSWER_TOKENS,
    progress: Callable[[int, int], None] | None = None,
) -> PasskeyReport:
    """Asks every method (fp16 first) every prompt; on KeyboardInterrupt returns the prompts all of them answered.

    `progress(done, total)` is called after each (prompt, method) answer.
    """
    check_settings(lengths, depths, trials, seed)
    if max_new_tokens < 1:
        raise XQInferError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    positions = llm.config.max_position_embeddings
    for length in lengths:
        if length + max_new_tokens > positions:
            raise XQInferError(f"--length {length} and a {max_new_tokens}-token answer exceed the model's "
                               f"{positions} positions; use --length {positions - max_new_tokens} or less")
    # Resolved: the report names every option, the model-dependent ones (AsymKV's lk, ...) filled in.
    resolved_specs = [resolved(spec, llm.config) for spec in with_baseline(specs)]
    methods = [MethodAnswers(spec, bits_label(spec, llm.config), normalized_size(spec, llm.config, llm.dtype))
               for spec in resolved_specs]
    prompts = build_prompts(llm.tokenizer, lengths, depths, trials, seed)
    report = PasskeyReport(llm.name, seed, max_new_tokens, list(lengths), list(depths), trials, len(prompts), [],
                           methods)
    total, done = len(prompts) * len(methods), 0
    try:
        for prompt in prompts:
            pending = []
            for method in methods:
                start = time.perf_counter()
                pending.append((method, answer(llm, method.spec, prompt, max_new_tokens),
                                time.perf_counter() - start))
                done += 1
                if progress:
                    progress(done, total)
            # A prompt counts only once every method has answered it, so an interrupted table stays comparable.
            for method, text, seconds in pending:
                method.answers.append(text)
                method.seconds += seconds
            report.prompts.append(prompt)
    except KeyboardInterrupt:
        report.interrupted = True
    return report
