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


# -----------------------------------------------------------------------------
# adapter dirs (oral.lora)


def _adapter(path: Path) -> Path:
    from oral.lora import LoraSpec, save_adapter
    from oral.models import tiny_llama_config

    spec = LoraSpec.from_base_config(tiny_llama_config(), ["q_proj", "v_proj"], 2, 4)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in spec.shapes().items()}
    return save_adapter(path, spec, state, provenance={"generator": "test", "seed": 0})


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "oral_provenance.json"])
def test_adapter_dir_with_a_file_cut_in_half_names_it_and_the_fix(tmp_path, name):
    from oral.lora import ADAPTER_FIX, LoraSpec, load_adapter, read_provenance

    adapter = _adapter(tmp_path / "a")
    _cut_in_half(adapter / name)
    readers = {
        "adapter_model.safetensors": [load_adapter, LoraSpec.from_adapter_dir],
        "adapter_config.json": [load_adapter, LoraSpec.from_adapter_dir],
        "oral_provenance.json": [read_provenance],
    }[name]
    for read in readers:
        with pytest.raises(DamagedFileError) as e:
            read(adapter)
        _assert_one_line_naming(e.value, adapter / name, ADAPTER_FIX)


def test_provenance_in_metadata_that_is_not_json_is_damaged(tmp_path):
    from oral.lora import ADAPTER_FIX, read_provenance

    path = tmp_path / "a"
    path.mkdir()
    save_file({"x": torch.zeros(2)}, str(path / "adapter_model.safetensors"), metadata={"oral_provenance": "{cut"})
    with pytest.raises(DamagedFileError) as e:
        read_provenance(path)
    _assert_one_line_naming(e.value, path / "adapter_model.safetensors", ADAPTER_FIX)


def test_cli_inspect_of_a_cut_adapter_is_one_line_exit_2(tmp_path, capsys):
    from oral.cli import main

    adapter = _adapter(tmp_path / "a")
    assert main(["inspect", str(adapter)]) == 0
    capsys.readouterr()
    _cut_in_half(adapter / "adapter_model.safetensors")
    assert main(["inspect", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("oral inspect: error: ")
    assert str(adapter / "adapter_model.safetensors") in err


# -----------------------------------------------------------------------------
# model dirs (oral.models): the embedded cache, evolved models, others


def _save_model(tiny, path: Path) -> Path:
    model, tok = tiny
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "generation_config.json"])
def test_damaged_embedded_model_cache_says_delete_it(tiny, tmp_home, name):
    from oral.models import load_base, load_base_config, load_tokenizer

    cache = _save_model(tiny, tmp_home / "models" / "tiny-llama")
    _cut_in_half(cache / name)
    for load in (load_base, load_base_config, load_tokenizer):
        with pytest.raises(DamagedFileError) as e:
            load("tiny-llama")
        _assert_one_line_naming(e.value, cache / name, f"delete {cache}")


def test_evolved_model_with_a_junk_config_names_the_evolve_command(tiny, tmp_path):
    from oral.models import load_base

    out = _save_model(tiny, tmp_path / "kjv-s3")
    entry = {"parent": "tiny-llama", "corpus": "/data/my corpus.txt#sha256:0123456789ab", "steps": 3, "lr": 1e-4,
             "seed": 0, "batch_size": 8, "seq_len": 128}
    (out / "oral_evolve.json").write_text(json.dumps({"lineage_entry": entry}))
    (out / "config.json").write_text("not json at all")
    with pytest.raises(DamagedFileError) as e:
        load_base(str(out))
    cmd = (f"oral evolve --base tiny-llama --corpus '/data/my corpus.txt' --steps 3 --lr 0.0001 --seed 0 "
           f"--batch-size 8 --seq-len 128 --out {out}")
    _assert_one_line_naming(e.value, out / "config.json", cmd)


def test_a_model_dir_checked_once_is_checked_again_after_it_changes(tiny, tmp_path):
    from oral.models import load_base_config

    d = _save_model(tiny, tmp_path / "m")
    load_base_config(str(d))
    _cut_in_half(d / "model.safetensors")
    with pytest.raises(DamagedFileError) as e:
        load_base_config(str(d))
    _assert_one_line_naming(e.value, d / "model.safetensors", "restore that model directory")


