"""The image base model: a small text-to-image diffusion model of our own, on diffusers' code path.

A diffusers `UNet2DConditionModel` in pixel space (RGB, `size` px) or on the latents of a small
AutoencoderKL of its own, conditioned by cross-attention on the token embeddings of the subject's name
from the text encoder the project already ships (all-MiniLM-L6-v2), trained with diffusers' DDPM noise
schedule on one style set, sampled with DDIM and classifier-free guidance. It is the base the style
LoRAs adapt, as Stable Diffusion is in the paper.

    oral images train-base --config configs/image-base-emoji-latent-wide.yaml   # the shipped one: copied; else trained (resumable)
    base = ImageBase.from_pretrained(dir)                            # the exported model
    images = base.sample(["cat face", "red apple"], seed=0)          # (2, 3, S, S) in [-1, 1]

Files of a trained base (OUT/): unet/ (diffusers' save_pretrained: config.json and safetensors,
the EMA weights), scheduler/ (diffusers' DDPMScheduler config), image_base.json (the text encoder,
the size, the style set, the step), loss.csv, samples.png (held-out subjects), checkpoints/<step>/.

With `vae_channels` set (configs/image-base-emoji-latent.yaml) the base is a latent one, laid out as Stable
Diffusion is: an AutoencoderKL of our own is trained first (OUT/vae/, its loss log in vae/training.json,
checkpoints-vae/<step>/), then the UNet learns its latents; sampling decodes them, and a style LoRA learns
the latents of its style's pictures (ImageBase.encode / decode), as on a Stable Diffusion pipeline.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from oral.conditions import DEFAULT_TEXT_ENCODER, TextEncoder
from oral.image.data import load_style_set, style_set
from oral.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    load_safetensors,
    read_json,
    remove_debris,
)
from oral.models import (
    IMAGE_BASE_META,
    IMAGE_BASE_UNET,
    is_diffusers_pipeline,
    is_image_base,
)
from oral.paths import oral_home
from oral.progress import progress_bar
from oral.training import (
    SCHEDULES,
    lr_at,
    resolve_device,
    restore_ema,
    resume,
    save_checkpoint,
    set_lr,
    step_rng,
)

log = logging.getLogger(__name__)

META_NAME = IMAGE_BASE_META
UNET_DIR = IMAGE_BASE_UNET
SCHEDULER_DIR = "scheduler"
CHECKPOINTS = "checkpoints"
VAE_DIR = "vae"  # a latent base's autoencoder (diffusers' save_pretrained), as in a Stable Diffusion pipeline
VAE_META = "training.json"  # beside it: its recipe and loss log
VAE_CHECKPOINTS = "checkpoints-vae"
SAMPLES_NAME = "samples.png"  # held-out subjects drawn by the final model
SAMPLE_COUNT = 16


class ImageBaseError(ValueError):
    """A bad image-base config, or a dir that holds no trained image base."""


@dataclass
class ImageBaseConfig:
    """How the image base model is built and trained (configs/image-base-emoji.yaml)."""

    style: str = "emoji-google"  # the style set it learns to draw (oral.image.data.STYLE_SETS)
    size: int = 32  # pixels a side
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # per UNet level; attention on all but the first
    layers_per_block: int = 1
    head_dim: int = 8  # attention head size
    norm_groups: int = 16
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_tokens: int = 16  # the name's token embeddings, padded or cut to this many
    steps: int = 6000
    batch_size: int = 16
    lr: float = 3.0e-4
    warmup_steps: int = 200
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.999  # diffusers' EMAModel
    cond_dropout: float = 0.1  # share of names replaced by the empty one (classifier-free guidance)
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # v: under the cosine schedule, epsilon prediction at high noise never set the pictures' low
    # frequencies (sampled means 0.04 against the data's 0.54; scripts/image_base_check.py)
    prediction_type: str = "v_prediction"
    # Min-SNR-gamma loss weighting (Hang et al. 2023): each timestep's loss weighted by min(SNR, gamma) over
    # the target's own SNR scale, so the many easy low-noise steps stop dominating the gradient. None: plain MSE.
    snr_gamma: float | None = None
    # The autoencoder (diffusers' AutoencoderKL, trained first, frozen): the UNet then denoises its latents,
    # (latent_channels, size / 2^(len(vae_channels) - 1)) a side, as Stable Diffusion's does
    # (configs/image-base-emoji-latent.yaml). None: pixels.
    vae_channels: list[int] | None = None
    vae_latent_channels: int = 8
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_lr: float = 1.0e-3
    vae_kl_weight: float = 1.0e-6  # the KL term keeps the latents near N(0, 1) without blurring them
    vae_styles: list[str] | None = None  # the style sets it learns to encode (None: the base's own)
    limit: int | None = None  # train on the first N subjects only (tests)
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 1
    log_every: int = 50
    sample_steps: int = 50  # DDIM steps of the exported sample grid
    sample_guidance: float = 3.0
    device: str = "auto"

    def __post_init__(self) -> None:
        style_set(self.style)  # unknown names fail here
        if self.vae_channels is None and self.size % 2 ** (len(self.channels) - 1):
            raise ImageBaseError(f"size {self.size} must be divisible by 2^{len(self.channels) - 1} "
                                 f"(one halving per UNet level after the first)")
        if any(c % self.norm_groups for c in self.channels):
            raise ImageBaseError(f"every channel count ({self.channels}) must be divisible by norm_groups={self.norm_groups}")
        if self.schedule not in SCHEDULES:
            raise ImageBaseError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ImageBaseError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ImageBaseError(f"snr_gamma must be positive (5 is the usual value) or null, got {self.snr_gamma}")
        if self.vae_channels is not None:
            for name in self.vae_styles or []:
                style_set(name)
            if self.size % 2 ** (len(self.vae_channels) - 1):
                raise ImageBaseError(f"size {self.size} must be divisible by 2^{len(self.vae_channels) - 1} "
                                     f"(one halving per autoencoder level after the first)")
            if any(c % self.norm_groups for c in self.vae_channels):
                raise ImageBaseError(f"every vae channel count ({self.vae_channels}) must be divisible by "
                                     f"norm_groups={self.norm_groups}")
            if self.latent_size % 2 ** (len(self.channels) - 1):
                raise ImageBaseError(f"the latents' side {self.latent_size} (size {self.size} halved "
                                     f"{len(self.vae_channels) - 1} times by the autoencoder) must be divisible by "
                                     f"2^{len(self.channels) - 1} (one halving per UNet level after the first)")

    @property
    def latent_size(self) -> int:
        """The side of what the UNet denoises: the pictures', or the autoencoder's latents'."""
        return self.size if self.vae_channels is None else self.size // 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return 3 if self.vae_channels is None else self.vae_latent_channels


