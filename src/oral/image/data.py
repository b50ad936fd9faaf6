"""Style sets: the same named subjects drawn in different house styles, fetched once, read at run time.

A style set is a public package of small pictures with a name for each subject. The pictures are
never copied into the repository: `fetch_style_set` downloads the package (`npm pack`, or
`apt-get download` for a Debian package) into $ORAL_HOME/images/<set>/ and keeps only an index and
the pictures; `load_style_set` reads them as RGB tensors on a white background at the size asked
for, each with its subject's name.

    fetch_style_set("emoji-google")                      # once; `oral images fetch emoji-google`
    images, subjects = load_style_set("emoji-google", size=32)   # (N, 3, 32, 32) in [-1, 1], N names

Fetching is two small steps, each chosen by the set: its source downloads the package archive
(SOURCES: npm, deb) and its indexer turns the unpacked package into the index and the pictures
(INDEXERS: emoji, openmoji, icons, openclipart). Every set's index has the emoji-datasource layout
(emoji.json: name, image, category, sort_order and the set's flag), so reading never depends on
where a set came from.

Subjects are split once, by a hash of the name, into train and test (TEST_SHARE of them): the base
model never sees a test subject, so sample grids and subject accuracy can be measured on names it
was not trained on.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
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
from oral.progress import progress_bar

log = logging.getLogger(__name__)


class StyleSetError(ValueError):
    """A style set that is unknown, not fetched, or damaged."""


@dataclass(frozen=True)
class StyleSet:
    """A package of pictures in one house style, with a name per subject."""

    name: str  # "emoji-google"
    package: str  # what the source fetches, pinned: "emoji-datasource-google@16.0.0", "openclipart-svg@0.18"
    folder: str  # the pictures in the set's dir (as in the package, or drawn at fetch time): "img/google/64"
    flag: str  # the index field that says a subject has a picture in this set: "has_img_google"
    license: str
    free: bool  # False: research runs only (never shipped, never in the repository)
    descriptions: tuple[str, ...]  # the style in words, as a user might ask for it (what a generator trains on)
    heldout_descriptions: tuple[str, ...]  # other wordings, never trained on (what experiments ask with)
    source: str = "npm"  # how the package is downloaded: a key of SOURCES
    indexer: str = "emoji"  # how its pictures are indexed: a key of INDEXERS
    package_folder: str | None = None  # the pictures inside the package, when they are redrawn into `folder`
    categories: str | None = "unicode"  # what an index's category is: "unicode" (emoji's), "folder" (the
    # package's top folder, another label space), None (no category: every subject is "")


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
                 indexer="openmoji", package_folder="color/svg"),
        StyleSet("openmoji-line", f"openmoji@{OPENMOJI_VERSION}", "png", "has_img", "CC-BY-SA-4.0", True,
                 ("black and white line drawings", "black outline art with no colour, OpenMoji line style",
                  "draw it as a monochrome line icon", "thin black strokes on white, like a colouring book"),
                 ("only black lines on a white background", "uncoloured outline sketch of the emoji"),
                 indexer="openmoji", package_folder="black/svg"),
        # HackerNoon's Pixel Icon Library: 248 named black glyphs drawn on a 24-cell grid. The icons are CC BY 4.0
        # by the package's README (credit HackerNoon, link the licence); its LICENSE file (MIT) covers the code.
        # The 48 px PNGs are the 24-cell grid at exactly 2 px a cell (1 bit of alpha, no smoothing; the 12 and 16 px
        # ones are smoothed down): centred on a 64 px canvas they stay 2 px a cell, and the box resize to 32 px makes
        # that exactly 1 px a cell, so the grid survives without a nearest-neighbour resize.
        StyleSet("pixel-icons", "@hackernoon/pixel-icon-library@1.1.0", "png", "has_img",
                 "CC-BY-4.0 (HackerNoon)", True,
                 ("retro 8-bit pixel art icons", "black pixel glyphs on a grid",
                  "draw it as a chunky pixelated icon from an old video game",
                  "low resolution monochrome bitmap icon with hard square edges"),
                 ("make it a crisp black pixel-art pictogram", "blocky one-colour icon built from big square pixels"),
                 indexer="icons", package_folder="icons/PNG/for-light-mode/48px/solid", categories=None),
        # The Open Clip Art Library 0.18 as Debian packs it: ~8,100 SVGs by many hands, in topic folders, each put in
        # the public domain (the Creative Commons Public Domain Dedication, per its debian/copyright).
        StyleSet("clipart", "openclipart-svg@0.18", "png", "has_img", "public domain", True,
                 ("cartoon clip art", "colourful vector clipart like an old office suite",
                  "draw it as a clip art illustration from a 2000s word processor",
                  "glossy gradient cartoon drawings from a free clip art library"),
                 ("make it look like clipart pasted into a school presentation",
                  "hand-made vector cartoon from the Open Clip Art Library"),
                 source="deb", indexer="openclipart", package_folder="usr/share/openclipart/svg", categories="folder"),
    )
}
INDEX = "emoji.json"
FETCH_REPORT = "fetch.json"  # what a fetch kept and skipped (and why), written beside the index
TEST_SHARE = 0.1  # the share of subjects held out of every training run (by a hash of the name)


def style_set(name: str) -> StyleSet:
    """The style set called `name`, or an error listing the known ones."""
    if name not in STYLE_SETS:
        raise StyleSetError(f"unknown style set {name!r}; known: {', '.join(STYLE_SETS)}")
    return STYLE_SETS[name]


def style_dir(name: str) -> Path:
    """Where a fetched style set lives: $ORAL_HOME/images/<name>."""
    return oral_home() / "images" / style_set(name).name


def fetch_style_set(name: str, archive: str | Path | None = None) -> Path:
    """Download a style set's package once and keep its index and pictures; returns its dir.

    archive: the package's archive, downloaded by hand (`npm pack PACKAGE`'s .tgz, a .deb), used instead of
    downloading. Already fetched: returns at once. The dir appears complete or not at all (atomic rename)."""
    s = style_set(name)
    final = style_dir(name)
    if (final / INDEX).is_file():
        return final
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = Path(archive) if archive is not None else SOURCES[s.source](s, tmp)
        if not archive.is_file():
            raise StyleSetError(f"{archive} is not a file; give the archive of {s.package} (`.tgz` or `.deb`)")
        pkg = tmp / "package"
        _unpack(archive, pkg, s)
        with atomic_dir(final, overwrite=True) as out:
            skipped = INDEXERS[s.indexer](s, pkg, out)
            if not (out / INDEX).is_file():
                raise StyleSetError(f"{s.package} gave no {INDEX}; the package's layout changed")
            kept = sum(1 for e in json.loads((out / INDEX).read_text(encoding="utf-8"))
                       if e.get(s.flag) and (out / s.folder / e.get("image", "")).is_file())
            atomic_write_json(out / FETCH_REPORT, {"package": s.package, "archive": archive.name, "pictures": kept,
                                                   "skipped": dict(skipped), "wall_s": round(time.time() - t0, 1)})
    log.info("%s: %d pictures, skipped %s (%.0f s)", name, kept, dict(skipped) or "none", time.time() - t0)
    return final


# -----------------------------------------------------------------------------
# Sources: download a set's package archive into a dir, return its path


def _need(tool: str, s: StyleSet, install: str) -> None:
    if shutil.which(tool) is None:
        raise StyleSetError(f"fetching {s.name} needs {tool} ({install}), or download {s.package}'s archive "
                            f"elsewhere and run `oral images fetch {s.name} --archive FILE`")


def _npm_pack(s: StyleSet, into: Path) -> Path:
    """`npm pack PACKAGE@VERSION`: the npm registry's .tgz."""
    _need("npm", s, "`apt-get install -y npm`")
    run = subprocess.run(["npm", "pack", s.package, "--silent"], cwd=into, capture_output=True, text=True, check=False)
    tgz = sorted(into.glob("*.tgz"))
    if run.returncode != 0 or not tgz:
        raise StyleSetError(f"`npm pack {s.package}` failed ({run.stderr.strip()[-300:] or 'no archive'}); "
                            "check the network or the npm registry setting")
    return tgz[0]


