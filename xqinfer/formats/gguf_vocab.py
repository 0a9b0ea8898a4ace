"""The tokenizer of a GGUF file, rebuilt from its metadata (llama.cpp's ``tokenizer.ggml.*`` keys).

A GGUF holds no tokenizer.json: only the vocabulary, the merges (byte-level BPE) or scores (SentencePiece), a type
per token, the special token ids, the chat template, and a pre-tokenizer *name*, ``tokenizer.ggml.pre``, standing for
the split regexes that llama.cpp hard-codes per name (src/llama-vocab.cpp). This module builds the
`tokenizers.Tokenizer` that the original tokenizer.json describes from those, without transformers.

Where transformers' own GGUF conversion (5.x) and llama.cpp disagree, llama.cpp wins, since it defines the format:
- ``pre`` names that transformers does not map (it falls back to plain GPT-2 splitting) get llama.cpp's regexes;
  "smollm" and the other StarCoder-style names isolate every digit first, as the original tokenizer.json does;
- Llama-3 and Tekken vocabularies skip merges for a word that is a whole token (``ignore_merges``), and add BOS
  when ``tokenizer.ggml.add_bos_token`` is absent;
- ``tokenizer.ggml.add_space_prefix`` = false is honoured for SentencePiece vocabularies;
- control and user-defined tokens are added under their own spelling even when it is outside the byte-level
  alphabet (llama.cpp's converter writes added tokens raw); transformers drops those.
An unknown ``pre`` name is refused, as llama.cpp refuses it; a file without one gets llama.cpp's "default" regexes.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from xqinfer.errors import ConfigError
from xqinfer.tokenizer import Tokenizer

# llama.cpp's token types (tokenizer.ggml.token_type), as gguf.TokenType numbers them.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
# Tokens that llama.cpp and transformers match whole in text: control and unknown ones as special tokens (skipped by
# decode(skip_special=True)), user-defined ones as plain added tokens.
_SPECIAL_TYPES = {_UNKNOWN, _CONTROL}

_SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}

# The split regexes as the original tokenizer.json files spell them: llama-vocab.cpp quotes each above the variant it
# rewrote for std::regex, which lacks (?i:) and \p{Lu}-style classes; Oniguruma, under tokenizers, has both.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Non-ASCII classes are written as code points (\x{...}): llama-vocab.cpp's copy of deepseek-llm's letter class lost
# six of them to Unicode normalization (U+1F7D, U+1FD3, U+1FDB ending ranges, U+1FBE, U+2126, U+212A became other
# characters, reversing three ranges); restored, every member is a cased letter, as the class means.
_CJK = r"[\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+"
_DEEPSEEK_LETTERS = (
    r"A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}"
    r"\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}"
    r"\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}"
    r"\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}"
    r"\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}"
    r"\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}"
    r"\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}"
    r"\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}"
    r"\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}"
    r"\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}"
    r"\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}"
    r"\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}"
)
_DEEPSEEK_LLM = (
    r"[\r\n]",
    rf"\s?[{_DEEPSEEK_LETTERS}]+",
    r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# What llama.cpp splits with when a byte-level file names no pre-tokenizer (or names "default").
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(frozen=True)
class _Pre:
    """One llama.cpp pre-tokenizer: how text is cut into words before byte-level BPE runs on each."""

    splits: tuple[str, ...] = ()  # regexes applied in turn, each cutting every piece around its matches
    digits: bool = False  # isolate every digit first (the original files' Digits(individual_digits=True))
    gpt2: bool = False  # then ByteLevel's built-in GPT-2 regex (how the original GPT-2-style files say it)
    ignore_merges: bool = False  # a word that is itself a token is not merged up from its bytes
    add_bos: bool = False  # llama.cpp's add_bos when the file has no tokenizer.ggml.add_bos_token

    def build(self) -> pre_tokenizers.PreTokenizer:
        steps = [pre_tokenizers.Digits(individual_digits=True)] if self.digits else []
        steps += [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in self.splits]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=self.gpt2))
        return pre_tokenizers.Sequence(steps)


def _names(pre: _Pre, names: str) -> dict[str, _Pre]:
    return dict.fromkeys(names.split(), pre)


# llama.cpp's names, grouped as llama-vocab.cpp groups them; encoder-only vocabularies (BERT-style SEP) are left out.
_PRE_TOKENIZERS: dict[str, _Pre] = {
    **_names(_Pre(splits=_DEFAULT), "default"),
    **_names(_Pre(gpt2=True), "gpt-2 phi-2 mpt olmo jais trillion exaone4 gigachat a.x-4.0 mellum granite-docling"),
    **_names(_Pre(digits=True, gpt2=True), "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2"),
    **_names(
        _Pre(splits=(_LLAMA3,), ignore_merges=True, add_bos=True),
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
    ),
    **_names(_Pre(splits=(_LLAMA3,)), "dbrx smaug-bpe"),
    **_names(_Pre(splits=(_QWEN2,)), "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open"),
    **_names(_Pre(splits=(_QWEN35,)), "qwen35"),
    **_names(_Pre(splits=(_TEKKEN,), ignore_merges=True, add_bos=True), "tekken"),
    **_names(_Pre(splits=(_GPT4O,)), "gpt-4o llama4 kanana2 talkie minimax-m2"),
    **_names(_Pre(splits=_DEEPSEEK_LLM), "deepseek-llm"),
    **_names(_Pre(splits=_DEEPSEEK_CODER), "deepseek-coder"),
    **_names(_Pre(splits=_DEEPSEEK_V3), "deepseek-v3"),
}


def _strings(metadata: Mapping[str, Any], key: str, origin: str) -> list[str]:
    value = metadata.get(key)
    if value is None:
        raise ConfigError(f"{origin}: {key} is missing; xqinfer cannot rebuild the tokenizer without it")
    if not isinstance(value, list) or not set(map(type, value)) <= {str}:
        raise ConfigError(f"{origin}: {key} must be a list of strings")
    return value


def _numbers(metadata: Mapping[str, Any], key: str, kinds: set[type], count: int, origin: str) -> list | None:
    """A per-token array (token types are ints; scores floats, or ints, which llama.cpp also takes), or None."""
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not set(map(type, value)) <= kinds:  # exact types: a bool is no int
        raise ConfigError(f"{origin}: {key} must be a list of {'numbers' if float in kinds else 'integers'}")
    if len(value) != count:
        raise ConfigError(f"{origin}: {key} has {len(value)} entries for {count} tokens")
    return value


_KIND_NAMES = {int: "an integer", bool: "a boolean", str: "a string"}


def _scalar(metadata: Mapping[str, Any], key: str, kind: type, origin: str) -> Any:
    value = metadata.get(key)
    if value is not None and type(value) is not kind:  # exact type: a bool is no int
        raise ConfigError(f"{origin}: {key} must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


def _vocab(tokens: list[str], origin: str) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: set[str] = set()
        duplicate = next(t for t in tokens if t in seen or seen.add(t))
        raise ConfigError(f"{origin}: tokenizer.ggml.tokens lists {duplicate!r} twice")
    return vocab


def _byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str], origin: str) -> tuple[_HFTokenizer, bool]:
    """GPT-2-style BPE over UTF-8 bytes spelled as printable characters (tokens and merges come so spelled)."""
    pre_name = _scalar(metadata, "tokenizer.ggml.pre", str, origin) or "default"
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise ConfigError(
            f"{origin}: tokenizer.ggml.pre {pre_name!r} is not a pre-tokenizer xqinfer knows "
            f"(known: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    merges = []
    for merge in _strings(metadata, "tokenizer.ggml.merges", origin):
        # llama.cpp splits at the first space after the first character, so a merge may start with a space.
        cut = merge.find(" ", 1)
        if cut < 0:
            raise ConfigError(f"{origin}: tokenizer.ggml.merges entry {merge!r} is not two tokens joined by a space")
        merges.append((merge[:cut], merge[cut + 1 :]))
    vocab = _vocab(tokens, origin)
    try:
        model = models.BPE(vocab, merges, ignore_merges=pre.ignore_merges)
    except Exception as exc:  # tokenizers raises bare Exception, e.g. for a merge of tokens not in the vocabulary
        raise ConfigError(f"{origin}: tokenizer.ggml.merges do not fit the vocabulary: {exc}") from None
    backend = _HFTokenizer(model)
    backend.pre_tokenizer = pre.build()
    backend.decoder = decoders.ByteLevel()
    return backend, pre.add_bos


def _spm_merges(tokens: list[str], vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies, in the order transformers' generate_merges gives them.

    Every split of a token into two vocabulary tokens is a merge ranked by that token's score, best first; ties go to
    the longer left part, then the longer right part, then to vocabulary order. (generate_merges also orders each
    token's splits by their parts' ids, which never decides: two splits of one token differ in length.)
    """
    ranked = [
        (score, token[:k], token[k:])
        for token, score in zip(tokens, scores)
        for k in range(1, len(token))
        if token[:k] in vocab and token[k:] in vocab
    ]
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in ranked]


