"""Tokenizer: llama.cpp's Llama-2 vectors, parity with transformers on BOS and chat templates, streaming decode."""

import json
import random
import shutil
from pathlib import Path

import pytest

from xqinfer.errors import ConfigError
from xqinfer.tokenizer import Tokenizer

from conftest import SHARED

LLAMA2 = SHARED / "tokenizers" / "llama2"
STORIES = SHARED / "models" / "stories260K"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

MULTIBYTE_TEXT = "héllo 世界 🎉 naïve"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared asset {path} is absent (tests expect ../shared beside the repository)")
    return path


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(_need(src) / name, dst / name)
    return dst


def _edit_json(path: Path, **changes) -> None:
    """Set keys of a JSON object file; a value of ... removes the key."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data), encoding="utf-8")


def _hf_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def llama2() -> Tokenizer:
    return Tokenizer.from_dir(_need(LLAMA2))


@pytest.fixture(scope="module")
def stories() -> Tokenizer:
    return Tokenizer.from_dir(_need(STORIES))


# --- llama.cpp test vectors ------------------------------------------------------------------------------------


def _llama2_vectors() -> list:
    inp, out = LLAMA2 / "test-vectors.inp", LLAMA2 / "test-vectors.out"
    if not (inp.is_file() and out.is_file()):
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"llama2 test vectors absent from {LLAMA2}"))]
    # llama.cpp writes each input followed by "\n__ggml_vocab_test__\n", so splitting on that whole separator gives
    # the inputs exactly (an input's own trailing newlines stay), plus an empty piece after the last separator.
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert texts[-1] == ""
    texts = texts[:-1]
    expected = out.read_text(encoding="utf-8").split("\n")
    assert expected[-1] == ""
    expected = expected[:-1]
    assert len(texts) == len(expected) == 46
    return [
        pytest.param(text, [int(x) for x in ids.split()], id=f"{i:02d}-{text[:16]!r}")
        for i, (text, ids) in enumerate(zip(texts, expected))
    ]


@pytest.mark.parametrize(("text", "expected"), _llama2_vectors())
def test_llama2_vectors(llama2: Tokenizer, text: str, expected: list[int]) -> None:
    assert llama2.encode(text, add_bos=False) == expected
    assert llama2.encode(text) == [1] + expected


# --- BOS and special tokens ------------------------------------------------------------------------------------

PROBES = ["Once upon a time", "  Hello   world ", "", "Tom's cat\nsat.\n", "naïve 🎉", "a <s> b </s>"]


@pytest.mark.parametrize("src", [STORIES, LLAMA2], ids=["stories260K", "llama2"])
def test_encode_matches_transformers(src: Path) -> None:
    ours = Tokenizer.from_dir(_need(src))
    theirs = _hf_tokenizer(src)
    for text in PROBES:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.encode(text, add_bos=False) == theirs(text, add_special_tokens=False)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


@pytest.mark.parametrize(
    ("add_bos_token", "keep_post_processor"),
    [(False, True), (True, False), (..., False)],
    ids=["config-off-postproc-on", "config-on-no-postproc", "no-config-no-postproc"],
)
def test_bos_follows_post_processor_like_transformers(
    tmp_path: Path, add_bos_token: object, keep_post_processor: bool
) -> None:
    # transformers 5.x ignores add_bos_token once tokenizer.json exists: the post-processor alone decides.
    d = _copy_tokenizer(STORIES, tmp_path / "tok")
    _edit_json(d / "tokenizer_config.json", add_bos_token=add_bos_token)
    if not keep_post_processor:
        _edit_json(d / "tokenizer.json", post_processor=None)
    ours, theirs = Tokenizer.from_dir(d), _hf_tokenizer(d)
    for text in PROBES:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert (ours.encode("Hello")[0] == 1) == keep_post_processor
    assert ours.bos_id == 1


def test_special_tokens(llama2: Tokenizer) -> None:
    assert (llama2.bos_id, llama2.eos_ids, llama2.bos_token, llama2.eos_token) == (1, (2,), "<s>", "</s>")
    assert llama2.vocab_size == 32000
    assert llama2.token_to_id("▁the") == 278
    assert llama2.token_to_id("not a piece") is None
    assert llama2.decode([1, 15043, 2]) == "Hello"
    assert llama2.decode([1, 15043, 2], skip_special=False) == "<s> Hello</s>"


def test_special_tokens_from_dicts_and_special_tokens_map(tmp_path: Path) -> None:
    d = _copy_tokenizer(STORIES, tmp_path / "tok")
    _edit_json(d / "tokenizer_config.json", bos_token={"__type": "AddedToken", "content": "<s>"}, eos_token=...)
    _edit_json(d / "special_tokens_map.json", eos_token={"content": "</s>", "special": True})
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_token, tok.bos_id, tok.eos_token, tok.eos_ids) == ("<s>", 1, "</s>", (2,))


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no tokenizer.json in .*fast-tokenizer format"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    d = _copy_tokenizer(STORIES, tmp_path / "tok")
    (d / "tokenizer_config.json").write_text('{"bos_token": ', encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d)


# --- chat templates --------------------------------------------------------------------------------------------

# Both templates put every output in a whitespace-stripping {{- ... -}} so that the line breaks between the jinja
# statements stay out of the rendered prompt, as the published templates do.
LLAMA3_TEMPLATE = """{{- bos_token -}}
{% for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) -}}
{% if message['meta'] is defined %}
{{- '\\n\\n' + (message['meta'] | tojson(indent=2)) -}}
{% endif %}
{{- '<|eot_id|>' -}}
{% endfor %}
{% if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{% endif %}
"""

MISTRAL_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
{% set system_message = messages[0]['content'] %}
{% set loop_messages = messages[1:] %}
{% else %}
{% set system_message = none %}
{% set loop_messages = messages %}
{% endif %}
{{- bos_token -}}
{% for message in loop_messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{% endif %}
{% if message['role'] == 'user' %}
{% if loop.first and system_message is not none %}
{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' -}}
{% else %}
{{- '[INST] ' + message['content'] + ' [/INST]' -}}
{% endif %}
{% elif message['role'] == 'assistant' %}
{{- ' ' + message['content'] + eos_token -}}
{% endif %}
{% endfor %}
"""

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Tell me a story about a cat."}],
    "system-user": [
        {"role": "system", "content": "You are a kind storyteller."},
        {"role": "user", "content": "Once upon a time?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! Café 🎉", "meta": {"mood": "héllo", "n": [1, 2]}},
        {"role": "user", "content": "  What now?  "},
    ],
}


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    llama3 = _copy_tokenizer(STORIES, root / "llama3")
    _edit_json(llama3 / "tokenizer_config.json", chat_template=LLAMA3_TEMPLATE)
    mistral = _copy_tokenizer(STORIES, root / "mistral")
    (mistral / "chat_template.jinja").write_text(MISTRAL_TEMPLATE, encoding="utf-8")
    return {"llama3": llama3, "mistral": mistral}


