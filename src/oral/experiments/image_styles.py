"""`oral experiment image-styles --config configs/exp-image-styles.yaml`: style LoRAs on the image base,
trained vs generated from a held-out description, judged by our stand-in for FID.

For each style (a style set = the image domain's task) the methods draw the same held-out subjects
from the same noise: `base` (the image base as it is), `trained` (the style zoo's final checkpoint of
seed `zoo_seed`), `nearest` (retrieval: the trained LoRA of the generator's training style whose
description is nearest the request's) and `generated` (the generator's adapter for each held-out
description x sampling seed). Each set of pictures is judged against the style's real pictures of the held-out subjects by
the judge (oral.image.judge): FID-ours and KID-ours on its features (lower is closer to the style),
style accuracy (share of pictures the judge puts in the asked style) and subject accuracy (share
whose subject category the judge reads right; absent, no row, for a style whose subjects the judge has
no category for: pixel-icons, clipart). A style the generator never trained on is marked
`"seen": false` in its rows.

Resumable: generated adapters are kept under CACHE/image-styles/adapters/<hash>, each judged set's
measures in CACHE/image-styles/scores.json, so a rerun costs only what is new.

Output: OUT/exp-image-styles.json in the experiments' long row format ({"rows": [{"version": 0,
"task": style, "method", "description", "seed", "metric", "value", "n", ...}]}), exp-image-styles.md
(one table per measure) and one sample grid per free style: exp-image-styles-<style>.png (rows: the
style's real pictures, base, trained, generated; columns: held-out subjects).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from oral.evaluate import ScoreCache
from oral.experiments.compare import ExperimentError
from oral.experiments.runner import DISTANCES
from oral.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
)
from oral.paths import expand_path
from oral.progress import progress_bar

log = logging.getLogger(__name__)

METHODS = ("base", "trained", "nearest", "generated")
MEASURES = ("fid-ours", "kid-ours", "style-acc", "subject-acc")  # lower, lower, higher, higher is better
DISTANCE = DISTANCES[0]  # the memorization check: a generated update's distance to the nearest training adapter
GRID_SUBJECTS = 10  # columns of each sample grid


@dataclass
class ImageStylesConfig:
    """What the image-styles experiment measures (configs/exp-image-styles.yaml)."""

    base: str = "$ORAL_HOME/image-bases/emoji-google-latent-wide"  # the image base the style LoRAs adapt
    zoo: str = "$ORAL_HOME/zoos/styles-latent-wide-selfattn"  # the style zoo: `trained` is its final checkpoint of each style
    generator: str = "$ORAL_HOME/generators/image-styles"  # trained on the zoo (some styles may be held out of it)
    judge: str = "$ORAL_HOME/image-judges/styles8-32"  # `oral images train-judge` (scripts/image_styles.sh)
    styles: list[str] = field(default_factory=list)  # empty: every style in the zoo
    methods: list[str] = field(default_factory=lambda: list(METHODS))  # nearest, generated: need the generator
    rank: int = 4  # the zoo runs used: their rank ...
    zoo_seed: int = 0  # ... and training seed
    descriptions: int = 2  # held-out descriptions per style
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # the generator's sampling seeds per description
    gen_steps: int = 10  # the generator's DDIM steps
    snap: bool = False  # generated: a description far from every training one gets the nearest one's adapter
    subjects: int = 128  # held-out subjects drawn per method (the same names and noise for every method)
    steps: int = 25  # DDIM steps of the image base
    guidance: float = 3.0  # the image base's classifier-free guidance (3 keeps the subject on the latent base)
    sample_seed: int = 0
    device: str = "auto"  # where the image base draws (cuda when there is one)
    out: str = "docs/results"
    cache: str = "$ORAL_HOME/experiments"

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ExperimentError(f"unknown method(s) {bad} for image-styles; known: {', '.join(METHODS)}")


@dataclass
class Drawn:
    """One candidate: a method's adapter (None for the base) for a style."""

    method: str
    adapter: Path | None
    description: str | None = None
    seed: int | None = None
    info: dict = field(default_factory=dict)  # extra row fields (the nearest's style)


