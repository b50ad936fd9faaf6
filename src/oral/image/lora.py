"""Style LoRAs: PEFT LoRA on the image base model's attention, trained per style set into a zoo.

A style is the image domain's task: the base model draws Google's emoji; a style LoRA makes it draw the
same subjects in another house style (Twitter's, Apple's, ...), asked for in words ("flat pastel emoji in
the Twitter style"). Each run trains on the style set's training subjects with the base's own diffusion
loss and keeps its last checkpoints in a zoo exactly as language-model runs are kept (oral.zoo: the same
manifest records, the same PEFT adapter dirs), so the generator reads both domains by one code path.
Each kept dir also holds the adapter in the layout diffusers loads:

    unet.load_lora_adapter(dir, weight_name="pytorch_lora_weights.safetensors", prefix="unet")

    train_style_lora(base_dir, "emoji-twitter", rank=4, out_dir=zoo)   # `oral images train-style`

The base is an image base of ours or a diffusers Stable Diffusion-style pipeline dir (`oral.image.base.ImageBase`
reads both): on a pipeline the pictures are encoded once by its VAE and the names read by its CLIP text encoder.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from oral.image.base import ImageBase
from oral.image.data import load_style_set, style_set
from oral.io import append_jsonl, atomic_dir
from oral.lora import KEY_PREFIX, LoraSpec, load_adapter
from oral.models import weights_fingerprint
from oral.progress import progress_bar
from oral.training import (
    SCHEDULES,
    lr_at,
    resolve_device,
    resume,
    save_checkpoint,
    set_lr,
    step_rng,
)
from oral.zoo import Zoo, clean_run_dir, run_id_for, step_dirname, try_lock

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' load_lora_weights / load_lora_adapter read
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as diffusers' LoRA trainers adapt them


class StyleLoraError(ValueError):
    """A style-LoRA run that cannot work as asked."""


class RunBusy(StyleLoraError):
    """The run is being trained by another process (it holds the run's lock)."""


@dataclass
class StyleLoraConfig:
    """Hyperparameters of one style-LoRA run (shared by every run of a style zoo)."""

    steps: int = 400
    keep: int = 10  # checkpoints kept: the last `keep` saves
    save_every: int = 1
    batch_size: int = 16
    lr: float = 1.0e-3
    warmup_steps: int = 20
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    alpha: float | None = None  # None -> 2 * rank
    targets: list[str] = field(default_factory=lambda: list(UNET_TARGETS))
    limit: int | None = None  # train on the first N subjects only (tests)
    eval_limit: int = 64  # held-out subjects whose denoising loss scores the final checkpoint
    checkpoint_every: int = 50  # steps between training checkpoints a stopped run resumes from; 0: none
    device: str = "auto"

    def __post_init__(self) -> None:
        if min(self.steps, self.keep, self.save_every, self.batch_size) < 1:
            raise StyleLoraError("steps, keep, save_every and batch_size must all be >= 1")
        if self.schedule not in SCHEDULES:
            raise StyleLoraError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.targets:
            raise StyleLoraError(f"targets is empty: name the UNet modules to adapt, e.g. {','.join(UNET_TARGETS)}")

    def save_steps(self) -> list[int]:
        steps = [self.steps - i * self.save_every for i in range(self.keep)]
        return sorted(s for s in steps if s >= 1)

    def identity(self) -> dict:
        """The fields that change a run's weights."""
        d = dataclasses.asdict(self)
        for k in ("eval_limit", "checkpoint_every", "device"):
            d.pop(k)
        return d


# -----------------------------------------------------------------------------
# The diffusers layout


def save_diffusers_lora(out: Path, spec: LoraSpec, state: Mapping[str, torch.Tensor]) -> Path:
    """Write a UNet adapter (a PEFT state) into the dir `out` as diffusers' pytorch_lora_weights.safetensors:
    keys `unet.<module>.lora_A.weight`, its LoraConfig in the metadata. Returns the file."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    layers = {k.removeprefix(KEY_PREFIX): state[k].detach().cpu().contiguous() for k in spec.keys()}
    config = spec.lora_config().to_dict()
    config["target_modules"] = sorted(config["target_modules"] or [])
    StableDiffusionLoraLoaderMixin.save_lora_weights(out, unet_lora_layers=layers, unet_lora_adapter_metadata=config,
                                                     safe_serialization=True)
    return out / DIFFUSERS_WEIGHTS


def load_style_unet(base: ImageBase, adapter_dir: str | Path, adapter_name: str = "style"):
    """A copy of the base's UNet with the adapter in `adapter_dir` loaded the diffusers way."""
    import copy

    unet = copy.deepcopy(base.unet)
    unet.load_lora_adapter(str(adapter_dir), weight_name=DIFFUSERS_WEIGHTS, prefix="unet", adapter_name=adapter_name)
    return unet.eval()


# -----------------------------------------------------------------------------
# One run


@torch.no_grad()
def denoising_loss(unet, scheduler, images: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor,
                   prediction_type: str, seed: int = 0, batch: int = 32) -> float:
    """The mean diffusion loss on `images` at fixed noise and timesteps (the same draws for every adapter)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=g)
    total = 0.0
    for i in range(0, len(images), batch):
        x0, n, tt = images[i:i + batch], noise[i:i + batch], t[i:i + batch]
        dev = next(unet.parameters()).device
        x_t = scheduler.add_noise(x0, n, tt)
        target = {"epsilon": n, "sample": x0, "v_prediction": scheduler.get_velocity(x0, n, tt)}[prediction_type]
        pred = unet(x_t.to(dev), tt.to(dev), encoder_hidden_states=emb[i:i + batch].to(dev),
                    encoder_attention_mask=mask[i:i + batch].to(dev)).sample.cpu()
        total += float(torch.nn.functional.mse_loss(pred, target, reduction="sum"))
    return total / images.numel()


def train_style_lora(base_dir: str | Path, style: str, rank: int = 4, seed: int = 0, *, out_dir: str | Path,
                     cfg: StyleLoraConfig | None = None, stop_at: int | None = None) -> list[Path]:
    """Train one style LoRA on the image base at `base_dir` (or finish a stopped run) into the zoo `out_dir`.

    Returns the kept checkpoint dirs, oldest first (the last is the final one); a run done before is not
    trained again. stop_at: stop after this step (a training checkpoint is written), as if interrupted."""
    cfg = cfg or StyleLoraConfig()
    s = style_set(style)
    device = resolve_device(cfg.device)
    zoo = Zoo(out_dir)
    base_id = str(Path(base_dir).resolve())
    run_id = run_id_for(base_id, s.name, rank, seed, cfg)
    run_dir = zoo.root / "runs" / run_id
    save_steps = cfg.save_steps()
    kept = [run_dir / step_dirname(x) for x in save_steps]
    with try_lock(zoo.root / "locks" / f"{run_id}.lock") as locked:
        if not locked:
            raise RunBusy(f"run {run_id} is being trained by another process")
        recorded = {r["step"]: r for r in zoo.all_records() if r["run_id"] == run_id}
        if any(r.get("final") for r in recorded.values()):
            return kept
        base = ImageBase.from_pretrained(base_dir, device=str(device))  # only for a run to train: a grid skips done ones fast
        if s.name == base.style:
            raise StyleLoraError(f"the base already draws {style}; train a LoRA for another style set")
        clean_run_dir(zoo, run_id, set(recorded))

        # 1) data: the style's training subjects (its held-out ones score the run), names encoded once
        # (a pipeline's UNet denoises its VAE's latents: the pictures are encoded once)
        images, names = load_style_set(s.name, base.size, split="train", limit=cfg.limit)
        val_images, val_names = load_style_set(s.name, base.size, split="test", limit=cfg.eval_limit)
        images, val_images = base.encode(images), base.encode(val_images)
        emb, mask = base.names(names + [""])
        null_emb, null_mask = emb[-1:], mask[-1:]
        emb, mask = emb[:-1], mask[:-1]
        val_emb, val_mask = base.names(val_names)
        scheduler = base.noise_scheduler()
        alpha = cfg.alpha if cfg.alpha is not None else 2.0 * rank
        common = {"run_id": run_id, "domain": "image", "base": base_id, "lineage": [],
                  "base_fingerprint": weights_fingerprint(base.unet), "task": s.name, "task_key": s.name,
                  "rank": rank, "alpha": alpha, "targets": list(cfg.targets), "seed": seed, "train": cfg.identity()}
        base_val = {"metric": "denoise-mse", "n": len(val_names),
                    "value": denoising_loss(base.unet, scheduler, val_images, val_emb, val_mask, base.prediction_type)}

        # 2) a fresh LoRA on the attention projections (PEFT's init, seeded); the base frozen
        torch.manual_seed(seed)
        lcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(cfg.targets), bias="none")
        model = get_peft_model(base.unet, lcfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        ckpt_root, run_key = run_dir / "checkpoints", {"run_id": run_id}
        start, state, _ = resume(ckpt_root, model, opt, run_key, fix=f"remove {ckpt_root} to train the run again")
        wall_before = state.get("wall_s", 0.0)
        t0 = time.time() - wall_before
        end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        bar = progress_bar(range(start + 1, end + 1), initial=start, total=cfg.steps, desc=f"{s.name}/r{rank}/s{seed}")
        for step in bar:
            # 3) a seeded batch: pictures, names (some replaced by the empty one), noise, timesteps
            model.train()
            rng = step_rng(seed, step)
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=rng)
            drop = torch.rand(cfg.batch_size, generator=rng) < base.cond_dropout  # (B,)
            c = torch.where(drop[:, None, None], null_emb, emb[idx])  # (B, L, dim)
            m = torch.where(drop[:, None], null_mask, mask[idx])  # (B, L)
            x0 = images[idx]  # (B, 3, S, S)
            noise = torch.randn(x0.shape, generator=rng)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=rng)
            x_t = scheduler.add_noise(x0, noise, t)
            target = {"epsilon": noise, "sample": x0,
                      "v_prediction": scheduler.get_velocity(x0, noise, t)}[base.prediction_type]
            set_lr(opt, lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                              schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio))
            pred = model(x_t.to(device), t.to(device), encoder_hidden_states=c.to(device),
                         encoder_attention_mask=m.to(device)).sample
            loss = torch.nn.functional.mse_loss(pred, target.to(device))
            if not math.isfinite(loss.item()):
                raise StyleLoraError(f"run {run_id}: loss became {loss.item()} at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            # 4) a kept checkpoint (PEFT dir + the diffusers file), then its manifest record
            if step in save_steps and (step not in recorded or step == cfg.steps):
                rel = Path("runs") / run_id / step_dirname(step)
                with atomic_dir(zoo.root / rel, overwrite=True) as tmp:
                    model.save_pretrained(tmp)
                    save_diffusers_lora(tmp, *load_adapter(tmp))
                record = {**common, "step": step, "path": rel.as_posix(), "final": step == cfg.steps,
                          "train_loss": round(loss.item(), 6), "lr": lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                                                           total_steps=cfg.steps, schedule=cfg.schedule,
                                                                           min_lr_ratio=cfg.min_lr_ratio),
                          "time": dt.datetime.now(dt.timezone.utc).isoformat()}
                if step == cfg.steps:
                    model.eval()
                    record["val_metric"] = {"metric": "denoise-mse", "n": len(val_names), "value": denoising_loss(
                        model, scheduler, val_images, val_emb, val_mask, base.prediction_type)}
                    record["base_val_metric"] = base_val
                    record["wall_s"] = round(time.time() - t0, 2)
                append_jsonl(zoo.manifest, record)
            # 5) a training checkpoint to resume from
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps) or \
                    (step == end and end < cfg.steps):
                save_checkpoint(ckpt_root, step, model, opt, run_key, {"wall_s": time.time() - t0})
        bar.close()
        if end == cfg.steps:
            shutil.rmtree(ckpt_root, ignore_errors=True)
    return kept