# -----------------------------------------------------------------------------
# weight tokenizers (oral.tokens)


@pytest.mark.parametrize("name", ["tokenizer.json", "stats.safetensors"])
def test_weight_tokenizer_with_a_file_cut_in_half_names_it(tmp_path, name):
    from oral.lora import load_adapter
    from oral.tokens import TOKENIZER_FIX, WeightTokenizer

    spec, state = load_adapter(_adapter(tmp_path / "a"))
    path = WeightTokenizer(spec, 16).fit([state]).save(tmp_path / "tok")
    assert torch.equal(WeightTokenizer.load(path).scale, WeightTokenizer(spec, 16).fit([state]).scale)
    _cut_in_half(path / name)
    with pytest.raises(DamagedFileError) as e:
        WeightTokenizer.load(path, fix="retrain GEN")
    _assert_one_line_naming(e.value, path / name, "retrain GEN")
    with pytest.raises(DamagedFileError) as e:
        WeightTokenizer.load(path)
    _assert_one_line_naming(e.value, path / name, TOKENIZER_FIX)


# -----------------------------------------------------------------------------
# corpora caches (oral.corpora)


@pytest.fixture()
def counted_corpus(monkeypatch):
    """A fake embedded corpus `fake` whose package reads are counted."""
    from oral import corpora

    calls = []

    def load():
        calls.append(1)
        return ["first document", "second document \u00e9"]

    monkeypatch.setitem(corpora.CORPORA, "fake", corpora.EmbeddedCorpus("fake", "test", "nothing", load))
    return calls


@pytest.mark.parametrize("damage", ["cut", "junk", "not-documents"])
def test_damaged_corpus_cache_is_read_again_from_its_package(tmp_home, counted_corpus, caplog, damage):
    import gzip

    from oral.corpora import get_corpus

    docs = get_corpus("fake")
    cache = tmp_home / "corpora" / "fake.json.gz"
    assert get_corpus("fake") == docs and len(counted_corpus) == 1  # the second read is from the cache
    if damage == "cut":
        _cut_in_half(cache)
    elif damage == "junk":
        cache.write_bytes(b"junk" * 10)
    else:
        cache.write_bytes(gzip.compress(b'{"documents": [1, 2]}'))
    assert get_corpus("fake") == docs and len(counted_corpus) == 2
    assert str(cache) in caplog.text and "damaged" in caplog.text
    assert get_corpus("fake") == docs and len(counted_corpus) == 2  # rewritten whole


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    return out


def test_damaged_austen_deb_says_download_it_again(tmp_home, tmp_path, monkeypatch):
    import io
    import random
    import tarfile

    from oral import corpora

    deb = tmp_path / "janeaustenr.deb"
    monkeypatch.setattr(corpora, "R_LIBRARY_DIRS", [])
    monkeypatch.setattr(corpora, "_austen_deb_candidates", lambda: [deb])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        member = tarfile.TarInfo("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")
        member.size = 20000
        tar.addfile(member, io.BytesIO(random.Random(0).randbytes(20000)))
    tar_gz = buf.getvalue()
    for content in [b"junk", _ar({"debian-binary": b"2.0\n"})[:-10] + b"xx", _ar({"data.tar.gz": tar_gz[: len(tar_gz) // 2]})]:
        deb.write_bytes(content)
        with pytest.raises(DamagedFileError) as e:
            corpora.get_corpus("austen")
        _assert_one_line_naming(e.value, deb, "apt-get download r-cran-janeaustenr")


@pytest.mark.parametrize("name", ["Rdata.rdx", "Rdata.rdb"])
def test_damaged_austen_data_cache_says_delete_it(tmp_home, monkeypatch, name):
    from oral import corpora

    debs = [d for d in corpora._austen_deb_candidates() if d.is_file()]
    if not debs:
        pytest.skip("needs r-cran-janeaustenr's .deb (scripts/setup.sh)")
    monkeypatch.setattr(corpora, "R_LIBRARY_DIRS", [])
    data = tmp_home / "corpora" / "janeaustenr"
    corpora._extract_austen_deb(debs[0], data)
    _cut_in_half(data / name)
    with pytest.raises(DamagedFileError) as e:
        corpora.get_corpus("austen")
    _assert_one_line_naming(e.value, data / name, f"delete {data}")