def _apt_get_download(s: StyleSet, into: Path) -> Path:
    """`apt-get download NAME`: the .deb of the system's Debian (or Ubuntu) archive; its version is checked
    against the pin when it is unpacked."""
    _need("apt-get", s, "a Debian or Ubuntu system")
    deb = s.package.split("@")[0]
    run = subprocess.run(["apt-get", "download", deb], cwd=into, capture_output=True, text=True, check=False)
    debs = sorted(into.glob("*.deb"))
    if run.returncode != 0 or not debs:
        raise StyleSetError(f"`apt-get download {deb}` failed ({run.stderr.strip()[-300:] or 'no archive'}); "
                            f"run `apt-get update` first, or download the .deb from https://packages.debian.org/{deb} "
                            f"and run `oral images fetch {s.name} --archive FILE.deb`")
    return debs[0]


SOURCES: dict[str, Callable[[StyleSet, Path], Path]] = {"npm": _npm_pack, "deb": _apt_get_download}


def _untar_npm(archive: Path, into: Path, s: StyleSet) -> None:
    """An npm .tgz: the files of its package/ dir."""
    with tarfile.open(archive) as tar:
        files = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/")]
        for m in files:
            m.name = m.name.removeprefix("package/")
        tar.extractall(into, members=files, filter="data")


