"""`ppl --plot` and `plan --plot`: PNG images of the expected size, the Pareto front, a one-line error without
matplotlib, and never a file overwritten."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from xqinfer import plots
from xqinfer.errors import XQInferError
from xqinfer.plots import HEIGHT, WIDTH, memory_plot, pareto_front
from xqinfer.presets import preset_config

from conftest import SHARED
from test_cli import assert_one_line_error, call_main, model_never_loads, snapshot

STORIES = SHARED / "models" / "stories260K"
SAMPLE = SHARED / "data" / "tinystories-sample.txt"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a PNG file must hold first, right after its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:8]
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def need_stories() -> None:
    if not (STORIES / "model.safetensors").is_file() or not SAMPLE.is_file():
        pytest.skip("the shared stories260K model and sample are absent (tests expect ../shared beside the checkout)")


def test_ppl_plot_is_a_png_and_turns_the_kld_on(tmp_path, monkeypatch, capsys, single_thread):
    pytest.importorskip("matplotlib")
    need_stories()
    image, results = tmp_path / "kld.png", tmp_path / "ppl.json"
    code, _, err = call_main(monkeypatch, capsys, "ppl", SAMPLE, "-m", STORIES, "--ctx", "64", "--limit", "2",
                             "--cache", "kivi:bits=2", "--cache", "xquant:bits=4", "--cache", "xquant-cl:bits=2",
                             "--plot", image, "--json", results)
    assert code == 0, err
    assert png_size(image) == (WIDTH, HEIGHT)
    rows = json.loads(results.read_text())["methods"]
    assert [row["kld"] > 0 for row in rows] == [False, True, True, True]  # --plot implied --kld


def test_plan_plot_is_a_png(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    image = tmp_path / "memory.png"
    code, _, err = call_main(monkeypatch, capsys, "plan", "--preset", "llama-3.1-8b", "--memory", "24GB",
                             "--context", "32k", "--plot", image)
    assert code == 0, err
    assert png_size(image) == (WIDTH, HEIGHT)


def test_memory_plot_of_a_model_with_few_positions(tmp_path):
    pytest.importorskip("matplotlib")
    image = tmp_path / "tiny.png"
    config = preset_config("llama-tiny")
    memory_plot(config, ["fp16", "kivi:bits=2"], image, memory=10**9, context=1 << 20)  # context off the axis
    assert png_size(image) == (WIDTH, HEIGHT)


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [(0.30, 0.01), (0.15, 0.20), (0.25, 0.05), (0.28, 0.90), (0.40, 0.03), (0.15, 0.30), (0.50, 0.01)]
    # By growing size: each kept point has a lower error than every smaller one.
    assert pareto_front(points) == [1, 2, 0]
    assert pareto_front([]) == []


def test_without_matplotlib_both_plots_are_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    model_never_loads(monkeypatch)
    dataset = tmp_path / "data.txt"
    dataset.write_text("Once upon a time there was a cat.\n", encoding="utf-8")
    before = snapshot(tmp_path)
    for args in (["ppl", dataset, "--plot", tmp_path / "kld.png"],
                 ["plan", "--memory", "24GB", "--plot", tmp_path / "memory.png"]):
        code, out, err = call_main(monkeypatch, capsys, *args)
        assert_one_line_error(code, out, err, "matplotlib", "pip install 'xqinfer[plot]'")
        assert code == 1
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["ppl", "plan"])
def test_an_existing_file_is_never_overwritten(command, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    model_never_loads(monkeypatch)
    dataset = tmp_path / "data.txt"
    dataset.write_text("Once upon a time there was a cat.\n", encoding="utf-8")
    existing = tmp_path / "figure.png"
    existing.write_bytes(b"not yours to replace")
    args = ["ppl", dataset] if command == "ppl" else ["plan", "--memory", "24GB"]
    before = snapshot(tmp_path)
    code, out, err = call_main(monkeypatch, capsys, *args, "--plot", existing)
    assert_one_line_error(code, out, err, "figure.png already exists", "never overwrites")
    assert snapshot(tmp_path) == before


BAD_DESTINATIONS = {
    "not a png": ("figure.jpg", ["--plot writes a PNG image", "figure.jpg"]),
    "missing folder": ("nowhere/figure.png", ["cannot write", "nowhere"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DESTINATIONS))
def test_a_bad_destination_is_refused_before_the_run(case, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    model_never_loads(monkeypatch)
    name, needles = BAD_DESTINATIONS[case]
    before = snapshot(tmp_path)
    code, out, err = call_main(monkeypatch, capsys, "plan", "--memory", "24GB", "--plot", tmp_path / name)
    assert_one_line_error(code, out, err, *needles)
    assert snapshot(tmp_path) == before


def test_a_file_made_after_the_check_is_not_replaced_either(tmp_path):
    """The check comes before the run; the write itself also creates the file or fails, never truncates one."""
    pytest.importorskip("matplotlib")
    image = tmp_path / "late.png"
    plots.check_plot_path(image)
    image.write_bytes(b"written meanwhile")
    with pytest.raises(XQInferError, match="already exists"):
        memory_plot(preset_config("llama-tiny"), ["fp16"], image, memory=10**9)
    assert image.read_bytes() == b"written meanwhile"
