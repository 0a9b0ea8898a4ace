"""`xqinfer eval passkey` and `xqinfer.passkey`: prompts that hide the key where and as long as asked, the same prompts
for every method, the scoring rule, the JSON, refusals before the model loads, Ctrl-C, and a real run on SmolLM2."""

from __future__ import annotations

import json
import re

import pytest

import xqinfer
import xqinfer.passkey as passkey_module
from xqinfer.cache import parse_spec
from xqinfer.errors import XQInferError
from xqinfer.formats import open_checkpoint
from xqinfer.passkey import FILLER, INSTRUCTION, NEEDLE, QUESTION, build_prompt, build_prompts, is_hit, passkey

from gguf_files import need_smollm2
from test_cli import ANSI, assert_one_line_error, call_main, model_never_loads, snapshot

TINY = ["--preset", "llama-tiny"]  # random weights, one token per byte, no chat template, 4096 positions


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return open_checkpoint(need_smollm2()).tokenizer()


# --- prompts --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [300, 512, 1024, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_the_key_sits_at_the_depth_asked_in_a_prompt_of_the_length_asked(smollm2_tokenizer, length, depth):
    tokenizer = smollm2_tokenizer
    prompt = build_prompt(tokenizer, length, depth, "60494")
    # The whole templated prompt counts, and the filler grows a word at a time: at most a couple of tokens short.
    assert length - 3 <= len(prompt.ids) <= length
    text = tokenizer.decode(prompt.ids, skip_special=False)
    assert text == tokenizer.render_chat(
        [{"role": "user", "content": text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]}])
    needle = NEEDLE.format(key="60494")
    assert text.count("60494") == 2 and text.count(needle) == 1
    assert tokenizer.decode(prompt.ids[prompt.key_position:]).lstrip(" ").startswith(needle)
    assert "60494" not in tokenizer.decode(prompt.ids[: prompt.key_position])
    # Where the needle sits within the filler, in characters (the filler is uniform, so tokens are proportional).
    start = text.index(INSTRUCTION) + len(INSTRUCTION)
    before, after = text[start : text.index(f"\n\n{QUESTION}")].split(needle)
    assert abs(len(before.strip()) / (len(before.strip()) + len(after.strip())) - depth) < 0.03
    # Outside the needle, nothing but the filler sentences, in order.
    words = (before + after).split()
    assert words == (FILLER.split() * (len(words) // len(FILLER.split()) + 1))[: len(words)]


def test_the_prompts_depend_on_the_seed_alone(smollm2_tokenizer):
    first = build_prompts(smollm2_tokenizer, [256, 512], [0.1, 0.9], 3, seed=7)
    again = build_prompts(smollm2_tokenizer, [256, 512], [0.1, 0.9], 3, seed=7)
    other = build_prompts(smollm2_tokenizer, [256, 512], [0.1, 0.9], 3, seed=8)
    assert first == again
    assert [p.key for p in first] != [p.key for p in other]
    assert all(re.fullmatch(r"[1-9]\d{4}", p.key) for p in first)
    # Trial by trial, every length and depth in each: a run cut short still covers them all.
    assert [(p.trial, p.length, p.depth) for p in first[:4]] == [(0, 256, 0.1), (0, 256, 0.9), (0, 512, 0.1),
                                                                 (0, 512, 0.9)]


def test_a_length_with_no_room_for_filler_is_refused(smollm2_tokenizer):
    with pytest.raises(XQInferError, match="leaves no room for filler"):
        build_prompt(smollm2_tokenizer, 64, 0.5, "12345")


def test_every_method_answers_the_same_prompts(monkeypatch):
    llm = xqinfer.load(preset="llama-tiny")
    asked = []
    monkeypatch.setattr(passkey_module, "answer",
                        lambda llm, spec, prompt, tokens: asked.append((str(spec), tuple(prompt.ids))) or "")
    report = passkey(llm, ["kivi:bits=2", "fp16", "xquant:bits=4"], lengths=[300, 400], depths=[0.5], trials=2)
    methods = [str(m.spec) for m in report.methods]
    assert methods == ["fp16", str(parse_spec("kivi:bits=2")), str(parse_spec("xquant:bits=4"))]  # fp16 first, once
    assert len(asked) == 3 * 4
    for start in range(0, len(asked), 3):
        assert [spec for spec, _ in asked[start:start + 3]] == methods
        assert len({ids for _, ids in asked[start:start + 3]}) == 1
    assert [ids for _, ids in asked[::3]] == [tuple(p.ids) for p in build_prompts(llm.tokenizer, [300, 400], [0.5], 2)]


# --- scoring --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer,hit", [
    ("60494", True),
    ("The pass key is 60494.", True),
    ("60,494", True),
    ("6 0 4 9 4", True),
    ("The pass key is 6049", False),  # cut short
    ("60495", False),
    ("49460", False),
    ("", False),
    ("The pass key is 160494", True),  # the five digits are there, together and in order
])
def test_a_hit_is_the_key_among_the_answers_digits(answer, hit):
    assert is_hit(answer, "60494") is hit


