import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from oral.config import ConfigError, load_config
from oral.io import append_jsonl, atomic_dir, read_jsonl
from oral.models import ModelError, load_base, load_base_config, resolve, weights_fingerprint


# -----------------------------------------------------------------------------
# models


def test_tiny_llama_loads_with_gqa_and_smollm2_vocab(tiny):
    model, tok = tiny
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.vocab_size == len(tok) == 49152
    ids = tok("Review: great film", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 49152)


def test_tiny_llama_is_deterministic_across_loads(tiny):
    model, _ = tiny
    again, _ = load_base("tiny-llama")
    assert weights_fingerprint(model) == weights_fingerprint(again)


def test_fingerprint_changes_when_one_weight_changes(tiny):
    model, _ = tiny
    other, _ = load_base("tiny-llama")
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3
    assert weights_fingerprint(model) != weights_fingerprint(other)


def test_local_directory_and_config_only_loading(tiny):
    path = resolve("tiny-llama")
    cfg = load_base_config(path)
    assert cfg.num_hidden_layers == tiny[0].config.num_hidden_layers


def test_missing_local_dir_is_a_clear_error():
    with pytest.raises(ModelError, match="does not exist"):
        resolve("./no/such/model")


def test_oral_models_cli_lists_both_embedded_models():
    out = subprocess.run([sys.executable, "-m", "oral.cli", "models", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["smollm2-135m"]["layers"] == 30 and rows["smollm2-135m"]["kv_heads"] == 3
    assert 130e6 < rows["smollm2-135m"]["num_params"] < 140e6
    assert rows["tiny-llama"]["architecture"] == "LlamaForCausalLM"


# -----------------------------------------------------------------------------
# io


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_to_overwrite_by_default(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
    assert (target / "a").read_text() == "1"


def test_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"a": 2')  # a writer killed mid-line
    assert read_jsonl(path) == [{"a": 1}]


# -----------------------------------------------------------------------------
# config


@dataclasses.dataclass
class _Inner:
    lr: float = 1e-3


@dataclasses.dataclass
class _Cfg:
    steps: int = 10
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj"])
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    name: str | None = None


def test_config_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ninner:\n  lr: 0.01\n")
    cfg = load_config(_Cfg, path, ["targets=q_proj,v_proj", "inner.lr=0.5"])
    assert cfg.steps == 20 and cfg.targets == ["q_proj", "v_proj"] and cfg.inner.lr == 0.5


def test_config_unknown_key_and_bad_type_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(_Cfg, None, ["stepz=3"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(_Cfg, None, ["steps=abc"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_Cfg, bad)


def test_jsonl_append_after_a_torn_line_keeps_the_new_record(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"a": 2')  # a writer killed mid-line
    append_jsonl(path, {"a": 3})
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}]


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    import os
    import stat

    from oral.io import atomic_write_text

    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "adapter") as d:
            (d / "x").write_text("1")
        assert (mode(tmp_path / "a.json"), mode(tmp_path / "adapter")) == (0o644, 0o755)  # not tempfile's 0600 / 0700
        os.chmod(tmp_path / "a.json", 0o600)  # a file's own permissions survive a rewrite
        atomic_write_text(tmp_path / "a.json", "[]")
        assert mode(tmp_path / "a.json") == 0o600
    finally:
        os.umask(old)


def test_a_rewritten_dir_gets_the_umask_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        (tmp_path / "adapter").mkdir(mode=0o700)  # e.g. left by an older writer
        with atomic_dir(tmp_path / "adapter", overwrite=True) as d:
            (d / "x").write_text("1")
        assert stat.S_IMODE(os.stat(tmp_path / "adapter").st_mode) == 0o755
    finally:
        os.umask(old)