class ImageStyles:
    """One run of the image-styles experiment; `run()` returns the result dict and writes the files."""

    def __init__(self, cfg: ImageStylesConfig, name: str = "image-styles"):
        from oral.image.base import ImageBase
        from oral.image.judge import Judge
        from oral.zoo import Zoo

        self.cfg, self.name = cfg, name
        self.base_dir = Path(expand_path(cfg.base)).resolve()
        self.base = ImageBase.from_pretrained(self.base_dir, device=cfg.device)
        self.judge = Judge.from_pretrained(expand_path(cfg.judge))
        self.zoo = Zoo(cfg.zoo)
        records = [r for r in self.zoo.all_records() if r.get("domain") == "image" and r.get("final")
                   and r["base"] == str(self.base_dir) and r["rank"] == cfg.rank and r["seed"] == cfg.zoo_seed]
        self.trained = {r["task"]: self.zoo.root / r["path"] for r in records}
        if not self.trained and (set(cfg.methods) != {"base"} or not cfg.styles):  # the base alone needs no zoo
            raise ExperimentError(f"{self.zoo.root} holds no finished style runs on {self.base_dir} at rank {cfg.rank}, "
                                  f"seed {cfg.zoo_seed}; train them with `oral images train-style --base {cfg.base} STYLE`")
        self.styles = cfg.styles or sorted(self.trained)
        self.gen = None
        self.gen_tasks: list[str] = []
        if "generated" in cfg.methods or "nearest" in cfg.methods:
            from oral.generate import WEIGHTS_NAME, Generator

            self.gen = Generator.from_pretrained(expand_path(cfg.generator), device="cpu")
            # what its adapters are cached by: the weights, not the dir (a generator retrained in place is another)
            self.gen_digest = hashlib.sha256((self.gen.path / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]
            self.gen_tasks = sorted(self.gen.config["conditions"]["tasks"])
        self.cache_dir = Path(expand_path(cfg.cache)) / "image-styles"
        self.scores = ScoreCache(self.cache_dir / "scores.json")  # shared safely by processes (one style each)

    # --- candidates -------------------------------------------------------------

    def candidates(self, style: str) -> Iterator[Drawn]:
        from oral.image.data import style_set

        cfg = self.cfg
        if "base" in cfg.methods:
            yield Drawn("base", None)
        if "trained" in cfg.methods:
            if style not in self.trained:
                raise ExperimentError(f"no finished {style} run in {self.zoo.root} (rank {cfg.rank}, seed "
                                      f"{cfg.zoo_seed}); `oral images train-style --base {cfg.base} {style}`")
            yield Drawn("trained", self.trained[style])
        if "nearest" in cfg.methods:
            for description in style_set(style).heldout_descriptions[:cfg.descriptions]:
                near = self.gen.nearest_descriptions(description, k=1)[0]
                if near["task"] not in self.trained:
                    raise ExperimentError(f"no finished {near['task']} run in {self.zoo.root} for nearest")
                yield Drawn("nearest", self.trained[near["task"]], description,
                            info={"from_task": near["task"], "similarity": round(float(near["similarity"]), 4)})
        if "generated" in cfg.methods:
            from oral.generate import generate_adapters

            for description in style_set(style).heldout_descriptions[:cfg.descriptions]:
                for seed in cfg.seeds:
                    used = self.gen.conditioning_prompt(description, cfg.snap)  # the description itself, or snapped
                    key = hashlib.sha256(json.dumps([self.gen_digest, str(self.base_dir), used, seed,
                                                     cfg.gen_steps]).encode()).hexdigest()[:16]
                    out = self.cache_dir / "adapters" / key
                    if not (out / "adapter_config.json").is_file():
                        generate_adapters(self.gen, str(self.base_dir), used, out, seed=seed, steps=cfg.gen_steps,
                                          overwrite=True)
                    yield Drawn("generated", out, description, seed,
                                info={"conditioned_on": used} if used != description else {})

    # --- the memorization check -------------------------------------------------

    def pool(self) -> list[tuple[dict, dict]]:
        """Every kept checkpoint the generator learned from (its training styles, and its zoo seeds when it
        was given some): (record, state)."""
        from oral.lora import load_adapter

        if not hasattr(self, "_pool"):
            seeds = (self.gen.config.get("train") or {}).get("zoo_seeds") or []
            self._pool = [(r, load_adapter(self.zoo.root / r["path"])[1]) for r in self.zoo.all_records()
                          if r.get("domain") == "image" and r["base"] == str(self.base_dir)
                          and r["rank"] == self.cfg.rank and r["task"] in self.gen_tasks
                          and (not seeds or r["seed"] in seeds)]
        return self._pool

    def distance_row(self, cand: Drawn) -> dict | None:
        """A generated update's relative L2 distance to the nearest training checkpoint, and whose it is."""
        from oral.gauge import update_distance
        from oral.lora import load_adapter

        if cand.method != "generated":
            return None
        pool = self.pool()
        if not pool:
            return None
        spec, state = load_adapter(cand.adapter)
        dist, rec = min(((update_distance(spec, state, other)["rel_l2"], r) for r, other in pool), key=lambda d: d[0])
        return {"metric": DISTANCE, "value": round(dist, 6), "n": len(pool), "nearest_task": rec["task"],
                "nearest_seed": rec["seed"], "nearest_step": rec["step"]}

    # --- drawing and judging ----------------------------------------------------

    def draw(self, cand: Drawn, subjects: list[str]) -> torch.Tensor:
        from oral.image.lora import load_style_unet

        unet = load_style_unet(self.base, cand.adapter) if cand.adapter is not None else None
        return self.base.sample(subjects, steps=self.cfg.steps, guidance=self.cfg.guidance, seed=self.cfg.sample_seed,
                                unet=unet)

    def measure(self, pictures: torch.Tensor, subjects: list[str], style: str, reference: torch.Tensor) -> dict:
        """Every measure of MEASURES; subject-acc is None when the judge has no category for any subject."""
        from oral.image.judge import frechet_distance, kernel_distance

        feats, style_pred, cat_pred = self.judge.predict(pictures)
        return {"fid-ours": frechet_distance(feats, reference), "kid-ours": kernel_distance(feats, reference),
                "style-acc": float((style_pred == self.judge.style_index(style)).float().mean()),
                "subject-acc": self.judge.subject_accuracy(cat_pred, subjects, style)}

    def _score_key(self, cand: Drawn, style: str, n: int) -> list:
        """What a set of pictures and its measures depend on: base, adapter bytes, style, sampling, judge."""
        from oral.lora import adapter_digest, load_adapter

        digest = adapter_digest(load_adapter(cand.adapter)[1]) if cand.adapter is not None else "none"
        c = self.cfg
        return [str(self.base_dir), digest, style, n, c.steps, c.guidance, c.sample_seed, self.judge.meta.get("created")]

    def _draw_and_measure(self, cand: Drawn, subjects: list[str], style: str, reference: torch.Tensor,
                          kept: Path) -> dict:
        """Draw the candidate's pictures, keep the first ones for the grid, judge them all."""
        pictures = self.draw(cand, subjects)
        atomic_write_bytes(kept, safetensors_bytes({"pictures": pictures[:GRID_SUBJECTS].contiguous()}))
        return self.measure(pictures, subjects, style, reference)

    # --- the run ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from oral.image.data import load_style_set, style_set

        cfg, t0, rows = self.cfg, time.time(), []
        grids = {}
        for style in progress_bar(self.styles, desc=self.name):
            real, subjects = load_style_set(style, self.base.size, "test", limit=cfg.subjects)
            reference = self.judge.features(load_style_set(style, self.base.size, "test")[0])
            seen = style in self.gen_tasks if self.gen is not None else None
            shown = {"real": real[:GRID_SUBJECTS]}
            for cand in self.candidates(style):
                key = self._score_key(cand, style, len(subjects))
                kept = self.cache_dir / "pictures" / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.safetensors"
                measures = self.scores.get(key, functools.partial(self._draw_and_measure, cand, subjects, style,
                                                                  reference, kept))
                if cand.method not in shown and kept.is_file():
                    shown[cand.method] = load_safetensors(kept, "remove it; it is drawn again")["pictures"]
                row = {"base": str(self.base_dir), "version": 0, "task": style, "method": cand.method,
                       "description": cand.description, "seed": cand.seed, "split": "test", "seen": seen, **cand.info}
                rows += measure_rows(row, measures, len(subjects))
                distance = self.distance_row(cand)
                if distance is not None:
                    rows.append({**row, **distance})
            if style_set(style).free:
                grids[style] = (shown, subjects[:GRID_SUBJECTS])
        result = {
            "experiment": self.name,
            "config": dataclasses.asdict(cfg),
            "versions": {"0": str(self.base_dir)},
            "training": {"generator": str(self.gen.path) if self.gen is not None else None, "tasks": self.gen_tasks,
                         "zoo": str(self.zoo.root), "judge": {k: self.judge.meta.get(k) for k in ("heldout", "created")}},
            "rows": rows,
            "wall_s": round(time.time() - t0, 1),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.write(result, grids)
        return result

    def write(self, result: dict, grids: dict) -> None:
        from oral.image.base import image_grid

        out = Path(expand_path(self.cfg.out))
        atomic_write_json(out / f"exp-{self.name}.json", result)
        atomic_write_text(out / f"exp-{self.name}.md", format_tables(result))
        for style, (shown, subjects) in grids.items():
            order = [m for m in ("real", *METHODS) if m in shown]
            pictures = torch.cat([shown[m] for m in order])
            labels = [f"{m}: {s}" if i == 0 else s for m in order for i, s in enumerate(subjects)]
            atomic_write_bytes(out / f"exp-{self.name}-{style}.png",
                               image_grid(pictures, labels, columns=len(subjects), scale=3))


def measure_rows(row: dict, measures: dict, n: int) -> list[dict]:
    """One row per measure, `row`'s fields plus metric, value, n; a measure of None (subject-acc of a style
    the judge has no categories for) has no row."""
    return [{**row, "metric": metric, "value": round(value, 6), "n": n}
            for metric, value in measures.items() if value is not None]


def format_tables(result: dict) -> str:
    """One markdown table per measure: style x method, mean +- sd over descriptions x seeds."""
    import statistics

    rows = result["rows"]
    styles = list(dict.fromkeys(r["task"] for r in rows))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    seen = {r["task"]: r.get("seen") for r in rows}
    lines = []
    for metric in [*MEASURES, DISTANCE]:
        if not any(r["metric"] == metric for r in rows):
            continue
        better = "lower" if metric in ("fid-ours", "kid-ours") else "higher"
        note = (f"{better} is better" if metric != DISTANCE
                else "the memorization check: 0 = a copy of a training checkpoint")
        lines += [f"### {metric} ({note})", "", "| style | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for style in styles:
            cells = []
            for m in methods:
                v = [r["value"] for r in rows if r["task"] == style and r["method"] == m and r["metric"] == metric]
                if not v:
                    cells.append("")
                    continue
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                cells.append(f"{statistics.fmean(v):.3f}" + (f" ± {sd:.3f}" if len(v) > 1 else ""))
            label = style + (" (held out of the generator)" if seen[style] is False else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        if metric == "subject-acc":
            blank = [t for t in styles if not any(r["task"] == t and r["metric"] == metric for r in rows)]
            lines += [f"blank: the judge has no subject categories for {', '.join(blank)}", ""] if blank else []
        if metric == DISTANCE:
            near = [r["nearest_task"] for r in rows if r["metric"] == DISTANCE]
            counts = {t: near.count(t) for t in dict.fromkeys(near)}
            lines += ["nearest training style of the generated adapters: "
                      + ", ".join(f"{t} {c}" for t, c in counts.items()), ""]
    return "\n".join(lines)


def run_image_styles(name: str, cfg: ImageStylesConfig) -> dict[str, Any]:
    return ImageStyles(cfg, name).run()
