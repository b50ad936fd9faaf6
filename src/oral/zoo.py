"""The LoRA zoo: a directory of PEFT LoRA checkpoints and the manifest that lists them.

    ZOO/manifest.jsonl                      one JSON record per finished checkpoint
    ZOO/runs/<run_id>/step-<NNNNNN>/        a plain PEFT adapter dir (adapter_config.json,
                                            adapter_model.safetensors)
    ZOO/runs/<run_id>/checkpoints/<N>/      a stopped run's latest training checkpoint (oral.finetune)
    ZOO/locks/<run_id>.lock                 held (flock) by the process training that run

A run is one (base model version, task, rank, seed) with fixed training hyperparameters; its
`run_id` is a readable prefix plus a hash of everything that changes its weights, so the same
grid always maps to the same run ids. oral.finetune trains a run into a zoo, oral.grid plans and
spreads a grid of runs; this module is the store they write and every reader uses.

The manifest is append-only JSONL (`oral.io.append_jsonl`: an flock-ed, fsync-ed append of one
line that starts on a fresh line after a torn one) rather than SQLite: the zoo is write-once
(checkpoints are never edited), readers want to grep it or `pandas.read_json(lines=True)` it, a
torn line from a killed writer is skipped by `oral.io.read_jsonl`, and many processes (one
per GPU) append to it with no database lock to contend for (SQLite's locking is also unreliable
on the network filesystems clusters use). A few thousand records never need an index.

Safety: every checkpoint is written into an `oral.io.atomic_dir` (a temporary sibling renamed into
place) and only then appended to the manifest, so a listed checkpoint is always complete; a run
is done when its final record (`"final": true`, carrying the validation metric) exists; leftover
temporary dirs and checkpoint dirs without a record are removed before a run is trained again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from oral import tasks as tasks_mod
from oral.evaluate import Evaluator
from oral.io import read_jsonl
from oral.models import load_base
from oral.paths import expand_path
from oral.progress import progress_bar
from oral.training import get_task

if TYPE_CHECKING:
    from oral.finetune import FinetuneConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
# A bad manifest line cannot come from a killed writer (oral.io.read_jsonl skips torn ones).
MANIFEST_FIX = ("remove that line (its checkpoint is then trained again by rerunning `oral zoo` with the same "
                "config) or restore the file")


class ZooError(ValueError):
    """A zoo config or directory that cannot be used as asked."""


# -----------------------------------------------------------------------------
# Run identity


def slug(s: str) -> str:
    s = Path(s.rstrip("/")).name or s
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")[:40] or "x"


def run_id_for(base_id: str, task_key: str, rank: int, seed: int, train: FinetuneConfig) -> str:
    """A readable, stable id: base-task-rank-seed plus a hash of everything that shapes the weights."""
    ident = {"base": base_id, "task": task_key, "rank": rank, "seed": seed, "train": train.identity()}
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return f"{slug(base_id)}_{slug(task_key)}_r{rank}_s{seed}_{h}"


def step_dirname(step: int) -> str:
    return f"step-{step:06d}"


# -----------------------------------------------------------------------------
# The store


class Zoo:
    """A zoo directory: its manifest records and the adapter dirs they point to."""

    def __init__(self, root: str | Path):
        self.root = Path(expand_path(str(root)))

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def all_records(self) -> list[dict]:
        """Every record, de-duplicated by (run_id, step) keeping the last, whose dir exists."""
        by_key: dict[tuple[str, int], dict] = {}
        for r in read_jsonl(self.manifest, MANIFEST_FIX):
            if "run_id" in r and "step" in r and (self.root / r["path"]).is_dir():
                by_key[(r["run_id"], r["step"])] = r
        return sorted(by_key.values(), key=lambda r: (r["run_id"], r["step"]))

    def done_runs(self) -> set[str]:
        return {r["run_id"] for r in self.all_records() if r.get("final")}

    def records(self, complete_only: bool = True, **filters: Any) -> list[dict]:
        """Checkpoint records matching every `key=value` filter (of completed runs by default).

        A set value matches any of its members (e.g. step={51, 55}).
        """
        recs = self.all_records()
        if complete_only:
            done = {r["run_id"] for r in recs if r.get("final")}
            recs = [r for r in recs if r["run_id"] in done]
        return matching(recs, filters)

    def runs(self, **filters: Any) -> dict[str, list[dict]]:
        """Completed runs: run_id -> its checkpoint records by step."""
        out: dict[str, list[dict]] = {}
        for r in self.records(**filters):
            out.setdefault(r["run_id"], []).append(r)
        return out

    def path(self, record: dict) -> Path:
        return self.root / record["path"]

    def summary(self, **filters: Any) -> list[dict]:
        """One row per completed run: base, version, task, rank, seed, steps, base and final metric,
        wall time. `filters` select rows by any of those keys (a set value matches any member)."""
        rows = []
        for run_id, recs in sorted(self.runs().items()):
            final = next(r for r in recs if r.get("final"))
            vals = [r["val_metric"]["value"] for r in recs if r.get("val_metric")]
            lineage = final.get("lineage") or []
            rows.append({
                "run_id": run_id,
                "base": final["base"],
                "version": len(lineage),  # t0 = the root model, tk = k continued-pretraining links
                "root": lineage[0]["parent"] if lineage else final["base"],
                "task": final["task"],
                "rank": final["rank"],
                "seed": final["seed"],
                "steps": final["step"],
                "checkpoints": len(recs),
                "base_metric": (final.get("base_val_metric") or {}).get("value"),
                "final_metric": (final.get("val_metric") or {}).get("value"),
                "metric": (final.get("val_metric") or {}).get("metric"),
                "ckpt_min": min(vals) if len(vals) > 1 else None,
                "ckpt_max": max(vals) if len(vals) > 1 else None,
                "wall_s": final.get("wall_s"),
            })
        return matching(rows, filters)


def matching(rows: list[dict], filters: dict[str, Any]) -> list[dict]:
    """The rows whose `key` equals each filter's value (a set value: any of its members)."""
    for key, want in filters.items():
        wanted = want if isinstance(want, (set, frozenset)) else {want}
        rows = [r for r in rows if r.get(key) in wanted]
    return rows


