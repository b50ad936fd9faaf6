"""Training the generator on a zoo: every checkpoint -> weight tokens, paired with a condition.

    oral train --zoo ZOO [--zoo ...] --out GEN [--steps N] [--config YAML] [key=value ...]

Data: each zoo checkpoint (a PEFT adapter dir) is loaded, optionally put in the canonical gauge,
and tokenized by a WeightTokenizer fitted on all adapters of its LoRA layout. Its condition is
c_model of its base and c_text of one of its task's training descriptions, drawn anew each time
(held-out descriptions are never used). With probability `cond_dropout` the text is replaced by
the null condition, so sampling can use classifier-free guidance.

The loop (accelerate: CPU here, one or many GPUs elsewhere): all randomness of step s comes from
a generator seeded by (seed, s, process), so a resumed run repeats an uninterrupted one exactly.
EMA weights are what the generator exports. Checkpoints (safetensors + JSON, no pickles) are
named by step under GEN/checkpoints/; the latest one is resumed automatically.

The exported generator (GEN/config.json, GEN/model.safetensors, GEN/tokenizers/) is rewritten at
every checkpoint, so a run stopped early still leaves a usable generator.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes
from tqdm.auto import tqdm

from oral.conditions import ConditionConfig, ConditionEncoder
from oral.diffusion import Diffusion, DiffusionConfig
from oral.generator import GeneratorConfig, LoraGenerator, generator_config
from oral.io import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from oral.tokens import WeightTokenizer

log = logging.getLogger(__name__)

FORMAT = "oral-generator"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONDITIONS_NAME = "conditions.safetensors"
GAUGES = ("raw", "canonical")
DATA_DIR = "data"


class TrainError(ValueError):
    """A training setup that cannot work (empty zoo, unknown preset, mismatched resume, ...)."""


@dataclass
class TrainConfig:
    """How the generator is built and trained."""

    preset: str = "small"  # a key of oral.generator.GENERATOR_PRESETS
    model: dict = field(default_factory=dict)  # GeneratorConfig fields overriding the preset
    conditions: ConditionConfig = field(default_factory=ConditionConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    gauge: str = "raw"  # "raw" (adapters as trained) or "canonical" (balanced SVD form)
    center: bool = False  # weight tokenizer: subtract per-tensor means too
    steps: int = 2000  # optimizer steps
    batch_size: int = 8  # adapters per step
    tokens_per_sample: int = 0  # weight tokens per adapter in each step's loss; 0 = all of them
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay down to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # with warm-up: min(ema_decay, (1 + step) / (10 + step))
    cond_dropout: float = 0.1  # chance of the null text condition (classifier-free guidance)
    seed: int = 0
    save_every: int = 500  # steps between checkpoints (and exports)
    keep_checkpoints: int = 2  # latest checkpoints kept on disk
    log_every: int = 10  # steps between loss-log rows
    device: str = "auto"  # "auto": cuda when available, else cpu
    tasks: list[str] = field(default_factory=list)  # zoo records of these tasks only (empty: all)
    final_only: bool = False  # only the final checkpoint of each zoo run

    def __post_init__(self):
        if self.gauge not in GAUGES:
            raise TrainError(f"gauge must be one of {', '.join(GAUGES)}, got {self.gauge!r}")
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1 or self.log_every < 1:
            raise TrainError("steps, batch_size, save_every and log_every must all be >= 1")
        from oral.generator import GENERATOR_PRESETS

        if self.preset not in GENERATOR_PRESETS:
            raise TrainError(f"unknown generator preset {self.preset!r}; choose one of {', '.join(GENERATOR_PRESETS)}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise TrainError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")

    def generator_config(self, model_cond_dim: int, text_cond_dim: int) -> GeneratorConfig:
        return generator_config(self.preset, **{**self.model, "model_cond_dim": model_cond_dim, "text_cond_dim": text_cond_dim})


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -----------------------------------------------------------------------------
# Data: zoo checkpoints -> weight tokens + conditions


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


def _get_task(record: dict):
    from oral.tasks import TaskError, get_task

    try:
        return get_task(record["task"])
    except TaskError:
        key = record.get("task_key")
        if key and key != record["task"]:
            return get_task(key)
        raise


def _spec_key(spec) -> str:
    from oral.lora import with_base

    return json.dumps(with_base(spec, None).to_dict(), sort_keys=True)


def manifest_sha256(zoo_root: Path) -> str:
    from oral.zoo import MANIFEST

    return hashlib.sha256((zoo_root / MANIFEST).read_bytes()).hexdigest()


def load_zoo_data(zoos: list[str | Path], cfg: TrainConfig, encoder: ConditionEncoder) -> ZooData:
    """Read every selected checkpoint of the zoos, tokenize per layout, and build the conditions."""
    from oral.lora import canonicalize, load_adapter
    from oral.models import load_base, load_base_config
    from oral.tokens import WeightTokenizer
    from oral.zoo import Zoo

    token_size = cfg.generator_config(0, 0).token_size
    records: list[tuple[Zoo, dict]] = []
    zoo_info = []
    for z in zoos:
        zoo = Zoo(z)
        if not zoo.manifest.exists():
            raise TrainError(f"{zoo.root} is not a zoo (no manifest.jsonl); make one with `oral zoo`")
        recs = zoo.records()
        if cfg.tasks:
            recs = [r for r in recs if r["task"] in cfg.tasks]
        if cfg.final_only:
            recs = [r for r in recs if r.get("final")]
        records += [(zoo, r) for r in recs]
        zoo_info.append({"path": str(zoo.root), "manifest_sha256": manifest_sha256(zoo.root), "records": len(recs)})
    if not records:
        raise TrainError(f"no finished checkpoints in zoo(s) {', '.join(map(str, zoos))}"
                         + (f" for tasks {cfg.tasks}" if cfg.tasks else "") + "; run `oral zoo` first")

    # 1) adapters, grouped by layout
    by_layout: dict[str, dict] = {}
    for zoo, r in tqdm(records, desc="reading zoo", unit="adapter", disable=None):
        spec, state = load_adapter(zoo.path(r))
        if cfg.gauge == "canonical":
            state = canonicalize(spec, state)
        g = by_layout.setdefault(_spec_key(spec), {"spec": spec, "states": [], "records": []})
        g["states"].append(state)
        g["records"].append(r)

    # 2) tasks and their training descriptions (never the held-out ones)
    task_names = sorted({r["task"] for _, r in records})
    task_objs = {r["task"]: _get_task(r) for _, r in records}
    descriptions = [list(task_objs[t].descriptions) for t in task_names]
    c_text = [encoder.text_condition(d) for d in descriptions]

    # 3) bases: metadata string and fingerprint per layout
    base_ids = sorted({r["base"] for _, r in records})
    bases, groups = [], []
    layouts = list(by_layout.values())
    c_models: list[dict[int, torch.Tensor]] = [dict() for _ in layouts]
    for bi, b in enumerate(base_ids):
        model = load_base(b)[0] if cfg.conditions.fingerprint else None
        config = model.config if model is not None else load_base_config(b)
        from oral.conditions import model_metadata

        shas = {r.get("base_fingerprint") for _, r in records if r["base"] == b}
        bases.append({"id": b, "metadata": model_metadata(config), "weights_sha256": sorted(s for s in shas if s)})
        for li, lay in enumerate(layouts):
            if any(r["base"] == b for r in lay["records"]):
                names = [m.name for m in lay["spec"].modules]
                c_models[li][bi] = encoder.model_condition(config, model, names)
        del model

    # 4) tokens
    for li, lay in enumerate(layouts):
        tok = WeightTokenizer(lay["spec"], token_size).fit(lay["states"], center=cfg.center)
        tokens = torch.empty(len(lay["states"]), tok.num_tokens, token_size)  # (S, N, D)
        for i, st in enumerate(lay["states"]):
            tok.encode(st, out=tokens[i])
        groups.append(Group(
            tokenizer=tok,
            tokens=tokens,
            base_index=torch.tensor([base_ids.index(r["base"]) for r in lay["records"]]),
            task_index=torch.tensor([task_names.index(r["task"]) for r in lay["records"]]),
            c_model=c_models[li],
        ))
    return ZooData(groups, bases, task_names, descriptions, c_text, zoo_info)


def _data_key(zoos: list[str | Path], cfg: TrainConfig) -> dict:
    """What the prepared data depends on: the zoo manifests and the data-shaping config fields."""
    from oral.zoo import Zoo

    return {
        "zoos": [manifest_sha256(Zoo(z).root) for z in zoos],
        "token_size": cfg.generator_config(0, 0).token_size,
        "conditions": dataclasses.asdict(cfg.conditions),
        **{k: getattr(cfg, k) for k in ("gauge", "center", "tasks", "final_only")},
    }


def save_zoo_data(data: ZooData, cfg: TrainConfig, path: Path) -> None:
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


def cached_zoo_data(out: Path, zoos: list[str | Path], cfg: TrainConfig) -> ZooData | None:
    """The data saved by an earlier run into OUT/data, when it was made from the same zoos and
    config (a zoo that is not on this machine is taken on trust from the saved hash)."""
    from oral.tokens import WeightTokenizer
    from oral.zoo import Zoo

    path = out / DATA_DIR
    if not (path / "data.json").exists():
        return None
    meta = json.loads((path / "data.json").read_text())
    want = {**meta["key"]}
    have = {**want, **{k: v for k, v in _data_key([], cfg).items() if k != "zoos"}}
    local = [Zoo(z).root for z in zoos]
    if all((r / "manifest.jsonl").exists() for r in local):
        have["zoos"] = [manifest_sha256(r) for r in local]
    if have != want:
        log.info("prepared data in %s is stale; reading the zoo again", path)
        return None
    t = load_file(str(path / "data.safetensors"))
    groups = []
    for gi in range(meta["groups"]):
        prefix = f"g{gi}.c_model."
        groups.append(Group(
            tokenizer=WeightTokenizer.load(path / "tokenizers" / str(gi)),
            tokens=t[f"g{gi}.tokens"],
            base_index=t[f"g{gi}.base_index"],
            task_index=t[f"g{gi}.task_index"],
            c_model={int(k[len(prefix):]): v for k, v in t.items() if k.startswith(prefix)},
        ))
    c_text = [t[f"c_text.{i}"] for i in range(len(meta["tasks"]))]
    return ZooData(groups, meta["bases"], meta["tasks"], meta["descriptions"], c_text, meta["zoos"])


def prepare_training_data(zoos: list[str | Path], out: str | Path, cfg: TrainConfig, save: bool = True) -> ZooData:
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


# -----------------------------------------------------------------------------
# Schedules and EMA


def lr_at(step: int, cfg: TrainConfig) -> float:
    """1) linear warmup to lr, 2) cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * coeff)


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for name, p in model.named_parameters():
        ema[name].mul_(d).add_(p.detach(), alpha=1 - d)


