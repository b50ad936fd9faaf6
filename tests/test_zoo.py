"""The LoRA zoo: training on target tokens, checkpoints PEFT loads, a manifest that survives kills."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from oral.config import load_config
from oral.finetune import (
    FinetuneConfig, FinetuneError, batch_indices, collate, encode_example, pack, target_loss, train_lora,
)
from oral.grid import GridBlock, ZooConfig, grid_runs, run_grid, shard
from oral.io import append_jsonl, read_jsonl
from oral.lora import load_adapter
from oral.zoo import Zoo, ZooError, evaluate_checkpoints, run_id_for, summary_table

REPO = Path(__file__).resolve().parents[1]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown"]
ANIMALS = ["cat", "dog", "horse", "mouse", "eagle", "shark", "tiger", "sheep"]


def write_task(tmp: Path, name: str = "color-or-animal") -> Path:
    """A small user task (JSONL + YAML): is the word in the sentence a color or an animal?"""
    rows = []
    for i in range(160):
        word = (COLORS if i % 2 == 0 else ANIMALS)[(i // 2) % 8]
        rows.append({"text": f"item {i} is about the {word}", "label": "color" if i % 2 == 0 else "animal"})
    (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": name, "kind": "classification", "data": f"{name}.jsonl",
        "template": "Text: {text}\nColor or animal:", "labels": ["color", "animal"],
        "descriptions": ["Say whether a sentence is about a color or an animal."],
        "heldout_descriptions": ["Color versus animal."],
        "splits": {"test": 20, "validation": 20, "train": 120},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


FAST = dict(lr=2e-2, batch_size=4, eval_limit=8, eval_base=False, warmup_steps=2)


@pytest.fixture()
def task_file(tmp_path: Path) -> Path:
    return write_task(tmp_path)


# -----------------------------------------------------------------------------
# Pieces


def test_save_steps_are_the_last_keep_saves_ending_at_the_final_step():
    assert FinetuneConfig(steps=100, keep=3).save_steps() == [98, 99, 100]
    assert FinetuneConfig(steps=100, keep=3, save_every=10).save_steps() == [80, 90, 100]
    assert FinetuneConfig(steps=5, keep=10).save_steps() == [1, 2, 3, 4, 5]
    with pytest.raises(FinetuneError, match="keep"):
        FinetuneConfig(keep=0)


def test_batch_indices_cover_every_example_once_per_epoch_and_follow_the_seed():
    n, bs = 10, 4
    first_epoch = [i for step in range(1, 3) for i in batch_indices(n, bs, step, seed=0)][:n]
    # steps 1-2 give 8 indices, step 3 the last 2 of epoch 0 then 2 of epoch 1
    epoch0 = first_epoch[:8] + batch_indices(n, bs, 3, seed=0)[:2]
    assert sorted(epoch0) == list(range(n))
    assert batch_indices(n, bs, 7, seed=1) == batch_indices(n, bs, 7, seed=1)
    assert batch_indices(n, bs, 1, seed=0) != batch_indices(n, bs, 1, seed=1)


def test_shard_gives_every_run_to_exactly_one_process():
    items = list(range(11))
    for world in (1, 2, 3, 8, 16):
        parts = [shard(items, r, world) for r in range(world)]
        assert sorted(x for p in parts for x in p) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ZooError):
        shard(items, 2, 2)


def test_lr_schedule_warms_up_then_decays_to_min_ratio():
    cfg = FinetuneConfig(steps=50, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert cfg.lr_at(1) == pytest.approx(1e-4)
    assert cfg.lr_at(10) == pytest.approx(1e-3)
    assert cfg.lr_at(50) == pytest.approx(1e-4)
    assert cfg.lr_at(30) < cfg.lr_at(20)
    assert FinetuneConfig(steps=50, lr=1e-3, schedule="constant").lr_at(30) == pytest.approx(1e-3)


def test_loss_mask_marks_exactly_the_target_tokens(tiny):
    _, tok = tiny
    a = encode_example(tok, "Review: fine\nSentiment:", " positive", 64)
    b = encode_example(tok, "Q: what?\nA:", " a long answer here", 64)
    batch = collate([a, b], pad_id=0)
    for row, (ids, n_target) in enumerate([a, b]):
        marked = batch["input_ids"][row][batch["loss_mask"][row]].tolist()
        assert marked == ids[-n_target:]
    assert batch["loss_mask"].sum() == a[1] + b[1]
    assert batch["attention_mask"][0].sum() == len(a[0])


def test_target_loss_equals_the_library_loss_with_prompt_labels_ignored(tiny):
    model, tok = tiny
    encoded = [encode_example(tok, f"Text: example {i} of length {'x ' * i}\nLabel:", " yes", 64) for i in range(4)]
    batch = collate(encoded, pad_id=tok.pad_token_id)
    labels = batch["input_ids"].masked_fill(~batch["loss_mask"], -100)
    with torch.no_grad():
        ours = target_loss(model, batch)
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_packed_batch_gives_the_padded_batch_loss_and_gradients(tiny):
    """One padding-free row with position resets == the right-padded batch: no example sees another."""
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    model = copy.deepcopy(model)
    encoded = [encode_example(tok, f"Text: example {i} {'word ' * (3 * i)}\nLabel:", [" yes", " no"][i % 2], 64)
               for i in range(5)]
    packed = pack(encoded)
    assert packed["input_ids"].shape == (1, sum(len(ids) for ids, _ in encoded))
    assert packed["input_ids"][packed["loss_mask"]].tolist() == [t for ids, n in encoded for t in ids[-n:]]
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    grads = []
    for batch in (collate(encoded, pad_id=tok.pad_token_id), packed):
        peft.zero_grad()
        loss = target_loss(peft, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in peft.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_run_id_is_stable_and_changes_with_what_shapes_the_weights():
    cfg = FinetuneConfig()
    a = run_id_for("smollm2-135m", "movie-sentiment", 4, 0, cfg)
    assert a == run_id_for("smollm2-135m", "movie-sentiment", 4, 0, FinetuneConfig(eval_limit=5, device="cpu"))
    assert a.startswith("smollm2-135m_movie-sentiment_r4_s0_")
    assert a != run_id_for("smollm2-135m", "movie-sentiment", 4, 0, FinetuneConfig(lr=1e-3))
    assert a != run_id_for("smollm2-135m", "movie-sentiment", 4, 1, cfg)


# -----------------------------------------------------------------------------
# One run


def test_train_lora_writes_peft_loadable_checkpoints_and_a_manifest(tiny, task_file, tmp_path):
    from peft import PeftModel

    from oral.evaluate import Evaluator
    from oral.models import weights_fingerprint
    from oral.tasks import load_task_file

    model, tok = tiny
    before = weights_fingerprint(model)
    task = load_task_file(task_file)
    base_loss = Evaluator(model, tok, progress=False).task_loss(task, "validation")
    zoo_dir = tmp_path / "zoo"
    paths = train_lora(model, str(task_file), rank=2, steps=20, keep=3, out_dir=zoo_dir, seed=0,
                       tokenizer=tok, targets=["q_proj", "v_proj"], **FAST)

    # the base handed in comes back untouched, without LoRA layers
    assert weights_fingerprint(model) == before
    assert not any("lora" in n for n, _ in model.named_modules())

    assert [p.name for p in paths] == ["step-000018", "step-000019", "step-000020"]
    records = Zoo(zoo_dir).records()
    assert [r["step"] for r in records] == [18, 19, 20]
    assert [r["final"] for r in records] == [False, False, True]
    final = records[-1]
    for key in ("base", "lineage", "base_fingerprint", "task", "rank", "alpha", "targets", "seed",
                "train_loss", "val_metric", "path", "run_id"):
        assert key in final, key
    assert final["base"] == "tiny-llama" and final["base_fingerprint"] == before
    assert final["task"] == "color-or-animal" and final["rank"] == 2 and final["alpha"] == 4.0
    assert final["val_metric"]["metric"] == "accuracy" and final["val_metric"]["n"] == 8
    assert "val_metric" not in records[0]
    assert not Path(final["path"]).is_absolute() and (zoo_dir / final["path"]) == paths[-1]

    # the final checkpoint loads in plain PEFT, changes the logits, and lowered the target loss
    peft_model = PeftModel.from_pretrained(model, str(paths[-1]))
    assert peft_model.peft_config["default"].r == 2
    tuned_loss = Evaluator(peft_model, tok, progress=False).task_loss(task, "validation")
    peft_model.unload()
    assert tuned_loss < base_loss - 1.0, (base_loss, tuned_loss)
    assert weights_fingerprint(model) == before


def test_checkpoints_load_through_the_codec(tiny, task_file, tmp_path):
    model, tok = tiny
    paths = train_lora(model, str(task_file), rank=2, steps=4, keep=2, out_dir=tmp_path / "zoo",
                       tokenizer=tok, **FAST)
    spec, state = load_adapter(paths[-1])
    assert spec.modules[0].rank == 2
    assert len(state) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_saved_checkpoints_score_as_they_did_during_training(tiny, task_file, tmp_path):
    model, tok = tiny
    train_lora(model, str(task_file), rank=2, steps=8, keep=2, out_dir=tmp_path / "zoo", tokenizer=tok,
               **{**FAST, "eval_checkpoints": True, "eval_limit": None})
    rows = evaluate_checkpoints(tmp_path / "zoo")
    assert [r["step"] for r in rows] == [7, 8]
    for r in rows:
        assert r["eval"]["n"] == r["val_metric"]["n"] == 20
        assert r["eval"]["value"] == pytest.approx(r["val_metric"]["value"])


def test_same_seed_gives_identical_adapters_and_another_seed_does_not(tiny, task_file, tmp_path):
    from safetensors.torch import load_file

    model, tok = tiny
    kw = dict(rank=2, steps=6, keep=1, tokenizer=tok, **FAST)
    a = train_lora(model, str(task_file), out_dir=tmp_path / "a", seed=3, **kw)[-1]
    b = train_lora(model, str(task_file), out_dir=tmp_path / "b", seed=3, **kw)[-1]
    c = train_lora(model, str(task_file), out_dir=tmp_path / "c", seed=4, **kw)[-1]
    sa, sb, sc = (load_file(p / "adapter_model.safetensors") for p in (a, b, c))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_rerun_of_a_done_run_trains_nothing(tiny, task_file, tmp_path):
    model, tok = tiny
    kw = dict(rank=2, steps=4, keep=2, out_dir=tmp_path / "zoo", tokenizer=tok, **FAST)
    first = train_lora(model, str(task_file), **kw)
    stamp = (first[-1] / "adapter_model.safetensors").stat().st_mtime_ns
    lines = (tmp_path / "zoo" / "manifest.jsonl").read_text()
    assert train_lora(model, str(task_file), **kw) == first
    assert (tmp_path / "zoo" / "manifest.jsonl").read_text() == lines
    assert (first[-1] / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_partial_run_is_finished_keeping_recorded_checkpoints_and_dropping_debris(tiny, task_file, tmp_path):
    model, tok = tiny
    zoo_dir = tmp_path / "zoo"
    kw = dict(rank=2, steps=6, keep=3, out_dir=zoo_dir, tokenizer=tok, **FAST)
    paths = train_lora(model, str(task_file), **kw)
    # As if killed during the final evaluation: the final dir exists, its record does not, and a
    # temporary dir of an interrupted write lies beside it.
    manifest = zoo_dir / "manifest.jsonl"
    kept = [line for line in manifest.read_text().splitlines() if '"final": false' in line]
    manifest.write_text("\n".join(kept) + "\n" + '{"run_id": "torn')  # plus a torn last line
    debris = paths[0].parent / ".step-000006.abc.tmp"
    debris.mkdir()
    zoo = Zoo(zoo_dir)
    assert zoo.records() == []  # a run without its final record is not listed
    assert len(zoo.records(complete_only=False)) == 2
    stamp = (paths[0] / "adapter_model.safetensors").stat().st_mtime_ns

    again = train_lora(model, str(task_file), **kw)
    assert again == paths
    assert not debris.exists()
    assert (paths[0] / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # left as it was
    raw = [r for r in read_jsonl(manifest)]
    assert sorted(r["step"] for r in raw) == [4, 5, 6]  # no duplicates
    assert [r["final"] for r in zoo.records()] == [False, False, True]


# -----------------------------------------------------------------------------
# Grids, processes, kills


def _grid_yaml(tmp: Path, task_file: Path, steps: int = 30, seeds=(0, 1, 2)) -> Path:
    cfg = {
        "out": str(tmp / "zoo"),
        "grid": [{"bases": ["tiny-llama"], "tasks": [str(task_file)], "ranks": [2], "seeds": list(seeds)}],
        "train": {"steps": steps, "keep": 4, **FAST},
    }
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _oral(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "oral.cli", *args], env=full_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _check_complete(zoo_dir: Path, runs: int, keep: int) -> list[dict]:
    raw = read_jsonl(zoo_dir / "manifest.jsonl")
    keys = [(r["run_id"], r["step"]) for r in raw]
    assert len(keys) == len(set(keys)), "duplicate manifest records"
    zoo = Zoo(zoo_dir)
    recs = zoo.records()
    assert len(zoo.runs()) == runs and len(recs) == runs * keep
    for r in recs:
        assert (zoo.path(r) / "adapter_model.safetensors").is_file()
        assert (zoo.path(r) / "adapter_config.json").is_file()
    on_disk = sorted(p.relative_to(zoo_dir).as_posix() for p in (zoo_dir / "runs").glob("*/*"))
    assert on_disk == sorted(r["path"] for r in recs), "a dir on disk without a record (or a temp dir)"
    return recs


def test_grid_killed_with_sigkill_and_rerun_completes_without_duplicates(task_file, tmp_path):
    cfg = _grid_yaml(tmp_path, task_file, steps=24)
    manifest = tmp_path / "zoo" / "manifest.jsonl"
    proc = _oral("zoo", "--config", str(cfg))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(read_jsonl(manifest)) >= 2:  # inside the first run's kept checkpoints
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the grid ended before it could be killed:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(Zoo(tmp_path / "zoo").runs()) < 3

    again = _oral("zoo", "--config", str(cfg))
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    recs = _check_complete(tmp_path / "zoo", runs=3, keep=4)
    assert {r["seed"] for r in recs} == {0, 1, 2}

    # a third run of the same grid finds nothing to do
    assert run_grid(load_config(ZooConfig, cfg)) == {"runs": 3, "skipped": 3, "trained": 0, "busy": 0,
                                                       "waiting": 0, "style_runs": 0}


def test_skip_missing_trains_the_runs_whose_base_exists_and_leaves_the_rest_waiting(task_file, tmp_path, tmp_home):
    chain = tmp_path / "chain.yaml"
    chain.write_text(yaml.safe_dump({"base": "tiny-llama", "corpora": ["kjv"], "steps": 2}))
    block = GridBlock(chain=str(chain), versions=[0, 1], tasks=[str(task_file)], ranks=[1], seeds=[0])
    cfg = ZooConfig(out=str(tmp_path / "zoo"), grid=[block], train=FinetuneConfig(steps=2, keep=1, **FAST))
    with pytest.raises(ZooError, match="--skip-missing"):
        run_grid(cfg)
    assert run_grid(cfg, skip_missing=True) == {"runs": 1, "skipped": 0, "trained": 1, "busy": 0, "waiting": 1, "style_runs": 0}
    assert [r["base"] for r in Zoo(tmp_path / "zoo").records()] == ["tiny-llama"]


def test_a_run_locked_by_another_process_is_left_to_it_and_counted_as_busy(task_file, tmp_path):
    import fcntl

    train = FinetuneConfig(steps=2, keep=1, **FAST)
    cfg = ZooConfig(out=str(tmp_path / "zoo"), train=train, grid=[
        GridBlock(bases=["tiny-llama"], tasks=[str(task_file)], ranks=[1], seeds=[0, 1])])
    locked = run_id_for("tiny-llama", str(task_file.resolve()), 1, 1, train)
    lock = tmp_path / "zoo" / "locks" / f"{locked}.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as f:  # what a second `oral zoo` on the same zoo holds while training seed 1
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        assert run_grid(cfg) == {"runs": 2, "skipped": 0, "trained": 1, "busy": 1, "waiting": 0, "style_runs": 0}
    assert [r["seed"] for r in Zoo(tmp_path / "zoo").records()] == [0]
    assert run_grid(cfg)["trained"] == 1  # released: the next command trains it


@pytest.mark.slow  # two model-loading processes; the assignment itself is unit-tested above
def test_two_processes_split_a_grid_by_rank_and_world_size(task_file, tmp_path):
    cfg = _grid_yaml(tmp_path, task_file, steps=8)
    procs = [_oral("zoo", "--config", str(cfg), env={"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)})
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "2 runs trained" in outs[0] and "1 runs trained" in outs[1], outs
    recs = _check_complete(tmp_path / "zoo", runs=3, keep=4)
    worker_of = {r["seed"]: r["worker"] for r in recs}
    assert worker_of == {0: 0, 1: 1, 2: 0}


def test_the_demo_builds_its_zoo_with_one_process_per_core_and_checks_it_after(task_file, tmp_path):
    from oral.demo import build_zoo

    cfg = load_config(ZooConfig, _grid_yaml(tmp_path, task_file, steps=4))
    counts = build_zoo(cfg, workers=2)
    assert counts == {"runs": 3, "skipped": 3, "trained": 0, "busy": 0, "waiting": 0, "style_runs": 0}  # the check after the workers
    recs = _check_complete(tmp_path / "zoo", runs=3, keep=4)
    assert {r["seed"]: r["worker"] for r in recs} == {0: 0, 1: 1, 2: 0}


# -----------------------------------------------------------------------------
# Configs and the command line


def test_shipped_configs_load_and_expand_to_their_grids(tmp_home, monkeypatch):
    monkeypatch.chdir(REPO)  # the full grid names its chain config relative to the repository
    tiny = load_config(ZooConfig, REPO / "configs" / "zoo-tiny.yaml")
    assert {r.base for r in grid_runs(tiny)} == {"tiny-llama"}
    quick = load_config(ZooConfig, REPO / "configs" / "zoo-quick.yaml")
    runs = grid_runs(quick)
    assert {r.base for r in runs} == {"smollm2-135m"} and 3 <= len(runs) <= 4
    assert quick.train.targets == ["q_proj", "v_proj"] and {r.rank for r in runs} == {4}
    full = load_config(ZooConfig, REPO / "configs" / "zoo-full.yaml")
    assert {1, 2, 4, 8} <= {r for b in full.grid for r in b.ranks}
    # the evolved versions do not exist in an empty $ORAL_HOME: the error names the command
    with pytest.raises(ZooError, match="oral evolve --chain"):
        grid_runs(full)
    # --skip-missing: the t0 runs (4 per task: r=4 and the rank study) now; t1..t4 wait
    n_tasks = len({r.task for b in full.grid for r in grid_runs(ZooConfig(grid=[GridBlock(bases=["x"], tasks=b.tasks)]))})
    waiting = []
    now = grid_runs(full, skip_missing=True, waiting=waiting)
    assert len(now) == 4 * n_tasks and {r.base for r in now} == {"smollm2-135m"}
    assert len(waiting) == 4 * n_tasks and len({r.base for r in waiting}) == 4
    assert {r.task for r in waiting} == {r.task for r in now}
    # the t0 config is the same 40 runs, with the same training section (so the same run ids)
    t0 = load_config(ZooConfig, REPO / "configs" / "zoo-full-t0.yaml")
    assert set(grid_runs(t0)) == set(now) and t0.train == full.train and t0.out == full.out


def test_grid_block_with_versions_needs_a_chain():
    with pytest.raises(ZooError, match="chain"):
        grid_runs(ZooConfig(grid=[GridBlock(bases=[], tasks=["movie-sentiment"], versions=[1])]))
    with pytest.raises(ZooError, match="empty"):
        grid_runs(ZooConfig(grid=[]))


def test_cli_without_a_run_or_config_says_what_to_give(capsys):
    from oral.cli import main

    assert main(["zoo"]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["zoo", "--config", "configs/zoo-tiny.yaml", "--base", "tiny-llama"]) == 2



def test_cli_evaluate_scores_the_chosen_kept_checkpoints(tiny, task_file, tmp_path, capsys):
    from oral.cli import main

    model, tok = tiny
    train_lora(copy.deepcopy(model), task_file, rank=2, steps=4, keep=3, out_dir=tmp_path / "zoo",
               tokenizer=tok, **FAST)
    out = tmp_path / "spread.json"
    assert main(["zoo", "--evaluate", "--out", str(tmp_path / "zoo"), "--where", "step=2,4",
                 "--where", "rank=2", "--limit", "8", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert sorted(r["step"] for r in rows) == [2, 4] and rows[0]["eval"]["n"] == 8
    assert 0.0 <= rows[0]["eval"]["value"] <= 1.0
    assert main(["zoo", "--evaluate", "--out", str(tmp_path / "zoo"), "--where", "step=99"]) == 2
    assert "matches" in capsys.readouterr().err
    assert main(["zoo", "--evaluate", "--out", str(tmp_path / "zoo"), "--where", "step"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def _fake_run(zoo: Zoo, task: str, rank: int, version: int, base_v: float, final_v: float) -> None:
    """Record one finished run (a final checkpoint dir and its manifest record) without training."""
    run_id = f"v{version}_{task}_r{rank}"
    (zoo.root / "runs" / run_id / "step-00010").mkdir(parents=True)
    lineage = [{"corpus": f"c{k}", "parent": "root" if k == 0 else f"v{k}"} for k in range(version)]
    append_jsonl(zoo.manifest, {
        "run_id": run_id, "base": f"v{version}", "lineage": lineage, "task": task, "rank": rank,
        "seed": 0, "step": 10, "final": True, "path": f"runs/{run_id}/step-00010",
        "val_metric": {"metric": "accuracy", "value": final_v, "n": 8},
        "base_val_metric": {"metric": "accuracy", "value": base_v, "n": 8}})


def test_summary_tables_put_versions_and_ranks_side_by_side(tmp_path, capsys):
    from oral.cli import main
    zoo = Zoo(tmp_path / "zoo")
    _fake_run(zoo, "sms-spam", 4, 0, 0.25, 0.75)
    _fake_run(zoo, "movie-sentiment", 4, 0, 0.5, 0.875)
    _fake_run(zoo, "movie-sentiment", 4, 1, 0.375, 1.0)
    _fake_run(zoo, "movie-sentiment", 8, 0, 0.5, 0.625)

    rows = zoo.summary(rank=4)
    assert {(r["task"], r["version"]) for r in rows} == {("sms-spam", 0), ("movie-sentiment", 0),
                                                         ("movie-sentiment", 1)}
    assert summary_table(rows, by="version").splitlines() == [
        "| task | t0 base | t0 final | t1 base | t1 final |", "|---|---|---|---|---|",
        "| movie-sentiment | 0.500 | 0.875 | 0.375 | 1.000 |",  # tasks in the registry's order
        "| sms-spam | 0.250 | 0.750 |  |  |"]
    assert summary_table(zoo.summary(version=0), by="rank").splitlines()[2] == (
        "| movie-sentiment | 0.500 | 0.875 | 0.625 |")
    with pytest.raises(ZooError, match="several runs for rank 4.*--where version="):
        summary_table(zoo.summary(), by="rank")  # movie r=4 on t0 and on t1 collide

    assert main(["zoo", "--summary", "--out", str(zoo.root), "--table", "rank", "--where", "version=0"]) == 0
    assert "| task | base | r=4 | r=8 |" in capsys.readouterr().out
    assert main(["zoo", "--summary", "--out", str(zoo.root), "--table", "version", "--where", "rank=2"]) == 2
    assert "no completed run" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Slow: the real model beats its base


@pytest.mark.slow
def test_smollm2_lora_beats_the_base_on_movie_sentiment(tmp_path):
    train_lora("smollm2-135m", "movie-sentiment", rank=4, steps=60, keep=2, out_dir=tmp_path / "zoo",
               eval_limit=100)
    final = Zoo(tmp_path / "zoo").records(final=True)[0]
    assert final["val_metric"]["value"] >= final["base_val_metric"]["value"] + 0.15, final


def test_compare_picks_the_zoo_run_by_rank_and_seed_and_refuses_an_ambiguous_pick(tmp_path):
    from oral.experiments import ExperimentError, final_checkpoints

    zoo = Zoo(tmp_path / "zoo")
    _fake_run(zoo, "movie-sentiment", 4, 0, 0.5, 0.875)
    _fake_run(zoo, "movie-sentiment", 8, 0, 0.5, 0.625)  # sorts after the rank-4 run
    _fake_run(zoo, "sms-spam", 8, 0, 0.25, 0.75)
    assert final_checkpoints(zoo, "v0", rank=4, seed=0, tasks=["movie-sentiment"])["movie-sentiment"]["rank"] == 4
    assert final_checkpoints(zoo, "v0", rank=8, seed=0)["movie-sentiment"]["rank"] == 8
    with pytest.raises(ExperimentError, match=r"no finished run on v0 for sms-spam at rank 4.*\(8, 0\)"):
        final_checkpoints(zoo, "v0", rank=4, seed=0, tasks=["sms-spam"])
    record = next(r for r in zoo.records() if r["rank"] == 4)
    (zoo.root / "runs" / "other-lr" / "step-00010").mkdir(parents=True)
    append_jsonl(zoo.manifest, {**record, "run_id": "other-lr", "path": "runs/other-lr/step-00010"})
    with pytest.raises(ExperimentError, match="2 runs on v0 for movie-sentiment at rank 4"):
        final_checkpoints(zoo, "v0", rank=4, seed=0)
