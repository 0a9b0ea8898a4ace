"""`xqinfer ppl` and `xqinfer.ppl`: the perplexity protocols of METHODS.md section 9.

- fp16 PPL is the PPL transformers gives on the same windows (same token ids, same formula).
- Per-token methods without a residual window (XQuant MHA, XQuant-CL) are causal: quantizing a token never depends on
  a later one, so `stream --chunk 1` (token-by-token decode through the real cache) equals `sim`.
- Per-channel groups (KIVI keys, the GQA XQuant key latents) are not: in `sim` a key is quantized with scale and zero
  taken over its whole group, later tokens included, while in `stream` the open group is read in full precision until
  its last token arrives. The tests below pin that difference down: it is exactly the open group, nothing else.
- The CLI: its JSON schema, one-line errors for bad inputs, and a Ctrl-C that still prints the complete windows.
"""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import xqinfer
import xqinfer.ppl as ppl_module
from xqinfer import cli
from xqinfer.accounting import normalized_size
from xqinfer.cache import make_cache, parse_spec
from xqinfer.cache.stream import QuantStream
from xqinfer.ppl import perplexity, read_text, window_logits

from conftest import SHARED

STORIES = SHARED / "models" / "stories260K"  # GQA: 8 query heads, 4 KV heads, head_dim 8, 512 positions
AIDREAMS = SHARED / "models" / "aidreams260K"  # MHA: 4 heads, head_dim 16, 128 positions
SAMPLE = SHARED / "data" / "tinystories-sample.txt"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
RELATIVE = 1e-4


def need(*paths: Path) -> None:
    for path in paths:
        if not path.exists():
            pytest.skip(f"shared asset {path} is absent (tests expect ../shared beside the repository)")


@pytest.fixture(scope="module")
def stories():
    need(STORIES / "model.safetensors", SAMPLE)
    return xqinfer.load(STORIES)


@pytest.fixture(scope="module")
def aidreams():
    need(AIDREAMS / "model.safetensors", SAMPLE)
    return xqinfer.load(AIDREAMS)


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def run(llm, specs: list[str], **kwargs) -> dict[str, float]:
    """PPL of each spec, keyed as given ("fp16" for the baseline, which always runs first)."""
    report = perplexity(llm, SAMPLE, specs, **kwargs)
    assert len(report.scores) == len(specs) + 1
    return {given: score.ppl for given, score in zip(["fp16", *specs], report.scores)}


# --- fp16 against transformers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctx", [100, 512])  # 512: every position the model has
def test_fp16_ppl_equals_transformers_on_the_same_windows(stories, ctx, single_thread):
    from transformers import AutoTokenizer, LlamaForCausalLM

    text = read_text(SAMPLE)
    ours = stories.tokenizer.encode(text, add_bos=True)
    theirs = AutoTokenizer.from_pretrained(str(STORIES))(text)["input_ids"]
    assert ours == theirs  # the same ids, BOS once at the start (METHODS.md section 9)
    assert ours[0] == stories.tokenizer.bos_id and ours.count(ours[0]) == 1

    hf = LlamaForCausalLM.from_pretrained(str(STORIES), attn_implementation="eager", dtype=torch.float32).eval()
    count = len(ours) // ctx  # non-overlapping windows, the partial tail dropped
    windows = torch.tensor(ours[: count * ctx]).view(count, ctx)
    with torch.inference_mode():
        logits = hf(windows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                            reduction="sum")
    expected = math.exp(nll.item() / (count * (ctx - 1)))

    report = perplexity(stories, SAMPLE, [], ctx=ctx)
    fp16 = report.baseline
    assert str(fp16.spec) == "fp16" and len(report.scores) == 1
    assert fp16.windows == report.windows_total == count
    assert fp16.tokens == count * (ctx - 1)  # every position that has a next token
    assert relative(fp16.ppl, expected) <= RELATIVE, (fp16.ppl, expected)


# --- sim against stream ----------------------------------------------------------------------------------------------

PER_TOKEN = {
    # MHA: X cached per token; the CL deltas are per token as well (1 and 3 delta layers of aidreams' 4).
    "aidreams": ["xquant:bits=4,residual=0", "xquant:bits=2,residual=0", "xquant-cl:bits=2",
                 "xquant-cl:bits=3,base_bits=2,base_layers=1"],
    # GQA: XQuant-CL stores Q(ΔX·U_kv) per token.
    "stories": ["xquant-cl:bits=2", "xquant-cl:bits=4,base_layers=1"],
}


