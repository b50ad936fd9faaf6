"""Corpora and evolution: lineage, reload, resume parity, errors that write nothing."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from oral import corpora
from oral.corpora import CorpusError, get_corpus, split_documents
from oral.models import resolve
from oral.training import CheckpointError, latest_checkpoint
from oral.evolve import (ChainConfig, EvolveError, chain_report, checkpoint_dir, evolve, evolve_chain,
                         format_report, perplexity)

# Small and fast: tiny-llama, 2 sequences of 32 tokens a step.
FAST = dict(batch_size=2, seq_len=32, warmup_steps=1, progress=False)


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    paras = [f"Paragraph {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs near the river."
             for i in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras), encoding="utf-8")
    return path


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


# -----------------------------------------------------------------------------
# Corpora


def test_local_file_splits_on_blank_lines(text_file):
    docs = get_corpus(text_file)
    assert len(docs) == 60 and docs[3].startswith("Paragraph 3:")


def test_heldout_split_is_disjoint_fixed_and_order_free(text_file):
    docs = get_corpus(text_file)
    train, held = split_documents(docs)
    assert train and held and not set(train) & set(held) and len(train) + len(held) == len(docs)
    train2, held2 = split_documents(list(reversed(docs)))
    assert set(held2) == set(held)


def test_unknown_corpus_names_the_choices():
    with pytest.raises(CorpusError, match="unknown corpus 'no-such-corpus'.*kjv"):
        get_corpus("no-such-corpus")


def test_empty_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n")
    with pytest.raises(CorpusError, match="holds no text"):
        get_corpus(empty)


def test_missing_package_error_names_the_install_command(monkeypatch, tmp_path, tmp_home):
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path / "nowhere")
    with pytest.raises(CorpusError, match="apt-get install fortunes"):
        get_corpus("fortunes")
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="apt-get install bible-kjv"):
        get_corpus("kjv")


def test_austen_error_names_apt_get_download(monkeypatch, tmp_home):
    monkeypatch.setattr(corpora, "R_LIBRARY_DIRS", [])
    monkeypatch.setattr(corpora, "_austen_deb_candidates", lambda: [tmp_home / "none.deb"])
    with pytest.raises(CorpusError, match="apt-get download r-cran-janeaustenr"):
        get_corpus("austen")


@pytest.mark.skipif(not corpora.FORTUNES_DIR.is_dir(), reason="fortunes not installed")
def test_fortunes_are_split_into_many_documents_and_cached(tmp_home):
    docs = get_corpus("fortunes")
    assert (tmp_home / "corpora" / "fortunes.json.gz").is_file() and get_corpus("fortunes") == docs
    assert len(docs) > 1000 and not any("\n%\n" in d for d in docs[:500])


@pytest.mark.skipif(corpora.shutil.which("bible") is None, reason="bible-kjv not installed")
def test_kjv_has_every_chapter_without_references():
    docs = get_corpus("kjv")
    assert len(docs) == 1189  # chapters in the KJV
    assert docs[0].startswith("In the beginning God created the heaven and the earth.")
    assert "Ge1:" not in docs[0]


@pytest.mark.skipif(not any(p.is_file() for p in corpora._austen_deb_candidates())
                    and not any(d.is_dir() for d in corpora.R_LIBRARY_DIRS), reason="janeaustenr not present")
def test_austen_reads_six_novels_from_r_data(tmp_home):
    docs = get_corpus("austen")
    assert len(docs) > 5000
    assert any("truth universally acknowledged" in d for d in docs)


# -----------------------------------------------------------------------------
# Evolution


def test_evolved_dir_loads_and_records_lineage(tmp_path, text_file):
    out1 = evolve("tiny-llama", text_file, steps=2, out=tmp_path / "t1", lr=1e-3, seed=3, **FAST)
    model = AutoModelForCausalLM.from_pretrained(str(out1))
    (entry,) = model.config.oral_lineage
    assert entry["parent"] == "tiny-llama" and entry["steps"] == 2 and entry["lr"] == 1e-3 and entry["seed"] == 3
    assert entry["corpus"].startswith(str(text_file.resolve()) + "#sha256:")
    assert (out1 / "tokenizer.json").is_file()
    assert not hasattr(model.config, "oral_base_id")
    base = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"))  # the weights moved
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    # A second link extends the lineage, parent first.
    out2 = evolve(out1, text_file, steps=1, out=tmp_path / "t2", **FAST)
    lin = json.loads((out2 / "config.json").read_text())["oral_lineage"]
    assert [e["parent"] for e in lin] == ["tiny-llama", str(out1.resolve())]
    assert not checkpoint_dir(out1).exists()


def test_same_settings_reuse_the_cached_version(tmp_path, monkeypatch, text_file):
    from oral.paths import oral_home

    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(oral_home() / "models")  # share the converted base models
    monkeypatch.setenv("ORAL_HOME", str(home))
    out = evolve("tiny-llama", text_file, steps=1, **FAST)
    assert out.parent == home / "evolved"
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert evolve("tiny-llama", text_file, steps=1, **FAST) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert evolve("tiny-llama", text_file, steps=1, seed=1, **FAST) != out


def test_resume_after_kill_gives_the_uninterrupted_weights(tmp_path, text_file):
    straight = evolve("tiny-llama", text_file, steps=4, out=tmp_path / "a", lr=1e-3, save_every=2, **FAST)

    class Killed(Exception):
        pass

    def kill_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise Killed

    out = tmp_path / "b"
    with pytest.raises(Killed):
        evolve("tiny-llama", text_file, steps=4, out=out, lr=1e-3, save_every=2, on_step=kill_at_3, **FAST)
    assert not out.exists() and latest_checkpoint(checkpoint_dir(out)).name == "0000002"
    resumed = evolve("tiny-llama", text_file, steps=4, out=out, lr=1e-3, save_every=2, **FAST)
    info = json.loads((resumed / "oral_evolve.json").read_text())
    assert info["resumed_from_step"] == 2
    assert info["losses"] == json.loads((straight / "oral_evolve.json").read_text())["losses"]
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not checkpoint_dir(out).exists()


def test_checkpoint_of_other_settings_is_refused(tmp_path, text_file):
    out = tmp_path / "c"

    def stop(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve("tiny-llama", text_file, steps=3, out=out, save_every=1, on_step=stop, **FAST)
    with pytest.raises(CheckpointError, match="different training setup.*lr"):
        evolve("tiny-llama", text_file, steps=3, out=out, lr=5e-4, save_every=1, **FAST)


@pytest.mark.parametrize("corpus", ["no-such-corpus", "EMPTY"])
def test_bad_corpus_writes_nothing(tmp_home, tmp_path, corpus):
    if corpus == "EMPTY":
        corpus = tmp_path / "empty.txt"
        corpus.write_text("")
    out = tmp_path / "never"
    with pytest.raises(CorpusError):
        evolve("tiny-llama", corpus, steps=2, out=out, **FAST)
    with pytest.raises(CorpusError):
        evolve("tiny-llama", corpus, steps=2, **FAST)
    assert not out.exists() and not checkpoint_dir(out).exists()
    assert not (tmp_home / "evolved").exists()


def test_existing_foreign_out_is_not_overwritten(tmp_path, text_file):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        evolve("tiny-llama", text_file, steps=1, out=out, **FAST)
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_settings_are_refused(text_file, tmp_path):
    with pytest.raises(EvolveError, match="steps"):
        evolve("tiny-llama", text_file, steps=0, out=tmp_path / "x", **FAST)
    with pytest.raises(EvolveError, match="one value or one per corpus"):
        ChainConfig(corpora=["a", "b", "c"], steps=[1, 2]).links()


def test_chain_builds_versions_and_perplexity_drops_on_the_training_text(tmp_path, text_file, tiny):
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Numbers {i} {i + 1} {i + 2} and the ocean wave {i}." for i in range(60)))
    cfg = ChainConfig(base="tiny-llama", corpora=[str(text_file), str(other)], steps=[6, 1], lr=3e-3,
                      batch_size=2, seq_len=32, warmup_steps=0, root=str(tmp_path / "fam"))
    versions = evolve_chain(cfg, progress=False)
    assert len(versions) == 3 and versions[0] == "tiny-llama"
    lin = json.loads((Path(versions[2]) / "config.json").read_text())["oral_lineage"]
    assert [Path(e["corpus"].split("#")[0]).name for e in lin] == ["corpus.txt", "other.txt"]
    heldout = split_documents(get_corpus(text_file))[1]
    model0, tok = tiny
    model1 = AutoModelForCausalLM.from_pretrained(str(versions[1]))
    assert perplexity(model1, tok, heldout, seq_len=32) < perplexity(model0, tok, heldout, seq_len=32)
    # The report: one row per version, perplexity on every corpus, zero-shot task scores.
    cfg.tasks, cfg.task_limit, cfg.ppl_tokens = ["movie-sentiment"], 4, 256
    rows = chain_report(cfg, versions, progress=False)
    assert [r["version"] for r in rows] == ["t0", "t1", "t2"] and rows[1]["steps"] == 6
    assert rows[1]["perplexity"][str(text_file)] < rows[0]["perplexity"][str(text_file)]
    assert all(0.0 <= r["tasks"]["movie-sentiment"] <= 1.0 for r in rows)
    assert "t2" in format_report(rows)


def test_cli_evolve_and_list_corpora(tmp_path, text_file, capsys):
    from oral.cli import main

    assert main(["evolve", "--base", "tiny-llama", "--corpus", str(text_file), "--steps", "1",
                 "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / "cli"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(tmp_path / "cli") and printed["oral_lineage"][0]["steps"] == 1
    assert main(["evolve", "--corpus", "no-such-corpus", "--steps", "1", "--out", str(tmp_path / "z")]) == 2
    assert "unknown corpus" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_cli_chain_builds_and_reports(tmp_path, text_file, capsys):
    from oral.cli import main

    assert main(["evolve", "--chain", "base=tiny-llama", f"corpora={text_file}", "steps=1", "batch_size=2",
                 "seq_len=32", "ppl_tokens=256", f"root={tmp_path / 'fam'}", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == ["t0", "t1"] and Path(rows[1]["path"]).parent == tmp_path / "fam"
