"""How well an image base draws its own style set: `oral images eval-base --base DIR`.

The base draws the first `subjects` training subjects and the first `subjects` held-out ones (names it
never saw) from one seed, and each set of drawings is set beside the real pictures of the same subjects:

- fid-ours, kid-ours: FID's and KID's formulas on the judge's features (oral.image.judge), drawings vs
  the real pictures (lower is closer);
- style-acc: the share of drawings the judge puts in the base's own style;
- subject-acc: the share whose subject category (Smileys, Animals, Food, ...) the judge reads right;
  the same judge on the real pictures gives the ceiling (`real-subject-acc`);
- vae-psnr, vae-fid-ours (latent bases): the real pictures through the base's autoencoder and back, against
  the real pictures: the floor the drawings cannot beat;
- match@1, match@5: is the drawing of a subject nearest (pixel L2) to that subject's real picture
  among the real pictures of all the drawn subjects (chance: 1/n and 5/n)? A base that draws the
  asked subject scores high on training subjects; on held-out ones only what the name implies can match.

    report = evaluate_base(ImageBase.from_pretrained(dir), Judge.from_pretrained(judge_dir))
    bundle_base(dir, report)    # the package's copy (oral.image.base.BUNDLED) with this report in its card
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from oral.image.base import ImageBase, ImageBaseError, image_grid, recipe
from oral.image.data import style_set
from oral.image.judge import Judge, frechet_distance, kernel_distance

SPLITS = ("train", "test")
GRID_SUBJECTS = 16  # columns of the real-over-drawn grid per split


def match_at(drawn: torch.Tensor, real: torch.Tensor, k: int) -> float:
    """Share of drawings i whose real picture i is among the k nearest real pictures (pixel L2)."""
    d = torch.cdist(drawn.flatten(1).double(), real.flatten(1).double())  # (n, n)
    nearest = d.topk(min(k, len(real)), largest=False).indices  # (n, k)
    return float((nearest == torch.arange(len(drawn))[:, None]).any(1).double().mean())


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def round_trip(base: ImageBase, judge: Judge, real: torch.Tensor, real_feats: torch.Tensor | None = None) -> dict:
    """Real pictures through a latent base's autoencoder and back: {"psnr" (on [0, 1] pixels), "fid-ours"
    (against the real pictures), "style": the judge's style prediction per picture}."""
    back = base.decode(base.encode(real))
    mse = float(((back - real) / 2).pow(2).mean())
    feats, style, _ = judge.predict(back)
    if real_feats is None:
        real_feats = judge.predict(real)[0]
    return {"psnr": 10 * math.log10(1 / max(mse, 1e-12)), "fid-ours": frechet_distance(feats, real_feats),
            "style": style}


def evaluate_base(base: ImageBase, judge: Judge, subjects: int = 128, steps: int = 25, guidance: float = 1.0,
                  seed: int = 0) -> dict:
    """{"config": ..., "train": {measure: value}, "test": {...}}, plus the pictures for a grid under "_shown"."""
    from oral.image.data import load_style_set

    if base.style is None:
        raise ImageBaseError(f"{base.path} names no style set of its own (a diffusers pipeline); eval-base judges "
                             "a base trained by `oral images train-base`")
    style = judge.style_index(base.style)
    report: dict = {"config": {"base": str(base.path), "style": base.style, "subjects": subjects, "steps": steps,
                               "guidance": guidance, "seed": seed, "judge_created": judge.meta.get("created")},
                    "_shown": {}}
    for split in SPLITS:
        real, names = load_style_set(base.style, base.size, split, limit=subjects)
        drawn = base.sample(names, steps=steps, guidance=guidance, seed=seed)  # (n, 3, S, S)
        feats, style_pred, cat_pred = judge.predict(drawn)
        real_feats, _, real_cat = judge.predict(real)
        report[split] = {
            "n": len(names),
            "fid-ours": round(frechet_distance(feats, real_feats), 4),
            "kid-ours": round(kernel_distance(feats, real_feats), 6),
            "style-acc": round(float((style_pred == style).double().mean()), 4),
            "subject-acc": _round(judge.subject_accuracy(cat_pred, names, base.style)),
            "real-subject-acc": _round(judge.subject_accuracy(real_cat, names, base.style)),
            "match@1": round(match_at(drawn, real, 1), 4),
            "match@5": round(match_at(drawn, real, 5), 4),
            "chance@1": round(1 / len(names), 4),
        }
        if base.vae is not None:  # a latent base draws no better than its autoencoder gives back the real pictures
            trip = round_trip(base, judge, real, real_feats)
            report[split]["vae-psnr"] = round(trip["psnr"], 2)
            report[split]["vae-fid-ours"] = round(trip["fid-ours"], 4)
        report["_shown"][split] = (real[:GRID_SUBJECTS], drawn[:GRID_SUBJECTS], names[:GRID_SUBJECTS])
    return report


