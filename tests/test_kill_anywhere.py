"""Kill anywhere: `oral evolve`, `oral zoo` and `oral train`, SIGKILLed again and again and rerun
until they finish, end exactly where an uninterrupted run ends.

Each loop runs once uninterrupted (in this process, one thread), then as a command (one thread too)
that is killed: at a seeded-random time during training, and deterministically at oral.io's fault
points (ORAL_FAULT="POINT:N": inside a checkpoint's commit, between the two renames of an overwrite,
right after a commit, halfway through a manifest line); then the same command runs to its end.
The rules:

(a) the final weights are the uninterrupted run's, bit for bit;
(b) the output dirs hold exactly the uninterrupted run's files: no dot-named ".tmp" / ".old" debris
    of a killed write, no training checkpoints a finished run does not keep;
(c) every manifest line parses, with no duplicate (run_id, step): a torn record (a writer killed
    mid-line) is cut off by the next append (oral.io.append_jsonl), and a finishing run always
    appends its final record, so none remains;
(d) each rerun resumes from the latest complete training checkpoint the kill left (the step its
    INFO log line names), not from step 0.
"""

import json
import random
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from oral.config import load_config
from oral.evolve import checkpoint_dir, evolve
from oral.grid import ZooConfig, run_grid
from oral.io import append_jsonl, read_jsonl, remove_debris
from oral.train import GeneratorTrainConfig, train_generator
from oral.training import checkpoint_dirs
from test_zoo import _grid_yaml, _oral, write_task

REPO = Path(__file__).resolve().parents[1]
KILLED = -signal.SIGKILL


# -----------------------------------------------------------------------------
# Killing and rerunning a command


class Kill(NamedTuple):
    """One killed run: `when` is a delay in seconds (SIGKILL that long after training started) or an
    ORAL_FAULT (a string, or a function of what is on disk now); `leaves()` checks the kill hit
    the window it aims at."""

    when: float | str | Callable[[], str]
    leaves: Callable[[], bool] = lambda: True


def _latest(root: Path) -> int | None:
    """The step of the latest complete training checkpoint under `root` (None if none)."""
    found = checkpoint_dirs(root)
    return int(found[-1].name) if found else None


def _run_killed_after(args: list[str], started: Callable[[], bool], delay: float) -> tuple[int, str]:
    """Run `oral -v ARGS`; SIGKILL it `delay` seconds after `started()` first holds."""
    proc = _oral("-v", *args)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout))  # keeps the pipe drained
    reader.start()
    deadline = time.time() + 120
    while not started():
        assert proc.poll() is None and time.time() < deadline, "".join(lines)
        time.sleep(0.01)
    time.sleep(delay)
    assert proc.poll() is None, f"the command ended before its kill at +{delay:.2f} s:\n" + "".join(lines)
    proc.kill()
    proc.wait()
    reader.join()
    return proc.returncode, "".join(lines)


def _kill_and_finish(args: list[str], kills: list[Kill], started: Callable[[], bool],
                     resume_point: Callable[[], int | None], resumed: str) -> list[int | None]:
    """Run `oral -v ARGS` once per kill, then once more to its end (exit 0); return the steps the
    reruns resumed from.

    resume_point(): the step a rerun must resume from, given what is on disk (None: it must not
    resume, e.g. when the run is already done); resumed: a regex of the log line, its group the step.
    """
    steps = []
    for kill in kills + [None]:
        expected = resume_point()
        if kill is not None and isinstance(kill.when, float):
            rc, out = _run_killed_after(args, started, kill.when)
        else:
            fault = None if kill is None else kill.when() if callable(kill.when) else kill.when
            proc = _oral("-v", *args, env={"ORAL_FAULT": fault} if fault else None)
            out = proc.communicate(timeout=300)[0]
            rc = proc.returncode
        what = "the finishing run" if kill is None else f"the run killed at {kill.when}"
        assert rc == (0 if kill is None else KILLED), f"{what}: exit {rc}\n{out[-4000:]}"
        found = [int(s) for s in re.findall(resumed, out)]
        assert found == ([] if expected is None else [expected]), f"{what}: resumed from {found}, not {expected}"
        if kill is not None:
            assert kill.leaves(), f"{what} did not stop where it aims:\n{out[-4000:]}"
        steps.append(expected)
    return steps


# -----------------------------------------------------------------------------
# Comparing with the uninterrupted run


def _uninterrupted(train: Callable, *args, **kwargs) -> tuple[Any, float]:
    """train(*args, **kwargs) here on one thread, as the commands run (OMP_NUM_THREADS=1: the same
    kernels, so the same bits); with the seconds it took, the scale of the random kills."""
    threads, t0 = torch.get_num_threads(), time.time()
    torch.set_num_threads(1)
    try:
        return train(*args, **kwargs), time.time() - t0
    finally:
        torch.set_num_threads(threads)


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _debris(root: Path) -> list[str]:
    """What a killed write leaves: dot-named temporary ("*.tmp") and moved-aside ("*.old") entries."""
    return [p for p in _tree(root) if re.search(r"(^|/)\.[^/]*\.(tmp|old)$", p)]


