"""`oral experiment NAME --config configs/exp-NAME.yaml [key=value ...]`: every method on every (version, task).

For each base version asked for (t0 = the family's root, tk = k evolved links, read from the zoo's
lineage) and each task, each method of `oral.experiments.methods` gives its candidates: one per
held-out description x sampling seed for generated adapters, one per description for in-prompt
and nearest, one otherwise. Each is scored on the same first `limit` examples of `split`.
Anything chosen (the guidance of generated-cfg, the strength of refined, the version of
stale-best) is chosen on the validation split. With `distances`, every generated adapter (and the oracle) also gets its
distance to the nearest adapter of the generator's training zoo (the memorization check).

Resumable: generated adapters are written as PEFT dirs under CACHE/adapters/<key hash> and every
score is kept in CACHE/scores.json by (base, adapter digest, task, split, limit, instruction), so
a rerun, or an added method, costs only what is new.

Output, one long format for every experiment: OUT/exp-NAME.json
    {"experiment", "config", "versions": {version: base}, "training": {...}, "rows": [{"base", "version",
     "task", "method", "description", "seed", "split", "metric", "value", "n", ...}], "wall_s", "created"}
plus OUT/exp-NAME.md (mean +- sd per cell) and OUT/exp-NAME.png.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from oral.evaluate import Evaluator, ScoreCache
from oral.experiments.compare import ExperimentError
from oral.experiments.methods import (
    GENERATED,
    METHODS,
    Candidate,
    ZooAdapters,
    gibberish,
    mean_adapter,
    random_base_condition,
    shifted_adapter,
    with_base_spec,
    without_fingerprint,
)
from oral.gauge import update_distance
from oral.generate import Generator
from oral.hypernet import (
    Hypernet,
    HypernetConfig,
    load_hypernet,
    save_hypernet,
    train_hypernet,
)
from oral.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from oral.lora import adapter_digest, load_adapter, save_adapter
from oral.models import base_id, load_base
from oral.paths import expand_path, oral_home
from oral.progress import progress_bar
from oral.tasks import get_task
from oral.zoo import Zoo

log = logging.getLogger(__name__)


DISTANCES = ("rel-l2-to-nearest", "cosine-to-nearest", "rel-l2-within-run")  # the memorization metrics


@dataclass
class ExperimentConfig:
    """What an experiment measures (configs/exp-*.yaml)."""

    generator: str = ""  # trained generator dir; empty: the bundled one
    zoo: str = "$ORAL_HOME/zoos/quick"  # the zoo the generator was trained on (oracle, stale, nearest, mean, hypernet)
    oracle_zoo: str = ""  # another zoo for the oracle (e.g. one with the tasks the generator never saw); empty: zoo
    root: str = "smollm2-135m"  # the family's root base, t0
    versions: list[int] = field(default_factory=lambda: [0])  # versions scored on (their bases come from the zoo)
    tasks: list[str] = field(default_factory=list)  # empty: the generator's training tasks
    methods: list[str] = field(default_factory=lambda: ["base", "oracle", "in-prompt", "nearest", "mean", "generated"])
    rank: int = 4  # the zoo runs used: their rank ...
    ranks: list[int] = field(default_factory=list)  # ... or each of these in turn (rows then record their rank)
    zoo_seed: int = 0  # ... and training seed
    descriptions: int = 2  # held-out descriptions per task
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # sampling seeds per description
    split: str = "test"
    limit: int = 200  # examples per task (all when fewer): the same examples for every method
    val_limit: int = 100  # validation examples for the choices (stale-best, generated-cfg, refined)
    steps: int = 60  # DDIM steps
    guidances: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])  # generated-cfg's candidates
    strengths: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75])  # refined's candidates
    sweep_steps: list[int] = field(default_factory=list)  # extra generated rows per DDIM step count ("generated-steps10")
    sweep_guidance: list[float] = field(default_factory=list)  # ... per guidance scale ("generated-g2")
    distances: bool = False  # also the memorization distances of generated adapters and the oracle
    scores: bool = True  # score candidates (off: distances only)
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)  # the hypernet baseline, trained on the same zoo
    out: str = "docs/results"  # exp-NAME.{json,md,png} go here
    cache: str = "$ORAL_HOME/experiments"  # generated adapters and scores


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


class Experiment:
    """One run of a named experiment; `run()` returns the result dict and writes the files."""

    def __init__(self, name: str, cfg: ExperimentConfig):
        unknown = sorted(set(cfg.methods) - set(METHODS))
        if unknown:
            raise ExperimentError(f"unknown method(s) {unknown}; the methods are {', '.join(METHODS)}")
        if not 1 <= cfg.descriptions <= 2:
            raise ExperimentError(f"descriptions must be 1 or 2 (each task has two held-out ones), got {cfg.descriptions}")
        self.name, self.cfg = name, cfg
        self.cache_dir = Path(expand_path(cfg.cache)) if cfg.cache else oral_home() / "experiments"
        self.scores = ScoreCache(self.cache_dir / "scores.json")
        self.gen = Generator.from_pretrained(cfg.generator or None)
        self.gen_id = self._generator_id()
        self._groups: dict[tuple[str, int], int] = {}
        self._hypernets: dict[int, Hypernet] = {}
        for rank in reversed(cfg.ranks or [cfg.rank]):  # every rank checked before anything runs; the first one set
            self.use_rank(rank)

    def use_rank(self, rank: int) -> None:
        """Score against the zoo's runs of LoRA rank `rank` (and the generator's layout of that rank) from now on."""
        cfg = self.cfg
        self.rank = rank
        zoo = Zoo(cfg.zoo)
        if not zoo.manifest.is_file():
            raise ExperimentError(f"{zoo.root} is not a zoo (no manifest); build it with the command in its config, "
                                  f"e.g. `oral zoo --config configs/zoo-quick.yaml`")
        self.zoo = ZooAdapters(zoo, cfg.root, rank, cfg.zoo_seed)
        self.oracle_zoo = self.zoo
        if cfg.oracle_zoo:
            other = Zoo(cfg.oracle_zoo)
            if not other.manifest.is_file():
                raise ExperimentError(f"the oracle zoo {other.root} is not a zoo (no manifest); build it or leave oracle_zoo empty")
            self.oracle_zoo = ZooAdapters(other, cfg.root, rank, cfg.zoo_seed)
            for v in set(self.zoo.versions) & set(self.oracle_zoo.versions):
                if self.zoo.versions[v] != self.oracle_zoo.versions[v]:
                    raise ExperimentError(f"version {v} is {self.zoo.versions[v]} in {zoo.root} but "
                                          f"{self.oracle_zoo.versions[v]} in {other.root}: give zoos of one family")
        self.bases = {**self.oracle_zoo.versions, **self.zoo.versions}  # version -> base
        gen_bases = [b["id"] for b in self.gen.config["conditions"]["bases"]]
        self.train_versions = sorted(v for v in (self.zoo.version_of(b) for b in gen_bases) if v is not None)
        self.train_tasks = sorted(self.gen.config["conditions"]["tasks"])
        if not self.train_versions:
            raise ExperimentError(f"none of the generator's bases {gen_bases} is in the zoo {zoo.root}'s family of "
                                  f"{cfg.root} at rank {rank}; give the zoo the generator was trained on")
        missing = [v for v in cfg.versions if v not in self.bases]
        if missing:
            raise ExperimentError(f"the zoo {zoo.root} has no runs on version(s) {missing} of {cfg.root} at rank {rank} "
                                  f"(it has {sorted(self.bases)}); build them with `oral zoo --config configs/zoo-full.yaml`")
        self.tasks = cfg.tasks or self.train_tasks
        self._pool = None

    def group(self, base: str) -> int:
        """The generator's layout for `base` at the experiment's rank, looked up once per base."""
        if (base, self.rank) not in self._groups:
            self._groups[base, self.rank] = self.gen.layout_for(base, self.rank)
        return self._groups[base, self.rank]

    def pool(self) -> list[tuple[dict, Any, dict]]:
        """Every kept checkpoint of the generator's training runs: (record, spec, state), read once."""
        if self._pool is None:
            self._pool = self.zoo.checkpoints(set(self.train_versions), set(self.train_tasks))
        return self._pool

    def _pool_id(self) -> str:
        """The identity of the training checkpoints (runs and steps, not the rest of the zoo's manifest)."""
        ids = sorted((rec["run_id"], rec["step"]) for rec, _, _ in self.pool())
        return hashlib.sha256(json.dumps([str(self.zoo.zoo.root), ids]).encode()).hexdigest()[:16]

    def _generator_id(self) -> str:
        h = hashlib.sha256((self.gen.path / "model.safetensors").read_bytes()).hexdigest()[:16]
        return f"{self.gen.path.name}@{self.gen.config['step']}:{h}"

    # --- candidates -------------------------------------------------------------

    def candidates(self, version: int, task: str, ev: Evaluator, model: torch.nn.Module) -> Iterator[Candidate]:
        cfg, base = self.cfg, self.bases[version]
        the_task = get_task(task)
        descriptions = the_task.heldout_descriptions[: cfg.descriptions]
        unseen_version = version not in self.train_versions
        for method in cfg.methods:
            if method == "base":
                yield Candidate(method)
            elif method == "in-prompt":
                for d in descriptions:
                    yield Candidate(method, d, instruction=d)
            elif method == "oracle":
                if (found := self.oracle_zoo.final(version, task)) is not None:
                    yield Candidate(method, spec=found[0], state=found[1])
            elif method in ("stale-t0", "stale-newest") and unseen_version:
                v = 0 if method == "stale-t0" else max(self.train_versions)
                if (found := self.zoo.final(v, task)) is not None:
                    yield Candidate(method, spec=with_base_spec(found[0], base), state=found[1], info={"from_version": v})
            elif method == "stale-best" and unseen_version:
                found = [(v, f) for v in self.train_versions if (f := self.zoo.final(v, task)) is not None]
                if found:
                    val = [self.score(base, f[0], f[1], task, "validation", cfg.val_limit, None, ev)["value"] for _, f in found]
                    v, (spec, state) = found[max(range(len(found)), key=val.__getitem__)]
                    yield Candidate(method, spec=with_base_spec(spec, base), state=state, info={"from_version": v})
            elif method == "nearest":
                for d in descriptions:
                    yield self._nearest(base, d, model)
            elif method == "mean":
                found = [f for v in self.train_versions if task in self.train_tasks
                         and (f := self.zoo.final(v, task)) is not None]
                if found:
                    spec, state = mean_adapter(found)
                    yield Candidate(method, spec=with_base_spec(spec, base), state=state, info={"of": len(found)})
            elif method == "hypernet":
                group = self.group(base)
                net = self.hypernet(group)
                c_model = self.gen.model_condition(base, group, model)
                for d in descriptions:
                    state = net.adapter(torch.cat([c_model, self.gen.conditions.text_condition([d])[0]]))
                    yield Candidate(method, d, spec=with_base_spec(net.spec, base), state=state)
            elif method == "generated":
                yield from self._generated(method, base, descriptions, model)
            elif method == "generated-cfg":
                g = self._choose_guidance(base, task, descriptions[0], model, ev)
                yield from self._generated(method, base, descriptions, model, guidance=g)
            elif method == "refined":
                yield from self._refined(base, task, descriptions, model, ev)
            elif method == "shifted" and unseen_version:
                yield from self._shifted(base, descriptions, model)
            elif method == "random-text":
                for d in descriptions:
                    for s in cfg.seeds:
                        yield self._generate(method, base, d, s, model, prompt=gibberish(d, s))
            elif method == "random-model":
                group = self.group(base)
                c = random_base_condition(self.gen, group, model)
                yield from self._generated(method, base, descriptions, model, c_model=c)
            elif method == "no-fingerprint":
                group = self.group(base)
                c = without_fingerprint(self.gen, self.gen.model_condition(base, group, model))
                if c is not None:
                    yield from self._generated(method, base, descriptions, model, c_model=c)
        for steps in cfg.sweep_steps:
            yield from self._generated(f"generated-steps{steps}", base, descriptions, model, steps=steps)
        for g in cfg.sweep_guidance:
            yield from self._generated(f"generated-g{g:g}", base, descriptions, model, guidance=g)

    def _nearest(self, base: str, description: str, model: torch.nn.Module) -> Candidate:
        """Retrieval: the training version whose c_model is nearest the base's, then the training task
        whose description is nearest the request's; its zoo adapter as is."""
        group = self.group(base)
        c = self.gen.model_condition(base, group, model)
        dist = {v: float((self.gen.model_condition(self.zoo.versions[v], group) - c).norm()) for v in self.train_versions}
        version = min(dist, key=dist.get)
        near = self.gen.nearest_descriptions(description, k=1)[0]
        spec, state = self.zoo.final(version, near["task"])
        return Candidate("nearest", description, spec=with_base_spec(spec, base), state=state,
                         info={"from_version": version, "from_task": near["task"], "similarity": near["similarity"]})

    def hypernet(self, group: int) -> Hypernet:
        """The hypernetwork baseline trained on the generator's training checkpoints and conditions (cached on
        disk, and in memory once loaded)."""
        if group not in self._hypernets:
            self._hypernets[group] = self._load_or_train_hypernet(group)
        return self._hypernets[group]

    def _load_or_train_hypernet(self, group: int) -> Hypernet:
        cfg = self.cfg.hypernet
        # what the hypernet learns from: the generator's conditions (not its weights: any checkpoint of one
        # generator run shares them), the layout, and the zoo's checkpoints
        conditions = hashlib.sha256((self.gen.path / "conditions.safetensors").read_bytes()
                                    + json.dumps([self.gen.config["conditions"], self.gen.config["groups"][group]["spec"]],
                                                 sort_keys=True).encode()).hexdigest()[:16]
        key = {"conditions": conditions, "group": group, "zoo": self._pool_id(),
               "versions": self.train_versions, "tasks": self.train_tasks, "rank": self.rank,
               "zoo_seed": self.cfg.zoo_seed, "config": dataclasses.asdict(cfg)}
        path = self.cache_dir / "hypernets" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        if (path / "config.json").is_file():
            return load_hypernet(path)
        tasks = self.gen.config["conditions"]["tasks"]
        texts = {t: list(self.gen.conditions.text_condition(tasks[t]["descriptions"])) for t in self.train_tasks}
        samples = [(state, self.gen.model_condition(self.zoo.versions[len(rec.get("lineage") or [])], group), texts[rec["task"]])
                   for rec, _, state in self.pool()]
        if not samples:
            raise ExperimentError(f"the zoo {self.zoo.zoo.root} has no checkpoints of the generator's training runs "
                                  f"to train the hypernet baseline on")
        spec = self.gen.tokenizers[group].spec
        t = time.time()
        net = train_hypernet(cfg, spec, samples)
        save_hypernet(net, path, {"key": key, "samples": len(samples), "final_loss": net.final_loss,
                                  "wall_s": round(time.time() - t, 1)})
        return net

    def _generated(self, method: str, base: str, descriptions: list[str], model, guidance: float = 1.0,
                   c_model: torch.Tensor | None = None, steps: int | None = None) -> Iterator[Candidate]:
        for d in descriptions:
            for s in self.cfg.seeds:
                yield self._generate(method, base, d, s, model, guidance=guidance, c_model=c_model, steps=steps)

    def _generate(self, method: str, base: str, description: str, seed: int, model, prompt: str | None = None,
                  guidance: float = 1.0, c_model: torch.Tensor | None = None, steps: int | None = None,
                  init: Candidate | None = None, strength: float = 1.0) -> Candidate:
        """A generated adapter (refined from `init`'s adapter when given), from the adapter cache when it was made before."""
        prompt = prompt or description
        steps = steps or self.cfg.steps
        key = {"generator": self.gen_id, "base": base_id(base), "prompt": prompt, "seed": seed, "steps": steps,
               "guidance": guidance, "rank": self.rank,
               "c_model": None if c_model is None else hashlib.sha256(c_model.numpy().tobytes()).hexdigest()[:16]}
        if init is not None:  # absent otherwise: the keys of adapters made before refinement existed hold
            key.update(init=adapter_digest(init.state), strength=strength)
        path = self.cache_dir / "adapters" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        if (path / "adapter_config.json").is_file():
            spec, state = load_adapter(path)
        else:
            spec, state = self.gen.generate(base, prompt, seed=seed, steps=steps, guidance=guidance,
                                            rank=self.rank, base_model=model, c_model=c_model,
                                            init=None if init is None else (init.spec, init.state), strength=strength)
            save_adapter(path, spec, state, provenance={"source": "oral experiment", **key}, overwrite=True)
        familiar = self.gen.familiarity(prompt)["familiar"]
        inside = self.gen.base_familiarity(base, self.group(base), model)["inside"]
        return Candidate(method, description, seed, spec, state,
                         info={"guidance": guidance, "steps": steps, "familiar": familiar, "base_inside": inside,
                               "adapter": str(path)})

    def _refined(self, base: str, task: str, descriptions: list[str], model, ev: Evaluator) -> Iterator[Candidate]:
        """nearest's adapter for each description, refined by the generator at the strength whose adapter (first
        description, first seed) scores best on validation."""
        starts = {d: self._nearest(base, d, model) for d in descriptions}
        first = starts[descriptions[0]]
        val = {}
        for st in self.cfg.strengths:
            c = self._generate("refined", base, descriptions[0], self.cfg.seeds[0], model, init=first, strength=st)
            val[st] = self.score(base, c.spec, c.state, task, "validation", self.cfg.val_limit, None, ev)["value"]
        strength = max(val, key=lambda st: (val[st], -st))  # ties: the smaller strength
        for d in descriptions:
            for s in self.cfg.seeds:
                c = self._generate("refined", base, d, s, model, init=starts[d], strength=strength)
                c.info.update(strength=strength, from_version=starts[d].info["from_version"],
                              from_task=starts[d].info["from_task"])
                yield c

    def _shifted(self, base: str, descriptions: list[str], model) -> Iterator[Candidate]:
        """nearest's adapter plus the generator's change from nearest's version to `base` (see `shifted_adapter`)."""
        for d in descriptions:
            start = self._nearest(base, d, model)
            old_base = self.zoo.versions[start.info["from_version"]]  # a training version: its c_model is cached
            for s in self.cfg.seeds:
                new = self._generate("generated", base, d, s, model)
                old = self._generate("generated", old_base, d, s, None)
                spec, state = shifted_adapter((start.spec, start.state), (new.spec, new.state), (old.spec, old.state))
                yield Candidate("shifted", d, s, spec, state,
                                info={**new.info, "from_version": start.info["from_version"],
                                      "from_task": start.info["from_task"]})

    def _choose_guidance(self, base: str, task: str, description: str, model, ev: Evaluator) -> float:
        """The guidance scale whose adapter (first description, first seed) scores best on validation."""
        val = {}
        for g in self.cfg.guidances:
            c = self._generate("generated-cfg", base, description, self.cfg.seeds[0], model, guidance=g)
            val[g] = self.score(base, c.spec, c.state, task, "validation", self.cfg.val_limit, None, ev)["value"]
        return max(val, key=lambda g: (val[g], -g))  # ties: the smaller scale

    # --- scoring ----------------------------------------------------------------

    def score(self, base: str, spec, state, task: str, split: str, limit: int, instruction: str | None,
              ev: Evaluator) -> dict:
        key = {"base": base_id(base), "adapter": None if state is None else adapter_digest(state), "task": task,
               "split": split, "limit": limit, "instruction": instruction}

        def measure():
            ev.set_adapter(state, spec=spec)
            scored = get_task(task) if instruction is None else get_task(task).prefixed(instruction)
            return ev.evaluate(scored, split=split, limit=limit)

        return self.scores.get(key, measure)

    def distance_rows(self, cand: Candidate, row: dict, version: int, task: str) -> list[dict]:
        """Distances of the candidate's update to the nearest adapter of the generator's training zoo
        (every kept checkpoint); the oracle's own run is left out of its pool, and its distance to the
        nearest other checkpoint of that run (the zoo's own spread along one run) is a row of its own."""
        pool = self.pool()
        extra = []
        if cand.method == "oracle":
            own = self.oracle_zoo.runs.get((version, task))
            mine = [p for p in pool if p[0]["run_id"] == own and not p[0].get("final")]
            if mine:
                d = min(update_distance(cand.spec, cand.state, state)["rel_l2"] for _, _, state in mine)
                extra.append({**row, "metric": "rel-l2-within-run", "value": d, "n": len(mine)})
            pool = [p for p in pool if p[0]["run_id"] != own]
        if not pool:
            return extra
        dist = [(update_distance(cand.spec, cand.state, state), rec) for rec, _, state in pool]
        best, rec = min(dist, key=lambda d: d[0]["rel_l2"])
        near = {"nearest_run": rec["run_id"], "nearest_step": rec["step"], "nearest_task": rec["task"],
                "nearest_version": len(rec.get("lineage") or [])}
        return [{**row, "metric": "rel-l2-to-nearest", "value": best["rel_l2"], "n": len(pool), **near},
                {**row, "metric": "cosine-to-nearest", "value": best["cosine"], "n": len(pool), **near}, *extra]

    # --- the run ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.time()
        rows: list[dict] = []
        quiet = logging.getLogger("oral.generate")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the familiarity warning is recorded in each row instead
        try:
            for version in cfg.versions:
                base = self.bases[version]
                model, tok = load_base(base)
                ev = Evaluator(model, tok, progress=False)
                for rank in cfg.ranks or [cfg.rank]:
                    self.use_rank(rank)
                    for task in progress_bar(self.tasks, desc=f"{self.name} t{version}"
                                             + (f" r={rank}" if cfg.ranks else "")):
                        rows += self._rows(version, base, task, ev, model)
                del ev, model
        finally:
            quiet.setLevel(level)
        result = {
            "experiment": self.name,
            "config": dataclasses.asdict(cfg),
            "versions": {str(v): self.bases[v] for v in cfg.versions},
            "training": {"generator": self.gen_id, "versions": self.train_versions, "tasks": self.train_tasks,
                         "zoo": str(self.zoo.zoo.root)},
            "rows": rows,
            "wall_s": round(time.time() - t0, 1),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.write(result)
        return result

    def _rows(self, version: int, base: str, task: str, ev: Evaluator, model) -> list[dict]:
        """The rows of every method's candidates on one (version, task) at the current rank."""
        cfg, rows = self.cfg, []
        # a line every 30 s without a terminal: a task's candidates can take many minutes
        cands = progress_bar(self.candidates(version, task, ev, model), desc=f"  t{version} {task}", unit="adapter",
                             leave=False)
        for cand in cands:
            cands.set_postfix(method=cand.method, refresh=False)
            row = {"base": base_id(base), "version": version, "task": task, "method": cand.method,
                   "description": cand.description, "seed": cand.seed, "split": cfg.split,
                   **({"rank": self.rank} if cfg.ranks else {}), **{k: v for k, v in cand.info.items() if k != "adapter"}}
            if cfg.scores:
                s = self.score(base, cand.spec, cand.state, task, cfg.split, cfg.limit, cand.instruction, ev)
                rows.append({**row, "metric": s["metric"], "value": s["value"], "n": s["n"]})
            if cfg.distances and cand.state is not None and (cand.method in GENERATED or cand.method in ("oracle", "hypernet")):
                rows.extend(self.distance_rows(cand, row, version, task))
        return rows

    def write(self, result: dict) -> None:
        out = Path(expand_path(self.cfg.out))
        atomic_write_json(out / f"exp-{self.name}.json", result)
        atomic_write_text(out / f"exp-{self.name}.md", format_table(result))
        png = plot(result)
        if png is not None:
            atomic_write_bytes(out / f"exp-{self.name}.png", png)


# -----------------------------------------------------------------------------
# Tables and plots from the long format


def cells(rows: list[dict], metric: str | None = None) -> dict[tuple[int, str], dict[str, list[float]]]:
    """(version, task) -> method -> values (one per description x seed) of `metric` (default: the task metric)."""
    out: dict[tuple[int, str], dict[str, list[float]]] = {}
    for r in rows:
        if (metric is None and r["metric"] in DISTANCES) or (metric and r["metric"] != metric):
            continue
        out.setdefault((r["version"], task_label(r)), {}).setdefault(r["method"], []).append(r["value"])
    return out


def task_label(row: dict) -> str:
    """A row's task, with its LoRA rank when the experiment ran several ("trec-question r=8")."""
    return row["task"] if row.get("rank") is None else f"{row['task']} r={row['rank']}"


def format_table(result: dict, metric: str | None = None) -> str:
    """Markdown: one line per (version, task), one column per method, mean +- sd (samples)."""
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))  # in the order they were run
    lines = []
    for title, m in ([("scores", None)] if result["config"].get("scores", True) else []) + \
            ([("distance to the nearest training adapter (relative L2 of dW)", "rel-l2-to-nearest"),
              ("cosine to the nearest training adapter", "cosine-to-nearest"),
              ("the oracle's distance to the nearest other checkpoint of its own run", "rel-l2-within-run")]
             if result["config"].get("distances") else []):
        table = cells(result["rows"], m)
        cols = [x for x in methods if any(x in c for c in table.values())]
        if not cols:
            continue
        lines += [f"### exp-{result['experiment']}: {title}", "", "| version | task | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for (v, task), by_method in sorted(table.items()):
            row = []
            for c in cols:
                vals = by_method.get(c)
                if not vals:
                    row.append("-")
                else:
                    mean, sd = mean_sd(vals)
                    row.append(f"{mean:.3f}" + (f" +- {sd:.3f} ({len(vals)})" if len(vals) > 1 else ""))
            lines.append(f"| t{v} | {task} | " + " | ".join(row) + " |")
        if len(table) > 1:
            means = {c: [mean_sd(by[c])[0] for by in table.values() if by.get(c)] for c in cols}
            lines.append("| all | mean of the cells | " + " | ".join(
                f"{statistics.fmean(means[c]):.3f} ({len(means[c])} cells)" if means[c] else "-" for c in cols) + " |")
        lines.append("")
        if m is None:
            lines += bar_lines(result["experiment"], table)
    asked = {}  # (version, task) -> [familiar, inside] of each distinct generated request
    for r in result["rows"]:
        if r["method"] == "generated" and "familiar" in r:
            asked.setdefault((r["version"], task_label(r)), {})[(r["description"], r["seed"])] = (r["familiar"], r.get("base_inside", True))
    if asked:
        lines += [f"### exp-{result['experiment']}: when `oral generate` warns (generated requests)", "",
                  "| version | task | requests | prompt far from training | base outside training versions |", "|---|---|---|---|---|"]
        for (v, task), reqs in sorted(asked.items()):
            lines.append(f"| t{v} | {task} | {len(reqs)} | {sum(not f for f, _ in reqs.values())} | "
                         f"{sum(not i for _, i in reqs.values())} |")
        lines.append("")
    return "\n".join(lines)


# The references a generated adapter is held against (the project's bar): (method, margin, wording).
BAR = (("oracle", -0.01, ">= oracle - 1 point"), ("stale-t0", 0.0, "> stale-t0"), ("stale-newest", 0.0, "> stale-newest"),
       ("stale-best", 0.0, "> stale-best"), ("nearest", 0.0, "> nearest"), ("mean", 0.0, "> mean"),
       ("hypernet", 0.0, "> hypernet"), ("in-prompt", 0.0, "> in-prompt"), ("base", 0.0, "> base"))


TIE = 1e-9  # score differences below this are float rounding


def bar_lines(name: str, table: dict[tuple[int, str], dict[str, list[float]]]) -> list[str]:
    """Markdown: in how many cells the mean of `generated` (and of `generated-cfg`, `refined`, `shifted`) clears
    each reference method's mean (ties do not count, except against the oracle, which it may trail by a point)."""
    lines = []
    for method in ("generated", "generated-cfg", "refined", "shifted"):
        counts = []
        for ref, margin, wording in BAR:
            pairs = [(statistics.fmean(by[method]), statistics.fmean(by[ref])) for by in table.values()
                     if by.get(method) and by.get(ref)]
            if pairs:
                # means of equal scores can differ in the last bit (fmean of six 0.915s is not 0.915): a tie is a tie
                won = sum(g >= r + margin - TIE if margin < 0 else g > r + TIE for g, r in pairs)
                counts.append(f"{wording}: {won}/{len(pairs)}")
        if counts:
            lines.append(f"- `{method}`: " + "; ".join(counts))
    return [f"### exp-{name}: cells where the generated mean clears each reference", "", *lines, ""] if lines else []


def plot(result: dict) -> bytes | None:
    """A grouped bar chart (mean with sd) per (version, task) and method, one row of panels per version
    (at most 6 tasks a row), one colour per method; PNG bytes, None without rows."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = None if result["config"].get("scores", True) else "rel-l2-to-nearest"
    table = cells(result["rows"], metric)
    if not table:
        return None
    methods = [m for m in dict.fromkeys(r["method"] for r in result["rows"]) if any(m in c for c in table.values())]
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    keys = sorted(table)
    per_row = 6
    rows = [[k for k in keys if k[0] == v] for v in dict.fromkeys(k[0] for k in keys)]
    rows = [r[i:i + per_row] for r in rows for i in range(0, len(r), per_row)]
    cols = max(len(r) for r in rows)
    width = 0.8 / max(len(methods), 1)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6, 0.25 * cols * len(methods) + 1.5), 2.8 * len(rows) + 0.8),
                             squeeze=False, sharey=True)
    for ax, row in zip(axes[:, 0], rows):
        for i, m in enumerate(methods):
            xs, means, sds = [], [], []
            for j, k in enumerate(row):
                if m in table[k]:
                    mean, sd = mean_sd(table[k][m])
                    xs.append(j + i * width)
                    means.append(mean)
                    sds.append(sd)
            ax.bar(xs, means, width, yerr=sds, label=m, capsize=1.5, color=colours(i % colours.N))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(row))])
        ax.set_xticklabels([f"t{v} {t}" for v, t in row], fontsize=8)
        ax.set_xlim(-0.3, cols - 0.1)
        ax.set_ylabel("relative L2 to the nearest\ntraining adapter" if metric else "test score", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=min(len(methods), 6), loc="upper center")
    fig.suptitle(f"exp-{result['experiment']}", y=0.995, fontsize=9, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.8 * len(rows) + 0.8)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run_experiment(name: str, cfg: ExperimentConfig) -> dict[str, Any]:
    return Experiment(name, cfg).run()
