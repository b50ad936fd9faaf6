"""Where oral keeps its caches: $ORAL_HOME, default ~/.cache/oral."""

import os
from pathlib import Path


def oral_home() -> Path:
    """The cache root (converted models, evolved versions, zoos); created on first use."""
    home = Path(os.environ.get("ORAL_HOME", Path.home() / ".cache" / "oral")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def expand_path(s: str) -> str:
    """Expand $ORAL_HOME (to oral_home()), other environment variables and ~."""
    if "$ORAL_HOME" in s or "${ORAL_HOME}" in s:
        home = str(oral_home())
        s = s.replace("${ORAL_HOME}", home).replace("$ORAL_HOME", home)
    return os.path.expanduser(os.path.expandvars(s))