@pytest.mark.parametrize("style", ["llama3", "mistral"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_transformers(
    chat_dirs: dict[str, Path], style: str, conversation: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[conversation]
    if style == "mistral":
        messages = [{k: v for k, v in m.items() if k != "meta"} for m in messages]
    ours, theirs = Tokenizer.from_dir(chat_dirs[style]), _hf_tokenizer(chat_dirs[style])
    assert ours.has_chat_template
    text = ours.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == theirs.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ids[0] == 1 and ids[1] != 1  # the template's BOS, and no second one


def test_chat_template_shapes(chat_dirs: dict[str, Path]) -> None:
    messages = CONVERSATIONS["multi-turn"]
    text = Tokenizer.from_dir(chat_dirs["llama3"]).render_chat(messages)
    assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert '"mood": "héllo"' in text and "\n  " in text  # tojson keeps non-ASCII and honours indent
    assert text.endswith("What now?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    text = Tokenizer.from_dir(chat_dirs["mistral"]).render_chat(messages)
    assert text == "<s>[INST] Be brief.\n\nHi there [/INST] Hello! Café 🎉</s>[INST]   What now?   [/INST]"


def test_chat_template_list_form_and_jinja_file_priority(tmp_path: Path, chat_dirs: dict[str, Path]) -> None:
    d = _copy_tokenizer(STORIES, tmp_path / "tok")
    _edit_json(
        d / "tokenizer_config.json",
        chat_template=[{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": LLAMA3_TEMPLATE}],
    )
    assert Tokenizer.from_dir(d).chat_template == LLAMA3_TEMPLATE
    (d / "chat_template.jinja").write_text(MISTRAL_TEMPLATE, encoding="utf-8")
    assert Tokenizer.from_dir(d).chat_template == MISTRAL_TEMPLATE


def test_chat_template_globals(tmp_path: Path) -> None:
    d = _copy_tokenizer(STORIES, tmp_path / "tok")
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "|{{ strftime_now('%Y') | length }}|{{ tools is none }}|{{ eos_token }}",
        encoding="utf-8",
    )
    text = Tokenizer.from_dir(d).render_chat(CONVERSATIONS["system-user"])
    assert text == "You are a kind storyteller.|4|True|</s>"


def test_chat_template_errors(tmp_path: Path, chat_dirs: dict[str, Path]) -> None:
    mistral = Tokenizer.from_dir(chat_dirs["mistral"])
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ConfigError, match="roles must alternate"):
        mistral.render_chat(bad)
    with pytest.raises(ConfigError, match="roles must alternate"):
        mistral.encode_chat(bad)
    d = _copy_tokenizer(STORIES, tmp_path / "tok")
    for source, match in [("{% for m in messages %}", "does not compile"), ("{{ 1 / 0 }}", "ZeroDivisionError")]:
        (d / "chat_template.jinja").write_text(source, encoding="utf-8")
        with pytest.raises(ConfigError, match=match) as info:
            Tokenizer.from_dir(d).render_chat(CONVERSATIONS["user"])
        assert "\n" not in str(info.value)


def test_no_template_fallback(stories: Tokenizer) -> None:
    assert not stories.has_chat_template and stories.chat_template is None
    messages = CONVERSATIONS["system-user"]
    text = stories.render_chat(messages)
    assert text == "System: You are a kind storyteller.\n\nUser: Once upon a time?\n\nAssistant:"
    assert stories.render_chat(messages, add_generation_prompt=False) == text.removesuffix("\n\nAssistant:")
    assert stories.encode_chat(messages) == stories.encode(text)
    assert stories.encode_chat(messages)[0] == stories.bos_id


# --- streaming detokenization ----------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = tok.detokenizer()
    return [detok.add(i) for i in ids] + [detok.flush()]


STREAM_TEXTS = [
    MULTIBYTE_TEXT,
    "Once upon a time, there was  a cat.\n\n It said: 𝔘𝔫𝔦 — ok",
    " leading space",
    "a\u0301e\u0308 🇫🇷",  # combining marks and a flag (two regional indicators)
]


@pytest.mark.parametrize("which", ["llama2", "stories260K", "byte_level"])
def test_stream_detokenizer(which: str) -> None:
    if which == "byte_level":
        tok = Tokenizer.byte_level(512)
    else:
        tok = Tokenizer.from_dir(_need(LLAMA2 if which == "llama2" else STORIES))
    for text in STREAM_TEXTS:
        for add_bos in (True, False):
            ids = tok.encode(text, add_bos=add_bos)
            chunks = _stream(tok, ids)
            assert "".join(chunks) == tok.decode(ids), text
            assert not any("\ufffd" in c for c in chunks), chunks


def test_stream_uses_byte_fallback_and_keeps_spaces(llama2: Tokenizer) -> None:
    ids = llama2.encode(MULTIBYTE_TEXT, add_bos=False)
    assert llama2.token_to_id("<0xF0>") in ids  # the emoji really goes through byte tokens
    chunks = _stream(llama2, ids)
    assert "🎉" in chunks and " na" in chunks
    assert "".join(chunks) == MULTIBYTE_TEXT


def test_stream_flush_returns_unfinished_bytes(llama2: Tokenizer) -> None:
    detok = llama2.detokenizer()
    assert [detok.add(i) for i in llama2.encode("🎉", add_bos=False)[:-1]] == ["", "", "", ""]
    assert detok.flush() == "\ufffd" * 3


# --- byte-level tokenizer --------------------------------------------------------------------------------------


def test_byte_level_round_trip() -> None:
    tok = Tokenizer.byte_level(300)
    rng = random.Random(0)
    samples = [MULTIBYTE_TEXT, "", "\x00\t\n\r", "日本語のテキスト", "👩‍👩‍👧 ∑ ≠ ∞", "<0x41>"]
    ranges = [(0x20, 0x7F), (0xA0, 0xD800), (0xE000, 0x110000)]  # every plane, surrogates excluded
    samples.append("".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(500)))
    for text in samples:
        ids = tok.encode(text, add_bos=False)
        assert len(ids) == len(text.encode("utf-8"))
        assert all(3 <= i < 259 for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode(text) == [1] + ids


def test_byte_level_layout() -> None:
    tok = Tokenizer.byte_level(300)
    assert tok.vocab_size == 300
    assert (tok.bos_id, tok.eos_ids, tok.bos_token, tok.eos_token) == (1, (2,), "<s>", "</s>")
    assert not tok.has_chat_template
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258]
    assert tok.token_to_id("<|reserved_0|>") == 259 and tok.token_to_id("<|reserved_40|>") == 299
    assert tok.encode("A") == [1, 3 + ord("A")]
    assert tok.decode([1, 3 + ord("h"), 260, 3 + ord("i"), 299, 2]) == "hi"
    assert tok.decode([260], skip_special=False) == "<|reserved_1|>"
    assert Tokenizer.byte_level(259).vocab_size == 259
    with pytest.raises(ConfigError, match="259"):
        Tokenizer.byte_level(258)
