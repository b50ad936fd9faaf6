"""The methods an experiment compares: where each one's adapter (or prompt) comes from.

Every method answers one request (a base version, a task, a held-out description, a sampling seed)
with a `Candidate`: an adapter (spec + state, or none) and an instruction written before each
example (or none). All of them draw on the same zoo and the same generator:

    base            the bare base                      oracle        the zoo's LoRA of that version and task
    in-prompt       the description before each        stale-t0      t0's LoRA of the task, on a later version
                    example, no adapter                stale-newest  the newest training version's LoRA
    nearest         the zoo adapter whose condition    stale-best    the training versions' LoRA that scores
                    is nearest the request's                         best on this version's validation split
    mean            the task's training adapters,      generated     the generator, guidance 1
                    dW averaged, refactorized          generated-cfg the generator, guidance chosen on validation
    hypernet        a Text-to-LoRA-style hypernetwork (oral.hypernet) trained on the same zoo and conditions
    refined         nearest's adapter refined by the generator for this base and description (SDEdit:
                    `Generator.generate(init=...)`), strength chosen on validation
    shifted         nearest's adapter moved by what the generator changes between bases: dW(nearest) +
                    dW(generated for this base) - dW(generated for nearest's version), same description and
                    seed, refactorized to the rank (the generator as a predictor of the version shift only)
    random-text     generated from gibberish of the description's length          (controls)
    random-model    generated with the c_model of a randomly initialized base of the same shape
    no-fingerprint  generated with the weight-fingerprint half of c_model set to 0
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from oral.gauge import delta_weight, factorize
from oral.lora import LoraSpec, load_adapter, with_base
from oral.models import base_id
from oral.zoo import Zoo, matching

GENERATED = ("generated", "generated-cfg", "refined", "shifted", "random-text", "random-model", "no-fingerprint")
BASELINES = ("base", "oracle", "stale-t0", "stale-newest", "stale-best", "nearest", "mean", "hypernet", "in-prompt")
METHODS = BASELINES + GENERATED


@dataclass
class Candidate:
    """One thing to score: an adapter (or None: the bare base) and an instruction (or None)."""

    method: str
    description: str | None = None  # the held-out description it answers, if any
    seed: int | None = None  # the sampling seed, for generated adapters
    spec: LoraSpec | None = None
    state: dict[str, torch.Tensor] | None = None
    instruction: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # extra row fields (guidance, nearest task, ...)


def gibberish(text: str, seed: int) -> str:
    """Random lowercase letters with `text`'s word lengths: a description that says nothing."""
    rng = random.Random(f"{seed}:{text}")
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in w) for w in text.split())


class ZooAdapters:
    """The zoo's adapters by (version, task), read once: finals for oracle-type methods, every
    checkpoint of a run for the memorization distances."""

    def __init__(self, zoo: Zoo, root: str, rank: int, seed: int):
        self.zoo = zoo
        self.rank, self.seed = rank, seed
        rows = zoo.summary(rank=rank, seed=seed)
        self.records = zoo.records(rank=rank, seed=seed)  # the manifest read once: every kept checkpoint of its runs
        root = base_id(root)
        self.versions: dict[int, str] = {}
        self.runs: dict[tuple[int, str], str] = {}  # (version, task) -> run_id
        for r in rows:
            if r["root"] != root:
                continue
            have = self.versions.setdefault(r["version"], r["base"])
            if have != r["base"]:
                raise ValueError(f"the zoo {zoo.root} has two bases at version {r['version']} of {root}: {have} and "
                                 f"{r['base']}; give a zoo with one family")
            if (r["version"], r["task"]) in self.runs:
                raise ValueError(f"the zoo {zoo.root} has several runs on version {r['version']} for {r['task']} at rank "
                                 f"{rank}, seed {seed} ({self.runs[r['version'], r['task']]}, {r['run_id']}); "
                                 f"give a zoo with one")
            self.runs[(r["version"], r["task"])] = r["run_id"]
        self._cache: dict[str, tuple[LoraSpec, dict]] = {}

    def version_of(self, base: str) -> int | None:
        return next((v for v, b in self.versions.items() if b == base_id(base)), None)

    def load(self, record: dict) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
        key = record["path"]
        if key not in self._cache:
            self._cache[key] = load_adapter(self.zoo.path(record))
        return self._cache[key]

    def final(self, version: int, task: str) -> tuple[LoraSpec, dict[str, torch.Tensor]] | None:
        run = self.runs.get((version, task))
        if run is None:
            return None
        (rec,) = matching(self.records, {"run_id": run, "final": True})
        return self.load(rec)

    def checkpoints(self, versions: set[int], tasks: set[str]) -> list[tuple[dict, LoraSpec, dict]]:
        """Every kept checkpoint of the runs on `versions` x `tasks`: (record, spec, state)."""
        runs = {run for (v, t), run in self.runs.items() if v in versions and t in tasks}
        return [(r, *self.load(r)) for r in matching(self.records, {"run_id": runs})] if runs else []


def mean_adapter(adapters: list[tuple[LoraSpec, dict]]) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """The average weight update of `adapters` (one layout), factorized back to their rank."""
    spec = adapters[0][0]
    deltas = {m.name: sum(delta_weight(spec, s, m.name) for _, s in adapters) / len(adapters) for m in spec.modules}
    return spec, factorize(spec, deltas)


def shifted_adapter(start: tuple[LoraSpec, dict], new: tuple[LoraSpec, dict],
                    old: tuple[LoraSpec, dict]) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """`start`'s update plus the difference new - old of two updates (one layout), factorized back to the rank."""
    spec = start[0]
    deltas = {m.name: delta_weight(spec, start[1], m.name) + delta_weight(spec, new[1], m.name)
              - delta_weight(spec, old[1], m.name) for m in spec.modules}
    return spec, factorize(spec, deltas)


def random_base_condition(gen, group: int, base_model: torch.nn.Module, seed: int = 1234) -> torch.Tensor:
    """c_model of a randomly initialized model with `base_model`'s config (the paper's random-model ablation)."""
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        random_model = AutoModelForCausalLM.from_config(base_model.config)
    names = [m.name for m in gen.tokenizers[group].spec.modules]
    return gen.conditions.model_condition(base_model.config, random_model, names)


def without_fingerprint(gen, c_model: torch.Tensor) -> torch.Tensor | None:
    """c_model with its weight-fingerprint part set to 0; None when the generator has no fingerprint."""
    cfg = gen.conditions.config
    if not cfg.fingerprint:
        return None
    out = c_model.clone()
    out[out.shape[0] - cfg.fingerprint_dim:] = 0
    return out


def with_base_spec(spec: LoraSpec, base: str) -> LoraSpec:
    return with_base(spec, base_id(base))
