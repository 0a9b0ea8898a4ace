"""Cache methods, one file each, behind the interface in `base`."""

from . import asymkv, fp16, kivi, xquant, xquant_cl, xquant_kv
from .base import REGISTRY, Cache, CacheSpec, LayerCache, parse_spec

METHODS = (fp16, kivi, asymkv, xquant, xquant_cl, xquant_kv)


def make_cache(spec: str | CacheSpec, model, capacity: int, batch_size: int = 1) -> Cache:
    """Builds the cache a spec names, preallocated for `capacity` tokens of `batch_size` sequences."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    return REGISTRY[spec.method](spec, model, capacity, batch_size)


__all__ = ["Cache", "CacheSpec", "LayerCache", "make_cache", "parse_spec", "REGISTRY"]
