"""Architecture presets: config.json-shaped files in the repository's `models/` folder, for random-weight runs."""

from __future__ import annotations

import sys
from pathlib import Path

from .config import ModelConfig
from .errors import ConfigError


def _preset_dir() -> Path:
    # A source checkout (or an editable install) reads models/ beside the package; a wheel installs the same files
    # as data under <prefix>/share/xqinfer/models (pyproject.toml).
    for candidate in (Path(__file__).resolve().parent.parent / "models", Path(sys.prefix) / "share/xqinfer/models"):
        if candidate.is_dir():
            return candidate
    return Path(sys.prefix) / "share/xqinfer/models"


PRESET_DIR = _preset_dir()


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_config(name: str) -> ModelConfig:
    """A preset by name (`llama-3.1-8b`) or a path to any config.json-shaped file."""
    path = Path(name)
    if not path.is_file():
        path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r} (available: {', '.join(preset_names()) or 'none'})")
    return ModelConfig.from_file(path)
