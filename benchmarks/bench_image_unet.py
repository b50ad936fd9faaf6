"""Time one training step of candidate image-base UNets: pixel space at 32 px, or latents at 16 or 8 px.

    python benchmarks/bench_image_unet.py --threads 2 --batch 16

The shapes are those `oral.image.base.build_unet` builds (plain first level, cross-attention to 16 name
tokens of width 384 below it). Prints one JSON line per candidate: parameters and seconds a step (AdamW,
the mean of 3 steps after one warm-up). Run it on an idle machine: on shared cores the numbers measure
the load.
"""

import argparse
import json
import time

import torch

CANDIDATES = [  # (name, side, in_channels, channels)
    ("pixel 32 px [32, 64, 64]", 32, 3, [32, 64, 64]),
    ("latent 16 px [64, 128, 128]", 16, 4, [64, 128, 128]),
    ("latent 16 px [32, 64, 128]", 16, 4, [32, 64, 128]),
    ("latent 8 px [64, 128, 128]", 8, 8, [64, 128, 128]),
    ("latent 8 px [128, 256]", 8, 8, [128, 256]),
]


def step_seconds(side: int, in_channels: int, channels: list[int], batch: int) -> tuple[int, float]:
    from oral.image.base import ImageBaseConfig, build_unet

    vae = None if in_channels == 3 else [32] * (1 + (32 // side).bit_length() - 1)
    cfg = ImageBaseConfig(size=32, channels=channels, vae_channels=vae, vae_latent_channels=in_channels)
    unet = build_unet(cfg)
    x, c = torch.randn(batch, in_channels, side, side), torch.randn(batch, cfg.text_tokens, 384)
    t = torch.randint(0, 1000, (batch,))
    opt = torch.optim.AdamW(unet.parameters())
    for i in range(4):
        if i == 1:
            t0 = time.perf_counter()
        loss = unet(x, t, encoder_hidden_states=c).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sum(p.numel() for p in unet.parameters()), (time.perf_counter() - t0) / 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, side, in_channels, channels in CANDIDATES:
        params, seconds = step_seconds(side, in_channels, channels, args.batch)
        print(json.dumps({"unet": name, "params": params, "s_per_step": round(seconds, 3), "batch": args.batch,
                          "threads": args.threads}), flush=True)


if __name__ == "__main__":
    main()
