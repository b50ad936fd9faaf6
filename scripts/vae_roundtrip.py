"""How well does a latent image base's autoencoder give back each style's pictures? Held-out subjects of
each style set through the base's `vae/` and back, judged as `oral images eval-base` judges drawings.

    python scripts/vae_roundtrip.py $ORAL_HOME/image-bases/emoji-google-latent emoji-twitter openmoji-line

A latent base draws no better than its autoencoder gives back a picture, and a style LoRA on it no better
than the autoencoder gives back that style: this is the floor of each style's FID-ours on that base
(docs/RESULTS.md, "The image base"). Columns: PSNR on [0, 1] pixels, FID-ours of the round trip against
the real pictures (oral.image.quality.round_trip, as eval-base's vae-psnr and vae-fid-ours), and the
judge's style accuracy on the real pictures and on the round trip.
"""

import argparse
from pathlib import Path

from oral.image.base import ImageBase
from oral.image.data import StyleSetError, load_style_set, style_set
from oral.image.judge import Judge
from oral.image.quality import round_trip
from oral.paths import expand_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="a latent image base dir (one with vae/)")
    p.add_argument("styles", nargs="+", help="style set names (`oral images list`)")
    p.add_argument("--judge", default="$ORAL_HOME/image-judges/styles8-32", help="the judge dir")
    p.add_argument("--subjects", type=int, default=128, help="held-out subjects per style")
    args = p.parse_args()
    try:
        for name in args.styles:
            style_set(name)
    except StyleSetError as e:
        raise SystemExit(str(e)) from None
    base = ImageBase.from_pretrained(Path(expand_path(args.base)))
    if base.vae is None:
        raise SystemExit(f"{args.base} has no vae/: give a latent base (one trained with vae_channels set)")
    judge = Judge.from_pretrained(Path(expand_path(args.judge)))
    print("| style | PSNR (dB) | FID-ours | style-acc real | style-acc round trip |\n|---|---|---|---|---|")
    for style in args.styles:
        real, _ = load_style_set(style, base.size, "test", limit=args.subjects)
        real_feats, real_style, _ = judge.predict(real)
        trip = round_trip(base, judge, real, real_feats)
        index = judge.styles.index(style) if style in judge.styles else None  # a judge knows the styles it trained on
        acc = ["-" if index is None else f"{float((pred == index).double().mean()):.3f}"
               for pred in (real_style, trip["style"])]
        print(f"| {style} | {trip['psnr']:.2f} | {trip['fid-ours']:.1f} | {acc[0]} | {acc[1]} |")


if __name__ == "__main__":
    main()
