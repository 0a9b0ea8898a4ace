"""Perplexity of several cache methods over one text, window by window, under the `sim` or `stream` protocol.

Windows, tokenization and the formula follow METHODS.md section 9 (the GPTQ/KVQuant WikiText-2 convention):
the whole file is tokenized once (CRLF -> LF, the tokenizer's BOS once at the start), cut into non-overlapping
windows of `ctx` tokens with the partial tail dropped, and PPL = exp(mean cross-entropy over every position of
every window that has a next token). Every method scores exactly the same positions, and `fp16` always runs first
as the baseline, so ΔPPL and the KL divergence compare like with like.

`scoring="llama.cpp"` scores as llama-perplexity does, so its figures sit beside llama.cpp's: the same windows, the
first token of each replaced by BOS when the tokenizer adds one, and only the second half of each window scored
(positions ctx/2 .. ctx-2 predicting the tokens after them), which every token sees at least ctx/2 of context for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .accounting import bits_label, normalized_size
from .api import LLM
from .cache import CacheSpec, make_cache, parse_spec
from .errors import XQInferError
from .memory import CACHE_HINT, cache_needs, check_memory

PROTOCOLS = ("sim", "stream")
SCORINGS = ("gptq", "llama.cpp")
BASELINE = "fp16"


def read_text(path: str | Path) -> str:
    """The dataset as text, without a UTF-8 BOM; refuses what is missing, empty, binary or not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise XQInferError(f"dataset {path} does not exist") from None
    except IsADirectoryError:
        raise XQInferError(f"dataset {path} is a directory; pass a text file") from None
    if b"\x00" in data:
        raise XQInferError(f"dataset {path} is binary (it contains NUL bytes); pass a UTF-8 text file")
    try:
        # utf-8-sig drops a leading BOM, which is no part of the text (scored, it costs ~10% of the PPL).
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise XQInferError(f"dataset {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise XQInferError(f"dataset {path} is empty")
    return text.replace("\r\n", "\n")


def make_windows(ids: list[int], ctx: int, limit: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `ctx` tokens, the partial tail dropped, at most `limit` of them."""
    if len(ids) < ctx:
        raise XQInferError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}; "
                           f"use --ctx {len(ids)} or less")
    windows = [ids[start : start + ctx] for start in range(0, len(ids) - ctx + 1, ctx)]
    return windows[:limit] if limit else windows


def with_baseline(specs: Iterable[str | CacheSpec]) -> list[CacheSpec]:
    """The specs parsed, `fp16` first whether given or not (and only once): what the others are compared with."""
    parsed = [parse_spec(s) if isinstance(s, str) else s for s in specs]
    return [parse_spec(BASELINE)] + [s for s in parsed if str(s) != BASELINE]


@dataclass
class MethodScore:
    """Running sums for one method; the figures are derived from them."""

    spec: CacheSpec
    normalized_size: float
    bits: str
    label: str  # what tables call it (CacheSpec.display_name)
    nll_sum: float = 0.0
    nll_squares: float = 0.0
    kld_sum: float = 0.0
    # Of the per-token differences from the baseline's NLL (the same tokens): ΔPPL's own, paired, error.
    delta_nll_sum: float = 0.0
    delta_nll_squares: float = 0.0
    tokens: int = 0
    windows: int = 0
    seconds: float = 0.0

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else float("nan")

    @property
    def ppl_stderr(self) -> float:
        """Standard error of the PPL, propagated from that of the mean NLL (as llama-perplexity reports it)."""
        return self.ppl * _stderr_of_mean(self.nll_sum, self.nll_squares, self.tokens)

    @property
    def delta_ppl_stderr(self) -> float:
        """Standard error of ΔPPL = PPL − PPL(baseline), propagated from that of the mean per-token difference of NLL.

        Both score the same tokens, so most of each PPL's own error (which text is hard) cancels: the difference is
        known far better than either PPL's stderr suggests. Tokens are taken as independent, as for `ppl_stderr`.
        """
        return self.ppl * _stderr_of_mean(self.delta_nll_sum, self.delta_nll_squares, self.tokens)

    @property
    def kld(self) -> float:
        return self.kld_sum / self.tokens if self.tokens else float("nan")


def _stderr_of_mean(total: float, squares: float, count: int) -> float:
    """Standard error of a mean from the running sum and sum of squares of `count` samples (unbiased variance)."""
    if count < 2:
        return float("nan")
    mean = total / count
    return math.sqrt(max(squares / count - mean**2, 0.0) / (count - 1))


@dataclass
class PerplexityReport:
    dataset: str
    model: str
    protocol: str
    ctx: int
    chunk: int
    windows_total: int
    scores: list[MethodScore]
    with_kld: bool
    scoring: str = "gptq"
    interrupted: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def baseline(self) -> MethodScore:
        return self.scores[0]

    def rows(self) -> list[dict]:
        base = self.baseline.ppl
        rows = []
        for score in self.scores:
            row = {
                "spec": str(score.spec),
                "label": score.label,
                "bits": score.bits,
                "normalized_size": score.normalized_size,
                "compression": 1.0 / score.normalized_size if score.normalized_size else float("inf"),
                "ppl": score.ppl,
                "ppl_stderr": score.ppl_stderr,
                "delta_ppl": score.ppl - base,
                "delta_ppl_stderr": score.delta_ppl_stderr,
                "kld": score.kld if self.with_kld else None,
                "tokens": score.tokens,
                "windows": score.windows,
                "seconds": score.seconds,
            }
            rows.append(row)
        return rows

    def as_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "model": self.model,
            "protocol": self.protocol,
            "ctx": self.ctx,
            "chunk": self.chunk,
            "scoring": self.scoring,
            "windows_total": self.windows_total,
            "interrupted": self.interrupted,
            "methods": self.rows(),
            **self.extra,
        }


def perplexity(
    llm: LLM,
    dataset: str | Path,
    specs: Iterable[str | CacheSpec],
    *,
    ctx: int,
    protocol: str = "sim",
    chunk: int = 1,
    limit: int | None = None,
    kld: bool = False,
    scoring: str = "gptq",
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityReport:
    """Scores every method on the same windows; on KeyboardInterrupt returns what complete windows gave.

    `progress(done, total)` is called after each (window, method) pass.
    """
    check_options(ctx, protocol, scoring, chunk)
    limit_positions = llm.config.max_position_embeddings
    if ctx > limit_positions:
        raise XQInferError(f"--ctx {ctx} exceeds the model's {limit_positions} positions")
    parsed = with_baseline(specs)
    ids = llm.tokenizer.encode(read_text(dataset), add_bos=True)
    windows = make_windows(ids, ctx, limit)
    first = 0
    if scoring == "llama.cpp":
        first = ctx // 2
        bos = llm.tokenizer.bos_id
        if bos is not None and ids[0] == bos:  # the tokenizer adds BOS: every window starts with one
            windows = [[bos] + window[1:] for window in windows]
    check_memory(cache_needs(parsed, llm.config, ctx, 1, llm.dtype), llm.device,
                 lambda: f"{len(parsed)} caches of {ctx} tokens", CACHE_HINT)
    caches = [make_cache(spec, llm.model, ctx) for spec in parsed]
    for cache in caches:
        cache.simulate = protocol == "sim"
    # The caches' specs have the model-dependent options (AsymKV's lk, XQuant-KV's kq...) filled in.
    scores = [MethodScore(cache.spec, normalized_size(cache.spec, llm.config, llm.dtype),
                          bits_label(cache.spec, llm.config), cache.spec.display_name(llm.dtype)) for cache in caches]
    report = PerplexityReport(str(dataset), llm.name, protocol, ctx, chunk, len(windows), scores, kld, scoring)
    total, done = len(windows) * len(parsed), 0
    try:
        for window in windows:
            tokens = torch.tensor([window], device=llm.device)
            pending = []
            reference = reference_nll = None
            for cache, score in zip(caches, scores):
                start = time.perf_counter()
                logits = window_logits(llm, cache, tokens, protocol, chunk)
                log_probs = F.log_softmax(logits[0, first:-1].float(), dim=-1)
                nll = -log_probs.gather(-1, tokens[0, first + 1 :, None]).squeeze(-1)
                divergence = 0.0
                if reference is None:
                    reference, reference_nll = log_probs, nll
                elif kld:
                    divergence = F.kl_div(log_probs, reference, log_target=True, reduction="sum").item()
                delta = nll.double() - reference_nll.double()
                pending.append((score, nll.sum().item(), nll.pow(2).sum().item(), delta.sum().item(),
                                delta.pow(2).sum().item(), divergence, nll.numel(), time.perf_counter() - start))
                done += 1
                if progress:
                    progress(done, total)
            # A window counts only once every method has scored it, so an interrupted table stays comparable.
            for score, nll_sum, nll_squares, delta_sum, delta_squares, divergence, count, seconds in pending:
                score.nll_sum += nll_sum
                score.nll_squares += nll_squares
                score.delta_nll_sum += delta_sum
                score.delta_nll_squares += delta_squares
                score.kld_sum += divergence
                score.tokens += count
                score.windows += 1
                score.seconds += seconds
    except KeyboardInterrupt:
        report.interrupted = True
    return report


def check_options(ctx: int, protocol: str, scoring: str, chunk: int) -> None:
    """Refuses what no model could make sense of (the CLI calls it before loading one)."""
    if protocol not in PROTOCOLS:
        raise XQInferError(f"unknown protocol {protocol!r} (accepted: {', '.join(PROTOCOLS)})")
    if scoring not in SCORINGS:
        raise XQInferError(f"unknown scoring {scoring!r} (accepted: {', '.join(SCORINGS)})")
    if chunk < 1:
        raise XQInferError("--chunk must be at least 1")
    # gptq scores every position but the last; llama.cpp the second half of the window but its last position.
    least = 3 if scoring == "llama.cpp" else 2
    if ctx < least:
        raise XQInferError(f"--ctx must be at least {least} with --scoring {scoring} (a window needs a scored "
                           "position and its next token)")


@torch.inference_mode()
def window_logits(llm: LLM, cache, tokens: torch.Tensor, protocol: str, chunk: int) -> torch.Tensor:
    """Logits [1, ctx, vocab] of one window through a freshly reset cache."""
    cache.reset()
    length = tokens.shape[1]
    if protocol == "sim":
        if length > cache.max_chunk:
            raise XQInferError(f"the sim protocol runs a window in one pass; this cache takes at most "
                               f"{cache.max_chunk} tokens at once (sliding window): use a smaller --ctx")
        return llm.model(tokens, torch.arange(length, device=tokens.device), cache)
    step = min(chunk, cache.max_chunk)
    pieces = []
    for start in range(0, length, step):
        positions = torch.arange(start, min(start + step, length), device=tokens.device)
        pieces.append(llm.model(tokens[:, start : start + step], positions, cache))
    return torch.cat(pieces, dim=1)
