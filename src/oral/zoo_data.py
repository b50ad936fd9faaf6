"""The generator's training data: zoo checkpoints -> weight tokens per LoRA layout, plus conditions.

Each selected zoo checkpoint (a PEFT adapter dir) is read, optionally put in the canonical gauge,
and tokenized by a WeightTokenizer fitted on all adapters of its layout. Adapters are streamed:
a first pass reads only their specs (config and tensor headers), the tokenizer's statistics and
the tokens are then computed one adapter at a time, so memory holds the tokens, never every
state dict. Conditions: c_model per (layout, base) and c_text of each task's training
descriptions (held-out descriptions are never used).

The prepared data is saved as safetensors + JSON in GEN/data, so a resumed run, or a run on
another machine, needs neither the zoo's adapters nor the base models nor the text encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors.torch import save_file

from oral.conditions import ConditionEncoder, model_metadata
from oral.io import atomic_dir, load_safetensors, read_json
from oral.gauge import canonicalize
from oral.lora import LoraSpec, load_adapter, with_base
from oral.models import load_base, load_base_config
from oral.progress import progress_bar
from oral.tasks import TaskError, get_task
from oral.tokens import WeightTokenizer
from oral.zoo import MANIFEST, Zoo

if TYPE_CHECKING:
    from oral.train import GeneratorTrainConfig

log = logging.getLogger(__name__)

DATA_DIR = "data"
DATA_FIX = "delete that data dir; `oral train` prepares it again from the zoo"


class DataError(ValueError):
    """Training data that cannot be prepared (no zoo, no checkpoint selected)."""


@dataclass
class Group:
    """Adapters that share one LoRA layout (spec), hence one tokenizer and one token sequence."""

    tokenizer: WeightTokenizer
    tokens: torch.Tensor  # (S, N, D)
    base_index: torch.Tensor  # (S,) long, into ZooData.bases
    task_index: torch.Tensor  # (S,) long, into ZooData.tasks
    c_model: dict[int, torch.Tensor]  # base index -> (Cm,) for this layout's modules


@dataclass
class ZooData:
    groups: list[Group]
    bases: list[dict]  # {"id", "metadata", "weights_sha256"}
    tasks: list[str]
    descriptions: list[list[str]]  # training descriptions per task
    c_text: list[torch.Tensor]  # per task: (n_desc, Ct)
    zoos: list[dict]  # {"path", "manifest_sha256", "records"}

    @property
    def num_samples(self) -> int:
        return sum(len(g.tokens) for g in self.groups)


def _task_of(record: dict):
    """The task of a zoo record (anything with `.name` and `.descriptions`): a style set for an image run."""
    if record.get("domain") == "image":
        from oral.image.data import style_set

        return style_set(record["task"])
    try:
        return get_task(record["task"])
    except TaskError:
        key = record.get("task_key")
        if key and key != record["task"]:
            return get_task(key)
        raise


def _spec_key(spec: LoraSpec) -> str:
    return json.dumps(with_base(spec, None).to_dict(), sort_keys=True)


def manifest_sha256(zoo_root: Path) -> str:
    return hashlib.sha256((zoo_root / MANIFEST).read_bytes()).hexdigest()



def _selected_records(zoos: list[str | Path], cfg: GeneratorTrainConfig) -> tuple[list[tuple[Zoo, dict]], list[dict]]:
    records: list[tuple[Zoo, dict]] = []
    zoo_info = []
    for z in zoos:
        zoo = Zoo(z)
        if not zoo.manifest.exists():
            raise DataError(f"{zoo.root} is not a zoo (no manifest.jsonl); make one with `oral zoo`")
        recs = zoo.records()
        if cfg.tasks:
            recs = [r for r in recs if r["task"] in cfg.tasks]
        if cfg.versions:
            recs = [r for r in recs if len(r.get("lineage") or []) in cfg.versions]
        if cfg.ranks:
            recs = [r for r in recs if r["rank"] in cfg.ranks]
        if cfg.zoo_seeds:
            recs = [r for r in recs if r["seed"] in cfg.zoo_seeds]
        if cfg.final_only:
            recs = [r for r in recs if r.get("final")]
        records += [(zoo, r) for r in recs]
        zoo_info.append({"path": str(zoo.root), "manifest_sha256": manifest_sha256(zoo.root), "records": len(recs)})
    if not records:
        raise DataError(f"no finished checkpoints in zoo(s) {', '.join(map(str, zoos))}"
                        + "".join(f" for {k} {getattr(cfg, k)}" for k in ("tasks", "versions", "ranks", "zoo_seeds")
                                if getattr(cfg, k))
                        + "; run `oral zoo` first")
    return records, zoo_info


def load_zoo_data(zoos: list[str | Path], cfg: GeneratorTrainConfig, encoder: ConditionEncoder) -> ZooData:
    """Read every selected checkpoint of the zoos, tokenize per layout, and build the conditions."""
    token_size = cfg.generator_config(0, 0).token_size
    records, zoo_info = _selected_records(zoos, cfg)

    # 1) layouts, from the adapters' configs and tensor headers only
    by_layout: dict[str, dict] = {}
    for zoo, r in records:
        spec = LoraSpec.from_adapter_dir(zoo.path(r))
        by_layout.setdefault(_spec_key(spec), {"spec": spec, "records": []})["records"].append((zoo, r))
    layouts = list(by_layout.values())

    def states(recs: list[tuple[Zoo, dict]], desc: str) -> Iterator[dict[str, torch.Tensor]]:
        for zoo, r in progress_bar(recs, desc=desc, unit="adapter"):
            spec, state = load_adapter(zoo.path(r))
            yield canonicalize(spec, state) if cfg.gauge == "canonical" else state

    # 2) tasks and their training descriptions (never the held-out ones)
    task_names = sorted({r["task"] for _, r in records})
    task_objs = {r["task"]: _task_of(r) for _, r in records}
    descriptions = [list(task_objs[t].descriptions) for t in task_names]
    c_text = [encoder.text_condition(d) for d in descriptions]

    # 3) bases: metadata string and fingerprint per layout
    base_ids = sorted({r["base"] for _, r in records})
    bases = []
    c_models: list[dict[int, torch.Tensor]] = [dict() for _ in layouts]
    for bi, b in enumerate(base_ids):
        model = load_base(b)[0] if cfg.conditions.fingerprint else None
        config = model.config if model is not None else load_base_config(b)
        shas = {r.get("base_fingerprint") for _, r in records if r["base"] == b}
        bases.append({"id": b, "metadata": model_metadata(config), "weights_sha256": sorted(s for s in shas if s)})
        for li, lay in enumerate(layouts):
            if any(r["base"] == b for _, r in lay["records"]):
                names = [m.name for m in lay["spec"].modules]
                c_models[li][bi] = encoder.model_condition(config, model, names)
        del model

    # 4) tokens: statistics over the layout's adapters, then one adapter at a time
    groups = []
    for li, lay in enumerate(layouts):
        recs = lay["records"]
        tok = WeightTokenizer(lay["spec"], token_size).fit(states(recs, "tokenizer stats"), center=cfg.center)
        tokens = torch.empty(len(recs), tok.num_tokens, token_size)  # (S, N, D)
        for i, state in enumerate(states(recs, "tokenizing zoo")):
            tok.encode(state, out=tokens[i])
        groups.append(Group(
            tokenizer=tok,
            tokens=tokens,
            base_index=torch.tensor([base_ids.index(r["base"]) for _, r in recs]),
            task_index=torch.tensor([task_names.index(r["task"]) for _, r in recs]),
            c_model=c_models[li],
        ))
    return ZooData(groups, bases, task_names, descriptions, c_text, zoo_info)


def _data_key(zoos: list[str | Path], cfg: GeneratorTrainConfig) -> dict:
    """What the prepared data depends on: the zoo manifests and the data-shaping config fields."""
    return {
        "zoos": [manifest_sha256(Zoo(z).root) for z in zoos],
        "token_size": cfg.generator_config(0, 0).token_size,
        "conditions": dataclasses.asdict(cfg.conditions),
        **{k: getattr(cfg, k) for k in ("gauge", "center", "tasks", "final_only")},
        **{k: getattr(cfg, k) for k in ("versions", "ranks", "zoo_seeds") if getattr(cfg, k)},  # absent when unset: older keys hold
    }


def save_zoo_data(data: ZooData, cfg: GeneratorTrainConfig, path: Path) -> None:
    """The prepared training data (tokens, conditions, tokenizers) as safetensors + JSON, so a
    resumed run, or a run on another machine, needs neither the zoo's adapters nor the encoder."""
    tensors = {}
    for gi, g in enumerate(data.groups):
        tensors[f"g{gi}.tokens"] = g.tokens.contiguous()
        tensors[f"g{gi}.base_index"] = g.base_index
        tensors[f"g{gi}.task_index"] = g.task_index
        for bi, v in g.c_model.items():
            tensors[f"g{gi}.c_model.{bi}"] = v.contiguous()
    for ti, c in enumerate(data.c_text):
        tensors[f"c_text.{ti}"] = c.contiguous()
    meta = {"key": _data_key([z["path"] for z in data.zoos], cfg), "bases": data.bases, "tasks": data.tasks,
            "descriptions": data.descriptions, "zoos": data.zoos, "groups": len(data.groups)}
    with atomic_dir(path, overwrite=True) as tmp:
        for gi, g in enumerate(data.groups):
            g.tokenizer.save(tmp / "tokenizers" / str(gi))
        save_file(tensors, str(tmp / "data.safetensors"))
        (tmp / "data.json").write_text(json.dumps(meta, indent=1))


