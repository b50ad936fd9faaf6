"""The LoRA zoo: PEFT LoRA fine-tuning runs whose last K checkpoints become the generator's data.

A zoo is a directory:

    ZOO/manifest.jsonl                      one JSON record per finished checkpoint
    ZOO/runs/<run_id>/step-<NNNNNN>/        a plain PEFT adapter dir (adapter_config.json,
                                            adapter_model.safetensors)
    ZOO/locks/<run_id>.lock                 held (flock) by the process training that run

A run is one (base model version, task, rank, seed) with fixed training hyperparameters; its
`run_id` is a readable prefix plus a hash of everything that changes its weights, so the same
grid always maps to the same run ids.

The manifest is append-only JSONL (`oral.io.append_jsonl`: an flock-ed, fsync-ed append of one
line that starts on a fresh line after a torn one) rather than SQLite: the zoo is write-once
(checkpoints are never edited), readers want to grep it or `pandas.read_json(lines=True)` it, a
torn last line from a killed writer is skipped by `oral.io.read_jsonl`, and many processes (one
per GPU) append to it with no database lock to contend for (SQLite's locking is also unreliable
on the network filesystems clusters use). A few thousand records never need an index.

Safety and resumption:
- every checkpoint is written into an `oral.io.atomic_dir` (a temporary sibling renamed into
  place) and only then appended to the manifest, so a listed checkpoint is always complete;
- a run is done when its final record (`"final": true`, carrying the validation metric) exists;
- rerunning a grid skips done runs; a partial run (killed mid-way) is trained again from scratch
  with the same seed (training is deterministic: the batch of step s is a function of the seed
  and s), and the checkpoints it had already recorded are kept as they are, not written twice.
  Leftover temporary dirs and checkpoint dirs without a record are removed first. Runs are a few
  minutes long, so resuming mid-run is not worth a second, optimizer-state checkpoint format.
- a per-run lock lets two processes (or two `oral zoo` commands) share a zoo: a run locked by
  another process is left to it.

Many GPUs: a grid is spread over processes by `RANK` / `WORLD_SIZE` (set by `accelerate launch`
and `torchrun`): process r trains runs r, r + W, r + 2W, ... of the grid's fixed order, on
`cuda:LOCAL_RANK` when CUDA is there. Runs are independent, so no process group is needed:

    accelerate launch --num_processes 8 -m oral.cli zoo --config configs/zoo-full.yaml
    torchrun --nproc_per_node 8 -m oral.cli zoo --config configs/zoo-full.yaml
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from oral.io import append_jsonl, atomic_dir, read_jsonl
from oral.paths import oral_home

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
LOG_EVERY = 10  # steps between log lines (the progress bar shows every step on a terminal)


class ZooError(ValueError):
    """A zoo config or directory that cannot be used as asked."""


# -----------------------------------------------------------------------------
# Configs


@dataclass
class TrainConfig:
    """Hyperparameters of one LoRA fine-tuning run (shared by every run of a grid)."""

    steps: int = 100  # optimizer steps
    keep: int = 10  # checkpoints kept: the last `keep` saves of the run
    save_every: int = 1  # steps between kept checkpoints (RPG keeps every one of the last 50)
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 10  # linear warmup, then `schedule`
    schedule: str = "cosine"  # "cosine" (down to min_lr_ratio * lr) or "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    alpha: float | None = None  # LoRA alpha; None -> 2 * rank (a scale of 2 at every rank)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # module names
    dropout: float = 0.0  # LoRA dropout (0 keeps the run a pure function of the seed)
    max_length: int = 256  # tokens per example; long prompts are cut from the left
    generation_stop: str = "\n"  # appended to generation targets: the evaluator stops at a newline
    eval_limit: int | None = 200  # validation examples scored for the final checkpoint
    eval_checkpoints: bool = False  # also score every kept checkpoint (costs an eval each)
    eval_base: bool = True  # score the base model too (cached per base and task)
    eval_batch_size: int = 16
    packing: bool = True  # pack a batch's examples into one padding-free row (same loss, fewer FLOPs)
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is there, else cpu

    def __post_init__(self) -> None:
        if self.steps < 1 or self.keep < 1 or self.save_every < 1 or self.batch_size < 1:
            raise ZooError("steps, keep, save_every and batch_size must all be >= 1")
        if self.schedule not in ("cosine", "constant"):
            raise ZooError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not self.targets:
            raise ZooError("targets is empty: name the modules to adapt, e.g. q_proj,v_proj")

    def save_steps(self) -> list[int]:
        """The steps whose checkpoints are kept: the last `keep` multiples of save_every, ending at steps."""
        steps = [self.steps - i * self.save_every for i in range(self.keep)]
        return sorted(s for s in steps if s >= 1)

    def identity(self) -> dict:
        """The fields that change a run's weights (the eval and device fields do not)."""
        d = dataclasses.asdict(self)
        for k in ("eval_limit", "eval_checkpoints", "eval_base", "eval_batch_size", "packing", "device"):
            d.pop(k)
        return d