def _sentencepiece_bpe(
    metadata: Mapping[str, Any], tokens: list[str], unk_token: str | None, origin: str
) -> tuple[_HFTokenizer, bool]:
    """Llama/Mistral-style SentencePiece BPE: spaces spelled "▁", unknown characters as <0xNN> byte tokens."""
    scores = _numbers(metadata, "tokenizer.ggml.scores", {float, int}, len(tokens), origin)
    if scores is None:
        raise ConfigError(f"{origin}: tokenizer.ggml.scores is missing; a 'llama' vocabulary merges by score")
    vocab = _vocab(tokens, origin)
    backend = _HFTokenizer(
        models.BPE(vocab, _spm_merges(tokens, vocab, scores), unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    )
    prefix = _scalar(metadata, "tokenizer.ggml.add_space_prefix", bool, origin)
    prefix = True if prefix is None else prefix
    # A normalizer, not Metaspace: it prepends "▁" to text that already starts with a space ("  a" -> "▁▁▁a"), and to
    # the text after each special token, as llama.cpp and sentencepiece do (and Llama-2's own tokenizer.json).
    spaces = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prefix else spaces
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend, True


def _added_by_encode(
    metadata: Mapping[str, Any], name: str, default: bool, special_tokens: dict[str, str], origin: str
) -> str | None:
    """The BOS or EOS token ("bos"/"eos") that encode() adds, or None: as tokenizer.ggml.add_{name}_token says, or
    as `default` when the file does not say."""
    key = f"tokenizer.ggml.add_{name}_token"
    wanted = _scalar(metadata, key, bool, origin)
    token = special_tokens.get(f"{name}_token")
    if wanted and token is None:
        raise ConfigError(f"{origin}: {key} is true but {_SPECIAL_TOKEN_KEYS[f'{name}_token']} is missing")
    return token if (default if wanted is None else wanted) else None


def _template(bos: str | None, eos: str | None, backend: _HFTokenizer) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence, laid out as transformers' update_post_processor lays them."""

    def sequence(name: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in (bos, f"${name}", eos) if t]

    return processors.TemplateProcessing(
        single=sequence("A", 0),
        pair=sequence("A", 0) + sequence("B", 1),
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t],
    )