def cached_zoo_data(out: Path, zoos: list[str | Path], cfg: GeneratorTrainConfig) -> ZooData | None:
    """The data saved by an earlier run into OUT/data, when it was made from the same zoos and
    config (a zoo that is not on this machine is taken on trust from the saved hash)."""
    path = out / DATA_DIR
    if not (path / "data.json").exists():
        return None
    meta = read_json(path / "data.json", f"{DATA_FIX} ({path})")
    want = {**meta["key"]}
    have = {**want, **{k: v for k, v in _data_key([], cfg).items() if k != "zoos"}}
    local = [Zoo(z).root for z in zoos]
    if all((r / "manifest.jsonl").exists() for r in local):
        have["zoos"] = [manifest_sha256(r) for r in local]
    if have != want:
        log.info("prepared data in %s is stale; reading the zoo again", path)
        return None
    t = load_safetensors(path / "data.safetensors", f"{DATA_FIX} ({path})")
    groups = []
    for gi in range(meta["groups"]):
        prefix = f"g{gi}.c_model."
        groups.append(Group(
            tokenizer=WeightTokenizer.load(path / "tokenizers" / str(gi), fix=f"{DATA_FIX} ({path})"),
            tokens=t[f"g{gi}.tokens"],
            base_index=t[f"g{gi}.base_index"],
            task_index=t[f"g{gi}.task_index"],
            c_model={int(k[len(prefix):]): v for k, v in t.items() if k.startswith(prefix)},
        ))
    c_text = [t[f"c_text.{i}"] for i in range(len(meta["tasks"]))]
    return ZooData(groups, meta["bases"], meta["tasks"], meta["descriptions"], c_text, meta["zoos"])


def prepare_training_data(zoos: list[str | Path], out: str | Path, cfg: GeneratorTrainConfig, save: bool = True) -> ZooData:
    """OUT/data if it is up to date, else the zoos read, tokenized and encoded (and saved to OUT/data).

    Preparing once and copying OUT to another machine lets that machine train without the zoo,
    the base models or the text encoder.
    """
    out = Path(out)
    data = cached_zoo_data(out, zoos, cfg)
    if data is None:
        data = load_zoo_data([Path(z) for z in zoos], cfg, ConditionEncoder(cfg.conditions, device="cpu"))
        if save:
            save_zoo_data(data, cfg, out / DATA_DIR)
    return data