def report_grid(report: dict) -> bytes:
    """PNG bytes: per split, the real pictures above the base's drawings of the same subjects."""
    rows, labels = [], []
    for split, (real, drawn, names) in report["_shown"].items():
        rows += [real, drawn]
        labels += [f"{split} real: {n}" if i == 0 else n for i, n in enumerate(names)]
        labels += [f"{split} drawn" if i == 0 else "" for i in range(len(names))]
    columns = max(len(r) for r in rows)
    return image_grid(torch.cat(rows), labels, columns=columns, scale=3)


def format_report(report: dict) -> str:
    cfg = report["config"]
    measures = [k for k in report["train"] if k != "n"]  # a latent base's rows also carry vae-*
    lines = [f"{cfg['base']} drawing {cfg['style']}: {cfg['steps']} DDIM steps, guidance {cfg['guidance']}, "
             f"seed {cfg['seed']}", "", "| subjects | n | " + " | ".join(measures) + " |",
             "|---|---|" + "---|" * len(measures)]
    for split in SPLITS:
        r = report[split]
        cells = ["" if r[m] is None else f"{r[m]:.4g}" for m in measures]
        lines.append(f"| {'training' if split == 'train' else 'held-out'} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(base: ImageBase, report: dict) -> str:
    """The README.md of the package's copy of a base: what it is, how it was trained, what it draws."""
    meta, train = base.meta, base.meta["train"]
    report = {**report, "config": {**report["config"], "base": Path(report["config"]["base"]).name}}  # no local path
    n = sum(p.numel() for p in base.unet.parameters())
    space = "pixel space" if base.vae is None else (
        f"on the {base.channels} x {base.model_size} x {base.model_size} latents of its own AutoencoderKL "
        f"({sum(p.numel() for p in base.vae.parameters()) / 1e6:.2f} M parameters, channels {train['vae_channels']})")
    return "\n".join([
        f"# oral image base: {meta['style']}, {meta['size']} px",
        "",
        f"A text-to-image diffusion model of {n / 1e6:.2f} M parameters (diffusers `UNet2DConditionModel`, {space}, "
        f"channels {train['channels']}) that draws the {meta['style']} style set from a subject's name, read "
        f"by {meta['text_encoder']} (token embeddings, cross-attention). It is the base the style LoRAs of "
        "`oral images train-style` adapt and `oral generate --base` writes adapters for.",
        "",
        "## Training",
        f"- {meta['step']} steps, batch {train['batch_size']}, lr {train['lr']} ({train['schedule']}), EMA "
        f"{train['ema_decay']}, {train['prediction_type']}, Min-SNR gamma {train.get('snr_gamma')}, "
        f"{train['beta_schedule']} betas, {train['cond_dropout']:.0%} of names dropped (classifier-free guidance); "
        f"{meta['wall_s']:.0f} s of training on CPU",
        "- the style set's training subjects only (a tenth of the names, chosen by a hash, are held out)",
        *([] if base.vae is None else [
            f"- its autoencoder: {train['vae_steps']} steps on the training subjects of "
            + ", ".join(f"{s} ({style_set(s).license})" for s in train.get("vae_styles") or [meta["style"]])]),
        "- rebuild: the recipe below as a YAML file, then `oral images train-base --config FILE --retrain` (without "
        "--retrain that command copies this base)",
        "",
        "```yaml",
        yaml.safe_dump(recipe(train), sort_keys=True, default_flow_style=None).rstrip(),
        "```",
        "",
        "## Measured (`oral images eval-base`)",
        "",
        format_report(report),
        "",
        "fid-ours / kid-ours: FID's and KID's formulas on the features of the project's judge (a small classifier "
        "trained on the style sets), not Inception's; subject-acc: the judge reads the subject's category; "
        "match@k: the drawing's nearest real pictures (pixel L2) include the subject's own.",
        "",
        "## Limits",
        f"- {meta['size']} px and {n / 1e6:.1f} M parameters: compare its subject accuracy and match@k above with "
        "the real pictures' before relying on it to draw a named subject.",
        f"- Trained on {meta['style']} pictures ({style_set(meta['style']).license}).",
        "",
    ])


def bundle_base(base_dir, report: dict, out=None):
    """Copy a trained base into the package (oral.image.base.BUNDLED, or `out`), its weights stored as float16,
    with its model card."""
    from oral.image.base import BUNDLED, copy_image_base

    base = ImageBase.from_pretrained(base_dir)
    return copy_image_base(base_dir, BUNDLED if out is None else out, card=model_card(base, report), dtype=torch.float16)