def build_unet(cfg: ImageBaseConfig, text_dim: int = 384):
    """The UNet: plain ResNet blocks at full size, cross-attention to the name at every smaller level; on
    pixels, or on the autoencoder's latents."""
    from diffusers import UNet2DConditionModel

    levels = len(cfg.channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=text_dim, attention_head_dim=cfg.head_dim, norm_num_groups=cfg.norm_groups,
    )


def build_scheduler(cfg: ImageBaseConfig):
    from diffusers import DDPMScheduler

    # pictures live in [-1, 1], so a predicted picture is clipped there; latents do not (unit variance, as
    # Stable Diffusion's, whose schedulers do not clip either)
    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=cfg.vae_channels is None)


# -----------------------------------------------------------------------------
# The name as the UNet reads it


class NameEncoder:
    """Names -> (n, text_tokens, dim) token embeddings of the text encoder and (n, text_tokens) masks."""

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, tokens: int = 16):
        self.encoder = TextEncoder(name)
        self.tokens = tokens
        self.dim = self.encoder.dim

    @torch.no_grad()
    def __call__(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder.model.encode(names, output_value="token_embeddings", show_progress_bar=False)
        emb = torch.zeros(len(names), self.tokens, self.dim)  # (n, L, dim)
        mask = torch.zeros(len(names), self.tokens, dtype=torch.bool)  # (n, L)
        for i, e in enumerate(out):
            k = min(len(e), self.tokens)
            emb[i, :k] = e[:k].float().cpu()
            mask[i, :k] = True
        return emb, mask


# -----------------------------------------------------------------------------
# Training


# What a trained base depends on: its config less where and how verbosely it ran.
NOT_RECIPE = ("device", "save_every", "keep_checkpoints", "log_every", "sample_steps", "sample_guidance")


def recipe(cfg: ImageBaseConfig | dict) -> dict:
    """The fields of an image-base config that decide the trained weights (JSON-normalised)."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg) if isinstance(cfg, ImageBaseConfig) else cfg))
    # snr_gamma unset, and a pixel base's vae_* fields, are how bases trained before those fields existed were
    # trained: leave them out, so their checkpoints still resume
    pixels = d.get("vae_channels") is None
    return {k: v for k, v in d.items() if k not in NOT_RECIPE and not (k == "snr_gamma" and v is None)
            and not (pixels and k.startswith("vae_"))}


def autoencoder_recipe(cfg: ImageBaseConfig) -> dict:
    """The fields that decide the autoencoder's weights (its data, shape, seed and lr schedule)."""
    return {k: v for k, v in recipe(cfg).items()
            if k.startswith("vae_") or k in ("style", "size", "limit", "norm_groups", "seed", "warmup_steps",
                                             "min_lr_ratio")}


def build_autoencoder(cfg: ImageBaseConfig):
    """diffusers' AutoencoderKL: one ResNet block per level, a halving between levels."""
    from diffusers import AutoencoderKL

    levels = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(cfg.vae_channels),
                         layers_per_block=1, latent_channels=cfg.vae_latent_channels, norm_num_groups=cfg.norm_groups,
                         sample_size=cfg.size)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    """Pictures (n, 3, S, S) -> the means of `vae`'s latents (n, C, s, s) on the CPU, before any scaling."""
    return torch.cat([vae.encode(images[i:i + batch].to(device)).latent_dist.mean.cpu()
                      for i in range(0, len(images), batch)])