@pytest.mark.parametrize("model", sorted(PER_TOKEN))
def test_per_token_methods_stream_chunk_1_equals_sim(model, request, single_thread):
    llm = request.getfixturevalue(model)
    specs = PER_TOKEN[model]
    sim = run(llm, specs, ctx=48, protocol="sim", limit=2)
    stream = run(llm, specs, ctx=48, protocol="stream", chunk=1, limit=2)
    for spec in sim:
        assert relative(stream[spec], sim[spec]) <= RELATIVE, (spec, sim[spec], stream[spec])
    assert all(sim[spec] != sim["fp16"] for spec in sim if spec != "fp16")  # the quantization did something


def test_sim_has_no_residual_window_and_stream_residual_covering_the_window_is_fp16(stories, single_thread):
    """METHODS.md section 9: `sim` reads every K and V quantized whatever `residual` says; in `stream` a residual at
    least as long as the window keeps every token exact (the default residual=128 does so for any --ctx up to 128)."""
    specs = ["kivi:bits=2", "kivi:bits=2,residual=0", "xquant:bits=2", "xquant:bits=2,residual=0"]
    sim = run(stories, specs, ctx=64, protocol="sim", limit=2)
    assert sim["kivi:bits=2"] == sim["kivi:bits=2,residual=0"]
    assert sim["xquant:bits=2"] == sim["xquant:bits=2,residual=0"]
    assert relative(sim["kivi:bits=2"], sim["fp16"]) > 0.05 and relative(sim["xquant:bits=2"], sim["fp16"]) > 0.05

    stream = run(stories, ["kivi:bits=2", "xquant:bits=2"], ctx=64, protocol="stream", chunk=1, limit=2)
    for spec, value in stream.items():
        assert relative(value, stream["fp16"]) <= RELATIVE, (spec, value, stream["fp16"])


OPEN_GROUP = [
    "kivi:bits=2,group=64,residual=0",  # keys per channel, G = ctx
    "kivi:bits=2,group=128,residual=0,prerope=1",  # KIVI*, G > ctx
    "xquant:bits=2,residual=0",  # GQA: key latents X·Uk per channel, G = 128 > ctx
]


def test_per_channel_stream_differs_from_sim_by_the_open_group_alone(stories, monkeypatch, single_thread):
    """With G >= ctx every scored position is in the first, still open, key group: `stream --chunk 1` reads all keys
    (or key latents) exact and only values quantized, which is `sim` with the per-channel quantization removed."""
    stream = run(stories, OPEN_GROUP, ctx=64, protocol="stream", chunk=1, limit=2)
    sim = run(stories, OPEN_GROUP, ctx=64, protocol="sim", limit=2)
    original = QuantStream.simulate

    def values_only(self, y, *args, **kwargs):
        return y if self.axis == "channel" else original(self, y, *args, **kwargs)

    monkeypatch.setattr(QuantStream, "simulate", values_only)
    sim_exact_keys = run(stories, OPEN_GROUP, ctx=64, protocol="sim", limit=2)
    for spec in stream:
        assert relative(stream[spec], sim_exact_keys[spec]) <= RELATIVE, (spec, stream[spec], sim_exact_keys[spec])
        if spec != "fp16":
            # ...and the open group is what separates the two protocols: the plain sim is clearly worse here.
            assert sim[spec] > stream[spec] * 1.05, (spec, sim[spec], stream[spec])
            assert stream[spec] != stream["fp16"]  # the values are still quantized in stream


def one_layer_model(make_hf_model):
    """A one-layer GQA Llama in float64: each position's logits depend only on which of the layer's K/V are
    quantized (no earlier layer feeds the protocols' differences forward), and float64 keeps the two protocols'
    projections bit-close, so no fp16 scale or zero lands on a different rounding."""
    from xqinfer.formats import open_checkpoint
    from xqinfer.loader import load_checkpoint

    _, directory = make_hf_model(num_hidden_layers=1, num_key_value_heads=2)
    return load_checkpoint(open_checkpoint(directory), torch.float64, "cpu")


@pytest.mark.parametrize("spec", ["kivi:bits=2,group=8,residual=0", "kivi:bits=2,group=8,residual=0,prerope=1",
                                  "xquant:bits=2,group=8,residual=0", "xquant:bits=3,group=8,residual=0,outlier=1"])