@dataclass
class GridBlock:
    """One product of the grid: every base x task x rank x seed."""

    bases: list[str] = field(default_factory=list)  # names, dirs or hub ids
    tasks: list[str] = field(default_factory=list)  # names, task YAML files, "all" or "classification"
    ranks: list[int] = field(default_factory=lambda: [4])
    seeds: list[int] = field(default_factory=lambda: [0])
    # An evolved family as bases: the versions t_k (0 = the chain's base) of the family that
    # `oral evolve --chain --config CHAIN` builds (its cached dirs under $ORAL_HOME/evolved).
    chain: str | None = None  # a ChainConfig YAML, or "default" for ChainConfig's defaults
    versions: list[int] = field(default_factory=list)


@dataclass
class ZooConfig:
    """A zoo grid: where it goes, which runs (a union of products), and how each run trains."""

    out: str = "$ORAL_HOME/zoos/default"  # zoo root; $ORAL_HOME and ~ are expanded
    grid: list[GridBlock] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the grid."""

    base: str
    task: str
    rank: int
    seed: int


def expand_path(s: str) -> str:
    """Expand $ORAL_HOME (to oral.paths.oral_home()), other environment variables and ~."""
    if "$ORAL_HOME" in s or "${ORAL_HOME}" in s:
        home = str(oral_home())
        s = s.replace("${ORAL_HOME}", home).replace("$ORAL_HOME", home)
    return os.path.expanduser(os.path.expandvars(s))


def _expand_tasks(names: list[str]) -> list[str]:
    from oral import tasks as tasks_mod

    out: list[str] = []
    for name in names:
        if name in ("all", "classification", "generation"):
            for t in tasks_mod.list_tasks():
                if name == "all" or tasks_mod.get_task(t).kind == name:
                    out.append(t)
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def chain_versions(chain: str) -> list[str]:
    """The model dirs [t0, t1, ...] of the family a chain config describes (as oral.evolve caches them).

    Nothing is trained here: a version that is missing is an error naming the command that builds it.
    """
    from oral import evolve as ev
    from oral.config import load_config

    cfg = load_config(ev.ChainConfig, None if chain == "default" else expand_path(chain))
    versions = [cfg.base]
    for link in cfg.links():
        link.base = str(versions[-1])
        versions.append(str(ev.default_out(link, cfg.root)))
    return versions


def _block_bases(block: GridBlock, skip_missing: bool = False) -> tuple[list[str], list[str]]:
    """(bases of the block that exist, evolved versions not built yet); the latter only when skip_missing."""
    bases = [expand_path(b) for b in block.bases]
    if block.chain is None:
        if block.versions:
            raise ZooError("versions needs chain: the evolve chain config whose versions to use")
        return bases, []
    family = chain_versions(block.chain)
    missing = []
    for k in block.versions or range(len(family)):
        if not 0 <= k < len(family):
            raise ZooError(f"version t{k} is not in the chain {block.chain} (t0..t{len(family) - 1})")
        if k > 0 and not (Path(family[k]) / "config.json").is_file():
            if skip_missing:
                missing.append(family[k])
                continue
            cmd = "oral evolve --chain" + ("" if block.chain == "default" else f" --config {block.chain}")
            raise ZooError(f"evolved version t{k} ({family[k]}) does not exist yet; build the family first: "
                           f"{cmd} (or pass --skip-missing to train the runs whose base exists now)")
        bases.append(family[k])
    return bases, missing


def grid_runs(cfg: ZooConfig, skip_missing: bool = False, waiting: list | None = None) -> list[RunSpec]:
    """Every run of the grid, de-duplicated, in a fixed order (the order sharding relies on).

    skip_missing: leave out the runs on evolved versions that are not built yet (appended to
    `waiting` when given) instead of raising, so a zoo can be filled while the family is built.
    """
    runs: list[RunSpec] = []
    held: list[RunSpec] = []
    for block in cfg.grid:
        bases, missing = _block_bases(block, skip_missing)
        for base in bases + missing:
            for task in _expand_tasks(block.tasks):
                for rank in block.ranks:
                    for seed in block.seeds:
                        spec = RunSpec(base, task, int(rank), int(seed))
                        (held if base in missing else runs).append(spec)
    if waiting is not None:
        waiting.extend(dict.fromkeys(held))
    if not runs and not held:
        raise ZooError("the grid is empty: give at least one block with bases and tasks")
    return list(dict.fromkeys(runs))


def shard(items: list, rank: int, world_size: int) -> list:
    """Items rank, rank + W, rank + 2W, ...: each item goes to exactly one process."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ZooError(f"bad process rank {rank} for world size {world_size}")
    return items[rank::world_size]


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the variables accelerate launch / torchrun set."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


