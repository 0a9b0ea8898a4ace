"""Test-wide paths. Shared assets live in ../shared beside the repository checkout; tests skip when it is absent."""

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