# --- the command ----------------------------------------------------------------------------------------------------


def strict_json(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))


RATE = {"hits": int, "trials": int, "hit_rate": (float, type(None))}


def check_schema(data: dict, lengths: list[int], depths: list[float], trials: int) -> None:
    assert set(data) == {"model", "seed", "max_new_tokens", "lengths", "depths", "trials", "prompts_total",
                         "interrupted", "prompts", "methods"}
    assert data["lengths"] == lengths and data["depths"] == depths and data["trials"] == trials
    assert data["prompts_total"] == len(lengths) * len(depths) * trials
    for prompt in data["prompts"]:
        assert set(prompt) == {"length", "tokens", "depth", "trial", "key", "key_position"}
        assert prompt["length"] in lengths and prompt["depth"] in depths and prompt["tokens"] <= prompt["length"]
        assert re.fullmatch(r"\d{5}", prompt["key"])
    for method in data["methods"]:
        assert {"spec", "bits", "normalized_size", "hits", "trials", "hit_rate", "by_length", "by_depth",
                "by_length_and_depth", "answers", "seconds"} == set(method)
        assert len(method["answers"]) == len(data["prompts"]) == method["trials"]
        hits = [is_hit(answer, prompt["key"]) for answer, prompt in zip(method["answers"], data["prompts"])]
        assert method["hits"] == sum(hits)
        assert [row["length"] for row in method["by_length"]] == lengths
        assert [row["depth"] for row in method["by_depth"]] == depths
        assert [(row["length"], row["depth"]) for row in method["by_length_and_depth"]] == [
            (length, depth) for length in lengths for depth in depths]
        for row in [method, *method["by_length"], *method["by_depth"], *method["by_length_and_depth"]]:
            for key, kind in RATE.items():
                assert isinstance(row[key], kind), (key, row[key])
            assert row["hit_rate"] == (row["hits"] / row["trials"] if row["trials"] else None)
        for row in method["by_length_and_depth"]:
            chosen = [h for h, p in zip(hits, data["prompts"])
                      if p["length"] == row["length"] and p["depth"] == row["depth"]]
            assert row["hits"] == sum(chosen) and row["trials"] == len(chosen)


def test_json_schema_and_table(tmp_path, monkeypatch, capsys):
    path = tmp_path / "passkey.json"
    code, out, err = call_main(monkeypatch, capsys, "eval", "passkey", *TINY, "--length", "300", "--length", "340",
                               "--depth", "0.2", "--depth", "0.8", "--trials", "2", "--cache", "xquant-kv",
                               "--seed", "3", "--json", path)
    assert code == 0, err
    data = strict_json(path)
    check_schema(data, [300, 340], [0.2, 0.8], 2)
    assert data["interrupted"] is False and data["seed"] == 3 and data["model"] == "llama-tiny"
    assert [m["spec"] for m in data["methods"]][0] == "fp16"
    assert data["methods"][1]["spec"].startswith("xquant-kv:kq=")  # model-dependent options resolved
    assert len(data["prompts"]) == 8
    assert "no chat template: the prompts went through a plain transcript" in ANSI.sub("", err)
    table = ANSI.sub("", out)
    assert "300 tok" in table and "340 tok" in table and "xquant-kv" in table


