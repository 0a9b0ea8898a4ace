"""`xqinfer plan`: sizes from the accounting alone (METHODS.md section 7), the largest context and batch a memory budget
holds, memory parsing, and the command's refusals and JSON, with a model directory that holds nothing but config.json.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from xqinfer import cli
from xqinfer.accounting import bytes_per_token, equivalent_bits, normalized_size, residual_bytes, workspace_bytes
from xqinfer.cache import benchmarked_specs, parse_spec
from xqinfer.errors import XQInferError
from xqinfer.plan import PlanRow, parse_memory, plan
from xqinfer.presets import preset_config
from xqinfer.roofline import Peaks, decode_floor

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
GB = 10**9

# --- METHODS.md section 7 ------------------------------------------------------------------------------------------

KIVI_STAR = "kivi:bits={},group=128,prerope=1"
# (preset, spec, the table's figure to 4 decimals, the exact fraction it rounds)
TABLE = [
    *[(preset, KIVI_STAR.format(bits), figure, exact)
      for preset in ("llama-2-7b", "llama-3.1-8b")
      for bits, figure, exact in ((4, 0.2656, 4.25 / 16), (3, 0.2031, 3.25 / 16), (2, 0.1406, 2.25 / 16))],
    # GQA XQuant caches X·Uk and X·Uv: as many elements as K and V, so KIVI*'s figures.
    *[("llama-3.1-8b", f"xquant:bits={bits}", figure, exact)
      for bits, figure, exact in ((4, 0.2656, 4.25 / 16), (3, 0.2031, 3.25 / 16), (2, 0.1406, 2.25 / 16))],
    # MHA XQuant caches X alone: half of K and V.
    ("llama-2-7b", "xquant:bits=4", 0.1328, 4.25 / 32),
    ("llama-2-7b", "xquant:bits=3", 0.1016, 3.25 / 32),
    # MHA XQuant-CL: the first 3 of 32 layers at 4 bits.
    ("llama-2-7b", "xquant-cl:bits=3", 0.1045, (3 * 4.25 + 29 * 3.25) / 32 / 32),
    ("llama-2-7b", "xquant-cl:bits=2", 0.0762, (3 * 4.25 + 29 * 2.25) / 32 / 32),
]


@pytest.mark.parametrize("preset,spec,figure,exact", TABLE, ids=[f"{p}-{s}" for p, s, _, _ in TABLE])
def test_plan_normalized_sizes_are_the_methods_table(preset, spec, figure, exact):
    config = preset_config(preset)
    [row] = plan(config, [spec], memory=80 * GB, context=32768)
    assert row.method == str(parse_spec(spec))
    assert abs(row.normalized_size - figure) <= 0.5e-4, f"{row.normalized_size} does not print as {figure}"
    assert row.normalized_size == pytest.approx(exact, abs=1e-12)
    # The figure does not depend on the dtype the plan assumes for weights and residual windows.
    [fp16_row] = plan(config, [spec], memory=80 * GB, context=32768, dtype=torch.float16)
    assert fp16_row.normalized_size == row.normalized_size


def test_plan_figures_for_the_base_layers_follow_xquant_cl_options():
    config = preset_config("llama-2-7b")
    specs = ["xquant-cl:bits=2,base_layers=1,base_bits=2", "xquant-cl:bits=2,base_layers=32"]
    [none_extra, all_base] = plan(config, specs, memory=80 * GB, context=4096)
    assert none_extra.normalized_size == pytest.approx(2.25 / 32)
    assert all_base.normalized_size == pytest.approx(4.25 / 32)


# --- bytes per token and equivalent bits ---------------------------------------------------------------------------


def test_fp16_bytes_per_token_is_k_and_v_of_every_layer():
    spec = parse_spec("fp16")
    llama2, llama3 = preset_config("llama-2-7b"), preset_config("llama-3.1-8b")
    assert bytes_per_token(spec, llama2, torch.bfloat16) == 2 * 32 * 4096 * 2 == 524288
    assert bytes_per_token(spec, llama3, torch.bfloat16) == 2 * 32 * 1024 * 2 == 131072
    assert bytes_per_token(spec, llama3, torch.float32) == 2 * 131072  # the plain cache stores the model dtype
    [row] = plan(llama2, ["fp16"], memory=80 * GB, context=4096)
    assert row.bytes_per_token == 524288 and row.cache_bytes_at_context == 4096 * 524288
    assert row.normalized_size == 1.0


@pytest.mark.parametrize("preset", ["llama-2-7b", "llama-3.1-8b", "mistral-7b-v0.1"])
@pytest.mark.parametrize("spec", ["kivi:bits=2", KIVI_STAR.format(4), "xquant:bits=3", "xquant-cl:bits=2"])
def test_bytes_per_token_is_the_normalized_size_of_the_fp16_bytes(preset, spec):
    config = preset_config(preset)
    parsed, fp16 = parse_spec(spec), parse_spec("fp16")
    ratio = bytes_per_token(parsed, config, torch.float16) / bytes_per_token(fp16, config, torch.float16)
    assert ratio == pytest.approx(normalized_size(parsed, config, torch.float16), rel=1e-12)


def test_equivalent_bits_count_codes_only_for_kv_methods():
    config = preset_config("llama-3.1-8b")
    assert equivalent_bits(parse_spec("fp16"), config) == 16
    assert equivalent_bits(parse_spec("kivi:bits=2"), config) == 2
    assert equivalent_bits(parse_spec(KIVI_STAR.format(3)), config) == 3
    assert equivalent_bits(parse_spec("xquant:bits=4"), config) is None
    assert equivalent_bits(parse_spec("xquant-cl:bits=2"), config) is None
    rows = plan(preset_config("llama-3.1-8b"), ["fp16", "kivi:bits=2", "xquant"], memory=80 * GB, context=1024)
    assert [r.equivalent_bits for r in rows] == [16, 2, None]


def test_plan_reports_the_equivalent_bits_of_every_kv_method():
    """[Y]'s headline figures on a 32-layer model, from each method's own declaration."""
    expected = {"xquant-kv": 1.375, "xquant-kv:kq=28,vq=0,km=32,vm=28": 1.40625, "asymkv": 1.5, "kivi:bits=2": 2}
    rows = plan(preset_config("llama-3.1-8b"), list(expected), memory=80 * GB, context=1024)
    assert [r.equivalent_bits for r in rows] == list(expected.values())


# --- largest context and batch -------------------------------------------------------------------------------------

BOUNDARY_CASES = [
    ("llama-3.1-8b", "fp16", 10_000),
    ("llama-3.1-8b", "kivi:bits=2", 50_000),
    ("llama-2-7b", KIVI_STAR.format(2), 3000),
    ("llama-2-7b", "xquant:bits=4", 1234),
    ("mistral-7b-v0.1", "xquant-cl:bits=2", 20_001),
]


def budget_for(config, spec: str, tokens: int, batch: int = 1, dtype=torch.bfloat16) -> int:
    """Memory that holds exactly: the weights, `batch` sequences of `tokens`, and the step's workspace."""
    parsed = parse_spec(spec)
    weights = config.num_parameters * torch.finfo(dtype).bits // 8
    per_token = bytes_per_token(parsed, config, dtype)
    assert per_token == int(per_token)  # whole bytes per token for these models: the sum below is exact
    sequence = tokens * int(per_token) + residual_bytes(parsed, config, dtype)
    return weights + batch * sequence + workspace_bytes(config, tokens, batch, dtype)