# -----------------------------------------------------------------------------
# Checkpoints: safetensors + JSON only


def _optimizer_to_safetensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_safetensors(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def checkpoint_dirs(out: Path) -> list[Path]:
    d = out / "checkpoints"
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, ema: dict, opt: torch.optim.Optimizer,
                    run_key: dict, keep: int) -> Path:
    """GEN/checkpoints/<step:07d>/: model, EMA and optimizer tensors (safetensors) + state.json."""
    final = out / "checkpoints" / f"{step:07d}"
    opt_tensors, opt_meta = _optimizer_to_safetensors(opt)
    with atomic_dir(final, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "run": run_key, "optimizer": opt_meta}, indent=1))
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model: torch.nn.Module, ema: dict, opt: torch.optim.Optimizer, run_key: dict) -> int:
    state = json.loads((ckpt / "state.json").read_text())
    if state["run"] != run_key:
        diff = sorted(k for k in set(state["run"]) | set(run_key) if state["run"].get(k) != run_key.get(k))
        raise TrainError(
            f"{ckpt} was made by a different training setup (differs in: {', '.join(diff)}); "
            f"resume with the same zoo and config, or give a new --out"
        )
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in load_file(str(ckpt / "model.safetensors")).items()})
    for k, v in load_file(str(ckpt / "ema.safetensors")).items():
        ema[k].copy_(v)
    tensors = {k: v.to(device) for k, v in load_file(str(ckpt / "optimizer.safetensors")).items()}
    for k in [k for k in tensors if k.endswith(".step")]:
        tensors[k] = tensors[k].cpu()  # AdamW keeps `step` on CPU
    _optimizer_from_safetensors(opt, tensors, state["optimizer"])
    return int(state["step"])


