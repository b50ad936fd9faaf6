"""Training the generator on a zoo: weight tokens + conditions -> the diffusion loss, with EMA.

    oral train --zoo ZOO [--zoo ...] --out GEN [--steps N] [--config YAML] [key=value ...]

Data (oral.zoo_data): every zoo checkpoint as weight tokens of its LoRA layout, with c_model of
its base and c_text of one of its task's training descriptions, drawn anew each time (held-out
descriptions are never used). With probability `cond_dropout` the text is replaced by the null
condition, so sampling can use classifier-free guidance.

The loop (accelerate: CPU here, one or many GPUs elsewhere): all randomness of step s comes from
a generator seeded by (seed, s, process), so a resumed run repeats an uninterrupted one exactly.
The loss is `Diffusion.loss`; EMA weights (diffusers' EMAModel) are what the generator exports.
Checkpoints (oral.training: safetensors + JSON, no pickles) are named by step under
GEN/checkpoints/; the latest one is resumed automatically.

The exported generator (oral.generate's format: GEN/config.json, GEN/model.safetensors,
GEN/conditions.safetensors, GEN/tokenizers/) is rewritten at every checkpoint, so a run stopped
early still leaves a usable generator.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch.profiler import record_function

from oral.conditions import ConditionConfig
from oral.diffusion import Diffusion, DiffusionConfig
from oral.generate import CONFIG_NAME, save_generator
from oral.generator import GENERATOR_PRESETS, GeneratorConfig, GeneratorNet, generator_config
from oral.io import atomic_write_bytes, atomic_write_text, read_json, remove_debris
from oral.progress import progress_bar
from oral.training import (lr_at, prune_checkpoints, resolve_device, restore_ema, resume, save_checkpoint, set_lr,
                           step_rng)
from oral.zoo_data import prepare_training_data

log = logging.getLogger(__name__)

GAUGES = ("raw", "canonical")
PRECISIONS = ("fp32", "bf16")
# Settings added since the first generator runs, with the default that reproduces the runs made before them
LATER_SETTINGS = {"versions": [], "ranks": [], "zoo_seeds": [], "precision": "fp32"}
LATER_CONDITIONS = {"fingerprint_kind": "sketch", "fingerprint_reference": "", "fingerprint_bins": 8}
CHECKPOINTS = "checkpoints"


class TrainError(ValueError):
    """A generator training setup that cannot work (unknown preset, bad settings, a diverging loss)."""


@dataclass
class GeneratorTrainConfig:
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
    ema_decay: float = 0.999  # diffusers' EMAModel, with its warm-up: min(ema_decay, (1 + step) / (10 + step))
    cond_dropout: float = 0.1  # chance of the null text condition (classifier-free guidance)
    seed: int = 0
    save_every: int = 500  # steps between checkpoints (and exports)
    keep_checkpoints: int = 2  # latest checkpoints kept on disk
    log_every: int = 10  # steps between loss-log rows
    device: str = "auto"  # "auto": cuda when available, else cpu
    precision: str = "fp32"  # "bf16": the network's forward under torch's bf16 autocast, weights and optimizer fp32
    tasks: list[str] = field(default_factory=list)  # zoo records of these tasks only (empty: all)
    versions: list[int] = field(default_factory=list)  # ... of these base versions only (evolved links; empty: all)
    ranks: list[int] = field(default_factory=list)  # ... of these LoRA ranks only (empty: all)
    # ... of these training seeds only (empty: all). Runs of one seed share their LoRA init across tasks; two seeds
    # of one task can land far apart (style LoRAs: cosine 0.34-0.44 between seeds), two modes the generator blends
    zoo_seeds: list[int] = field(default_factory=list)
    final_only: bool = False  # only the final checkpoint of each zoo run

    def __post_init__(self):
        if self.gauge not in GAUGES:
            raise TrainError(f"gauge must be one of {', '.join(GAUGES)}, got {self.gauge!r}")
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1 or self.log_every < 1:
            raise TrainError("steps, batch_size, save_every and log_every must all be >= 1")
        if self.preset not in GENERATOR_PRESETS:
            raise TrainError(f"unknown generator preset {self.preset!r}; choose one of {', '.join(GENERATOR_PRESETS)}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise TrainError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (1-based): warmup, then cosine to lr * min_lr_ratio."""
        return lr_at(step, lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.steps,
                     min_lr_ratio=self.min_lr_ratio)

    def generator_config(self, model_cond_dim: int, text_cond_dim: int) -> GeneratorConfig:
        return generator_config(self.preset, **{**self.model, "model_cond_dim": model_cond_dim, "text_cond_dim": text_cond_dim})




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


