"""Diffusion over weight tokens: DDPM noise for training, DDIM or DDPM for sampling (diffusers).

eps-prediction, T = 1000, linear betas 1e-4 .. 0.02 (as RPG). Padding values of a token are
masked out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler

# eps_fn(x_t: (M, D), t: (M,) long) -> eps: (M, D)
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("ddim", "ddpm")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000  # T
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"


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
            prediction_type="epsilon",
            clip_sample=False,
        )

    # --- training -----------------------------------------------------------

    def loss(
        self, eps_fn: EpsFn, x0: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Masked eps-prediction MSE. x0, mask: (M, D); one random timestep per token."""
        M = x0.shape[0]
        x0 = torch.where(mask, x0, torch.zeros_like(x0))
        t = torch.randint(0, self.config.num_train_timesteps, (M,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        eps = eps_fn(x_t, t)
        err = (eps - noise).pow(2) * mask
        return err.sum() / mask.sum().clamp_min(1)

    # --- sampling -----------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        eps_fn: EpsFn,
        shape: tuple[int, int],
        steps: int = 60,
        sampler: str = "ddim",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Draw x0 of `shape` (M, D) from noise in `steps` denoising steps; deterministic given `generator`."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        T = self.config.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and {T}, got {steps}")
        if sampler == "ddim":
            sched = DDIMScheduler.from_config(self.scheduler.config, clip_sample=False, set_alpha_to_one=True)
        else:
            sched = DDPMScheduler.from_config(self.scheduler.config, clip_sample=False)
        sched.set_timesteps(steps)
        x = torch.randn(shape, generator=generator).to(device)
        for t in sched.timesteps:
            tt = torch.full((shape[0],), int(t), dtype=torch.long, device=device)
            eps = eps_fn(x, tt)
            if sampler == "ddim":
                x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
            else:
                x = sched.step(eps, t, x, generator=generator).prev_sample
        return x
