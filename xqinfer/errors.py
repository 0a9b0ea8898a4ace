"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


def one_line(text: object) -> str:
    """A message on one line: the CLI's errors and warnings are always a single line on stderr."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class XQInferError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class ConfigError(XQInferError):
    """config.json is missing, malformed, or describes something xqinfer does not run."""


class WeightsError(XQInferError):
    """The checkpoint is missing, truncated, in a refused format, or does not match the config."""


class CacheSpecError(XQInferError):
    """A --cache spec names an unknown method or an invalid option."""


class ContextError(XQInferError):
    """A request needs more positions than the model or the allocated cache allows."""


class MemoryLimitError(XQInferError):
    """What a run needs (weights, cache, workspace) is more than the device has free: refused before allocating."""


class SamplingError(XQInferError, ValueError):
    """A sampling setting of the wrong type or out of range (a ValueError too, for callers that catch those)."""


class XQInferWarning(UserWarning):
    """Something xqinfer adjusted for the user (e.g. a residual clamped to the capacity); the CLI prints it on one
    line of stderr."""
