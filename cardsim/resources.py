"""Where the fixtures (cities, test keys, sample data) are, in a checkout and in an installed wheel.

The repository keeps them in the top-level ``fixtures/``; the wheel carries them as ``yikatong/fixtures``
(a symlink in the checkout), so no top-level ``fixtures`` import is ever installed.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def fixture_path(name: str) -> Path:
    """The path of a fixture file, e.g. ``keys/test-keys.json``."""
    return Path(str(files("yikatong"))) / "fixtures" / name