def _dpkg_x(archive: Path, into: Path, s: StyleSet) -> None:
    """A .deb of the pinned upstream version ("openclipart-svg@0.18": 1:0.18+dfsg-19 will do): `dpkg -x`."""
    if shutil.which("dpkg") is None:
        raise StyleSetError(f"unpacking {archive.name} needs dpkg (`apt-get install dpkg`, `dnf install dpkg` or "
                            "`brew install dpkg`)")
    deb, pinned = s.package.split("@")
    version = subprocess.run(["dpkg", "--field", str(archive), "Version"], capture_output=True, text=True,
                             check=False).stdout.strip()
    if version.split(":")[-1].split("+")[0].split("-")[0] != pinned:  # "1:0.18+dfsg-19" -> "0.18"
        raise StyleSetError(f"{archive.name} is version {version or '(unreadable)'}, not {pinned}; "
                            f"download {deb} {pinned} and give it with --archive")
    run = subprocess.run(["dpkg", "-x", str(archive), str(into)], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise StyleSetError(f"`dpkg -x {archive.name}` failed: {run.stderr.strip()[-300:]}")


def _unpack(archive: Path, into: Path, s: StyleSet) -> None:
    """Unpack a package archive into `into` by its kind: a .deb or an npm .tgz."""
    into.mkdir(parents=True)
    (_dpkg_x if archive.suffix == ".deb" else _untar_npm)(archive, into, s)


# -----------------------------------------------------------------------------
# Indexers: an unpacked package -> out/INDEX (emoji-datasource's layout) and out/<folder>/; each returns what it
# skipped, by reason


def _index_emoji(s: StyleSet, pkg: Path, out: Path) -> Counter:
    """An emoji-datasource package: its own emoji.json and pictures, as they are."""
    if (pkg / INDEX).is_file():
        shutil.copyfile(pkg / INDEX, out / INDEX)
    if (pkg / s.folder).is_dir():
        shutil.copytree(pkg / s.folder, out / s.folder)
    return Counter()


RASTER_SIZE = 64  # pictures drawn at fetch time are as big as the emoji-datasource pictures


def _cairosvg(s: StyleSet):
    try:
        import cairosvg
    except ImportError as e:  # an install without it
        raise StyleSetError(f"{s.name} is SVG and needs cairosvg to draw it: `pip install cairosvg` ({e})") from e
    return cairosvg


def _index_openmoji(s: StyleSet, pkg: Path, out: Path) -> Counter:
    """Draw an OpenMoji package's SVGs (`s.package_folder`) as RASTER_SIZE PNGs into out/<s.folder>/ and write an
    emoji-datasource-like index: each subject named as NAMES_FROM names its code point; skin-tone variants and
    code points NAMES_FROM does not know are left out."""
    cairosvg = _cairosvg(s)
    names_index = fetch_style_set(NAMES_FROM) / INDEX
    known = {}
    for e in json.loads(names_index.read_text(encoding="utf-8")):
        for code in (e.get("unified"), e.get("non_qualified")):
            if code:
                known.setdefault(code.upper(), e)
    meta = pkg / "data/openmoji.json"
    if not meta.is_file():
        raise StyleSetError(f"{s.package} has no data/openmoji.json; the package layout changed "
                            f"(pinned version {OPENMOJI_VERSION})")
    (out / s.folder).mkdir(parents=True)
    index, skipped = [], Counter()
    for m in json.loads(meta.read_bytes()):
        e = known.get(str(m.get("hexcode", "")).upper())
        svg = pkg / s.package_folder / f"{m.get('hexcode')}.svg"
        if e is None or not svg.is_file() or m.get("skintone"):
            skipped["skin tone, or no picture or no name"] += 1
            continue
        png = f"{m['hexcode']}.png"
        cairosvg.svg2png(bytestring=svg.read_bytes(), write_to=str(out / s.folder / png),
                         output_width=RASTER_SIZE, output_height=RASTER_SIZE)
        index.append({"name": e["name"], "unified": e["unified"], "image": png, "category": e.get("category"),
                      "sort_order": e.get("sort_order", 0), s.flag: True})
    if not index:
        raise StyleSetError(f"{s.package}: no SVG matched a code point of {NAMES_FROM}; the package layout changed")
    atomic_write_json(out / INDEX, index)
    return skipped


def _index_icons(s: StyleSet, pkg: Path, out: Path) -> Counter:
    """A folder of icon PNGs, one subject per file named by its stem ("arrow-circle left-solid.png" -> "arrow
    circle left"), each centred as it is (no resampling) on a transparent RASTER_SIZE canvas."""
    from PIL import Image

    pictures = sorted((pkg / s.package_folder).glob("*.png")) if s.package_folder else []
    if not pictures:
        raise StyleSetError(f"{s.package} has no PNG in {s.package_folder}/; the package layout changed")
    (out / s.folder).mkdir(parents=True)
    index, skipped = [], Counter()
    for path in pictures:
        with Image.open(path) as im:
            im = im.convert("RGBA")
        if max(im.size) > RASTER_SIZE:
            skipped[f"bigger than {RASTER_SIZE} px"] += 1
            continue
        canvas = Image.new("RGBA", (RASTER_SIZE, RASTER_SIZE), (0, 0, 0, 0))
        canvas.paste(im, ((RASTER_SIZE - im.width) // 2, (RASTER_SIZE - im.height) // 2))
        canvas.save(out / s.folder / path.name)
        name = " ".join(path.stem.removesuffix("-solid").replace("-", " ").split())
        index.append({"name": name, "image": path.name, "category": None, "sort_order": len(index), s.flag: True,
                      "source": f"{s.package_folder}/{path.name}"})
    atomic_write_json(out / INDEX, index)
    return skipped


# Folders of the Open Clip Art Library that are not drawings of subjects (each path and everything under it):
CLIPART_EXCLUDED = (
    "special",  # fill patterns, gradient swatches and layout examples
    "unsorted",  # what the library never sorted, with duplicates of sorted files
    "logos",  # trademarks
    "shapes",  # arrows, callouts, flowchart shapes, jigsaw pieces and ~1,400 gradient circles ("stars")
    "buttons",  # and below: glossy GUI buttons and bullets
    "computer/buttons",
    "computer/icons",  # desktop icon themes, titled by theme ("lemon svg theme"), not by subject
)
_DC = "{http://purl.org/dc/elements/1.1/}"
_WORK = ("{http://web.resource.org/cc/}Work", "{http://creativecommons.org/ns#}Work")
_TEMPLATE = re.compile(r"^clipart by [^-]+ - ")  # one author's template title: "clipart by nicu buculei - pear"
_NOT_NAMES = {"the", "and", "with", "for", "svg", "clipart", "icon", "icons", "theme"}


def _readable(text: str) -> str:
    return " ".join(html.unescape(text).lower().replace("_", " ").split())


def svg_title(svg: bytes) -> str | None:
    """The first dc:title of an SVG's cc:Work (its own title, not its author's or publisher's), lower-cased and
    made readable; None when it has none, when it is the name of one of the work's agents (its author's: no
    subject), or when the SVG is not XML."""
    try:
        root = ET.fromstring(svg)
    except ET.ParseError:
        return None
    for work in (w for tag in _WORK for w in root.iter(tag)):
        title = _TEMPLATE.sub("", _readable(work.findtext(f"{_DC}title") or ""))
        agents = {_readable(a.findtext(f"{_DC}title") or "") for a in work.iter() if a.tag.endswith("}Agent")}
        if title:
            return title if title not in agents else None
    return None


def _titles_its_file(title: str, path: Path) -> bool:
    """Whether a title names the picture of its file: some word of it (3 letters or more) is in the file's name.
    Titles that are not (a collection's, "etiquette icons" on ant.svg, or a template's, "pear" on apple.svg) are
    dropped rather than name the wrong subject."""
    stem = re.sub(r"[^a-z]", "", path.stem.lower())
    return any(w in stem for w in re.findall(r"[a-z]{3,}", title) if w not in _NOT_NAMES)


def draw_svg(svg: bytes, size: int = RASTER_SIZE, work: int = 4 * RASTER_SIZE, most: int = 2048):
    """An SVG -> a size x size RGBA picture of what it draws: drawn `work` px wide, cropped to its drawn (not
    white, not transparent) part, centred on a transparent square and resized. A drawing that is small on its
    page is drawn again larger (up to `most` px wide) first. None when it draws nothing."""
    import cairosvg
    from PIL import Image

    def render(width: int):
        im = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=svg, output_width=width))).convert("RGBA")
        on_white = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("L")
        return im, on_white.point(lambda v: 255 if v < 250 else 0).getbbox()  # the drawn part's (l, t, r, b)

    im, box = render(work)
    if box is None:
        return None
    side = max(box[2] - box[0], box[3] - box[1])
    if side < work // 2 and im.width < most:
        im, box = render(min(most, im.width * work // side))
        if box is None:
            return None
    im = im.crop(box)
    side = max(im.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def _index_openclipart(s: StyleSet, pkg: Path, out: Path) -> Counter:
    """The Open Clip Art Library's SVGs (`s.package_folder`), in sorted path order: each named by its dc:title
    and categorised by its top folder, drawn by `draw_svg`. Skipped, and counted: excluded folders, files
    without a title or whose title names something else, titles already kept, SVGs cairosvg cannot draw or
    that draw nothing."""
    _cairosvg(s)
    root = pkg / (s.package_folder or "")
    svgs = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.svg"))
    if not svgs:
        raise StyleSetError(f"{s.package} has no SVG under {s.package_folder}/; the package layout changed")
    (out / s.folder).mkdir(parents=True)
    index, seen, skipped = [], set(), Counter()
    for rel in progress_bar(svgs, desc=f"drawing {s.name}"):
        if any(rel.startswith(f"{folder}/") for folder in CLIPART_EXCLUDED):
            skipped["excluded folder"] += 1
            continue
        svg = (root / rel).read_bytes()
        title = svg_title(svg)
        if title is None:
            skipped["no title"] += 1
            continue
        if not _titles_its_file(title, Path(rel)):
            skipped["title names something else"] += 1
            continue
        if title in seen:
            skipped["title already kept"] += 1
            continue
        try:
            picture = draw_svg(svg)
        except Exception as e:  # cairosvg raises many kinds (ValueError, entities it forbids, ...)
            log.debug("%s: cairosvg cannot draw it: %s", rel, e)
            skipped["cairosvg cannot draw it"] += 1
            continue
        if picture is None:
            skipped["draws nothing"] += 1
            continue
        png = rel.removesuffix(".svg").replace("/", ".") + ".png"
        picture.save(out / s.folder / png)
        seen.add(title)
        index.append({"name": title, "image": png, "category": rel.split("/")[0], "sort_order": len(index),
                      s.flag: True, "source": f"{s.package_folder}/{rel}"})
    atomic_write_json(out / INDEX, index)
    return skipped


INDEXERS: dict[str, Callable[[StyleSet, Path, Path], Counter]] = {
    "emoji": _index_emoji, "openmoji": _index_openmoji, "icons": _index_icons, "openclipart": _index_openclipart}


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