# -----------------------------------------------------------------------------
# Run identity and the manifest


def _base_id_of(base: str | Path) -> str:
    from oral.models import base_id

    return base_id(expand_path(str(base)))


def _slug(s: str) -> str:
    s = Path(s.rstrip("/")).name or s
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")[:40] or "x"


def run_id_for(base_id: str, task_key: str, rank: int, seed: int, train: TrainConfig) -> str:
    """A readable, stable id: base-task-rank-seed plus a hash of everything that shapes the weights."""
    ident = {"base": base_id, "task": task_key, "rank": rank, "seed": seed, "train": train.identity()}
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return f"{_slug(base_id)}_{_slug(task_key)}_r{rank}_s{seed}_{h}"


def step_dirname(step: int) -> str:
    return f"step-{step:06d}"


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
        for r in read_jsonl(self.manifest):
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
        return _matching(recs, filters)

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
        return _matching(rows, filters)


def _matching(rows: list[dict], filters: dict[str, Any]) -> list[dict]:
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
    from oral import tasks as tasks_mod

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
def _try_lock(path: Path) -> Iterator[bool]:
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


def _clean_run_dir(zoo: Zoo, run_id: str, recorded_steps: set[int]) -> None:
    """Remove temporary dirs of a killed writer and checkpoint dirs that never got a record."""
    run_dir = zoo.root / "runs" / run_id
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if p.name.startswith(".") or (m and int(m.group(1)) not in recorded_steps):
            log.info("removing unfinished %s", p)
            shutil.rmtree(p, ignore_errors=True)


# -----------------------------------------------------------------------------
# Data: prompt + target, loss on the target tokens only


def encode_example(tok, prompt: str, target: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + target and the number of target tokens.

    Tokenized exactly as the evaluator scores (oral.evaluate.encode_pair: the prompt with special
    tokens, cut from the left to fit; the target on its own), so the supervised tokens are the
    answer's tokens whatever the tokenizer would merge across the boundary.
    """
    from oral.evaluate import encode_pair

    p, t = encode_pair(tok, prompt, target, max_length)
    if not t:
        raise ZooError(f"target {target!r} has no tokens: a task example needs a non-empty answer")
    return p + t, len(t)


def collate(encoded: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (B, L); loss_mask (B, L) marks target tokens."""
    L = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    loss_mask = torch.zeros((B, L), dtype=torch.bool)
    for i, (ids, n_target) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, len(ids) - n_target : len(ids)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pack(encoded: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """The batch as one padding-free row (1, T): input_ids, position_ids restarting at 0 per example,
    loss_mask on target tokens. No attention_mask: transformers reads the position_ids resets as a
    packed batch and masks attention block-diagonally, so each example sees only itself.
    The loss equals collate's (tested); the padding of a right-padded batch is not computed.
    """
    ids = [t for seq, _ in encoded for t in seq]
    position_ids = [i for seq, _ in encoded for i in range(len(seq))]
    loss_mask = [i >= len(seq) - n for seq, n in encoded for i in range(len(seq))]
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "loss_mask": torch.tensor([loss_mask], dtype=torch.bool),
    }


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of step `step` (1-based): epochs of seeded permutations, read in order.

    A function of (n, batch_size, step, seed) alone, so a run is reproducible and any step's
    batch can be recomputed without replaying the others.
    """
    start = (step - 1) * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
    return out


def target_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over target tokens; the LM head runs on the predicting positions only.

    model: a PeftModel (or any causal LM exposing get_decoder / get_output_embeddings).
    batch: from collate (right-padded, attention_mask) or pack (one row, position_ids).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    mask = batch.get("attention_mask")
    if mask is not None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    else:
        position_ids = batch["position_ids"]  # packed: resets mark example boundaries
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # (B, L, D)
    predict = loss_mask[:, 1:]  # (B, L-1): position i predicts token i+1
    h = hidden[:, :-1][predict]  # (M, D), M = target tokens in the batch
    logits = lm.get_output_embeddings()(h).float()  # (M, V)
    labels = ids[:, 1:][predict]  # (M,)
    return torch.nn.functional.cross_entropy(logits, labels)


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of step `step` (1-based): linear warmup, then cosine to min_lr_ratio or constant."""
    # 1) linear warmup
    if step <= train.warmup_steps:
        return train.lr * step / max(1, train.warmup_steps)
    if train.schedule == "constant":
        return train.lr
    # 2) cosine decay from lr to min_lr_ratio * lr at the last step
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * coeff)