def train_autoencoder(out: Path, cfg: ImageBaseConfig, device: torch.device, stop_at: int | None = None):
    """Train (or resume, or load when done) the autoencoder of a latent base into OUT/vae; returns it in
    eval mode, its `scaling_factor` set so the training pictures' latents have unit variance (as SD's).

    L1 reconstruction plus `vae_kl_weight` KL, on the training subjects of `vae_styles`; checkpoints under
    OUT/checkpoints-vae. stop_at: stop after this step (a checkpoint is written there), as if interrupted."""
    from diffusers import AutoencoderKL

    key = autoencoder_recipe(cfg)
    meta_path = out / VAE_DIR / VAE_META
    if meta_path.is_file() and read_json(meta_path, f"remove {out / VAE_DIR}").get("recipe") == key:
        log.info("image base: the autoencoder in %s is trained; reusing it", out / VAE_DIR)
        return AutoencoderKL.from_pretrained(out / VAE_DIR).to(device).eval()
    styles = cfg.vae_styles or [cfg.style]
    images = torch.cat([load_style_set(name, cfg.size, split="train", limit=cfg.limit)[0] for name in styles])
    log.info("image base: autoencoder on %d pictures of %s", len(images), ", ".join(styles))
    torch.manual_seed(cfg.seed)
    vae = build_autoencoder(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    start, state, _ = resume(out / VAE_CHECKPOINTS, vae, opt, key,
                             fix=f"resume with the same config, or give a new --out than {out}")
    rows = state.get("loss_log", [])
    end = cfg.vae_steps if stop_at is None else min(cfg.vae_steps, stop_at)
    t0 = time.time() - (rows[-1]["wall_s"] if rows else 0.0)
    bar = progress_bar(range(start, end), initial=start, total=cfg.vae_steps, desc="train autoencoder")
    for step in bar:
        done = step + 1
        rng = step_rng(cfg.seed + 1, step)
        x = images[torch.randint(0, len(images), (cfg.vae_batch_size,), generator=rng)].to(device)  # (B, 3, S, S)
        lr = lr_at(done, lr=cfg.vae_lr, warmup_steps=min(cfg.warmup_steps, cfg.vae_steps // 10),
                   total_steps=cfg.vae_steps, schedule="cosine", min_lr_ratio=cfg.min_lr_ratio)
        set_lr(opt, lr)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=rng).to(device)
        recon = (vae.decode(z).sample - x).abs().mean()
        loss = recon + cfg.vae_kl_weight * posterior.kl().mean()
        if not math.isfinite(loss.item()):
            raise ImageBaseError(f"the autoencoder's loss became {loss.item()} at step {done}; lower vae_lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if done % cfg.log_every == 0 or done == end:
            rows.append({"step": done, "l1": round(recon.item(), 6), "lr": lr, "wall_s": round(time.time() - t0, 1)})
            bar.set_postfix(l1=f"{recon.item():.4f}")
        if done % cfg.save_every == 0 or done == end:
            save_checkpoint(out / VAE_CHECKPOINTS, done, vae, opt, key, state={"loss_log": rows},
                            keep=cfg.keep_checkpoints)
    bar.close()
    vae.eval()
    if end < cfg.vae_steps:
        return vae
    vae.register_to_config(scaling_factor=float(1 / encode_latents(vae, images, device).std()))
    with atomic_dir(out / VAE_DIR, overwrite=True) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        atomic_write_text(tmp / VAE_META, json.dumps({"recipe": key, "styles": styles, "steps": cfg.vae_steps,
                                                       "wall_s": rows[-1]["wall_s"] if rows else 0.0,
                                                       "loss_log": rows}, indent=1) + "\n")
    return vae


def train_image_base(out: str | Path, cfg: ImageBaseConfig | None = None, stop_at: int | None = None,
                     use_bundled: bool = True) -> Path:
    """Train (or resume) the image base model into `out`; returns `out`.

    use_bundled: when `out` holds nothing yet and the package ships a base trained by this very recipe
    (BUNDLED), copy that one instead of spending the hours again. stop_at: stop after this step (a
    checkpoint is written there), as if interrupted."""
    from diffusers.training_utils import EMAModel

    cfg = cfg or ImageBaseConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_debris(out)
    if use_bundled and stop_at is None and not (out / META_NAME).is_file() and not (out / CHECKPOINTS).exists() \
            and bundled_recipe() == recipe(cfg):
        log.info("image base: the package ships this recipe's base; copying %s (retrain: use_bundled=False)", BUNDLED)
        return copy_image_base(BUNDLED, out, cfg.device)
    device = resolve_device(cfg.device)

    # 1) data: the style set's training subjects and their names' embeddings (the empty name: the null condition)
    images, names = load_style_set(cfg.style, cfg.size, split="train", limit=cfg.limit)
    encoder = NameEncoder(cfg.text_encoder, cfg.text_tokens)
    emb, mask = encoder(names + [""])  # (N + 1, L, dim), (N + 1, L)
    null_emb, null_mask = emb[-1:], mask[-1:]
    emb, mask = emb[:-1], mask[:-1]
    log.info("image base: %d subjects of %s at %d px", len(names), cfg.style, cfg.size)

    # (a latent base: the autoencoder first, then the UNet learns its latents, encoded once)
    if cfg.vae_channels is not None:
        vae = train_autoencoder(out, cfg, device)
        images = encode_latents(vae, images, device) * vae.config.scaling_factor  # (N, C, s, s)

    # 2) model, optimizer, EMA, noise schedule
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, encoder.dim).to(device)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(cfg)
    run_key = {k: v for k, v in recipe(cfg).items() if k != "steps"}
    start, state, extra = resume(out / CHECKPOINTS, unet, opt, run_key, tensors=("ema",),
                                 fix=f"resume with the same config, or give a new --out than {out}")
    if state:
        restore_ema(ema, unet, extra["ema"], start)
    rows = state.get("loss_log", [])

    images, emb, mask = images.to(device), emb.to(device), mask.to(device)
    null_emb, null_mask = null_emb.to(device), null_mask.to(device)
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    t0 = time.time() - (rows[-1]["wall_s"] if rows else 0.0)
    bar = progress_bar(range(start, end), initial=start, total=cfg.steps, desc="train image base")
    for step in bar:
        done = step + 1
        rng = step_rng(cfg.seed, step)
        # 3) a batch: pictures, their names (some replaced by the empty name), noise at random timesteps
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=rng)
        x0 = images[idx.to(device)]  # (B, C, s, s): pictures, or latents
        drop = (torch.rand(cfg.batch_size, generator=rng) < cfg.cond_dropout).to(device)  # (B,)
        c = torch.where(drop[:, None, None], null_emb, emb[idx.to(device)])  # (B, L, dim)
        m = torch.where(drop[:, None], null_mask, mask[idx.to(device)])  # (B, L)
        noise = torch.randn(x0.shape, generator=rng).to(device)
        t = torch.randint(0, cfg.train_timesteps, (cfg.batch_size,), generator=rng).to(device)
        x_t = scheduler.add_noise(x0, noise, t)
        target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[cfg.prediction_type]
        # 4) the loss, one optimizer step, EMA
        lr = lr_at(done, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, schedule=cfg.schedule,
                   min_lr_ratio=cfg.min_lr_ratio)
        set_lr(opt, lr)
        pred = unet(x_t, t, encoder_hidden_states=c, encoder_attention_mask=m).sample  # (B, C, s, s)
        loss = denoising_loss(pred, target, t, scheduler, cfg.prediction_type, cfg.snr_gamma)
        if not math.isfinite(loss.item()):
            raise ImageBaseError(f"the loss became {loss.item()} at step {done}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(unet.parameters())
        if done % cfg.log_every == 0 or done == end:
            rows.append({"step": done, "loss": round(loss.item(), 6), "lr": lr, "wall_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if done % cfg.save_every == 0 or done == end:
            weights = {n: s for (n, _), s in zip(unet.named_parameters(), ema.shadow_params)}
            save_checkpoint(out / CHECKPOINTS, done, unet, opt, run_key, state={"loss_log": rows},
                            tensors={"ema": weights}, keep=cfg.keep_checkpoints)
            _export(out, cfg, encoder.dim, weights, scheduler, done, time.time() - t0, rows)
    bar.close()
    if start >= end and not (out / META_NAME).is_file():  # a run killed after its last checkpoint
        weights = {n: s for (n, _), s in zip(unet.named_parameters(), ema.shadow_params)}
        _export(out, cfg, encoder.dim, weights, scheduler, start, time.time() - t0, rows)
    if end == cfg.steps and (start < end or not (out / SAMPLES_NAME).is_file()):
        _, held_out = load_style_set(cfg.style, cfg.size, split="test")
        write_sample_grid(ImageBase.from_pretrained(out, cfg.device), out / SAMPLES_NAME, held_out[:SAMPLE_COUNT],
                          cfg.sample_steps, cfg.sample_guidance)
    return out


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, scheduler, prediction_type: str,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """The MSE of a batch's predictions, each picture's weighted by Min-SNR-gamma when `snr_gamma` is set:
    min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v, / 1 for the sample itself (weights <= 1)."""
    if snr_gamma is None:
        return torch.nn.functional.mse_loss(pred, target)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)  # (B,)
    clipped = snr.clamp(max=snr_gamma)
    weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    per_picture = (pred - target).pow(2).flatten(1).mean(1)  # (B,)
    return (per_picture * weight).mean()


def _export(out: Path, cfg: ImageBaseConfig, text_dim: int, weights: dict, scheduler, step: int, wall_s: float,
            rows: list[dict]) -> None:
    """OUT/unet, OUT/scheduler, OUT/image_base.json (last: a reader never sees a half-written base), loss.csv.
    (A latent base's OUT/vae is written once, by train_autoencoder.)"""
    unet = build_unet(cfg, text_dim)
    unet.load_state_dict({k: v.detach().cpu() for k, v in weights.items()})
    with atomic_dir(out / UNET_DIR, overwrite=True) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    with atomic_dir(out / SCHEDULER_DIR, overwrite=True) as tmp:
        scheduler.save_pretrained(tmp)
    atomic_write_text(out / "loss.csv", "step,loss,lr,wall_s\n" + "".join(
        f"{r['step']},{r['loss']},{r['lr']},{r['wall_s']}\n" for r in rows))
    meta = {"format": "oral-image-base", "step": step, "wall_s": round(wall_s, 1), "style": cfg.style,
            "size": cfg.size, "text_encoder": cfg.text_encoder, "text_tokens": cfg.text_tokens,
            "train": dataclasses.asdict(cfg)}
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")


# -----------------------------------------------------------------------------
# The base shipped in the package

BUNDLED = Path(__file__).resolve().parents[1] / "pretrained" / "image-base-emoji-google"
BUNDLE_FILES = (META_NAME, f"{UNET_DIR}/config.json", f"{UNET_DIR}/diffusion_pytorch_model.safetensors",
                f"{SCHEDULER_DIR}/scheduler_config.json")
VAE_FILES = (f"{VAE_DIR}/config.json", f"{VAE_DIR}/diffusion_pytorch_model.safetensors")  # a latent base's too


def base_files(path: Path) -> tuple[str, ...]:
    """The inference files of the base in `path`: BUNDLE_FILES, and VAE_FILES when its recipe has an autoencoder."""
    meta = read_json(path / META_NAME, f"train {path} again") if (path / META_NAME).is_file() else {}
    return BUNDLE_FILES + (VAE_FILES if (meta.get("train") or {}).get("vae_channels") else ())


def bundled_recipe() -> dict | None:
    """The training recipe of the base the package ships, or None when this install ships none."""
    if not all((BUNDLED / f).is_file() for f in base_files(BUNDLED)):
        return None
    return recipe(read_json(BUNDLED / META_NAME, f"reinstall oral; {BUNDLED} is damaged")["train"])


def copy_image_base(src: str | Path, out: str | Path, device: str = "cpu", card: str | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Copy a trained base's inference files (unet/, scheduler/, image_base.json, vae/ of a latent base; no
    checkpoints) into `out`, the metadata last so a reader never sees half a base, then draw its held-out sample
    grid there (or, with `card`, write the card as README.md instead: the package's copy). `dtype`: store the
    weights so (the package's copy: float16, half the bytes); `ImageBase.from_pretrained` reads them back as
    float32. Returns `out`."""
    import shutil

    from safetensors.torch import save as safetensors_bytes

    src, out = Path(src), Path(out)
    files = base_files(src)
    missing = [f for f in files if not (src / f).is_file()]
    if missing:
        raise ImageBaseError(f"{src} is not a complete image base (no {', '.join(missing)}); train it with "
                             f"`{BUILD_COMMAND} --out {src}`")
    out.mkdir(parents=True, exist_ok=True)
    for sub in sorted({f.split("/")[0] for f in files if "/" in f}):
        with atomic_dir(out / sub, overwrite=True) as tmp:
            for f in files:
                if not f.startswith(f"{sub}/"):
                    continue
                if dtype is not None and f.endswith(".safetensors"):
                    weights = load_safetensors(src / f, f"train {src} again")
                    (tmp / Path(f).name).write_bytes(safetensors_bytes(
                        {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()},
                        metadata={"format": "pt"}))
                else:
                    shutil.copyfile(src / f, tmp / Path(f).name)
    meta = read_json(src / META_NAME, f"train {src} again")
    if card is not None:
        atomic_write_text(out / "README.md", card)
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if card is None:
        _, held_out = load_style_set(meta["style"], meta["size"], split="test")
        train = meta["train"]
        write_sample_grid(ImageBase.from_pretrained(out, device), out / SAMPLES_NAME, held_out[:SAMPLE_COUNT],
                          train.get("sample_steps", 50), train.get("sample_guidance", 3.0))
    return out


# -----------------------------------------------------------------------------
# Sampling


class ImageBase:
    """A text-to-image base model as style LoRAs see it: its UNet, noise schedule and name encoder, and the
    space the UNet denoises in. An image base of ours (`oral images train-base`) denoises pixels; a diffusers
    Stable Diffusion pipeline dir (model_index.json + unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    denoises its VAE's latents, the names read by its CLIP text encoder."""

    def __init__(self, path: Path, meta: dict, unet, scheduler_config: dict, names, device: torch.device, vae=None):
        self.path, self.meta, self.unet, self.scheduler_config = path, meta, unet, scheduler_config
        self.names, self.device, self.vae = names, device, vae
        self.size = int(meta["size"])  # pixels a side
        train = meta.get("train") or {}
        self.style: str | None = meta.get("style")  # the style set it was trained on (None: a pipeline's own)
        self.cond_dropout = float(train.get("cond_dropout", 0.1))
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        self.channels = int(unet.config.in_channels)  # of the space the UNet denoises
        self.model_size = int(unet.config.sample_size)  # its side

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> ImageBase:
        from diffusers import DDIMScheduler, UNet2DConditionModel

        path = Path(path)
        if is_diffusers_pipeline(path):
            return cls._from_pipeline(path, device)
        if not (path / META_NAME).is_file():
            raise ImageBaseError(f"{path} holds no trained image base ({META_NAME} is missing); train one with "
                                 f"`{BUILD_COMMAND}` (copied from the package in seconds), or "
                                 "give a diffusers pipeline dir (model_index.json, unet/, vae/, text_encoder/)")
        meta = read_json(path / META_NAME, f"train it again with `oral images train-base --out {path}`")
        dev = resolve_device(device)
        # float32 whatever the files hold (the package's copy stores float16)
        unet = UNet2DConditionModel.from_pretrained(path / UNET_DIR, torch_dtype=torch.float32).to(dev).eval()
        scheduler_config = dict(DDIMScheduler.load_config(path / SCHEDULER_DIR))
        vae = None
        if (path / VAE_DIR).is_dir():  # a latent base
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(path / VAE_DIR, torch_dtype=torch.float32).to(dev).eval()
        return cls(path, meta, unet, scheduler_config, NameEncoder(meta["text_encoder"], meta["text_tokens"]), dev,
                   vae=vae)

    @classmethod
    def _from_pipeline(cls, path: Path, device: str) -> ImageBase:
        """A Stable Diffusion-style pipeline dir: UNet on VAE latents, CLIP text encoder and tokenizer."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / d).is_dir()]
        if missing:
            raise ImageBaseError(f"{path} is a diffusers pipeline without {', '.join(missing)}/; style LoRAs need a "
                                 "text-to-image pipeline laid out like Stable Diffusion's")
        dev = resolve_device(device)
        unet = UNet2DConditionModel.from_pretrained(path / "unet").to(dev).eval()
        vae = AutoencoderKL.from_pretrained(path / "vae").to(dev).eval()
        names = PipelineNameEncoder(AutoTokenizer.from_pretrained(path / "tokenizer"),
                                    CLIPTextModel.from_pretrained(path / "text_encoder").to(dev).eval())
        scheduler_config = dict(DDIMScheduler.load_config(path / "scheduler"))
        size = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
        meta = {"format": "diffusers-pipeline", "size": size, "style": None, "text_encoder": str(path / "text_encoder")}
        return cls(path, meta, unet, scheduler_config, names, dev, vae=vae)

    def noise_scheduler(self):
        """The training noise schedule (DDPM) of the base."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Pictures (n, 3, size, size) in [-1, 1] -> what the UNet denoises (the pictures themselves, or latents)."""
        if self.vae is None:
            return images
        return encode_latents(self.vae, images, self.device, batch) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """The inverse of `encode`: (n, 3, size, size) in [-1, 1]."""
        if self.vae is None:
            return x.clamp(-1, 1).cpu()
        scale = self.vae.config.scaling_factor
        return torch.cat([self.vae.decode(x[i:i + batch].to(self.device) / scale).sample.clamp(-1, 1).cpu()
                          for i in range(0, len(x), batch)])

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int = 50, guidance: float = 3.0, seed: int = 0,
               unet=None) -> torch.Tensor:
        """Pictures of `prompts`: (n, 3, S, S) in [-1, 1]; DDIM, classifier-free guidance (1: none).
        unet: another UNet to sample with (the same one with a LoRA loaded)."""
        from diffusers import DDIMScheduler

        unet = unet or self.unet
        sched = DDIMScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(steps)
        n = len(prompts)
        emb, mask = self.names(list(prompts) + [""])
        cond = torch.cat([emb[:n], emb[n:].expand(n, -1, -1)]).to(self.device)  # (2n, L, dim)
        cmask = torch.cat([mask[:n], mask[n:].expand(n, -1)]).to(self.device)  # (2n, L)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.channels, self.model_size, self.model_size, generator=g).to(self.device)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            if guidance == 1.0:  # no guidance: the conditional prediction alone, half the work
                pred = unet(x, t, encoder_hidden_states=cond[:n], encoder_attention_mask=cmask[:n]).sample
            else:
                c, u = unet(torch.cat([x, x]), t, encoder_hidden_states=cond, encoder_attention_mask=cmask).sample.chunk(2)
                pred = u + guidance * (c - u)
            x = sched.step(pred, t, x).prev_sample
        return self.decode(x)


class PipelineNameEncoder:
    """Names -> a pipeline's CLIP token embeddings (n, max_length, dim), padded as the pipeline pads them,
    with an all-true mask (Stable Diffusion's UNet reads every position)."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.dim = text_encoder.config.hidden_size

    @torch.no_grad()
    def __call__(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(names, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        emb = self.text_encoder(ids.to(self.text_encoder.device))[0].float().cpu()  # (n, L, dim)
        return emb, torch.ones(emb.shape[:2], dtype=torch.bool)


def image_grid(images: torch.Tensor, labels: list[str] | None = None, columns: int = 8, scale: int = 2) -> bytes:
    """PNG bytes: images (n, 3, S, S) in [-1, 1] on a grid, each scaled up `scale` times, a label under each."""
    from PIL import Image, ImageDraw

    n, _, S, _ = images.shape
    cell, text_h = S * scale, 12 if labels else 0
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # (n, S, S, 3)
    for i in range(n):
        im = Image.fromarray(pixels[i].numpy()).resize((cell, cell), Image.Resampling.NEAREST)
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        grid.paste(im, (x, y))
        if labels:
            draw.text((x + 1, y + cell), labels[i][: cell // 6], fill="black")
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def write_sample_grid(base: ImageBase, out: str | Path, prompts: list[str], steps: int = 50, guidance: float = 3.0,
                      seed: int = 0, unet=None) -> Path:
    """Sample `prompts` (with `unet`, e.g. the base's with a style LoRA, if given) as a labelled grid PNG at `out`."""
    out = Path(out)
    atomic_write_bytes(out, image_grid(base.sample(prompts, steps, guidance, seed, unet=unet), prompts))
    return out


DEFAULT_BASE = "emoji-google-latent-wide"  # the image base the style experiment adapts, under $ORAL_HOME/image-bases
BUILD_COMMAND = (f"oral images train-base --config configs/image-base-emoji-latent-wide.yaml "
                 f"--out $ORAL_HOME/image-bases/{DEFAULT_BASE}")  # builds it


def list_image_bases() -> list[dict]:
    """The image bases built under $ORAL_HOME/image-bases (what `oral models` lists), or, when none is,
    one row saying how to build the default one."""
    root = oral_home() / "image-bases"
    rows = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not is_image_base(d):
            continue
        meta = read_json(d / META_NAME, f"remove {d} and build it again: {BUILD_COMMAND}")
        weights = d / UNET_DIR / "diffusion_pytorch_model.safetensors"
        n = sum(t.numel() for t in load_safetensors(weights, f"remove {d} and build it again").values()) \
            if weights.is_file() else 0
        space = "latent" if (d / VAE_DIR).is_dir() else "pixel"
        rows.append({"name": str(d), "architecture": "UNet2DConditionModel", "num_params": n,
                     "description": f"text-to-image base, {meta['size']} px, {meta['style']}, {space} space, "
                                    f"{meta['train'].get('prediction_type', 'epsilon')}, step {meta['step']}",
                     "source": f"built by `oral images train-base` ({meta['style']}, {space} space, "
                               f"{meta['step']} steps)",
                     "path": str(d)})
    if not rows:
        shipped = bundled_recipe() is not None
        rows.append({"name": str(root / DEFAULT_BASE), "architecture": "UNet2DConditionModel", "num_params": 0,
                     "description": "text-to-image base (not installed)" if shipped else "text-to-image base (not built)",
                     "source": f"shipped in the package: `{BUILD_COMMAND}` copies it here in seconds" if shipped
                     else f"not built: `{BUILD_COMMAND}` (~65 min on two CPU threads)", "path": None})
    return rows
