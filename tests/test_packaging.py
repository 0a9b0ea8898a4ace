"""What a wheel carries: the package (the CPU kernel's C source too) and the presets `--preset` reads."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_preset(tmp_path):
    pytest.importorskip("setuptools")
    # Built from a copy: setuptools writes build/ and *.egg-info/ into the tree it builds.
    source = tmp_path / "source"
    for folder in ("models", "xqinfer"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"could not build a wheel offline here: {result.stderr.strip().splitlines()[-1:]}")
    [wheel] = tmp_path.glob("xqinfer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).name for n in names if "/share/xqinfer/models/" in n)
    assert shipped == sorted(p.name for p in (REPO / "models").glob("*.json"))
    assert any(n == "xqinfer/cache/xquant.py" for n in names)
    assert "xqinfer/kernels/kv_attention.c" in names  # the CPU kernel's source, compiled on first use
