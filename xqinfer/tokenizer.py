"""Tokenization, detokenization and chat templates on top of the `tokenizers` fast-tokenizer format.

Encoding is meant to give the same ids as ``transformers.AutoTokenizer`` (5.x) on the same directory, and chat
rendering the same text as its ``apply_chat_template``; the tests check both against transformers.
"""

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, processors
from tokenizers import Tokenizer as _HFTokenizer

from xqinfer.errors import ConfigError

# The named special tokens that transformers hands to chat templates (when set), in its order.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

_BYTE_LEVEL_FIRST_RESERVED = 3 + 256


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {_one_line(exc)}") from None


def _token_content(value: Any) -> str | None:
    """A special token as saved by transformers: a plain string or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_chat_template(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} of which "default" is used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"]
    return None


def _template_raise_exception(message: str) -> None:
    raise ConfigError(f"chat template error: {_one_line(message)}")


def _template_tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Replaces jinja's own tojson, which HTML-escapes; transformers' templates expect plain json.dumps output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _template_tojson
    env.globals["raise_exception"] = _template_raise_exception
    env.globals["strftime_now"] = _template_strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"chat template does not compile: {_one_line(exc)}") from None


def _plain_transcript(messages: list[dict], add_generation_prompt: bool) -> str:
    """The fallback for tokenizers without a chat template.

    Each turn becomes "Role: content" (role capitalised), turns are separated by a blank line, and the generation
    prompt is a final "Assistant:" for the model to continue.
    """
    turns = [f"{str(m.get('role', 'user')).capitalize()}: {m.get('content', '')}" for m in messages]
    if add_generation_prompt:
        turns.append("Assistant:")
    return "\n\n".join(turns)


class Tokenizer:
    """A fast tokenizer plus the special tokens and chat template that come with it."""

    def __init__(
        self,
        backend: _HFTokenizer,
        special_tokens: dict[str, str],
        chat_template: str | None,
    ) -> None:
        self._tok = backend
        self._special_tokens = special_tokens
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token: str | None = special_tokens.get("bos_token")
        self.eos_token: str | None = special_tokens.get("eos_token")
        self.bos_id: int | None = self.token_to_id(self.bos_token) if self.bos_token is not None else None
        eos_id = self.token_to_id(self.eos_token) if self.eos_token is not None else None
        self.eos_ids: tuple[int, ...] = () if eos_id is None else (eos_id,)

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        """Load tokenizer.json, with tokenizer_config.json, special_tokens_map.json and chat_template.jinja if present.

        BOS follows tokenizer.json's post-processor, not tokenizer_config.json's add_bos_token: transformers 5.x drops
        add_bos_token/add_eos_token whenever a tokenizer.json exists, and encode() must give its ids.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ConfigError(f"no tokenizer.json in {path}; xqinfer reads only the fast-tokenizer format")
        try:
            backend = _HFTokenizer.from_str(tokenizer_file.read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises bare Exception for every parse failure
            raise ConfigError(f"cannot read {tokenizer_file}: {_one_line(exc)}") from None

        config: dict = {}
        if (path / "tokenizer_config.json").is_file():
            config = _read_json(path / "tokenizer_config.json")
        special_map: dict = {}
        if (path / "special_tokens_map.json").is_file():
            special_map = _read_json(path / "special_tokens_map.json")
        if not isinstance(config, dict) or not isinstance(special_map, dict):
            raise ConfigError(f"tokenizer_config.json or special_tokens_map.json in {path} is not a JSON object")

        special_tokens: dict[str, str] = {}
        for name in _SPECIAL_TOKEN_NAMES:
            # A key present in tokenizer_config.json wins even when null: that is how a config says "no BOS".
            raw = config[name] if name in config else special_map.get(name)
            content = _token_content(raw)
            if content is not None:
                special_tokens[name] = content

        # transformers registers named special tokens as special added tokens, so that they are matched whole in
        # text and skipped by decode(skip_special_tokens=True). Tokens tokenizer.json already lists keep their own
        # flags, and ones missing from the vocabulary are not added: a new id would be past the embedding table.
        already_added = {t.content for t in backend.get_added_tokens_decoder().values()}
        to_register = [
            t for t in special_tokens.values() if t not in already_added and backend.token_to_id(t) is not None
        ]
        if to_register:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in to_register])

        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            try:
                chat_template = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read {template_file}: {_one_line(exc)}") from None
        else:
            chat_template = _pick_chat_template(config.get("chat_template"))
        return cls(backend, special_tokens, chat_template)

    @classmethod
    def byte_level(cls, vocab_size: int) -> "Tokenizer":
        """The built-in tokenizer for random-weight presets: <unk>, <s>, </s>, 256 byte tokens, then reserved ids.

        Every character is spelled as its UTF-8 bytes (byte fallback with no merges), so any text round-trips;
        ids from 259 up are special tokens "<|reserved_N|>" (N from 0) that the model may emit but text never gives.
        """
        if vocab_size < _BYTE_LEVEL_FIRST_RESERVED:
            raise ConfigError(
                f"byte-level tokenizer needs vocab_size >= {_BYTE_LEVEL_FIRST_RESERVED}, got {vocab_size}"
            )
        specials = ["<unk>", "<s>", "</s>"]
        reserved = [f"<|reserved_{n}|>" for n in range(vocab_size - _BYTE_LEVEL_FIRST_RESERVED)]
        pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + reserved
        backend = _HFTokenizer(
            models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True)
        )
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + reserved])
        return cls(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, None)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of text; add_bos=True adds what the tokenizer's post-processor adds (BOS for Llama/Mistral)."""
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def token_at(self, text: str, index: int, add_bos: bool = True) -> int:
        """The position, in `encode(text, add_bos)`, of the token that holds character `index` of text."""
        encoding = self._tok.encode(text, add_special_tokens=add_bos)
        # An added BOS holds no character of the text: its span is empty.
        return next(i for i, (start, end) in enumerate(encoding.offsets) if start < end and end > index)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ids; special tokens (BOS, EOS, reserved) are dropped unless skip_special is False."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, or None when it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    @property
    def has_chat_template(self) -> bool:
        """False when render_chat falls back to the plain transcript (callers warn about that once)."""
        return self.chat_template is not None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template renders it (as transformers' apply_chat_template does)."""
        # transformers drops None values so that templates see a missing key rather than the string "None".
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if self.chat_template is None:
            return _plain_transcript(messages, add_generation_prompt)
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        try:
            return self._compiled_template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except ConfigError:
            raise
        except Exception as exc:  # a template is arbitrary code: any failure in it is a bad template
            raise ConfigError(f"chat template failed: {type(exc).__name__}: {_one_line(exc)}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of render_chat's text, adding no BOS: a chat template writes the BOS itself when it wants one.

        The plain-transcript fallback has no template to write it, so it gets the tokenizer's usual BOS.
        """
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text, add_bos=not self.has_chat_template)

    def detokenizer(self) -> "StreamDetokenizer":
        """A fresh incremental decoder for one generated sequence."""
        return StreamDetokenizer(self)


class StreamDetokenizer:
    """Turns ids, one at a time, into text chunks whose concatenation is the decode of the whole sequence.

    Decoding a token alone is wrong in two ways: sentencepiece decoders strip the leading space of the first token,
    and a byte-fallback token may be part of a multi-byte character. So each step decodes a short window of recent
    ids twice, with and without the new ones, and emits the difference only once it no longer ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # ids[prefix:read] were already emitted and give context; ids[read:] are not emitted yet.
        self._prefix = 0
        self._read = 0

    def _pending_text(self) -> str:
        seen = self._tokenizer.decode(self._ids[self._prefix : self._read])
        full = self._tokenizer.decode(self._ids[self._prefix :])
        return full[len(seen) :]

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text that became printable (possibly "")."""
        self._ids.append(token_id)
        text = self._pending_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text

    def flush(self) -> str:
        """The text still held back (an unfinished character at the end of the sequence)."""
        text = self._pending_text()
        self._prefix = self._read = len(self._ids)
        return text
