"""Diffusion over weight tokens: DDPM noise for training, DDIM or DDPM for sampling (diffusers).

T = 1000, linear betas 1e-4 .. 0.02 (as RPG); the denoiser predicts x0 by default (RPG predicts
the noise; both, and v, are a config switch). Padding values of a token are masked out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler

# denoise(x_t: (M, D), t: (M,) long) -> the prediction (M, D): x0, the noise or v, per prediction_type
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("ddim", "ddpm")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000  # T
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    # What the denoiser predicts: "sample" (x0; ours, default), "epsilon" (RPG) or "v_prediction".
    # Measured on a tiny zoo, 300 steps: eps-prediction had not yet learned the small-t regime
    # (samples 13x too large), x0-prediction gave adapters whose updates point the way of the
    # zoo's for the prompted task (cosine 0.75-0.91). See docs/RESULTS.md.
    prediction_type: str = "sample"


class Diffusion:
    """The noise schedule, the training loss and the samplers."""

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config or DiffusionConfig()
        c = self.config
        # Normalized weight tokens are not bounded to [-1, 1]: never clip.
        self.scheduler = DDPMScheduler(
            num_train_timesteps=c.num_train_timesteps,
            beta_start=c.beta_start,
            beta_end=c.beta_end,
            beta_schedule=c.beta_schedule,
            prediction_type=c.prediction_type,
            clip_sample=False,
        )
        if c.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {c.prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")

    # --- training -----------------------------------------------------------

    def add_noise(
        self, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x0 (M, D) -> (x_t (M, D), t (M,) long, target (M, D)); one random timestep per token.

        The target is what the denoiser must predict: the noise, x0, or v, per `prediction_type`.
        """
        M = x0.shape[0]
        t = torch.randint(0, self.config.num_train_timesteps, (M,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        if self.config.prediction_type == "epsilon":
            target = noise
        elif self.config.prediction_type == "sample":
            target = x0
        else:
            target = self.scheduler.get_velocity(x0, noise, t)
        return x_t, t, target

    @staticmethod
    def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the prediction over real values only; pred, target, mask: (M, D)."""
        err = (pred - target).pow(2) * mask
        return err.sum() / mask.sum().clamp_min(1)

    def loss(
        self, denoise: DenoiseFn, x0: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Masked prediction MSE. x0, mask: (M, D); padding is zeroed and left out of the loss."""
        x_t, t, target = self.add_noise(torch.where(mask, x0, torch.zeros_like(x0)), generator)
        return self.masked_mse(denoise(x_t, t), target, mask)

    # --- sampling -----------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        denoise: DenoiseFn,
        shape: tuple[int, int],
        steps: int = 60,
        sampler: str = "ddim",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        init: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Draw x0 of `shape` (M, D) from noise in `steps` denoising steps; deterministic given `generator`.

        init (M, D), strength in [0, 1]: start from `init` instead of pure noise (SDEdit, diffusers'
        img2img): `init` is noised to the timestep `strength` of the way up the schedule and only the
        last round(steps * strength) steps run. strength 1 is sampling from noise, 0 returns `init`.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        T = self.config.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and {T}, got {steps}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        if init is not None and tuple(init.shape) != tuple(shape):
            raise ValueError(f"init has shape {tuple(init.shape)}, the sample {tuple(shape)}")
        if sampler == "ddim":
            sched = DDIMScheduler.from_config(self.scheduler.config, clip_sample=False, set_alpha_to_one=True)
        else:
            sched = DDPMScheduler.from_config(self.scheduler.config, clip_sample=False)
        sched.set_timesteps(steps)
        timesteps = sched.timesteps
        x = torch.randn(shape, generator=generator).to(device)
        if init is not None and strength < 1.0:
            timesteps = timesteps[steps - round(steps * strength):]
            if len(timesteps) == 0:
                return init.to(device).clone()
            x = sched.add_noise(init.to(device), x, timesteps[:1])
        for t in timesteps:
            tt = torch.full((shape[0],), int(t), dtype=torch.long, device=device)
            pred = denoise(x, tt)
            if sampler == "ddim":
                x = sched.step(pred, t, x, eta=eta, generator=generator).prev_sample
            else:
                x = sched.step(pred, t, x, generator=generator).prev_sample
        return x
