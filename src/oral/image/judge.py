"""The judge of generated pictures: a small classifier trained here on the style sets, and the measures
read from it.

FID and KID are defined on Inception-v3 features, and no Inception, CLIP or other pretrained image
weights install offline. The stand-in is ours and named as such: a small CNN trained on every style
set's training subjects to tell (a) which style set a picture comes from and (b) its subject's
Unicode category ("Smileys & Emotion", "Animals & Nature", ...), learnt only from the sets whose
subjects have one (StyleSet.categories == "unicode": the emoji sets; not pixel-icons, and not
clipart, whose folders are another label space). Its penultimate features replace
Inception's pool features in the Frechet distance ("FID-ours") and the kernel inception distance
("KID-ours"); its two heads give the style accuracy (is a picture drawn in the asked style?) and
the subject accuracy (is it still the asked subject, to its category?). Numbers are comparable
with each other, never with published FID.

    judge = train_judge(out_dir, JudgeConfig())          # `oral images train-judge`, minutes on a CPU
    judge = Judge.from_pretrained(out_dir)
    feats = judge.features(images)                       # images (N, 3, S, S) in [-1, 1] -> (N, F)
    frechet_distance(feats, reference_feats), kernel_distance(feats, reference_feats)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from oral.image.data import STYLE_SETS, categories_of, fetch_style_set, load_style_set, style_set
from oral.io import atomic_dir, atomic_write_json, load_safetensors, read_json
from oral.progress import progress_bar
from oral.training import lr_at, set_lr, step_rng

log = logging.getLogger(__name__)

DEFAULT_JUDGE = "$ORAL_HOME/image-judges/styles8-32"
# The default judge's styles: every style set the style experiment draws. The earlier judge of the emoji and
# OpenMoji sets only: `oral images train-judge --out $ORAL_HOME/image-judges/emoji-32 "styles=[<the first six>]"`.
JUDGE_STYLES = ("emoji-google", "emoji-twitter", "emoji-apple", "emoji-facebook", "openmoji-color", "openmoji-line",
                "pixel-icons", "clipart")
WEIGHTS = "judge.safetensors"
META = "judge.json"


class JudgeError(ValueError):
    """A judge that cannot be trained or loaded as asked."""


@dataclass
class JudgeConfig:
    """How the judge is trained (`oral images train-judge key=value ...`)."""

    styles: list[str] = field(default_factory=lambda: list(JUDGE_STYLES))  # the classes of the style head
    size: int = 32
    width: int = 32  # channels of the first block; doubled at each of the two downsamplings
    features: int = 64  # the penultimate width: the features FID-ours and KID-ours are computed on
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2.0e-3
    warmup_steps: int = 100
    noise: float = 0.15  # augmentation: Gaussian noise of sd up to this (judged samples are never clean)
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.styles) < 2:
            raise JudgeError(f"the judge tells style sets apart: give at least two, got {self.styles}")
        unknown = [s for s in self.styles if s not in STYLE_SETS]
        if unknown:
            raise JudgeError(f"unknown style set(s) {unknown}; known: {', '.join(STYLE_SETS)}")


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class JudgeNet(nn.Module):
    """size x size RGB -> features (F) -> style logits and category logits (none without categories)."""

    def __init__(self, n_styles: int, n_categories: int, width: int = 32, features: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(_block(3, w, 1), _block(w, w, 1), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
                                  _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(4 * w, features), nn.SiLU())
        self.style = nn.Linear(features, n_styles)
        self.category = nn.Linear(features, n_categories) if n_categories else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.body(x)  # (N, F)
        c = self.category(f) if self.category is not None else f.new_zeros(len(f), 0)  # (N, C)
        return f, self.style(f), c


class Judge:
    """A trained judge: features, style and category predictions of pictures in [-1, 1]."""

    def __init__(self, net: JudgeNet, meta: dict):
        self.net = net.eval()
        self.meta = meta
        self.styles: list[str] = meta["styles"]
        self.categories: list[str] = meta["categories"]
        self.size: int = meta["config"]["size"]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Judge:
        path = Path(path)
        if not (path / META).is_file() or not (path / WEIGHTS).is_file():
            raise JudgeError(f"{path} is not a trained judge ({META} + {WEIGHTS}); build one with "
                             f"`oral images train-judge --out {path}`")
        meta = read_json(path / META, f"remove {path} and train the judge again")
        cfg = meta["config"]
        net = JudgeNet(len(meta["styles"]), len(meta["categories"]), cfg["width"], cfg["features"])
        net.load_state_dict(load_safetensors(path / WEIGHTS, f"remove {path} and train the judge again"))
        return cls(net, meta)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (N, F), style index (N,), category index (N,), -1 for a judge without categories);
        pictures of another size are resized to the judge's by area first."""
        if images.shape[-1] != self.size:
            images = torch.nn.functional.interpolate(images, size=(self.size, self.size), mode="area")
        outs = [self.net(images[i:i + batch]) for i in range(0, len(images), batch)]
        f, s, c = (torch.cat(parts) for parts in zip(*outs))
        cats = c.argmax(-1) if c.shape[-1] else torch.full((len(c),), -1)
        return f.double(), s.argmax(-1), cats

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)[0]

    def style_index(self, style: str) -> int:
        if style not in self.styles:
            raise JudgeError(f"the judge was not trained on {style} (it knows {', '.join(self.styles)}); "
                             f"train it again with styles=[...,{style}]")
        return self.styles.index(style)

    def category_indices(self, subjects: list[str], style: str | None = None) -> torch.Tensor:
        """Each subject's category index: -1 where the judge has no such category, and for every subject of
        a style whose categories it did not learn (style given: pixel-icons', clipart's)."""
        return _category_indices(self.meta, subjects, style)

    def subject_accuracy(self, category_pred: torch.Tensor, subjects: list[str], style: str | None = None
                         ) -> float | None:
        """The share of pictures whose predicted category is their subject's, over the subjects the judge has
        a category for; None when it has none (a style without Unicode categories)."""
        cats = self.category_indices(subjects, style)  # (N,), -1: no category
        known = cats >= 0
        return float((category_pred[known] == cats[known]).double().mean()) if known.any() else None


