"""Experiments: generated adapters against the base and the zoo's trained adapters.

    oral compare --generator GEN --zoo ZOO --base smollm2-135m --tasks movie-sentiment,sms-spam \
        --seeds 0,1,2 --limit 200 --json-out docs/results/compare.json

For each task: the bare base, the final trained checkpoint of that task in the zoo (same base),
and one generated adapter per (held-out description, sampling seed). The descriptions are the
task's held-out ones, which the generator never saw in training. Everything is scored on the
test split with one loaded base whose adapter weights are swapped in place. Recovered gain is
(generated - base) / (trained - base), from the mean over generated samples.
"""

import datetime as dt
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from oral.evaluate import Evaluator
from oral.generate import Generator
from oral.io import atomic_write_json
from oral.models import base_id, load_base
from oral.progress import progress_bar
from oral.tasks import get_task
from oral.zoo import Zoo


class ExperimentError(ValueError):
    """An experiment that cannot run as asked (a missing or ambiguous zoo run, ...)."""


@dataclass
class CompareConfig:
    """What `compare` measures."""

    generator: str = ""  # trained generator dir (oral train --out)
    zoo: str = ""  # zoo dir with the trained adapters to compare against
    base: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=list)  # empty: every task the zoo has for this base
    rank: int = 4  # the zoo run compared against: its rank ...
    zoo_seed: int = 0  # ... and its training seed (several runs of one (base, task, rank, seed) are an error)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # sampling seeds per description
    descriptions: int = 1  # how many of the task's held-out descriptions to prompt with (1 or 2)
    split: str = "test"
    limit: int = 200  # examples per task and adapter
    sample_steps: int = 60  # DDIM steps
    guidance: float = 1.0  # classifier-free guidance scale (1 = off)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def final_checkpoints(zoo: Zoo, base: str, rank: int, seed: int, tasks: list[str] | None = None) -> dict[str, dict]:
    """task -> the final checkpoint record of the zoo's one run on (base, task, rank, seed).

    Every task asked for must have exactly one such run: none, or several (differing in their
    training settings), is an error that says which runs there are.
    """
    finals: dict[str, list[dict]] = {}
    for r in zoo.records(base=base_id(base), rank=rank, seed=seed, final=True):
        finals.setdefault(r["task"], []).append(r)
    tasks = tasks or sorted(finals)
    for t in tasks:
        if t not in finals:
            have = sorted({(r["rank"], r["seed"]) for r in zoo.records(base=base_id(base), task=t, final=True)})
            raise ExperimentError(
                f"the zoo {zoo.root} has no finished run on {base} for {t} at rank {rank}, seed {seed}"
                + (f" (it has (rank, seed) {have}: pick one)" if have else "")
                + f"; train one with `oral zoo --base {base} --task {t} --rank {rank} --seed {seed} --out {zoo.root}`")
        if len(finals[t]) > 1:
            ids = ", ".join(r["run_id"] for r in finals[t])
            raise ExperimentError(f"the zoo {zoo.root} has {len(finals[t])} runs on {base} for {t} at rank {rank}, "
                                  f"seed {seed} (other training settings: {ids}); compare against a zoo with one")
    return {t: finals[t][0] for t in tasks}


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Score base, trained and generated adapters per task; returns the results dict."""
    t0 = time.time()
    zoo = Zoo(Path(cfg.zoo).expanduser())
    finals = final_checkpoints(zoo, cfg.base, cfg.rank, cfg.zoo_seed, cfg.tasks)
    tasks = list(finals)
    model, tok = load_base(cfg.base)
    ev = Evaluator(model, tok, progress=False)
    gen = Generator.from_pretrained(cfg.generator)
    rows = []
    for name in progress_bar(tasks, desc="compare"):
        task = get_task(name)
        row: dict[str, Any] = {"task": name, "metric": None, "generated": []}
        ev.set_adapter(None)
        base = ev.evaluate(task, split=cfg.split, limit=cfg.limit)
        row["metric"], row["n"], row["base"] = base["metric"], base["n"], base["value"]
        ev.set_adapter(zoo.path(finals[name]))
        row["trained"] = ev.evaluate(task, split=cfg.split, limit=cfg.limit)["value"]
        row["trained_adapter"] = finals[name]["path"]
        for prompt in task.heldout_descriptions[: cfg.descriptions]:
            for seed in cfg.seeds:
                t = time.time()
                spec, state = gen.generate(cfg.base, prompt, seed=seed, steps=cfg.sample_steps,
                                           guidance=cfg.guidance, base_model=model)
                gen_s = time.time() - t
                ev.set_adapter(state, spec=spec)
                value = ev.evaluate(task, split=cfg.split, limit=cfg.limit)["value"]
                row["generated"].append({"prompt": prompt, "seed": seed, "value": value, "generate_s": round(gen_s, 2)})
        mean, std = _mean_std([g["value"] for g in row["generated"]])
        row["generated_mean"], row["generated_std"] = mean, std
        gain = row["trained"] - row["base"]
        row["recovered_gain"] = (mean - row["base"]) / gain if abs(gain) > 1e-9 else None
        rows.append(row)
    return {
        "config": asdict(cfg),
        "rows": rows,
        "wall_s": round(time.time() - t0, 1),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def format_compare(result: dict[str, Any]) -> str:
    """A plain-text table of `compare`'s result."""
    lines = [f"{'task':<18} {'n':>4} {'base':>7} {'trained':>8} {'generated (mean +- sd)':>24} {'recovered':>10}"]
    for r in result["rows"]:
        rec = "-" if r["recovered_gain"] is None else f"{100 * r['recovered_gain']:.0f}%"
        gen = f"{r['generated_mean']:.3f} +- {r['generated_std']:.3f} ({len(r['generated'])})"
        lines.append(f"{r['task']:<18} {r['n']:>4} {r['base']:>7.3f} {r['trained']:>8.3f} {gen:>24} {rec:>10}")
    return "\n".join(lines)


def save_result(result: dict[str, Any], path: str | Path) -> None:
    atomic_write_json(path, result)