def test_ctrl_c_prints_what_every_method_answered_and_exits_130(tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(llm, spec, prompt, tokens):
        calls.append(1)
        if len(calls) == 2 * 3 + 2:  # three prompts answered by both methods; Ctrl-C during the fourth
            raise KeyboardInterrupt
        return f"The pass key is {prompt.key}." if str(spec) == "fp16" else "no idea"

    monkeypatch.setattr(passkey_module, "answer", interrupted)
    path = tmp_path / "interrupted.json"
    code, out, err = call_main(monkeypatch, capsys, "eval", "passkey", *TINY, "--length", "300", "--length", "400",
                               "--trials", "3", "--cache", "kivi", "--json", path)
    assert code == 130, err
    assert "Traceback" not in out + err
    assert "interrupted: the table covers the 3 of 18 prompts every method answered" in ANSI.sub("", err)
    data = strict_json(path)
    check_schema(data, [300, 400], [0.1, 0.5, 0.9], 3)
    assert data["interrupted"] is True and len(data["prompts"]) == 3
    fp16, kivi = data["methods"]
    assert (fp16["hits"], fp16["trials"], kivi["hits"], kivi["trials"]) == (3, 3, 0, 3)
    assert [row["trials"] for row in fp16["by_length"]] == [3, 0]
    assert fp16["by_length"][1]["hit_rate"] is None
    assert "100% (3/3)" in ANSI.sub("", out)


BAD_INPUTS = {
    "length too short": (["--length", "32"], ["--length 32 is too short", "--length 64 or more"]),
    "length not a count": (["--length", "1x"], ["--length '1x' is not a token count"]),
    "depth above 1": (["--depth", "1.5"], ["--depth 1.5 is outside [0, 1]"]),
    "depth below 0": (["--depth=-0.1"], ["--depth -0.1 is outside [0, 1]"]),
    "trials 0": (["--trials", "0"], ["--trials must be at least 1"]),
    "cache typo": (["--cache", "xqant"], ["unknown cache method 'xqant'"]),
    "seed below 0": (["--seed=-1"], ["seed must be in 0..18446744073709551615"]),
    "json in a missing folder": (["--json", "{missing}"], ["cannot write", "nowhere"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_the_model_loads(case, tmp_path, monkeypatch, capsys):
    extra, needles = BAD_INPUTS[case]
    model_never_loads(monkeypatch)
    before = snapshot(tmp_path)
    args = [arg.format(missing=tmp_path / "nowhere" / "out.json") for arg in extra]
    code, out, err = call_main(monkeypatch, capsys, "eval", "passkey", *args)
    assert_one_line_error(code, out, err, *needles)
    assert code == 1
    assert snapshot(tmp_path) == before


def test_a_length_beyond_the_models_positions_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "out.json"
    code, out, err = call_main(monkeypatch, capsys, "eval", "passkey", *TINY, "--length", "4090", "--json", path)
    assert_one_line_error(code, out, err, "--length 4090", "4096 positions", "--length 4084 or less")
    assert not path.exists()


# --- a real run -----------------------------------------------------------------------------------------------------


def test_smollm2_finds_the_key_at_512_tokens(tmp_path, monkeypatch, capsys):
    model = need_smollm2()
    path = tmp_path / "passkey.json"
    code, out, err = call_main(monkeypatch, capsys, "eval", "passkey", model, "--length", "512", "--depth", "0.5",
                               "--trials", "2", "--cache", "xquant:bits=4", "--json", path)
    assert code == 0, err
    data = strict_json(path)
    check_schema(data, [512], [0.5], 2)
    fp16, xquant = data["methods"]
    assert fp16["spec"] == "fp16" and xquant["spec"] == str(parse_spec("xquant:bits=4"))
    assert all(509 <= prompt["tokens"] <= 512 for prompt in data["prompts"])
    assert fp16["hits"] >= 1, fp16["answers"]
    assert xquant["normalized_size"] < fp16["normalized_size"]