# -----------------------------------------------------------------------------
# One run


def _resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{dist_env()[2] % torch.cuda.device_count()}")
    return torch.device("cpu")


def _get_task(task):
    from oral import tasks as tasks_mod

    if not isinstance(task, str):
        return task
    if task.endswith((".yaml", ".yml")) and Path(expand_path(task)).is_file():
        return tasks_mod.load_task_file(expand_path(task))
    return tasks_mod.get_task(task)


def _task_key(given) -> str:
    """What identifies a task in run ids: its name, or the resolved YAML file it is loaded from."""
    if not isinstance(given, str):
        return given.name
    path = Path(expand_path(given))
    if given.endswith((".yaml", ".yml")) and path.is_file():
        return str(path.resolve())
    return given


class _Base:
    """A loaded base model with what the manifest records about it (computed once per load)."""

    def __init__(self, model, tok, base_id: str):
        from oral.models import lineage, weights_fingerprint

        self.model, self.tok, self.base_id = model, tok, base_id
        self.lineage = lineage(model.config)
        self.fingerprint = weights_fingerprint(model)
        self.base_evals: dict[tuple[str, int | None], dict] = {}


def _as_base(base, tokenizer=None, device: torch.device | None = None) -> _Base:
    if isinstance(base, _Base):
        return base
    from oral.models import load_base, load_tokenizer

    if isinstance(base, (str, Path)):
        model, tok = load_base(expand_path(str(base)), device=device or "cpu")
        return _Base(model, tokenizer or tok, _base_id_of(base))
    bid = getattr(base.config, "oral_base_id", None) or base.config.name_or_path
    if tokenizer is None:
        tokenizer = load_tokenizer(bid)
    return _Base(base, tokenizer, bid)


def _evaluate(model, tok, task, train: TrainConfig) -> dict:
    from oral.evaluate import Evaluator

    model.eval()
    with torch.no_grad():
        res = Evaluator(model, tok, batch_size=train.eval_batch_size, progress=False).evaluate(
            task, split="validation", limit=train.eval_limit
        )
    return {"metric": res["metric"], "value": float(res["value"]), "n": int(res["n"])}


