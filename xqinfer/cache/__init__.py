"""Cache methods, one file each, behind the interface in `base`."""

# Imported in the order tables list the methods: registration order is the registry's.
from . import fp16, kivi, asymkv, xquant_kv, xquant, xquant_cl  # noqa: I001
from .base import REGISTRY, Cache, CacheSpec, LayerCache, parse_spec

METHODS = (fp16, kivi, asymkv, xquant_kv, xquant, xquant_cl)


def make_cache(spec: str | CacheSpec, model, capacity: int, batch_size: int = 1) -> Cache:
    """Builds the cache a spec names over a model's attention layers (`model.kv_projections()`), preallocated for
    `capacity` tokens of `batch_size` sequences."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    return REGISTRY[spec.method](spec, model.config, model.kv_projections(), capacity, batch_size)


def benchmarked_specs() -> tuple[str, ...]:
    """Every registered method's headline specs: what `bench` and `plan` compare when no --cache is given."""
    return tuple(spec for method in REGISTRY.values() for spec in method.BENCHMARKED)


__all__ = ["benchmarked_specs", "Cache", "CacheSpec", "LayerCache", "make_cache", "parse_spec", "REGISTRY"]