@pytest.mark.parametrize("preset,spec,tokens", BOUNDARY_CASES, ids=[f"{p}-{s}" for p, s, _ in BOUNDARY_CASES])
def test_max_context_is_exactly_what_the_memory_holds(preset, spec, tokens):
    config = preset_config(preset)
    assert tokens < config.max_position_embeddings
    memory = budget_for(config, spec, tokens)
    [row] = plan(config, [spec], memory=memory, context=tokens)
    assert row.max_context_batch_1 == tokens
    assert row.fits_at_context and row.max_batch_at_context == 1
    assert row.weights_bytes + row.cache_bytes_at_context + row.workspace_bytes == memory
    # One byte less: that context no longer fits, the one below it does.
    [short] = plan(config, [spec], memory=memory - 1, context=tokens)
    assert short.max_context_batch_1 == tokens - 1
    assert not short.fits_at_context and short.max_batch_at_context == 0
    [below] = plan(config, [spec], memory=memory - 1, context=tokens - 1)
    assert below.fits_at_context
    [above] = plan(config, [spec], memory=memory, context=tokens + 1)
    assert not above.fits_at_context and above.max_context_batch_1 == tokens


@pytest.mark.parametrize("batch", [2, 7])
def test_max_batch_is_exactly_what_the_memory_holds(batch):
    config, spec, context = preset_config("llama-3.1-8b"), "xquant:bits=2", 32768
    memory = budget_for(config, spec, context, batch)
    [row] = plan(config, [spec], memory=memory, context=context, batch=batch)
    assert row.fits_at_context and row.max_batch_at_context == batch
    [short] = plan(config, [spec], memory=memory - 1, context=context, batch=batch)
    assert not short.fits_at_context and short.max_batch_at_context == batch - 1


