"""A zoo grid: which LoRA runs to train (bases x tasks x ranks x seeds) and spreading them over processes.

    oral zoo --config configs/zoo-full.yaml [--skip-missing]

A grid is a union of products (`GridBlock`); its runs come in a fixed order, and process r of W
trains runs r, r + W, r + 2W, ... (`RANK` / `WORLD_SIZE`, set by `accelerate launch` and
`torchrun`), on `cuda:LOCAL_RANK` when CUDA is there. Runs are independent, so no process group
is needed:

    accelerate launch --num_processes 8 -m oral.cli zoo --config configs/zoo-full.yaml
    torchrun --nproc_per_node 8 -m oral.cli zoo --config configs/zoo-full.yaml

Rerunning a grid skips done runs and finishes stopped ones from their training checkpoints
(oral.finetune); a per-run lock lets two processes (or two `oral zoo` commands) share a zoo: a
run locked by another process is left to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from oral import evolve
from oral import tasks as tasks_mod
from oral.config import load_config
from oral.finetune import (
    FinetuneConfig,
    LoadedBase,
    as_loaded_base,
    drop_training_checkpoints,
    task_key,
    train_run,
)
from oral.image.lora import RunBusy, StyleLoraConfig, train_style_lora
from oral.models import base_id, is_unet_base
from oral.paths import expand_path
from oral.progress import progress_bar
from oral.training import dist_env, get_task, resolve_device
from oral.zoo import Zoo, ZooError, run_id_for

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# Configs


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
    train: FinetuneConfig = field(default_factory=FinetuneConfig)  # runs on language models
    # runs on an image base (`oral images train-base` dirs as bases, style sets as tasks): style LoRAs
    style_train: StyleLoraConfig = field(default_factory=StyleLoraConfig)


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the grid."""

    base: str
    task: str
    rank: int
    seed: int



def _expand_tasks(names: list[str]) -> list[str]:
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
    cfg = load_config(evolve.ChainConfig, None if chain == "default" else expand_path(chain))
    versions = [cfg.base]
    for link in cfg.links():
        link.base = str(versions[-1])
        versions.append(str(evolve.default_out(link, cfg.root)))
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



# -----------------------------------------------------------------------------
# Training a grid


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
    # style LoRAs on image bases (ours, or diffusers pipeline dirs): train_style_lora skips done runs and finishes
    # stopped ones itself
    styles = [r for r in runs if is_unet_base(expand_path(r.base))]
    runs = [r for r in runs if r not in styles]
    style_busy = 0
    for r in progress_bar(styles, desc=f"style runs [{rank}/{world_size}]", position=0):
        try:
            train_style_lora(expand_path(r.base), r.task, r.rank, r.seed, out_dir=zoo.root, cfg=cfg.style_train)
        except RunBusy:
            style_busy += 1
    device = resolve_device(cfg.train.device)

    # Skip done runs without loading anything: the run id needs only the base id and task key.
    done = zoo.done_runs()
    todo = []
    for r in runs:
        rid = run_id_for(base_id(expand_path(r.base)), task_key(r.task), r.rank, r.seed, cfg.train)
        if rid not in done:
            todo.append(r)
        else:
            drop_training_checkpoints(zoo, rid)
    counts = {"runs": len(runs), "skipped": len(runs) - len(todo), "trained": 0, "busy": 0,
              "waiting": len(shard(waiting, rank, world_size)), "style_runs": len(styles) - style_busy}
    counts["busy"] += style_busy
    bar = progress_bar(total=len(runs), initial=counts["skipped"], desc=f"zoo grid [{rank}/{world_size}]",
                       position=0)
    current: LoadedBase | None = None
    for r in todo:
        if current is None or current.base_id != base_id(expand_path(r.base)):
            current = None  # free the previous base before loading the next
            current = as_loaded_base(r.base, device=device)
        _, _, outcome = train_run(current, get_task(r.task), task_key(r.task), r.rank, r.seed, cfg.train, zoo, device,
                             worker=rank, position=1)
        counts[outcome] += 1
        bar.update(1)
    bar.close()
    return counts
