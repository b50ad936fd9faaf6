"""What the three training loops share: `oral evolve`, the zoo's LoRA runs and `oral train`.

- `lr_at`: the learning rate of an optimizer step, a pure function of the step (so a resumed run
  needs no scheduler state): linear warmup, then constant or cosine down to `min_lr_ratio * lr`.
  It is transformers' `get_cosine_with_min_lr_schedule_with_warmup` / `get_constant_schedule_with_warmup`
  evaluated at the 1-based step (parity-tested).
- `resolve_device`: "auto" -> cuda:LOCAL_RANK when CUDA is there, else cpu.
- `get_task`: a task by name, task YAML file or Task object.
- `step_rng`: the torch.Generator of one step, seeded by (seed, step, process).
- Training checkpoints: ROOT/<step:07d>/ with the trainable tensors, the optimizer state and any
  extra tensors as safetensors, and the step, run key and scalars as JSON (no pickles). Each is
  written atomically; the latest one is resumed; one made by another setup is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from oral import tasks as tasks_mod
from oral.io import atomic_dir, load_safetensors, read_json
from oral.paths import expand_path

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
SCHEDULES = ("cosine", "constant")


class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed (another setup, a missing tensor)."""


# -----------------------------------------------------------------------------
# Schedule, device, task, randomness


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step `step` (1-based).

    1) linear warmup: lr * step / warmup_steps up to step == warmup_steps;
    2) "constant": lr; "cosine": from lr down to min_lr_ratio * lr at step == total_steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return lr * step / max(1, warmup_steps)
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * coeff)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the variables accelerate launch / torchrun set."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto": cuda:LOCAL_RANK (modulo the visible GPUs) when CUDA is there, else cpu."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{dist_env()[2] % torch.cuda.device_count()}")
    return torch.device("cpu")


def get_task(task: Any):
    """A task object from a built-in or registered name, a task YAML file, or a Task (returned as is)."""
    if not isinstance(task, (str, Path)):
        return task
    task = str(task)
    if task.endswith((".yaml", ".yml")) and Path(expand_path(task)).is_file():
        return tasks_mod.load_task_file(expand_path(task))
    return tasks_mod.get_task(task)


def step_rng(seed: int, step: int, process: int = 0) -> torch.Generator:
    """The generator of one step: all randomness of step `step` comes from it, so a resumed run
    draws exactly what an uninterrupted one does."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + process)


# -----------------------------------------------------------------------------
# Checkpoints: safetensors + JSON


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (tied ones once, under their first name), detached on CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_to_safetensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict as (tensors keyed "<param id>.<name>", JSON-able rest)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what optimizer_to_safetensors wrote; tensors go to the parameters' device (AdamW's
    `step` counters stay on the CPU, as AdamW keeps them)."""
    device = next(p.device for g in opt.param_groups for p in g["params"])
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v if k == "step" else v.to(device)
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first (temporary dirs of a killed writer are not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / STATE_NAME).is_file())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (None if none), after removing what a killed
    writer left there (temporary dirs, whose names start with a dot)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    run_key: dict, state: dict | None = None, tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                    keep: int = 1) -> Path:
    """ROOT/<step:07d>/: the model's trainable tensors, the optimizer, `tensors` (name -> dict, one
    safetensors file each) and state.json {step, run, optimizer scalars, **state}; then only the
    latest `keep` checkpoints are kept."""
    final = Path(root) / f"{step:07d}"
    opt_tensors, opt_meta = optimizer_to_safetensors(optimizer)
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(trainable_state(model), str(tmp / MODEL_NAME))
        save_file(opt_tensors, str(tmp / OPTIMIZER_NAME))
        for name, group in (tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
        meta = {**(state or {}), "step": step, "run": run_key, "optimizer": opt_meta}
        (tmp / STATE_NAME).write_text(json.dumps(meta, indent=1))
    prune_checkpoints(root, keep)
    return final


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Remove all but the latest `keep` complete checkpoints under `root` (keep <= 0: remove none)."""
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_key: dict,
                    tensors: tuple[str, ...] = (), fix: str = "remove it to start over") -> tuple[dict, dict]:
    """Restore the model's trainable tensors and the optimizer from a checkpoint of save_checkpoint.

    Returns (state.json's dict, {name: tensors} for each name in `tensors`). A checkpoint of
    another run key is refused with the keys that differ.
    """
    path = Path(path)
    state = read_json(path / STATE_NAME, fix)
    if state.get("run") != run_key:
        theirs = state.get("run") or {}
        diff = sorted(k for k in set(theirs) | set(run_key) if theirs.get(k) != run_key.get(k))
        raise CheckpointError(f"{path} was made by a different training setup (differs in: {', '.join(diff)}); "
                              f"resume with the same settings, or {fix}")
    weights = load_safetensors(path / MODEL_NAME, fix)
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != wanted:
        raise CheckpointError(f"{path} holds other tensors than this model trains; {fix}")
    with torch.no_grad():
        for n, v in weights.items():
            params[n].copy_(v)
    optimizer_from_safetensors(optimizer, load_safetensors(path / OPTIMIZER_NAME, fix), state["optimizer"])
    extra = {name: load_safetensors(path / f"{name}.safetensors", fix) for name in tensors}
    return state, extra


def resume(root: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_key: dict,
           tensors: tuple[str, ...] = (), fix: str = "remove it to start over") -> tuple[int, dict, dict]:
    """Restore the newest checkpoint under `root` (`latest_checkpoint`, `load_checkpoint`) into the model
    and optimizer: (its step, state.json's dict, its `tensors`), or (0, {}, {}) when there is none."""
    last = latest_checkpoint(root)
    if last is None:
        return 0, {}, {}
    state, extra = load_checkpoint(last, model, optimizer, run_key, tensors=tensors, fix=fix)
    log.info("resumed from %s (step %d)", last, state["step"])
    return int(state["step"]), state, extra


def restore_ema(ema, model: torch.nn.Module, weights: dict[str, torch.Tensor], step: int) -> None:
    """Put a checkpoint's EMA weights (by parameter name) into diffusers' EMAModel `ema` of `model`, at `step`."""
    with torch.no_grad():
        for s, (name, _) in zip(ema.shadow_params, model.named_parameters()):
            s.copy_(weights[name])
    ema.optimization_step = step