def _assert_same_files(ours: Path, theirs: Path) -> None:
    assert _debris(ours) == [], "debris of a killed write"
    assert _tree(ours) == _tree(theirs), "other files than the uninterrupted run's"


def _assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = load_file(str(ours)), load_file(str(theirs))
    assert a.keys() == b.keys(), ours
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{ours}: {k} differs"


# -----------------------------------------------------------------------------
# The pieces: a torn record is cut off, an interrupted write undone


def test_append_cuts_off_a_torn_last_line_and_ends_a_whole_one(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b"')  # a writer killed mid-line
    append_jsonl(path, {"a": 3})
    assert path.read_text() == '{"a": 1}\n{"a": 3}\n'
    path.write_text('{"a": 1}\n{"a": 2}')  # a whole record without its newline is kept
    append_jsonl(path, {"a": 3})
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 3}\n'
    path.write_text('{"a": 1}\ngarbage')  # junk is not a torn record: kept, for read_jsonl to name
    append_jsonl(path, {"a": 3})
    assert path.read_text() == '{"a": 1}\ngarbage\n{"a": 3}\n'


def test_remove_debris_removes_temporaries_and_puts_back_a_dir_moved_aside(tmp_path):
    for name in (".model.safetensors.k2j4x9_a.tmp", ".0.ab12cd34.tmp/x", ".0.old/tokenizer.json",
                 ".1.old/tokenizer.json", "1/tokenizer.json", ".keep", ".data.ab12cd34.tmp/x"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    remove_debris(tmp_path, "0")  # only entry 0's
    assert (tmp_path / "0" / "tokenizer.json").read_text() == ".0.old/tokenizer.json"  # the write undone
    assert (tmp_path / ".data.ab12cd34.tmp").exists() and not (tmp_path / ".0.ab12cd34.tmp").exists()
    remove_debris(tmp_path)
    assert _tree(tmp_path) == [".keep", "0", "0/tokenizer.json", "1", "1/tokenizer.json"]
    assert (tmp_path / "1" / "tokenizer.json").read_text() == "1/tokenizer.json"  # the newer one stays


# -----------------------------------------------------------------------------
# oral evolve


def test_evolve_killed_anywhere_ends_as_an_uninterrupted_run(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs."
                                  for i in range(60)))
    flags = dict(steps=24, save_every=4, batch_size=2, seq_len=32)
    ref, seconds = _uninterrupted(evolve, "tiny-llama", corpus, out=tmp_path / "a" / "ev", progress=False, **flags)
    out = tmp_path / "b" / "ev"
    ckpt = checkpoint_dir(out)
    args = ["evolve", "--base", "tiny-llama", "--corpus", str(corpus), "--out", str(out)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]

    def out_commit() -> int:  # the evolved model's commit: after the training checkpoints still to come
        return len(range(_latest(ckpt) + 4, 24, 4)) + 1

    rng = random.Random(0)
    resumed = _kill_and_finish(args, [
        Kill(rng.uniform(0.0, 0.4) * seconds),
        Kill("commit:1", leaves=lambda: bool(_debris(ckpt) or _debris(out.parent))),  # inside a write
        Kill(lambda: f"commit:{out_commit()}", leaves=lambda: bool(_debris(out.parent))),  # inside the model's
        Kill(lambda: f"committed:{out_commit()}", leaves=lambda: out.is_dir() and ckpt.is_dir()),  # just after it
    ], started=lambda: _latest(ckpt) is not None,
        resume_point=lambda: None if (out / "config.json").exists() else _latest(ckpt),
        resumed=r"resuming \S+ from step (\d+)")

    assert all(s for s in resumed[1:4]) and resumed[4] is None, resumed  # (d); the last run found it done
    _assert_same_tensors(out / "model.safetensors", ref / "model.safetensors")  # (a)
    ours, theirs = (json.loads((d / "oral_evolve.json").read_text()) for d in (out, ref))
    assert ours["losses"] == theirs["losses"]
    _assert_same_files(out.parent, ref.parent)  # (b): no half-written model, no training checkpoints


# -----------------------------------------------------------------------------
# oral zoo


@pytest.fixture(scope="module")
def zoo_grid(tmp_path_factory) -> tuple[Path, Path, float]:
    """(grid YAML, its zoo trained uninterrupted, seconds that took): one 100-step run keeping steps 97-100."""
    tmp = tmp_path_factory.mktemp("grid")
    grid = _grid_yaml(tmp, write_task(tmp), steps=100, seeds=(0,))
    cfg = load_config(ZooConfig, grid, [f"out={tmp / 'ref'}", "train.checkpoint_every=10"])
    counts, seconds = _uninterrupted(run_grid, cfg)
    assert counts["trained"] == 1
    return grid, tmp / "ref", seconds