def _run(base: _Base, task, task_key: str, rank: int, seed: int, train: TrainConfig, zoo: Zoo,
         device: torch.device, worker: int = 0, position: int = 1) -> tuple[str, list[Path], str]:
    """Train one run (or finish a partial one) into `zoo`.

    Returns (run_id, kept checkpoint dirs, outcome): outcome is "trained", "skipped" (finished
    earlier, nothing trained) or "busy" (another process holds the run; nothing kept here).
    """
    from peft import LoraConfig, get_peft_model

    run_id = run_id_for(base.base_id, task_key, rank, seed, train)
    with _try_lock(zoo.root / "locks" / f"{run_id}.lock") as locked:
        if not locked:
            log.info("run %s is being trained by another process; skipped", run_id)
            return run_id, [], "busy"
        recorded = {r["step"]: r for r in zoo.all_records() if r["run_id"] == run_id}
        if any(r.get("final") for r in recorded.values()):
            return run_id, [zoo.path(r) for r in sorted(recorded.values(), key=lambda r: r["step"])], "skipped"
        _clean_run_dir(zoo, run_id, set(recorded))
        if recorded:
            log.info("run %s: %d checkpoints recorded but no final one; training again from step 0",
                     run_id, len(recorded))

        alpha = train.alpha if train.alpha is not None else 2.0 * rank
        common = {
            "run_id": run_id,
            "base": base.base_id,
            "lineage": base.lineage,
            "base_fingerprint": base.fingerprint,
            "task": task.name,
            "task_key": task_key,
            "rank": rank,
            "alpha": alpha,
            "targets": list(train.targets),
            "seed": seed,
            "train": train.identity(),
        }
        examples = task.split("train")
        if not examples:
            raise ZooError(f"task {task.name!r} has an empty train split")
        stop = train.generation_stop if task.kind == "generation" else ""
        encoded = [encode_example(base.tok, e.prompt, e.target + stop, train.max_length) for e in examples]
        pad_id = base.tok.pad_token_id if base.tok.pad_token_id is not None else 0

        base.model.to(device)
        base_val = None
        if train.eval_base:
            key = (task_key, train.eval_limit)
            if key not in base.base_evals:
                base.base_evals[key] = _evaluate(base.model, base.tok, task, train)
            base_val = base.base_evals[key]

        # 1) wrap the base in a fresh LoRA (PEFT's init, seeded), base weights frozen
        torch.manual_seed(seed)
        lcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(train.targets),
                          lora_dropout=train.dropout, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(base.model, lcfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        save_steps = set(train.save_steps())
        final_step = train.steps
        kept: list[Path] = []
        t0 = time.time()
        try:
            # 2) the loop: one seeded batch per step, loss on target tokens
            bar = tqdm(range(1, train.steps + 1), desc=f"{_slug(base.base_id)}/{task.name}/r{rank}/s{seed}",
                       position=position, leave=False, disable=None)
            for step in bar:
                model.train()
                chosen = [encoded[i] for i in batch_indices(len(encoded), train.batch_size, step, seed)]
                batch = pack(chosen) if train.packing else collate(chosen, pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, train)
                loss = target_loss(model, batch)
                if not torch.isfinite(loss):
                    raise ZooError(f"run {run_id}: loss became {loss.item()} at step {step}; lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step % LOG_EVERY == 0 or step == train.steps:
                    log.info("%s step %d/%d loss %.4f lr %.2e %.2f s/step", run_id, step, train.steps,
                             loss.item(), lr_at(step, train), (time.time() - t0) / step)

                # 3) keep the checkpoint: atomic dir first, manifest record second
                if step not in save_steps:
                    continue
                rel = Path("runs") / run_id / step_dirname(step)
                kept.append(zoo.root / rel)
                is_final = step == final_step
                if step in recorded and not is_final:
                    continue  # written by an earlier, interrupted attempt: left as it is
                with atomic_dir(zoo.root / rel, overwrite=True) as tmp:
                    model.save_pretrained(tmp)
                record = {**common, "step": step, "path": rel.as_posix(), "final": is_final,
                          "train_loss": round(loss.item(), 6), "lr": lr_at(step, train),
                          "worker": worker, "time": dt.datetime.now(dt.timezone.utc).isoformat()}
                if train.eval_checkpoints or is_final:
                    record["val_metric"] = _evaluate(model, base.tok, task, train)
                if is_final:
                    record["base_val_metric"] = base_val
                    record["wall_s"] = round(time.time() - t0, 2)
                append_jsonl(zoo.manifest, record)
            bar.close()
        finally:
            # 4) hand the base back clean (LoRA layers removed) for the next run of the grid
            base.model = model.unload()
            base.model.requires_grad_(False)
            base.model.eval()
    return run_id, kept, "trained"


# -----------------------------------------------------------------------------
# Public API


def train_lora(
    base: str | Path | torch.nn.Module,
    task,
    rank: int = 4,
    steps: int = 100,
    *,
    keep: int = 10,
    out_dir: str | Path,
    seed: int = 0,
    tokenizer=None,
    **train_kwargs: Any,
) -> list[Path]:
    """Fine-tune one LoRA on `task` and keep its last `keep` checkpoints in the zoo at `out_dir`.

    base: an embedded name, a local HF dir or hub id (loaded with oral.models.load_base), or an
      already loaded model (give `tokenizer` unless the model came from load_base).
    task: a task name, a task YAML file, or an oral.tasks.Task.
    train_kwargs: any other TrainConfig field (lr, batch_size, targets, save_every, ...).
    Returns the kept checkpoint dirs (plain PEFT adapter dirs), oldest first; the last one is
    the final checkpoint. A run already done in that zoo is not trained again.
    """
    train = TrainConfig(steps=steps, keep=keep, **train_kwargs)
    task = str(task) if isinstance(task, Path) else task
    device = _resolve_device(train.device)
    b = _as_base(base, tokenizer, device)
    t = _get_task(task)
    _, kept, _ = _run(b, t, _task_key(task), rank, seed, train, Zoo(out_dir), device, position=0)
    return kept


def evaluate_checkpoints(
    zoo: str | Path | Zoo, records: list[dict] | None = None, split: str = "validation",
    limit: int | None = None, batch_size: int = 16,
) -> list[dict]:
    """Score checkpoints (default: every completed one) on their task; one dict per record.

    Each base is loaded once and the adapters are swapped into it in place (Evaluator.set_adapter).
    Returns the records with `eval` = {"metric", "value", "n", "split"} added (the manifest is not
    changed: its val_metric is the training-time score of the final checkpoint).
    """
    from oral.evaluate import Evaluator
    from oral.models import load_base

    zoo = zoo if isinstance(zoo, Zoo) else Zoo(zoo)
    records = zoo.records() if records is None else records
    out: list[dict] = []
    for base in dict.fromkeys(r["base"] for r in records):
        model, tok = load_base(base)
        ev = Evaluator(model, tok, batch_size=batch_size, progress=False)
        for r in tqdm([r for r in records if r["base"] == base], desc=f"eval {_slug(base)}", disable=None):
            ev.set_adapter(zoo.path(r))
            res = ev.evaluate(_get_task(r.get("task_key", r["task"])), split=split, limit=limit)
            out.append({**r, "eval": {**res, "split": split}})
    return out


def run_grid(cfg: ZooConfig, rank: int | None = None, world_size: int | None = None,
             skip_missing: bool = False) -> dict:
    """Train every missing run of the grid that falls to this process; return counts.

    rank / world_size default to the RANK / WORLD_SIZE environment variables (1 process).
    Bases are loaded once per base and reused across that base's runs.
    skip_missing: train the runs whose base exists and count the others as "waiting" (evolved
    versions still being built); a later call with the family complete finishes them. With
    several processes, give them all the same family: the runs are sharded by their order.
    """
    env_rank, env_world, _ = dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    zoo = Zoo(cfg.out)
    zoo.root.mkdir(parents=True, exist_ok=True)
    waiting: list[RunSpec] = []
    runs = shard(grid_runs(cfg, skip_missing, waiting), rank, world_size)
    if waiting:
        log.warning("%d run(s) wait for evolved versions not built yet: %s", len(waiting),
                    ", ".join(sorted({w.base for w in waiting})))
    device = _resolve_device(cfg.train.device)

    # Skip done runs without loading anything: the run id needs only the base id and task key.
    done = zoo.done_runs()
    todo = []
    for r in runs:
        rid = run_id_for(_base_id_of(r.base), _task_key(r.task), r.rank, r.seed, cfg.train)
        if rid not in done:
            todo.append(r)
    counts = {"runs": len(runs), "skipped": len(runs) - len(todo), "trained": 0, "busy": 0,
              "waiting": len(shard(waiting, rank, world_size))}
    bar = tqdm(total=len(runs), initial=counts["skipped"], desc=f"zoo grid [{rank}/{world_size}]",
               position=0, disable=None)
    current: _Base | None = None
    for r in todo:
        if current is None or current.base_id != _base_id_of(r.base):
            current = None  # free the previous base before loading the next
            current = _as_base(r.base, device=device)
        task = _get_task(r.task)
        _, _, outcome = _run(current, task, _task_key(r.task), r.rank, r.seed, cfg.train, zoo, device,
                             worker=rank, position=1)
        counts[outcome] += 1
        bar.update(1)
    bar.close()
    return counts
