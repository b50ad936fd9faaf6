"""How well does a latent image base's autoencoder give back each style's pictures? Held-out subjects of
each style set through the base's `vae/` and back, judged as `oral images eval-base` judges drawings.

    python scripts/vae_roundtrip.py $ORAL_HOME/image-bases/emoji-google-latent emoji-twitter openmoji-line

A latent base draws no better than its autoencoder gives back a picture, and a style LoRA on it no better
than the autoencoder gives back that style: this is the floor of each style's FID-ours on that base
(docs/RESULTS.md, "The image base"). Columns: PSNR on [0, 1] pixels, FID-ours of the round trip against
the real pictures, and the judge's style accuracy on the real pictures and on the round trip.
"""

import argparse
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from oral.image.base import VAE_DIR, encode_latents
from oral.image.data import load_style_set
from oral.image.judge import Judge, frechet_distance
from oral.paths import expand_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="a latent image base dir (one with vae/)")
    p.add_argument("styles", nargs="+", help="style set names (`oral images list`)")
    p.add_argument("--judge", default="$ORAL_HOME/image-judges/emoji-32", help="the judge dir")
    p.add_argument("--subjects", type=int, default=128, help="held-out subjects per style")
    args = p.parse_args()
    vae_dir = Path(expand_path(args.base)) / VAE_DIR
    if not vae_dir.is_dir():
        raise SystemExit(f"{vae_dir} does not exist: give a latent base (one trained with vae_channels set)")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    judge = Judge.from_pretrained(Path(expand_path(args.judge)))
    print("| style | PSNR (dB) | FID-ours | style-acc real | style-acc round trip |\n|---|---|---|---|---|")
    for style in args.styles:
        real, _ = load_style_set(style, vae.config.sample_size or 32, "test", limit=args.subjects)
        with torch.no_grad():
            back = vae.decode(encode_latents(vae, real, torch.device("cpu"))).sample.clamp(-1, 1)
        mse = float(((back - real) / 2).pow(2).mean())
        real_feats, real_style, _ = judge.predict(real)
        feats, style_pred, _ = judge.predict(back)
        index = judge.styles.index(style) if style in judge.styles else None  # a judge knows the styles it trained on
        acc = ["-" if index is None else f"{float((pred == index).double().mean()):.3f}" for pred in (real_style, style_pred)]
        print(f"| {style} | {10 * math.log10(1 / max(mse, 1e-12)):.2f} | {frechet_distance(feats, real_feats):.1f} "
              f"| {acc[0]} | {acc[1]} |")


if __name__ == "__main__":
    main()
