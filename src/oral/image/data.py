"""Style sets: the same named subjects drawn in different house styles, fetched once, read at run time.

A style set is a public package of small pictures with a name for each subject. The pictures are
never copied into the repository: `fetch_style_set` downloads the package (`npm pack`) into
$ORAL_HOME/images/<set>/ and keeps only the index and the pictures; `load_style_set` reads them as
RGB tensors on a white background at the size asked for, each with its subject's name.

    fetch_style_set("emoji-google")                      # once; `oral images fetch emoji-google`
    images, subjects = load_style_set("emoji-google", size=32)   # (N, 3, 32, 32) in [-1, 1], N names

Subjects are split once, by a hash of the name, into train and test (TEST_SHARE of them): the base
model never sees a test subject, so sample grids and subject accuracy can be measured on names it
was not trained on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from oral.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    load_safetensors,
    read_json,
)
from oral.paths import oral_home


class StyleSetError(ValueError):
    """A style set that is unknown, not fetched, or damaged."""


@dataclass(frozen=True)
class StyleSet:
    """A package of pictures in one house style, with a name per subject."""

    name: str  # "emoji-google"
    package: str  # what `npm pack` fetches, pinned: "emoji-datasource-google@16.0.0"
    folder: str  # the pictures inside the package: "img/google/64"
    flag: str  # the emoji.json field that says a subject has a picture in this set: "has_img_google"
    license: str
    free: bool  # False: research runs only (never shipped, never in the repository)
    descriptions: tuple[str, ...]  # the style in words, as a user might ask for it (what a generator trains on)
    heldout_descriptions: tuple[str, ...]  # other wordings, never trained on (what experiments ask with)
    svg_folder: str | None = None  # a package of SVGs: the folder rasterised at fetch time into `folder` as PNG


# The emoji-datasource packages: the same ~1,900 subjects (emoji.json names them) in four house styles, 64x64 RGBA.
EMOJI_VERSION = "16.0.0"
OPENMOJI_VERSION = "17.0.0"
NAMES_FROM = "emoji-google"  # the set whose index names the subjects of SVG sets (any emoji-datasource set would do)
STYLE_SETS: dict[str, StyleSet] = {
    s.name: s for s in (
        StyleSet("emoji-google", f"emoji-datasource-google@{EMOJI_VERSION}", "img/google/64", "has_img_google",
                 "Apache-2.0", True,
                 ("glossy rounded emoji in Google's Noto style", "Noto emoji: soft gradients and round shapes",
                  "draw it as a Google Android emoji", "cute shiny cartoon icons with gentle shading"),
                 ("make it look like the emoji on an Android phone", "smooth rounded Google emoji art")),
        StyleSet("emoji-twitter", f"emoji-datasource-twitter@{EMOJI_VERSION}", "img/twitter/64", "has_img_twitter",
                 "CC-BY-4.0", True,
                 ("flat pastel emoji in the Twitter style", "Twemoji: simple flat shapes with no shading",
                  "draw it as a flat two-dimensional Twitter emoji", "clean vector icons in plain bright colours"),
                 ("make the pictures look like Twitter's emoji set", "flat minimal emoji without gradients")),
        StyleSet("emoji-apple", f"emoji-datasource-apple@{EMOJI_VERSION}", "img/apple/64", "has_img_apple",
                 "Apple's (not free)", False,
                 ("shaded three-dimensional emoji in Apple's style", "glossy detailed iPhone emoji",
                  "draw it as an Apple emoji with realistic lighting", "rich rendered icons with depth and highlights"),
                 ("make it look like the emoji on an iPhone", "detailed 3D-looking emoji art")),
        StyleSet("emoji-facebook", f"emoji-datasource-facebook@{EMOJI_VERSION}", "img/facebook/64", "has_img_facebook",
                 "Facebook's (not free)", False,
                 ("bold outlined emoji in Facebook's style", "Facebook emoji with strong shapes and saturated colours",
                  "draw it as a Facebook Messenger emoji", "chunky saturated cartoon icons"),
                 ("make it look like Facebook's emoji", "vivid chunky emoji art")),
        # OpenMoji: the same Unicode subjects drawn as SVG, in colour and as black line art; rasterised at fetch
        # time and named by emoji-datasource's names (joined on the code point), so every set names a subject alike.
        StyleSet("openmoji-color", f"openmoji@{OPENMOJI_VERSION}", "png", "has_img", "CC-BY-SA-4.0", True,
                 ("OpenMoji style: bold black outlines around flat colours", "outlined flat emoji like OpenMoji",
                  "draw it as an OpenMoji icon with thick dark contours", "hand-drawn looking icons with black outlines"),
                 ("make it look like the open source OpenMoji set", "flat coloured emoji with heavy outlines"),
                 svg_folder="color/svg"),
        StyleSet("openmoji-line", f"openmoji@{OPENMOJI_VERSION}", "png", "has_img", "CC-BY-SA-4.0", True,
                 ("black and white line drawings", "black outline art with no colour, OpenMoji line style",
                  "draw it as a monochrome line icon", "thin black strokes on white, like a colouring book"),
                 ("only black lines on a white background", "uncoloured outline sketch of the emoji"),
                 svg_folder="black/svg"),
    )
}
INDEX = "emoji.json"
TEST_SHARE = 0.1  # the share of subjects held out of every training run (by a hash of the name)


def style_set(name: str) -> StyleSet:
    """The style set called `name`, or an error listing the known ones."""
    if name not in STYLE_SETS:
        raise StyleSetError(f"unknown style set {name!r}; known: {', '.join(STYLE_SETS)}")
    return STYLE_SETS[name]


def style_dir(name: str) -> Path:
    """Where a fetched style set lives: $ORAL_HOME/images/<name>."""
    return oral_home() / "images" / style_set(name).name


def fetch_style_set(name: str, npm: str = "npm") -> Path:
    """Download a style set's package once (`npm pack`) and keep its index and pictures; returns its dir.

    Already fetched: returns at once. The dir appears complete or not at all (atomic rename)."""
    s = style_set(name)
    final = style_dir(name)
    if (final / INDEX).is_file():
        return final
    if shutil.which(npm) is None:
        raise StyleSetError(f"fetching {name} needs npm (`apt-get install -y npm`), or unpack `npm pack {s.package}` "
                            f"yourself: {INDEX} and {s.folder}/ into {final}")
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([npm, "pack", s.package, "--silent"], cwd=tmp, capture_output=True, text=True, check=False)
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if run.returncode != 0 or not tgz:
            raise StyleSetError(f"`npm pack {s.package}` failed ({run.stderr.strip()[-300:] or 'no archive'}); "
                                "check the network or the npm registry setting")
        with tarfile.open(tgz[0]) as tar, atomic_dir(final, overwrite=True) as out:
            if s.svg_folder is not None:
                _rasterise_openmoji(tar, s, out)
            else:
                wanted = [m for m in tar.getmembers() if m.isfile() and (
                    m.name == f"package/{INDEX}" or m.name.startswith(f"package/{s.folder}/"))]
                for m in wanted:
                    m.name = m.name.removeprefix("package/")
                tar.extractall(out, members=wanted, filter="data")
    if not (final / INDEX).is_file():
        raise StyleSetError(f"{s.package} has no {INDEX}; the package layout changed (pinned version {EMOJI_VERSION})")
    return final


RASTER_SIZE = 64  # SVG sets are drawn at the emoji-datasource pictures' size


def _rasterise_openmoji(tar: tarfile.TarFile, s: StyleSet, out: Path) -> None:
    """Draw an OpenMoji package's SVGs (`s.svg_folder`) as RASTER_SIZE PNGs into out/<s.folder>/ and write an
    emoji-datasource-like index: each subject named as NAMES_FROM names its code point; skin-tone variants and
    code points NAMES_FROM does not know are left out."""
    try:
        import cairosvg
    except ImportError as e:  # an install without it
        raise StyleSetError(f"{s.name} is SVG and needs cairosvg to draw it: `pip install cairosvg` ({e})") from e
    names_index = fetch_style_set(NAMES_FROM) / INDEX
    known = {}
    for e in json.loads(names_index.read_text(encoding="utf-8")):
        for code in (e.get("unified"), e.get("non_qualified")):
            if code:
                known.setdefault(code.upper(), e)
    members = {m.name: m for m in tar.getmembers() if m.isfile()}
    meta = members.get("package/data/openmoji.json")
    if meta is None:
        raise StyleSetError(f"{s.package} has no data/openmoji.json; the package layout changed "
                            f"(pinned version {OPENMOJI_VERSION})")
    (out / s.folder).mkdir(parents=True)
    index = []
    for m in json.loads(tar.extractfile(meta).read()):
        e = known.get(str(m.get("hexcode", "")).upper())
        svg = members.get(f"package/{s.svg_folder}/{m.get('hexcode')}.svg")
        if e is None or svg is None or m.get("skintone"):
            continue
        png = f"{m['hexcode']}.png"
        cairosvg.svg2png(bytestring=tar.extractfile(svg).read(), write_to=str(out / s.folder / png),
                         output_width=RASTER_SIZE, output_height=RASTER_SIZE)
        index.append({"name": e["name"], "unified": e["unified"], "image": png, "category": e.get("category"),
                      "sort_order": e.get("sort_order", 0), s.flag: True})
    if not index:
        raise StyleSetError(f"{s.package}: no SVG matched a code point of {NAMES_FROM}; the package layout changed")
    atomic_write_json(out / INDEX, index)


def is_test_subject(subject: str) -> bool:
    """Whether a subject is held out of training (a fixed share, by a hash of its name)."""
    h = int.from_bytes(hashlib.sha256(subject.encode()).digest()[:4], "big")
    return h / 2**32 < TEST_SHARE


def subjects_of(name: str) -> list[tuple[str, Path]]:
    """(subject name, picture path) of every subject the set draws, in the index's order."""
    s = style_set(name)
    root = style_dir(name)
    if not (root / INDEX).is_file():
        raise StyleSetError(f"style set {name} is not fetched; run `oral images fetch {name}`")
    entries = json.loads((root / INDEX).read_text(encoding="utf-8"))
    out, seen = [], set()
    for e in sorted(entries, key=lambda e: e.get("sort_order", 0)):
        subject = (e.get("name") or "").lower()
        path = root / s.folder / e.get("image", "")
        if subject and e.get(s.flag) and path.is_file() and subject not in seen:
            seen.add(subject)
            out.append((subject, path))
    if not out:
        raise StyleSetError(f"{root} holds no pictures of {name}; remove it and fetch it again")
    return out