def test_limits_grow_with_memory_and_agree_with_fits():
    config, context = preset_config("llama-3.1-8b"), 32768
    methods = ["fp16", "kivi:bits=2", "xquant:bits=4", "xquant-cl:bits=2"]
    previous = None
    for memory in range(16 * GB, 200 * GB, 3 * GB + 123_457):
        rows = plan(config, methods, memory=memory, context=context)
        for row in rows:
            assert 0 <= row.max_context_batch_1 <= config.max_position_embeddings
            if row.max_batch_at_context:
                [at_max] = plan(config, [row.method], memory=memory, context=context, batch=row.max_batch_at_context)
                assert at_max.fits_at_context
            [one_more] = plan(config, [row.method], memory=memory, context=context, batch=row.max_batch_at_context + 1)
            assert not one_more.fits_at_context
            assert row.fits_at_context == (row.max_batch_at_context >= 1)
            # Below the model's positions, batch 1 fits exactly when the context is at most the largest one.
            assert row.fits_at_context == (context <= row.max_context_batch_1)
        if previous is not None:
            for before, now in zip(previous, rows):
                assert now.max_batch_at_context >= before.max_batch_at_context
                assert now.max_context_batch_1 >= before.max_context_batch_1
        previous = rows
    # With this much memory every method reaches the model's positions; the smaller methods batch more.
    fp16, kivi, xquant, cl = previous
    assert {r.max_context_batch_1 for r in previous} == {config.max_position_embeddings}
    assert fp16.max_batch_at_context < xquant.max_batch_at_context < kivi.max_batch_at_context


def test_memory_below_the_weights_fits_nothing():
    config = preset_config("llama-2-7b")
    weights = config.num_parameters * 2
    for row in plan(config, benchmarked_specs(), memory=weights - 1, context=1024):
        assert not row.fits_at_context
        assert row.max_context_batch_1 == 0 and row.max_batch_at_context == 0
        assert row.weights_bytes == weights


def test_fits_at_context_respects_the_model_positions():
    config = preset_config("llama-2-7b")
    for row in plan(config, benchmarked_specs(), memory=1000 * GB, context=32768):
        assert row.max_context_batch_1 == config.max_position_embeddings
        assert row.fits_at_context == (32768 <= row.max_context_batch_1)


