"""xqinfer: long-context Llama/Mistral inference with compressed caches (XQuant, XQuant-CL, XQuant-KV, KIVI, AsymKV).

    import xqinfer
    llm = xqinfer.load("path/or/hub-id")          # or xqinfer.load(preset="llama-tiny")
    print(xqinfer.generate(llm, "Once upon a time", max_tokens=64, cache="fp16").text)
"""

from .api import LLM, GenerationResult, Session, generate, load, stream
from .cache import make_cache, parse_spec
from .engine import Engine, GenerationStats
from .errors import XQInferError
from .sampling import SamplingParams

__all__ = [
    "LLM",
    "Engine",
    "GenerationResult",
    "GenerationStats",
    "SamplingParams",
    "Session",
    "XQInferError",
    "generate",
    "load",
    "make_cache",
    "parse_spec",
    "stream",
]