def summary_table(rows: list[dict], by: str) -> str:
    """A markdown table of summary rows: one line per task, one column group per version or rank.

    by="version": the base and final score of each evolved version (t0, t1, ...) side by side.
    by="rank": the base score, then the final score of each rank.
    Each (task, column) must hold one run: narrow the rows first (Zoo.summary(rank=4, seed=0)).
    """
    if by not in ("version", "rank"):
        raise ZooError(f"a summary table goes by 'version' or 'rank', not {by!r}")
    if not rows:
        raise ZooError("no completed run to tabulate: check the zoo path and the filters")
    other = "rank" if by == "version" else "version"
    cells: dict[tuple[str, int], dict] = {}
    for r in rows:
        key = (r["task"], r[by])
        if key in cells:
            raise ZooError(
                f"{r['task']} has several runs for {by} {r[by]} (differing in {other}, seed or root): "
                f"narrow the rows, e.g. --where {other}={r[other]} --where seed={r['seed']}")
        cells[key] = r
    known = tasks_mod.list_tasks()
    tasks = sorted({t for t, _ in cells}, key=lambda t: (known.index(t) if t in known else len(known), t))
    cols = sorted({c for _, c in cells})

    def f(r: dict | None, field: str) -> str:
        return "" if r is None or r.get(field) is None else f"{r[field]:.3f}"

    if by == "version":
        head = ["task"] + [f"t{c} {w}" for c in cols for w in ("base", "final")]
        lines = [[t] + [f(cells.get((t, c)), k) for c in cols for k in ("base_metric", "final_metric")]
                 for t in tasks]
    else:
        head = ["task", "base"] + [f"r={c}" for c in cols]
        lines = []
        for t in tasks:
            first = next(cells[(t, c)] for c in cols if (t, c) in cells)
            lines.append([t, f(first, "base_metric")] + [f(cells.get((t, c)), "final_metric") for c in cols])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """Yield True holding an exclusive flock on `path`, or False if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def clean_run_dir(zoo: Zoo, run_id: str, recorded_steps: set[int]) -> None:
    """Remove temporary dirs of a killed writer and checkpoint dirs that never got a record."""
    run_dir = zoo.root / "runs" / run_id
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if p.name.startswith(".") or (m and int(m.group(1)) not in recorded_steps):
            log.info("removing unfinished %s", p)
            shutil.rmtree(p, ignore_errors=True)


def evaluate_checkpoints(
    zoo: str | Path | Zoo, records: list[dict] | None = None, split: str = "validation",
    limit: int | None = None, batch_size: int = 16,
) -> list[dict]:
    """Score checkpoints (default: every completed one) on their task; one dict per record.

    Each base is loaded once and the adapters are swapped into it in place (Evaluator.set_adapter).
    Returns the records with `eval` = {"metric", "value", "n", "split"} added (the manifest is not
    changed: its val_metric is the training-time score of the final checkpoint).
    """
    zoo = zoo if isinstance(zoo, Zoo) else Zoo(zoo)
    records = zoo.records() if records is None else records
    out: list[dict] = []
    for base in dict.fromkeys(r["base"] for r in records):
        model, tok = load_base(base)
        ev = Evaluator(model, tok, batch_size=batch_size, progress=False)
        for r in progress_bar([r for r in records if r["base"] == base], desc=f"eval {slug(base)}"):
            ev.set_adapter(zoo.path(r))
            res = ev.evaluate(get_task(r.get("task_key", r["task"])), split=split, limit=limit)
            out.append({**r, "eval": {**res, "split": split}})
    return out
