import os
from pathlib import Path

import pytest

# Embedded models are converted once into $ORAL_HOME; tests share that cache (read-mostly) unless
# the caller set ORAL_HOME themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the embedded tiny-llama, loaded once per test session: read-only
    (a test that injects adapter layers loads a copy of its own)."""
    from oral.models import load_base

    return load_base("tiny-llama")


@pytest.fixture()
def tmp_home(tmp_path: Path, monkeypatch) -> Path:
    """An empty $ORAL_HOME for tests that must not see the shared cache."""
    home = tmp_path / "oral-home"
    monkeypatch.setenv("ORAL_HOME", str(home))
    return home