def test_per_channel_protocols_agree_exactly_where_a_key_group_closes(spec, make_hf_model, single_thread):
    """On one layer, the position that completes a group of G keys reads every key from closed groups in `stream`,
    quantized with the same scale and zero as `sim`: the logits agree there, and differ at every other position
    (position 0 aside: one key gets softmax weight 1 whatever its value)."""
    model = one_layer_model(make_hf_model)
    runner = types.SimpleNamespace(model=model)
    ctx, group = 32, 8
    tokens = torch.randint(0, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(1))
    logits = {}
    for protocol in ("sim", "stream"):
        cache = make_cache(spec, model, ctx)
        cache.simulate = protocol == "sim"
        logits[protocol] = window_logits(runner, cache, tokens, protocol, 1)[0]
    gap = (logits["sim"] - logits["stream"]).abs().amax(dim=-1)
    closing = torch.arange(ctx) % group == group - 1
    assert gap[closing].max() < 1e-5, gap
    assert gap[~closing][1:].min() > 1e-3, gap


# --- the CLI ---------------------------------------------------------------------------------------------------------


def call_main(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    """`xqinfer ARGS` in this process; main() always ends in SystemExit."""
    monkeypatch.setattr(sys, "argv", ["xqinfer", *map(str, args)])
    monkeypatch.delenv("XQINFER_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    code = exited.value.code
    return (0 if code is None else code), out, err


def strict_json(path: Path) -> dict:
    """JSON as RFC 8259 has it: NaN and Infinity are not JSON (JavaScript's JSON.parse refuses them)."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not valid JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


TOP_LEVEL = {"dataset": str, "model": str, "protocol": str, "ctx": int, "chunk": int, "scoring": str,
             "windows_total": int, "interrupted": bool, "methods": list}
ROW = {"spec": str, "label": str, "bits": str, "normalized_size": float, "compression": float, "ppl": float,
       "ppl_stderr": float, "delta_ppl": float, "delta_ppl_stderr": float, "tokens": int, "windows": int,
       "seconds": float}
FINAL = re.compile(r"^\[(.+)\] Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)$", re.MULTILINE)


def check_schema(data: dict, *, kld: bool) -> None:
    for key, kind in TOP_LEVEL.items():
        assert key in data, f"{key} missing from {sorted(data)}"
        assert type(data[key]) is kind, f"{key}={data[key]!r} is not {kind.__name__}"
    assert data["methods"], "no methods"
    for row in data["methods"]:
        assert type(row) is dict
        for key, kind in ROW.items():
            assert key in row, f"{key} missing from {sorted(row)}"
            assert type(row[key]) is kind, f"{key}={row[key]!r} is not {kind.__name__}"
        assert "kld" in row
        assert (type(row["kld"]) is float) if kld else (row["kld"] is None), row["kld"]


def test_ppl_json_schema_and_values(stories, tmp_path, monkeypatch, capsys, single_thread):
    path = tmp_path / "out.json"
    specs = ["kivi:bits=2", "xquant:bits=4", "xquant-cl:bits=2"]
    args = ["ppl", SAMPLE, "-m", STORIES, "--ctx", "64", "--limit", "2", "--kld", "--json", path]
    code, out, err = call_main(monkeypatch, capsys, *args, *[a for s in specs for a in ("--cache", s)])
    assert code == 0, err
    data = strict_json(path)
    check_schema(data, kld=True)
    assert data["protocol"] == "sim" and data["ctx"] == 64 and data["chunk"] == 1 and data["windows_total"] == 2
    assert data["interrupted"] is False
    assert Path(data["dataset"]) == SAMPLE and Path(data["model"]) == STORIES
    rows = data["methods"]
    assert [row["spec"] for row in rows] == ["fp16"] + [str(parse_spec(s)) for s in specs]  # fp16 first, as given
    assert [row["bits"] for row in rows] == ["16", "2", "4", "2 (first 3 at 4)"]
    # The baseline is named for what it stores: this run's fp32; the others by their spec's non-default options.
    assert [row["label"] for row in rows] == ["kv fp32", "kivi", "xquant", "xquant-cl"]
    expected = dict(zip([row["spec"] for row in rows], run(stories, specs, ctx=64, limit=2).values()))
    for row in rows:
        size = normalized_size(parse_spec(row["spec"]), stories.config, stories.dtype)
        assert row["normalized_size"] == pytest.approx(size) and row["compression"] == pytest.approx(1 / size)
        assert row["ppl"] == pytest.approx(expected[row["spec"]], rel=1e-9)
        assert row["delta_ppl"] == pytest.approx(row["ppl"] - rows[0]["ppl"], abs=1e-9)
        assert row["tokens"] == 2 * 63 and row["windows"] == 2
        assert row["ppl_stderr"] > 0 and row["seconds"] > 0
        assert (row["delta_ppl_stderr"] == 0.0) if row["spec"] == "fp16" else (row["delta_ppl_stderr"] > 0.0)
        assert (row["kld"] == 0.0) if row["spec"] == "fp16" else (row["kld"] > 0.0)
    # stdout: the table, then one "Final estimate" line per method that agrees with the JSON.
    text = ANSI.sub("", out)
    assert "ΔPPL" in text and "KLD" in text
    finals = FINAL.findall(text)
    assert [spec for spec, _, _ in finals] == [row["spec"] for row in rows]
    for (_, value, stderr), row in zip(finals, rows):
        assert float(value) == pytest.approx(row["ppl"], abs=1e-4)
        assert float(stderr) == pytest.approx(row["ppl_stderr"], abs=1e-5)


def test_delta_ppl_stderr_is_the_paired_error_of_the_per_token_differences(stories, single_thread):
    specs, ctx, windows = ["fp16", "kivi:bits=2", "xquant:bits=3"], 64, 3
    report = perplexity(stories, SAMPLE, specs[1:], ctx=ctx, limit=windows)
    ids = stories.tokenizer.encode(read_text(SAMPLE), add_bos=True)
    nll = {}
    for spec in specs:  # each window on a fresh cache, the NLL of every scored token
        per_window = []
        for w in range(windows):
            tokens = torch.tensor([ids[w * ctx : (w + 1) * ctx]])
            cache = make_cache(parse_spec(spec), stories.model, ctx)
            cache.simulate = True
            logits = window_logits(stories, cache, tokens, "sim", 1)[0, :-1].float()
            per_window.append(torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none"))
        nll[spec] = torch.cat(per_window).double()
    assert report.scores[0].delta_ppl_stderr == 0.0
    for spec, score in zip(specs[1:], report.scores[1:]):
        difference = nll[spec] - nll["fp16"]
        expected = score.ppl * float(difference.std()) / math.sqrt(difference.numel())
        assert score.delta_ppl_stderr == pytest.approx(expected, rel=1e-5)
        assert score.delta_ppl_stderr < score.ppl_stderr  # what makes a text hard for both cancels


def test_ppl_json_stream_without_kld(stories, tmp_path, monkeypatch, capsys, single_thread):
    path = tmp_path / "stream.json"
    code, out, err = call_main(monkeypatch, capsys, "ppl", SAMPLE, "-m", STORIES, "--ctx", "32", "--limit", "1",
                               "--protocol", "stream", "--chunk", "8", "--cache", "xquant:bits=3", "--json", path)
    assert code == 0, err
    data = strict_json(path)
    check_schema(data, kld=False)
    assert data["protocol"] == "stream" and data["chunk"] == 8 and data["ctx"] == 32
    assert "KLD" not in ANSI.sub("", out)


def test_bits_column_of_layerwise_methods_is_their_code_bits(stories, single_thread):
    """METHODS.md section 7: for KIVI-family methods [Y]'s "equivalent bits" (code bits per K/V element, scales and
    zeros not counted) is reported too; the `bits` column is where the table has room for it."""
    from xqinfer.cache import REGISTRY

    report = perplexity(stories, SAMPLE, ["asymkv", "xquant-kv"], ctx=16, limit=1)
    for score, row in zip(report.scores[1:], report.rows()[1:]):
        expected = REGISTRY[score.spec.method].code_bits(score.spec, stories.config)
        assert expected < 2
        assert float(row["bits"].split()[0]) == pytest.approx(expected), (row["spec"], row["bits"], expected)


def test_a_bom_at_the_start_of_the_dataset_is_not_scored(tmp_path):
    need(SAMPLE)
    with_bom = tmp_path / "bom.txt"
    with_bom.write_bytes(b"\xef\xbb\xbf" + SAMPLE.read_bytes())
    assert read_text(with_bom) == read_text(SAMPLE)


BAD_INPUTS = {
    "empty": (lambda d: d.write_bytes(b""), [], ["is empty"]),
    "blank": (lambda d: d.write_bytes(b" \n\r\n\t\n"), [], ["is empty"]),
    "binary": (lambda d: d.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256))), [], ["binary"]),
    "not utf-8": (lambda d: d.write_bytes("Il était une fois\n".encode("latin-1")), [], ["not UTF-8", "offset 3"]),
    "missing": (lambda d: None, [], ["does not exist"]),
    "ctx beyond positions": (None, ["--ctx", "513"], ["--ctx 513", "512 positions"]),
    "ctx below 2": (None, ["--ctx", "1"], ["--ctx must be at least 2"]),
    "ctx below 3, llama.cpp": (None, ["--ctx", "2", "--scoring", "llama.cpp"], ["--ctx must be at least 3"]),
    "unknown scoring": (None, ["--scoring", "lm-eval"], ["unknown scoring 'lm-eval'", "gptq, llama.cpp"]),
    "unknown protocol": (None, ["--protocol", "batch"], ["unknown protocol 'batch'", "sim, stream"]),
    "unknown method": (None, ["--cache", "kvquant:bits=2"], ["unknown cache method 'kvquant'", "xquant-cl"]),
    "unknown option": (None, ["--cache", "xquant:bitz=2"], ["unknown option 'bitz'"]),
    "bad bits": (None, ["--cache", "kivi:bits=5"], ["bits=5", "accepted: 2, 3, 4, 8"]),
    "bad residual": (None, ["--cache", "kivi:group=32,residual=48"], ["residual must be a multiple of group"]),
    "chunk 0": (None, ["--protocol", "stream", "--chunk", "0"], ["--chunk must be at least 1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(case, tmp_path, monkeypatch, capsys):
    need(STORIES / "model.safetensors", SAMPLE)
    write, extra, needles = BAD_INPUTS[case]
    dataset = SAMPLE
    if write is not None:
        dataset = tmp_path / "data.txt"
        write(dataset)
    json_path = tmp_path / "result.json"
    code, out, err = call_main(monkeypatch, capsys, "ppl", dataset, "-m", STORIES, *extra, "--json", json_path)
    assert_one_line_error(code, out, err, *needles)
    assert not json_path.exists()


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    text = ANSI.sub("", err).strip()
    assert code not in (0, None), err
    assert "Traceback" not in err + out, err
    assert out.strip() == "", out
    assert len(text.splitlines()) == 1, text
    assert text.startswith("error: ") and "internal error" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def test_text_shorter_than_a_window_says_its_length_and_a_ctx_that_works(stories, tmp_path, monkeypatch, capsys,
                                                                         single_thread):
    path = tmp_path / "short.txt"
    path.write_text("Once upon a time, there was a cat.\r\n", encoding="utf-8")
    length = len(stories.tokenizer.encode("Once upon a time, there was a cat.\n", add_bos=True))
    code, out, err = call_main(monkeypatch, capsys, "ppl", path, "-m", STORIES, "--ctx", "64")
    assert_one_line_error(code, out, err, f"has {length} tokens", f"--ctx {length} or less")
    code, out, err = call_main(monkeypatch, capsys, "ppl", path, "-m", STORIES, "--ctx", str(length), "--wide")
    assert code == 0, err  # the suggested --ctx does work: one window
    assert re.search(rf"\bkv fp32\b.*\b{length - 1}\b", ANSI.sub("", out)), out


# --- Ctrl-C ----------------------------------------------------------------------------------------------------------


def interrupt_on_call(monkeypatch, n: int) -> None:
    """Ctrl-C arrives during the n-th (window, method) pass."""
    original, calls = ppl_module.window_logits, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(ppl_module, "window_logits", interrupted)


def test_ctrl_c_prints_the_complete_windows_and_exits_130(stories, tmp_path, monkeypatch, capsys, single_thread):
    specs = ["--cache", "kivi:bits=2", "--cache", "xquant:bits=2"]  # 3 passes per window with fp16
    base = ["ppl", SAMPLE, "-m", STORIES, "--ctx", "64", "--kld", *specs]
    code, out, err = call_main(monkeypatch, capsys, *base, "--limit", "2", "--json", tmp_path / "two.json")
    assert code == 0, err
    complete = strict_json(tmp_path / "two.json")

    interrupt_on_call(monkeypatch, 3 * 2 + 2)  # windows 1 and 2 done; in window 3, during the second method
    path = tmp_path / "interrupted.json"
    code, out, err = call_main(monkeypatch, capsys, *base, "--limit", "5", "--json", path)
    assert code == 130, err
    assert "Traceback" not in err + out
    assert "interrupted: the table covers the 2 complete window(s)" in ANSI.sub("", err)
    text = ANSI.sub("", out)
    assert "ΔPPL" in text  # the table is printed
    assert len(FINAL.findall(text)) == 3
    data = strict_json(path)
    check_schema(data, kld=True)
    assert data["interrupted"] is True and data["windows_total"] == 5
    for row, reference in zip(data["methods"], complete["methods"], strict=True):
        # Only complete windows count: the third window's fp16 pass, done before Ctrl-C, is not in the table.
        assert row["spec"] == reference["spec"] and row["windows"] == 2 and row["tokens"] == 2 * 63
        for key in ("ppl", "ppl_stderr", "delta_ppl", "kld"):
            assert row[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key


def test_ctrl_c_in_the_first_window_still_writes_valid_json(stories, tmp_path, monkeypatch, capsys, single_thread):
    """Nothing complete to report: the averaged figures are null, since NaN is not JSON (RFC 8259)."""
    interrupt_on_call(monkeypatch, 2)
    path = tmp_path / "interrupted.json"
    code, _, err = call_main(monkeypatch, capsys, "ppl", SAMPLE, "-m", STORIES, "--ctx", "64", "--cache", "kivi",
                             "--json", path)
    assert code == 130, err
    data = strict_json(path)
    assert data["interrupted"] is True
    assert all(row["windows"] == 0 and row["ppl"] is None for row in data["methods"])


# --- llama-perplexity's scoring -------------------------------------------------------------------------------------


def second_half_nll(llm, window: list[int]) -> torch.Tensor:
    """What llama-perplexity scores of one window, computed here directly: the plain model over a fresh fp16 cache,
    the NLL of tokens ctx/2+1 .. ctx-1."""
    ctx = len(window)
    tokens = torch.tensor([window])
    with torch.inference_mode():
        logits = llm.model(tokens, torch.arange(ctx), make_cache("fp16", llm.model, ctx))
    log_probs = torch.log_softmax(logits[0].double(), dim=-1)
    first = ctx // 2
    return -log_probs[first:-1].gather(-1, tokens[0, first + 1 :, None]).squeeze(-1)


@pytest.mark.parametrize("ctx", [64, 65])
def test_llama_cpp_scoring_is_bos_per_window_and_the_second_half(stories, ctx, single_thread):
    ids = stories.tokenizer.encode(read_text(SAMPLE), add_bos=True)
    bos = stories.tokenizer.bos_id
    assert bos is not None and ids[0] == bos  # a tokenizer that adds BOS: every window gets one
    report = perplexity(stories, SAMPLE, ["kivi:bits=2"], ctx=ctx, limit=3, scoring="llama.cpp")
    windows = [[bos] + ids[start + 1 : start + ctx] for start in range(0, 3 * ctx, ctx)]
    nll = torch.cat([second_half_nll(stories, window) for window in windows])
    baseline = report.baseline
    assert baseline.tokens == 3 * (ctx - ctx // 2 - 1) == nll.numel()
    assert baseline.ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert report.as_dict()["scoring"] == "llama.cpp"
    gptq = perplexity(stories, SAMPLE, [], ctx=ctx, limit=3)
    assert gptq.baseline.tokens == 3 * (ctx - 1) and gptq.baseline.ppl != pytest.approx(baseline.ppl, rel=1e-3)


def test_llama_cpp_scoring_leaves_windows_alone_without_a_bos(stories, monkeypatch, single_thread):
    """A tokenizer that adds no BOS (SmolLM2's GGUF, for one) gets none: llama-perplexity adds it only if add_bos."""
    ctx = 64
    ids = stories.tokenizer.encode(read_text(SAMPLE), add_bos=True)[1:]
    monkeypatch.setattr(stories.tokenizer, "encode", lambda text, add_bos=True: list(ids))
    report = perplexity(stories, SAMPLE, [], ctx=ctx, limit=2, scoring="llama.cpp")
    nll = torch.cat([second_half_nll(stories, ids[start : start + ctx]) for start in (0, ctx)])
    assert report.baseline.ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