def _category_indices(meta: dict, subjects: list[str], style: str | None = None) -> torch.Tensor:
    if style is not None and style not in meta.get("category_styles", meta["styles"]):
        return torch.full((len(subjects),), -1)
    cats, categories = meta["subject_categories"], meta["categories"]
    return torch.tensor([categories.index(cats[s]) if cats.get(s) in categories else -1 for s in subjects],
                        dtype=torch.long)


def _data(cfg: JudgeConfig, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every style's pictures of `split`: images (N, 3, S, S), style labels (N,), subject names."""
    xs, ys, names = [], [], []
    for i, style in enumerate(cfg.styles):
        fetch_style_set(style)
        x, n = load_style_set(style, cfg.size, split)
        xs.append(x)
        ys.append(torch.full((len(x),), i))
        names += n
    return torch.cat(xs), torch.cat(ys), names


def _category_labels(meta: dict, y_style: torch.Tensor, names: list[str]) -> torch.Tensor:
    """(N,) each picture's category index; -1 (neither learnt from nor scored) for a picture of a style
    without Unicode categories."""
    y = torch.full((len(names),), -1)
    for i, style in enumerate(meta["styles"]):
        at = (y_style == i).nonzero().flatten().tolist()
        if at:
            y[at] = _category_indices(meta, [names[j] for j in at], style)
    return y


def train_judge(out: str | Path, cfg: JudgeConfig | None = None) -> Judge:
    """Train the judge on every style's training subjects, score it on the held-out subjects, write it to `out`."""
    cfg = cfg or JudgeConfig()
    out = Path(out)
    t0 = time.time()
    x, y_style, names = _data(cfg, "train")
    category_styles = [st for st in cfg.styles if style_set(st).categories == "unicode"]  # one label space
    subject_categories: dict[str, str] = {}
    for style in category_styles:
        subject_categories.update(categories_of(style))
    in_category_style = [cfg.styles[int(i)] in category_styles for i in y_style]
    categories = sorted({subject_categories[n] for n, k in zip(names, in_category_style) if k})
    meta = {"config": dataclasses.asdict(cfg), "styles": list(cfg.styles), "categories": categories,
            "category_styles": category_styles, "subject_categories": subject_categories, "train_pictures": len(x),
            "steps": cfg.steps}
    y_cat = _category_labels(meta, y_style, names)  # (N,), -1: no category to learn
    torch.manual_seed(cfg.seed)
    net = JudgeNet(len(cfg.styles), len(categories), cfg.width, cfg.features)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    bar = progress_bar(range(1, cfg.steps + 1), desc="judge")
    for step in bar:
        rng = step_rng(cfg.seed, step)
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=rng)
        xb = x[idx]
        flip = torch.rand(cfg.batch_size, generator=rng) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        sd = torch.rand(cfg.batch_size, 1, 1, 1, generator=rng) * cfg.noise
        xb = xb + sd * torch.randn(xb.shape, generator=rng)
        set_lr(opt, lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, schedule="cosine",
                          min_lr_ratio=0.05))
        net.train()
        _, s_logits, c_logits = net(xb)
        loss = loss_fn(s_logits, y_style[idx])
        known = y_cat[idx] >= 0  # (B,) pictures of a style with categories
        if known.any():
            loss = loss + loss_fn(c_logits[known], y_cat[idx][known])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    judge = Judge(net, meta)
    # held-out subjects (never trained on): how well the judge itself does, per style
    vx, vy, vnames = _data(cfg, "test")
    _, s_pred, c_pred = judge.predict(vx)
    v_cat = _category_labels(meta, vy, vnames)
    known = v_cat >= 0
    meta["heldout"] = {"pictures": len(vx), "style_acc": round(float((s_pred == vy).float().mean()), 4),
                       "category_acc": round(float((c_pred[known] == v_cat[known]).float().mean()), 4)
                       if known.any() else None,  # None: no held-out picture of a style with categories
                       "style_acc_per_set": {s: round(float((s_pred[vy == i] == i).float().mean()), 4)
                                             for i, s in enumerate(cfg.styles)}}
    meta["wall_s"] = round(time.time() - t0, 1)
    meta["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_dir(out, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS))
        atomic_write_json(tmp / META, meta)
    return judge


# -----------------------------------------------------------------------------
# Distances between sets of features


def _moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = f.double()
    return f.mean(0), torch.cov(f.T)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (FID's formula):
    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)."""
    if len(f1) < 2 or len(f2) < 2:
        raise JudgeError(f"the Frechet distance needs at least 2 pictures a side, got {len(f1)} and {len(f2)}")
    m1, s1 = _moments(f1)
    m2, s2 = _moments(f2)
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(r1 @ s2 @ r1)
    return float(((m1 - m2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * torch.trace(cross))


def kernel_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """KID's unbiased squared MMD with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3."""
    if len(f1) < 2 or len(f2) < 2:
        raise JudgeError(f"KID needs at least 2 pictures a side, got {len(f1)} and {len(f2)}")
    f1, f2 = f1.double(), f2.double()
    d = f1.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    k11, k22, k12 = k(f1, f1), k(f2, f2), k(f1, f2)
    m, n = len(f1), len(f2)
    return float((k11.sum() - k11.diagonal().sum()) / (m * (m - 1)) + (k22.sum() - k22.diagonal().sum()) / (n * (n - 1))
                 - 2 * k12.mean())