def tokenizer_from_gguf(metadata: Mapping[str, Any], origin: str = "GGUF") -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (keys to values as gguf.ReaderField.contents() gives them).

    "gpt2" (byte-level BPE) and "llama" (SentencePiece BPE) vocabularies are supported. BOS (and EOS) are added by
    encode() as tokenizer.ggml.add_bos_token (add_eos_token) says, defaulting as llama.cpp does: BOS for "llama"
    and for the Llama-3 and Tekken pre-tokenizers, nothing otherwise. Errors name `origin` and the key at fault.
    """
    tokens = _strings(metadata, "tokenizer.ggml.tokens", origin)
    if not tokens:
        raise ConfigError(f"{origin}: tokenizer.ggml.tokens is empty")
    types = _numbers(metadata, "tokenizer.ggml.token_type", {int}, len(tokens), origin) or [_NORMAL] * len(tokens)
    special_tokens: dict[str, str] = {}
    for name, key in _SPECIAL_TOKEN_KEYS.items():
        token_id = _scalar(metadata, key, int, origin)
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise ConfigError(f"{origin}: {key} = {token_id} is outside the vocabulary of {len(tokens)} tokens")
        special_tokens[name] = tokens[token_id]

    model_type = _scalar(metadata, "tokenizer.ggml.model", str, origin)
    if model_type == "gpt2":
        backend, add_bos_default = _byte_level_bpe(metadata, tokens, origin)
    elif model_type == "llama":
        backend, add_bos_default = _sentencepiece_bpe(metadata, tokens, special_tokens.get("unk_token"), origin)
    else:
        raise ConfigError(
            f"{origin}: tokenizer.ggml.model {model_type!r} is not supported; xqinfer reads 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece BPE) vocabularies"
        )

    # Named special tokens are special whatever their type, as transformers registers them.
    named = set(special_tokens.values())
    special = [t for t, kind in zip(tokens, types) if kind in _SPECIAL_TYPES or t in named]
    user_defined = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t not in named]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    bos = _added_by_encode(metadata, "bos", add_bos_default, special_tokens, origin)
    eos = _added_by_encode(metadata, "eos", False, special_tokens, origin)
    backend.post_processor = _template(bos, eos, backend)

    chat_template = _scalar(metadata, "tokenizer.chat_template", str, origin)
    return Tokenizer(backend, special_tokens, chat_template)
