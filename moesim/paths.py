"""Where moesim finds its data folders (hardware profiles, scenarios, model presets)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["display_path", "hardware_dir", "models_dir", "repo_root", "scenarios_dir"]


def repo_root() -> Path:
    """The project folder: ``$MOESIM_HOME`` if set, else the checkout this package lives in."""
    env = os.environ.get("MOESIM_HOME")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


def hardware_dir() -> Path:
    return repo_root() / "hardware_profiles"


def scenarios_dir() -> Path:
    return repo_root() / "scenarios"


def models_dir() -> Path:
    return scenarios_dir() / "models"


def display_path(path: Path) -> Path:
    """``path`` relative to the project folder when it lies inside it (stable across clones)."""
    try:
        return path.resolve().relative_to(repo_root())
    except ValueError:
        return path
