"""Architecture presets: config.json-shaped files in the repository's `models/` folder, for random-weight runs."""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent / "models"


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
