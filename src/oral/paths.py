"""Where oral keeps its caches: $ORAL_HOME, default ~/.cache/oral."""

import os
from pathlib import Path


def oral_home() -> Path:
    """The cache root (converted models, evolved versions, zoos); created on first use."""
    home = Path(os.environ.get("ORAL_HOME", Path.home() / ".cache" / "oral")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
