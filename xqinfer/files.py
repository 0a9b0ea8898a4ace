"""Files xqinfer creates for the user: never over one that exists, never a half-written one left behind."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Callable

from .errors import XQInferError


def write_new_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Creates `path` and fills it with `write(handle)`; raises XQInferError rather than touch an existing file.

    Mode "x" creates the file or fails, so even a file made since any earlier check is safe. A write that fails (or
    is interrupted) removes the file, which is the one just created here, never the user's.
    """
    try:
        handle = path.open("xb")
    except FileExistsError:
        raise XQInferError(f"{path} already exists: choose another name (xqinfer never overwrites a file)") from None
    except OSError as exc:
        raise XQInferError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with handle:
            write(handle)
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise XQInferError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