# --- parse_memory --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,size", [
    ("80GB", 80 * 10**9), ("24GiB", 24 * 2**30), ("512MB", 512 * 10**6), ("1.5GB", 1_500_000_000),
    ("80G", 80 * 10**9), ("141gib", 141 * 2**30), ("2TB", 2 * 10**12), (" 64 KiB ", 64 * 1024), ("4096B", 4096),
    ("100B", 100),
])
def test_parse_memory_accepts_decimal_and_binary_units(text, size):
    assert parse_memory(text) == size
    assert type(parse_memory(text)) is int


@pytest.mark.parametrize("text", ["80XB", "", "-1GB", "GB", "0GB", "80 G B", "1e9", "80iB", "1,5GB", "80GBs"])
def test_parse_memory_refuses_what_is_not_a_size(text):
    with pytest.raises(XQInferError, match="--memory"):
        parse_memory(text)


def test_parse_memory_refuses_a_bare_number_and_suggests_units():
    # `80` could mean 80 GB (what a person means) or 80 bytes (what it used to be read as): it is neither.
    with pytest.raises(XQInferError, match="--memory '80' has no unit: write 80GB or 80GiB"):
        parse_memory("80")


def test_parse_memory_never_returns_an_empty_budget():
    with pytest.raises(XQInferError, match="--memory"):
        parse_memory("0.5B")


