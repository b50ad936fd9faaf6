"""Truncated or garbled files give one line naming the file and its fix, never a traceback."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from oral.io import DamagedFileError, append_jsonl, load_safetensors, open_safetensors, read_json, read_jsonl


def _assert_one_line_naming(err: BaseException, path: Path, fix: str) -> None:
    assert isinstance(err, ValueError)
    msg = str(err)
    assert "\n" not in msg
    assert str(path) in msg
    assert fix in msg


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -----------------------------------------------------------------------------
# oral.io helpers


def test_load_safetensors_cut_in_half_names_file_and_fix(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    assert load_safetensors(path, "rebuild it")["a"].shape == (64, 64)
    _cut_in_half(path)
    with pytest.raises(DamagedFileError) as e:
        load_safetensors(path, "rebuild it")
    _assert_one_line_naming(e.value, path, "rebuild it")
    with pytest.raises(DamagedFileError) as e:
        with open_safetensors(path, "rebuild it"):
            pass
    _assert_one_line_naming(e.value, path, "rebuild it")


def test_missing_files_stay_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "none.safetensors", "fix")
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "none.json", "fix")
    with pytest.raises(FileNotFoundError):
        with open_safetensors(tmp_path / "none.safetensors", "fix"):
            pass


def _read_json(path):
    return read_json(path, "rebuild it")


def _load_safetensors(path):
    return load_safetensors(path, "rebuild it")


@pytest.mark.parametrize(
    "reader, content",
    [
        (_read_json, b""),
        (_read_json, b'{"a": 1'),
        (_read_json, b"not json"),
        (_read_json, b"[1, 2]"),
        (_read_json, b'{"a": "\xff\xfe"}'),
        (_load_safetensors, b""),
        (_load_safetensors, b"junk"),
        (_load_safetensors, b"\x00" * 100),
        (_load_safetensors, b"x" * 8 + b"{}"),
    ],
)
def test_garbled_file_names_file_and_fix(tmp_path, reader, content):
    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(DamagedFileError) as e:
        reader(path)
    _assert_one_line_naming(e.value, path, "rebuild it")


def test_read_json_reads_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"a": [1, 2]}))
    assert read_json(path, "fix") == {"a": [1, 2]}


def test_jsonl_every_torn_prefix_of_a_record_is_skipped(tmp_path):
    path = tmp_path / "manifest.jsonl"
    line = json.dumps({"path": "r/step-1", "score": -1.5e-3, "final": True, "tags": [1, None]}, sort_keys=True)
    for cut in range(1, len(line)):
        path.write_text('{"a": 1}\n' + line[:cut] + '\n{"a": 3}\n')
        assert read_jsonl(path) == [{"a": 1}, {"a": 3}], line[:cut]


@pytest.mark.parametrize(
    "junk", ["garbage here", "[1, 2]", "42", '{"a": 2} trailing', "\x00\x00\x00"], ids=["text", "list", "number", "extra", "nul"]
)
def test_jsonl_junk_line_names_file_line_and_fix(tmp_path, junk):
    path = tmp_path / "manifest.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a") as f:
        f.write(junk + "\n")
    append_jsonl(path, {"a": 3})
    with pytest.raises(DamagedFileError) as e:
        read_jsonl(path, fix="delete line 2")
    _assert_one_line_naming(e.value, path, "delete line 2")
    assert "line 2" in str(e.value)


def test_jsonl_bytes_that_are_not_utf8_are_damaged(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff\xfe\xfd\n')
    with pytest.raises(DamagedFileError, match="line 2"):
        read_jsonl(path)