def _ema_weights(net: torch.nn.Module, ema: EMAModel) -> dict[str, torch.Tensor]:
    """The EMA weights by parameter name."""
    return {n: s for (n, _), s in zip(net.named_parameters(), ema.shadow_params)}


def train_generator(zoos: list[str | Path], out: str | Path, cfg: GeneratorTrainConfig | None = None,
                    stop_at: int | None = None) -> Path:
    """Train (or resume) a generator on the zoos into `out`; returns `out`.

    stop_at: stop after this step (a checkpoint is written there), as if interrupted; the run
    resumes from it when called again. Used to test resumption.
    """
    cfg = cfg or GeneratorTrainConfig()
    out = Path(out)
    accelerator = Accelerator(cpu=resolve_device(cfg.device).type == "cpu")
    device = accelerator.device
    main = accelerator.is_main_process

    # 1) data and conditions (after undoing the writes a killed run left half done)
    if main:
        remove_debris(out)
        remove_debris(out / "tokenizers")
    data = prepare_training_data(zoos, out, cfg, save=main)
    cm_dim = next(iter(data.groups[0].c_model.values())).numel()
    net_cfg = cfg.generator_config(cm_dim, data.c_text[0].shape[1])
    log.info("training data: %d adapters in %d layout(s), %d base(s), %d task(s)",
             data.num_samples, len(data.groups), len(data.bases), len(data.tasks))

    # 2) network, optimizer, EMA
    torch.manual_seed(cfg.seed)
    net = GeneratorNet(net_cfg).to(device)
    ema = EMAModel(net.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    diffusion = Diffusion(cfg.diffusion)
    run_key = {
        "train": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "zoos": [z["manifest_sha256"] for z in data.zoos],
        "generator": dataclasses.asdict(net_cfg),
    }
    run_key["train"].pop("steps")  # a run may be extended; the cosine schedule then stretches
    run_key["train"].pop("device")
    # settings added after runs were made: at their defaults they leave the key as it was, so those runs resume
    for key, default in LATER_SETTINGS.items():
        if run_key["train"].get(key) == default:
            run_key["train"].pop(key)
    for key, default in LATER_CONDITIONS.items():
        if run_key["train"]["conditions"].get(key) == default:
            run_key["train"]["conditions"].pop(key)

    start, state, extra = resume(out / CHECKPOINTS, net, opt, run_key, tensors=("ema",),
                                 fix=f"resume with the same zoo and config, or give a new --out than {out}")
    if state:
        restore_ema(ema, net, extra["ema"], start)
    rows = [r for r in read_loss_log(out) if r["step"] <= start]
    model, opt = accelerator.prepare(net, opt)

    # device copies of the data
    groups = [(g, g.tokens.to(device), g.tokenizer.positions.to(device), g.tokenizer.mask.to(device)) for g in data.groups]
    sizes = torch.tensor([len(g.tokens) for g in data.groups], dtype=torch.float)
    c_text = [c.to(device) for c in data.c_text]
    c_model = [{b: v.to(device) for b, v in g.c_model.items()} for g in data.groups]

    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    t0 = time.time() - (rows[-1]["wall_s"] if rows else 0.0)
    bar = progress_bar(range(start, end), initial=start, total=cfg.steps, desc="train generator", disable=not main)
    for step in bar:
        done = step + 1  # this optimizer step, 1-based
        rng = step_rng(cfg.seed, step, accelerator.process_index)

        # 1) a batch of adapters from one layout (layouts drawn in proportion to their size)
        with record_function("train.batch"):  # the phases are named for torch.profiler (benchmarks/bench_train.py)
            gi = int(torch.multinomial(sizes, 1, generator=rng)) if len(groups) > 1 else 0
            group, tokens, positions, mask = groups[gi]
            S, N, D = tokens.shape
            B = cfg.batch_size
            idx = torch.randint(0, S, (B,), generator=rng)
            # 2) conditions: the sample's base; a random training description of its task, or null
            cm = torch.stack([c_model[gi][int(b)] for b in group.base_index[idx]])  # (B, Cm)
            ct = torch.stack([c_text[int(t)][int(torch.randint(0, len(c_text[int(t)]), (1,), generator=rng))]
                              for t in group.task_index[idx]])  # (B, Ct)
            drop = (torch.rand(B, generator=rng) < cfg.cond_dropout).to(device)  # (B,) null text
            # 3) a random subset of each sample's tokens
            K = N if cfg.tokens_per_sample <= 0 else min(cfg.tokens_per_sample, N)
            tok_idx = torch.rand(B, N, generator=rng).argsort(dim=1)[:, :K].to(device)  # (B, K)
            x0 = torch.gather(tokens[idx.to(device)], 1, tok_idx[..., None].expand(-1, -1, D)).reshape(B * K, D)
            m = mask[tok_idx].reshape(B * K, D)  # (B*K, D)

        # 4) the diffusion loss on real values, one optimizer step, EMA
        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(positions.expand(B, -1, -1), cm, ct, drop, tok_idx, x_t, t)  # (B*K, D)

        lr = cfg.lr_at(done)
        set_lr(opt, lr)
        # bf16: torch's autocast around the forward (not accelerate's mixed_precision, which is fixed per process)
        with record_function("train.forward"), torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = diffusion.loss(denoise, x0, m, rng)
        if not math.isfinite(loss.item()):
            raise TrainError(f"the loss became {loss.item()} at step {done}; lower lr or raise grad_clip")
        opt.zero_grad(set_to_none=True)
        with record_function("train.backward"):
            accelerator.backward(loss)
        with record_function("train.optimizer"):
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        with record_function("train.ema"):
            ema.step(net.parameters())

        if main and (done % cfg.log_every == 0 or done == end):
            rows.append({"step": done, "loss": loss.item(), "lr": lr, "wall_s": time.time() - t0})
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if main and (done % cfg.save_every == 0 or done == end):
            # the loss log first: a resumed run keeps the rows up to its checkpoint, so none is lost
            _write_log(out, rows)
            _write_plot(out, rows, f"masked MSE ({cfg.diffusion.prediction_type} prediction)")
            save_checkpoint(out / CHECKPOINTS, done, net, opt, run_key, tensors={"ema": _ema_weights(net, ema)},
                            keep=cfg.keep_checkpoints)
            _export(out, net_cfg, _ema_weights(net, ema), data, cfg, done, time.time() - t0)
    bar.close()
    accelerator.wait_for_everyone()
    if main and start >= end:  # nothing to train: finish what a run killed after its last checkpoint left undone
        prune_checkpoints(out / CHECKPOINTS, cfg.keep_checkpoints)
        if _exported_step(out) != start:
            _export(out, net_cfg, _ema_weights(net, ema), data, cfg, start, time.time() - t0)
    return out


def _exported_step(out: Path) -> int | None:
    """The step of the generator exported in `out` (None if none)."""
    path = out / CONFIG_NAME
    return read_json(path, "remove it to export it again").get("step") if path.exists() else None


def _export(out: Path, net_cfg: GeneratorConfig, weights: dict, data, cfg: GeneratorTrainConfig, step: int,
            wall_s: float) -> None:
    save_generator(out, net_cfg, weights, data, train=dataclasses.asdict(cfg), gauge=cfg.gauge, step=step,
                   wall_s=wall_s)