# -----------------------------------------------------------------------------
# Export: what Generator.from_pretrained reads


def export_generator(out: Path, net_cfg: GeneratorConfig, ema: dict, data: ZooData, cfg: TrainConfig,
                     step: int, wall_s: float) -> None:
    """Write GEN/config.json, GEN/model.safetensors (EMA weights), GEN/conditions.safetensors and
    GEN/tokenizers/<i>/ (each file atomically)."""
    groups = []
    for i, g in enumerate(data.groups):
        g.tokenizer.save(out / "tokenizers" / str(i))
        groups.append({
            "tokenizer": f"tokenizers/{i}",
            "spec": g.tokenizer.spec.to_dict(),
            "num_tokens": g.tokenizer.num_tokens,
            "num_samples": len(g.tokens),
            "bases": sorted({data.bases[int(b)]["id"] for b in g.base_index}),
        })
    cond_tensors = {f"c_model.{gi}.{bi}": v.contiguous() for gi, g in enumerate(data.groups) for bi, v in g.c_model.items()}
    atomic_write_bytes(out / CONDITIONS_NAME, save_bytes(cond_tensors))
    atomic_write_bytes(out / WEIGHTS_NAME, save_bytes({k: v.detach().cpu().contiguous() for k, v in ema.items()}))
    from oral.conditions import text_hash

    atomic_write_json(out / CONFIG_NAME, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "wall_s": round(wall_s, 1),
        "generator": dataclasses.asdict(net_cfg),
        "train": dataclasses.asdict(cfg),
        "conditions": {
            **dataclasses.asdict(cfg.conditions),
            "model_cond_dim": net_cfg.model_cond_dim,
            "text_cond_dim": net_cfg.text_cond_dim,
            "bases": data.bases,
            "tasks": {t: {"descriptions": d, "descriptions_hash": text_hash(d)} for t, d in zip(data.tasks, data.descriptions)},
        },
        "gauge": cfg.gauge,
        "groups": groups,
        "zoos": data.zoos,
        "num_samples": data.num_samples,
    })


