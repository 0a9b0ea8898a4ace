"""The file /save writes and /load reads: a conversation and the settings it ran with, as JSON.

The system prompt is the conversation's first message (role "system"), as the chat template sees it; a reply that
Ctrl-C stopped carries `"interrupted": true`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral
from pathlib import Path
from typing import Any

from .errors import XQInferError
from .sampling import SamplingParams

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "interrupted")


@dataclass
class SavedChat:
    """Every field but `messages` may be missing from a file (None here): /load then keeps the running value."""

    model: str | None = None
    cache: str | None = None
    context: int | None = None
    max_tokens: int | None = None
    sampling: dict[str, Any] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"


def is_text(text: str) -> bool:
    """Whether text is UTF-8 encodable: undecodable input reaches Python as lone surrogates, which are not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_saved_chat(path: Path) -> SavedChat:
    """The chat a /save file holds, checked throughout; raises XQInferError with one line saying what is wrong."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise XQInferError(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise XQInferError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise XQInferError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise XQInferError(f"{path} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    problem = _shape_problem(data)
    if problem:
        raise XQInferError(f"{path} is not a chat saved by /save: {problem}")
    return SavedChat(**data)


def _shape_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    names = [item.name for item in fields(SavedChat)]
    unknown = [key for key in data if key not in names]
    if unknown:
        return f"unknown key {unknown[0]!r} (accepted: {', '.join(names)})"
    if not isinstance(data.get("messages"), list):
        return "'messages' must be a list of messages"
    for index, message in enumerate(data["messages"]):
        problem = _message_problem(message, index)
        if problem:
            return f"message {index + 1}: {problem}"
    for key in ("model", "cache"):
        if data.get(key) is not None and not isinstance(data[key], str):
            return f"{key!r} must be a string"
    for key in ("context", "max_tokens"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
            return f"{key!r} must be a whole number of at least 1, got {value!r}"
    return _sampling_problem(data.get("sampling"))


def _message_problem(message: Any, index: int) -> str | None:
    if not isinstance(message, dict):
        return f"a JSON {type(message).__name__}, not an object with a role and a content"
    unknown = [key for key in message if key not in MESSAGE_KEYS]
    if unknown:
        return f"unknown key {unknown[0]!r} (accepted: {', '.join(MESSAGE_KEYS)})"
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        return f"role {role!r} is none of {', '.join(ROLES)}"
    if role == "system" and index > 0:
        return "a system prompt comes first only"
    if not isinstance(content, str):
        return "'content' must be a string"
    if not is_text(content):
        return "'content' is not valid UTF-8 text"
    if not isinstance(message.get("interrupted", False), bool):
        return "'interrupted' must be true or false"
    return None


def _sampling_problem(sampling: Any) -> str | None:
    if sampling is None:
        return None
    if not isinstance(sampling, dict):
        return "'sampling' must be an object of sampling settings"
    names = [item.name for item in fields(SamplingParams)]
    unknown = [key for key in sampling if key not in names]
    if unknown:
        return f"unknown sampling setting {unknown[0]!r} (accepted: {', '.join(names)})"
    try:
        SamplingParams(**sampling)
    except XQInferError as exc:
        return f"sampling: {exc}"
    return None