# --- the command ---------------------------------------------------------------------------------------------------


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`xqinfer ARGS` in-process: (exit status, stdout, stderr without terminal escapes)."""
    monkeypatch.setattr(sys, "argv", ["xqinfer", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    code = exited.value.code
    return (0 if code is None else code), out, ESCAPES.sub("", err)


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    text = err.strip()
    assert code != 0, f"exit status 0; stderr: {err!r}"
    assert "Traceback" not in out + err and "internal error" not in text, err
    assert out.strip() == "", f"stdout should be empty: {out!r}"
    assert len(text.splitlines()) == 1 and text.startswith("error: "), err
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


ROW_FIELDS = {"method": str, "label": str, "normalized_size": float, "bytes_per_token": float,
              "equivalent_bits": (float, type(None)),
              "cache_bytes_at_context": int, "weights_bytes": int, "workspace_bytes": int, "fits_at_context": bool,
              "max_context_batch_1": int, "max_batch_at_context": int,
              # without --bandwidth/--matmul (test_plan_decode_floors has them)
              "decode_floor_tokens_per_s": type(None), "decode_floor_bound": type(None)}


@pytest.mark.parametrize("args,needles", [
    (["--memory", "80XB"], ["80XB"]),
    (["--memory", "-1GB"], ["-1GB"]),
    (["--memory", "80"], ["no unit", "80GB", "80GiB"]),
    (["--memory", "80GB", "--context", "32q"], ["--context", "32q"]),
    (["--memory", "80GB", "--cache", "nope"], ["nope"]),
    (["--memory", "80GB", "--preset", "nope"], ["nope"]),
    (["--memory", "80GB", "--dtype", "fp8"], ["fp8"]),
    (["--context", "32k"], ["--memory"]),
    (["--memory", "80GB", "--bandwidth", "4300"], ["--bandwidth", "--matmul"]),
    (["--memory", "80GB", "--matmul", "790"], ["--bandwidth", "--matmul"]),
])
def test_plan_refuses_bad_input_in_one_line(args, needles, monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "plan", *args, "--json", tmp_path / "plan.json")
    assert_one_line_error(code, out, err, *needles)
    assert not (tmp_path / "plan.json").exists()


def check_plan_json(path: Path, model: str, config, memory: int, context: int) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) == {"model", "memory_bytes", "context", "batch", "dtype", "peaks", "methods"}
    assert data["peaks"] is None
    assert data["model"] == model
    assert type(data["memory_bytes"]) is int and data["memory_bytes"] == memory
    assert type(data["context"]) is int and data["context"] == context
    assert data["batch"] == 1 and data["dtype"] == "bf16"
    assert type(data["methods"]) is list and len(data["methods"]) == len(benchmarked_specs())
    assert set(ROW_FIELDS) == set(PlanRow.__dataclass_fields__)
    for row in data["methods"]:
        assert set(row) == set(ROW_FIELDS)
        for key, kind in ROW_FIELDS.items():
            assert type(row[key]) in (kind if isinstance(kind, tuple) else (kind,)), f"{key}={row[key]!r}"
    expected = plan(config, benchmarked_specs(), memory=memory, context=context, dtype=torch.bfloat16)
    assert data["methods"] == [r.as_dict() for r in expected]
    return data


def test_plan_json_schema(monkeypatch, capsys, tmp_path):
    path = tmp_path / "plan.json"
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--memory", "80GB", "--context", "32k", "--json", path)
    assert code == 0, err
    data = check_plan_json(path, "llama-3.1-8b", preset_config("llama-3.1-8b"), 80 * GB, 32768)
    assert [r["method"] for r in data["methods"]] == [str(parse_spec(m)) for m in benchmarked_specs()]
    assert [r["label"] for r in data["methods"]][:2] == ["kv bf16", "kivi"]
    # The table: title with model, budget and context, a header, one row per method.
    assert "llama-3.1-8b" in out and "context 32768" in out and "max ctx b=1" in out
    for method in benchmarked_specs():
        assert parse_spec(method).display_name(torch.bfloat16) in out


def test_plan_decode_floors_from_the_device_rates(monkeypatch, capsys, tmp_path):
    path = tmp_path / "plan.json"
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--memory", "141GB", "--context", "32k", "--bandwidth",
                             "4300", "--matmul", "790", "--wide", "--cache", "fp16", "--cache", "xquant-cl",
                             "--json", path)
    assert code == 0, err
    data = json.loads(path.read_text(encoding="utf-8"))
    peaks = Peaks(4300e9, 790e12, "bfloat16")
    assert data["peaks"] == peaks.as_dict()
    config = preset_config("llama-3.1-8b")
    for row, method in zip(data["methods"], ("fp16", "xquant-cl")):
        floor = decode_floor(config, parse_spec(method), 32768, 1, torch.bfloat16, peaks)
        assert row["decode_floor_tokens_per_s"] == pytest.approx(1 / floor.seconds)
        assert row["decode_floor_bound"] == floor.bound
    # What the accounting says of llama-3.1-8b at 32k: fp16 streams weights and cache, XQuant-CL's GQA rebuild binds.
    assert [row["decode_floor_bound"] for row in data["methods"]] == ["memory", "compute"]
    assert "decode floor t/s" in out


@pytest.mark.parametrize("extras", [False, True], ids=["config-only", "with-unreadable-weights"])
def test_plan_reads_only_the_config_of_a_model_directory(extras, monkeypatch, capsys, tmp_path):
    model = tmp_path / "llama-2-7b-config-only"
    model.mkdir()
    shutil.copy(MODELS_DIR / "llama-2-7b.json", model / "config.json")
    if extras:  # neither weights nor tokenizer are opened: junk in their place changes nothing
        (model / "model.safetensors").write_bytes(b"\x00not safetensors")
        (model / "tokenizer.json").write_text("{not json", encoding="utf-8")
    before = sorted(p.name for p in model.iterdir())
    path = tmp_path / "plan.json"
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--model", model, "--memory", "24GiB", "--context", "4k",
                             "--json", path)
    assert code == 0, err
    check_plan_json(path, str(model), preset_config("llama-2-7b"), 24 * 2**30, 4096)
    assert sorted(p.name for p in model.iterdir()) == before


def test_plan_model_directory_without_config_is_one_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--model", tmp_path / "empty", "--memory", "80GB")
    assert_one_line_error(code, out, err, "config.json")
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--model", tmp_path / "empty", "--preset", "llama-2-7b",
                             "--memory", "80GB")
    assert_one_line_error(code, out, err, "not both")