# -----------------------------------------------------------------------------
# Loss log


def _write_plot(out: Path, rows: list[dict], ylabel: str = "loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], lw=1, label="loss (logged step)")
    if len(rows) > 10:
        k = max(1, len(rows) // 20)
        sm = [sum(r["loss"] for r in rows[max(0, i - k):i + 1]) / len(rows[max(0, i - k):i + 1]) for i in range(len(rows))]
        ax.plot(steps, sm, lw=2, label=f"moving mean ({k + 1})")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("generator training loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out / "loss.png", buf.getvalue())


def read_loss_log(out: Path) -> list[dict]:
    path = Path(out) / "loss.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"]), "wall_s": float(r["wall_s"])}
                for r in csv.DictReader(f)]


def _write_log(out: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "wall_s"])
    w.writeheader()
    for r in rows:
        w.writerow({"step": r["step"], "loss": f"{r['loss']:.6g}", "lr": f"{r['lr']:.6g}", "wall_s": f"{r['wall_s']:.2f}"})
    atomic_write_text(out / "loss.csv", buf.getvalue())


# -----------------------------------------------------------------------------
# The training loop


def train_generator(zoos: list[str | Path], out: str | Path, cfg: TrainConfig | None = None,
                    stop_at: int | None = None) -> Path:
    """Train (or resume) a generator on the zoos into `out`; returns `out`.

    stop_at: stop after this step (a checkpoint is written there), as if interrupted; the run
    resumes from it when called again. Used to test resumption.
    """
    from accelerate import Accelerator

    cfg = cfg or TrainConfig()
    out = Path(out)
    device = resolve_device(cfg.device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    device = accelerator.device
    main = accelerator.is_main_process

    # 1) data and conditions
    data = prepare_training_data(zoos, out, cfg, save=main)
    cm_dim = next(iter(data.groups[0].c_model.values())).numel()
    net_cfg = cfg.generator_config(cm_dim, data.c_text[0].shape[1])
    log.info("training data: %d adapters in %d layout(s), %d base(s), %d task(s)",
             data.num_samples, len(data.groups), len(data.bases), len(data.tasks))

    # 2) model, optimizer, EMA
    torch.manual_seed(cfg.seed)
    model = LoraGenerator(net_cfg).to(device)
    ema = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    diffusion = Diffusion(cfg.diffusion)
    run_key = {
        "train": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "zoos": [z["manifest_sha256"] for z in data.zoos],
        "generator": dataclasses.asdict(net_cfg),
    }
    run_key["train"].pop("steps")  # a run may be extended; the cosine schedule then stretches
    run_key["train"].pop("device")

    start = 0
    ckpts = checkpoint_dirs(out)
    if ckpts:
        start = load_checkpoint(ckpts[-1], model, ema, opt, run_key)
        log.info("resumed from %s (step %d)", ckpts[-1], start)
    rows = [r for r in read_loss_log(out) if r["step"] <= start]
    model, opt = accelerator.prepare(model, opt)
    raw = accelerator.unwrap_model(model)

    # device copies of the data
    groups = [(g, g.tokens.to(device), g.tokenizer.positions.to(device), g.tokenizer.mask.to(device)) for g in data.groups]
    sizes = torch.tensor([len(g.tokens) for g in data.groups], dtype=torch.float)
    c_text = [c.to(device) for c in data.c_text]
    c_model = [{b: v.to(device) for b, v in g.c_model.items()} for g in data.groups]

    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    t0 = time.time() - (rows[-1]["wall_s"] if rows else 0.0)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="train generator", disable=None if main else True)
    step = start
    for step in bar:
        # one generator per (seed, step, process): resumption repeats the same draws
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + accelerator.process_index)

        # 1) a batch of adapters from one layout (layouts drawn in proportion to their size)
        gi = int(torch.multinomial(sizes, 1, generator=g)) if len(groups) > 1 else 0
        group, tokens, positions, mask = groups[gi]
        S, N, D = tokens.shape
        idx = torch.randint(0, S, (cfg.batch_size,), generator=g)
        B = cfg.batch_size
        # 2) conditions: the sample's base; a random training description of its task, or null
        cm = torch.stack([c_model[gi][int(b)] for b in group.base_index[idx]])  # (B, Cm)
        ct = torch.stack([c_text[int(t)][int(torch.randint(0, len(c_text[int(t)]), (1,), generator=g))]
                          for t in group.task_index[idx]])  # (B, Ct)
        drop = (torch.rand(B, generator=g) < cfg.cond_dropout).to(device)
        # 3) a random subset of each sample's tokens, noised
        K = N if cfg.tokens_per_sample <= 0 else min(cfg.tokens_per_sample, N)
        tok_idx = torch.rand(B, N, generator=g).argsort(dim=1)[:, :K].to(device)  # (B, K)
        x0 = torch.gather(tokens[idx.to(device)], 1, tok_idx[..., None].expand(-1, -1, D)).reshape(B * K, D)
        m = mask[tok_idx].reshape(B * K, D)  # (B*K, D)
        x_t, t, noise = diffusion.add_noise(x0, g)
        # 4) eps-prediction loss on real values, one optimizer step, EMA
        lr = lr_at(step, cfg)
        for pg in opt.param_groups:
            pg["lr"] = lr
        eps = model(positions.expand(B, -1, -1), cm, ct, drop, tok_idx, x_t, t)
        loss = Diffusion.masked_mse(eps, noise, m)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, raw, step, cfg.ema_decay)

        done = step + 1
        if not math.isfinite(loss.item()):
            raise TrainError(f"the loss became {loss.item()} at step {done}; lower lr or raise grad_clip")
        if main and (done % cfg.log_every == 0 or done == end):
            rows.append({"step": done, "loss": loss.item(), "lr": lr, "wall_s": time.time() - t0})
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if main and (done % cfg.save_every == 0 or done == end):
            save_checkpoint(out, done, raw, ema, opt, run_key, cfg.keep_checkpoints)
            export_generator(out, net_cfg, ema, data, cfg, done, time.time() - t0)
            _write_log(out, rows)
            _write_plot(out, rows, f"masked MSE ({cfg.diffusion.prediction_type} prediction)")
    bar.close()
    accelerator.wait_for_everyone()
    if main and start >= end and not (out / CONFIG_NAME).exists():
        export_generator(out, net_cfg, ema, data, cfg, start, time.time() - t0)
    return out