def categories_of(name: str) -> dict[str, str]:
    """Subject name -> its Unicode category ("Smileys & Emotion", "Animals & Nature", ...) in a fetched set."""
    root = style_dir(name)
    if not (root / INDEX).is_file():
        raise StyleSetError(f"style set {name} is not fetched; run `oral images fetch {name}`")
    entries = json.loads((root / INDEX).read_text(encoding="utf-8"))
    return {(e.get("name") or "").lower(): e.get("category") or "" for e in entries if e.get("name")}


def to_tensor(path: Path, size: int) -> torch.Tensor:
    """A picture -> (3, size, size) float32 in [-1, 1], transparent parts white, resized by area."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, im).convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BOX)
        x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, size, size)


def load_style_set(name: str, size: int = 32, split: str = "train", limit: int | None = None
                   ) -> tuple[torch.Tensor, list[str]]:
    """(images (N, 3, size, size) in [-1, 1], subject names) of one split ("train", "test" or "all")."""
    if split not in ("train", "test", "all"):
        raise StyleSetError(f"split must be train, test or all, got {split!r}")
    pairs = [(s, p) for s, p in subjects_of(name) if split == "all" or is_test_subject(s) == (split == "test")]
    pairs = pairs[:limit] if limit is not None else pairs
    cache = style_dir(name) / f"tensors-{size}-{split}-{len(pairs)}.safetensors"
    names = [s for s, _ in pairs]
    if cache.is_file():
        cached = load_safetensors(cache, "remove it; it is rebuilt from the pictures")
        meta = read_json(cache.with_suffix(".json"), "remove it; it is rebuilt") if cache.with_suffix(".json").is_file() else {}
        if meta.get("subjects") == names:
            return cached["images"], names
    images = torch.stack([to_tensor(p, size) for _, p in pairs])  # (N, 3, size, size)
    atomic_write_bytes(cache, safetensors_bytes({"images": images.contiguous()}))
    atomic_write_json(cache.with_suffix(".json"), {"subjects": names})
    return images, names