def test_zoo_killed_anywhere_ends_as_an_uninterrupted_run(zoo_grid, tmp_path):
    grid, ref, seconds = zoo_grid
    zoo = tmp_path / "zoo"
    args = ["zoo", "--config", str(grid), f"out={zoo}", "train.checkpoint_every=10"]
    (run_id,) = {r["run_id"] for r in read_jsonl(ref / "manifest.jsonl")}
    ckpts = zoo / "runs" / run_id / "checkpoints"
    manifest = zoo / "manifest.jsonl"

    def recorded() -> dict[int, dict]:
        return {r["step"]: r for r in read_jsonl(manifest)}

    rng = random.Random(1)
    resumed = _kill_and_finish(args, [
        Kill(rng.uniform(0.0, 0.3) * seconds),
        Kill("commit:1", leaves=lambda: bool(_debris(ckpts))),  # inside the next training checkpoint's write
        Kill("append:1", leaves=lambda: not manifest.read_bytes().endswith(b"\n")),  # a torn record
        # right after the final record, before the training checkpoints are removed
        Kill(lambda: f"appended:{len({97, 98, 99, 100} - set(recorded()))}",
             leaves=lambda: 100 in recorded() and ckpts.is_dir()),
    ], started=lambda: _latest(ckpts) is not None,
        resume_point=lambda: None if 100 in recorded() else _latest(ckpts),
        resumed=r"resumed from \S+ \(step (\d+)\)")

    assert all(s for s in resumed[1:4]) and resumed[4] is None, resumed  # (d)
    lines = manifest.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # (c): every line parses
    assert sorted(r["step"] for r in records) == [97, 98, 99, 100], "a missing or duplicate record"
    theirs = {r["step"]: r for r in read_jsonl(ref / "manifest.jsonl")}
    for r in records:
        same = theirs[r["step"]]
        assert (r["train_loss"], r.get("val_metric")) == (same["train_loss"], same.get("val_metric"))
        _assert_same_tensors(zoo / r["path"] / "adapter_model.safetensors",
                             ref / r["path"] / "adapter_model.safetensors")  # (a)
    _assert_same_files(zoo, ref)  # (b)


# -----------------------------------------------------------------------------
# oral train


def test_train_killed_anywhere_ends_as_an_uninterrupted_run(zoo_grid, tmp_path):
    _, zoo, _ = zoo_grid
    config = REPO / "configs" / "generator-tiny.yaml"
    overrides = ["steps=12", "save_every=2", "log_every=1", "device=cpu"]
    ref, seconds = _uninterrupted(train_generator, [zoo], tmp_path / "a" / "gen",
                                  load_config(GeneratorTrainConfig, config, overrides))
    gen = tmp_path / "b" / "gen"
    ckpts = gen / "checkpoints"
    args = ["train", "--zoo", str(zoo), "--out", str(gen), "--config", str(config), *overrides]

    def last_ckpt_commit() -> int:  # each save commits a checkpoint, then the exported tokenizer
        return 2 * len(range(_latest(ckpts) + 2, 13, 2)) - 1

    rng = random.Random(2)
    resumed = _kill_and_finish(args, [
        Kill(rng.uniform(0.0, 0.25) * seconds),  # before the checkpoint of step 8: two saves must remain
        Kill("commit:1", leaves=lambda: bool(_debris(ckpts))),  # inside the next checkpoint's write
        # between the two renames of the exported tokenizer: GEN/tokenizers/0 is missing
        Kill("swap:1", leaves=lambda: (gen / "tokenizers" / ".0.old").is_dir()
             and not (gen / "tokenizers" / "0").exists()),
        # the final checkpoint written, the generator not yet exported from it
        Kill(lambda: f"committed:{last_ckpt_commit()}",
             leaves=lambda: _latest(ckpts) == 12 and json.loads((gen / "config.json").read_text())["step"] < 12),
    ], started=lambda: _latest(ckpts) is not None, resume_point=lambda: _latest(ckpts),
        resumed=r"resumed from \S+ \(step (\d+)\)")

    assert all(s for s in resumed[1:]) and resumed[-1] == 12, resumed  # (d)
    _assert_same_tensors(gen / "model.safetensors", ref / "model.safetensors")  # (a): the EMA weights
    _assert_same_tensors(gen / "conditions.safetensors", ref / "conditions.safetensors")
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (gen, ref))
    assert ours["step"] == theirs["step"] == 12
    assert [r.split(",")[:3] for r in (gen / "loss.csv").read_text().splitlines()] == [
        r.split(",")[:3] for r in (ref / "loss.csv").read_text().splitlines()], "another loss log (step, loss, lr)"
    _assert_same_files(gen, ref)  # (b): the same kept checkpoints, no debris
