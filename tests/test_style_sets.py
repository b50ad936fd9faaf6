"""Style sets fetched from other kinds of package: pixel icons from an npm tarball, SVG clip art from a Debian
package, each indexed and drawn at fetch time; a judge and the image-styles measures on a set without categories."""

import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest
import torch
from conftest import write_fake_style_set

from oral.image.data import FETCH_REPORT

# --- a fake npm package of pixel icons ---------------------------------------

ICONS = "icons/PNG/for-light-mode/48px/solid"


def _cells(seed: int) -> torch.Tensor:
    """A 24 x 24 grid of black (1) and clear (0) cells."""
    return (torch.rand(24, 24, generator=torch.Generator().manual_seed(seed)) < 0.5).to(torch.uint8)


def _icon_png(cells: torch.Tensor) -> bytes:
    """The cells drawn as the package draws its 48 px icons: 2 x 2 black pixels a cell, the rest transparent."""
    from PIL import Image

    alpha = cells.repeat_interleave(2, 0).repeat_interleave(2, 1) * 255  # (48, 48)
    im = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    im.putalpha(Image.frombytes("L", (48, 48), bytes(alpha.flatten().tolist())))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _tgz(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_pixel_icons_are_named_by_file_stem_and_keep_their_pixel_grid_at_32_px(tmp_home, tmp_path):
    """An icon's 24-cell grid, 2 px a cell at 48 px, centred on the 64 px canvas, reads back at 32 px as exactly
    1 px a black or white cell (no grey: the grid is not smeared) inside a 4 px white border."""
    from PIL import Image

    from oral.image.data import categories_of, fetch_style_set, load_style_set, style_dir, subjects_of

    stems = ["arrow-circle left", "book-solid", "heart"]
    pkg = tmp_path / "hackernoon-pixel-icon-library-1.1.0.tgz"
    _tgz(pkg, {"LICENSE": b"MIT", **{f"{ICONS}/{stem}.png": _icon_png(_cells(i)) for i, stem in enumerate(stems)},
               "icons/PNG/for-light-mode/24px/solid/not-this-size.png": _icon_png(_cells(9))})
    root = fetch_style_set("pixel-icons", archive=pkg)
    assert root == style_dir("pixel-icons")
    assert [name for name, _ in subjects_of("pixel-icons")] == ["arrow circle left", "book", "heart"]
    assert set(categories_of("pixel-icons").values()) == {""}
    for _, path in subjects_of("pixel-icons"):
        assert Image.open(path).size == (64, 64)
    images, names = load_style_set("pixel-icons", size=32, split="all")
    for i in range(3):
        want = torch.ones(32, 32)
        want[4:28, 4:28] = 1 - 2 * _cells(i).float()  # black cells -1, clear cells white +1
        assert torch.equal(images[i, 0], want), names[i]
    assert json.loads((root / FETCH_REPORT).read_text())["pictures"] == 3


# --- a fake Debian package of SVG clip art -----------------------------------


def _svg(title: str | None, body: str, size: str = 'width="100" height="100"', publisher_first: bool = False) -> bytes:
    """An Inkscape-like SVG whose cc:Work has a dc:title (none: no title) and a publisher titled like the library."""
    publisher = ('<dc:publisher><cc:Agent rdf:about="http://www.openclipart.org/"><dc:title>Open Clip Art Library'
                 '</dc:title></cc:Agent></dc:publisher>')
    own = f"<dc:title>{title}</dc:title>" if title is not None else ""
    work = publisher + own if publisher_first else own + publisher
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" {size} '
            'xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/" '
            'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<metadata><rdf:RDF><cc:Work rdf:about="">{work}</cc:Work></rdf:RDF></metadata>{body}</svg>').encode()


RED = '<rect x="0" y="0" width="100" height="100" fill="#ff0000"/>'
CLIPART = {  # path under usr/share/openclipart/svg -> SVG
    "animals/cat.svg": _svg("Cat", RED),
    "animals/mammals/cat_02.svg": _svg("cat", RED),  # the same title again
    "animals/ant.svg": _svg("Etiquette Icons", RED),  # a collection's title
    "food/apple.svg": _svg(None, RED),
    "food/cafe_au_lait.svg": _svg("Caf&amp;eacute; au lait", RED),  # an HTML entity, escaped once more as XML
    "office/open_clip_art_library.svg": _svg("Open Clip Art Library", RED),  # titled by its publisher's name
    "food/broken_plate.svg": _svg("Broken plate", RED, size=""),  # no size at all: cairosvg refuses it
    "food/pear.svg": _svg("Pear", '<rect x="450" y="450" width="100" height="100" fill="#00ff00"/>',
                          size='width="1000" height="1000"'),  # a small drawing in the middle of a big page
    "geography/full_moon.svg": _svg("  Full\n Moon ", '<circle cx="50" cy="50" r="50" fill="#ffff00"/>',
                                    publisher_first=True),
    "plants/ghost.svg": _svg("Ghost", '<rect width="100" height="100" fill="#ffffff"/>'),  # white on white
    "special/patterns/dots.svg": _svg("dots", RED),
}
CLIPART_SKIPPED = {"title already kept": 1, "title names something else": 1, "no title": 2,
                   "cairosvg cannot draw it": 1, "draws nothing": 1, "excluded folder": 1}


def _deb(tmp_path, version: str = "1:0.18+dfsg-19"):
    """openclipart-svg_<version>_all.deb holding CLIPART, built with dpkg-deb."""
    if shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None:
        pytest.skip("needs dpkg and dpkg-deb (a Debian or Ubuntu system)")
    tree = tmp_path / f"deb-{version.replace(':', '_')}"
    for rel, svg in CLIPART.items():
        (tree / "usr/share/openclipart/svg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / "usr/share/openclipart/svg" / rel).write_bytes(svg)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(f"Package: openclipart-svg\nVersion: {version}\nArchitecture: all\n"
                                         "Maintainer: nobody <nobody@example.org>\nDescription: test clip art\n")
    deb = tmp_path / f"openclipart-svg_{version.replace(':', '%3a')}_all.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(tree), str(deb)], check=True,
                   capture_output=True)
    return deb


def _fake_apt_get(tmp_path, monkeypatch, deb) -> "os.PathLike":
    """An apt-get first on PATH whose `download` copies `deb` here and logs each call; returns the log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "apt-get.log"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {log}\ncp {deb} .\n')
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_clip_art_is_named_by_its_works_title_categorised_by_folder_drawn_at_64_px_and_fetched_once(
        tmp_home, tmp_path, monkeypatch):
    from PIL import Image

    from oral.image.data import categories_of, fetch_style_set, load_style_set, subjects_of

    log = _fake_apt_get(tmp_path, monkeypatch, _deb(tmp_path))
    root = fetch_style_set("clipart")
    subjects = dict(subjects_of("clipart"))
    assert list(subjects) == ["cat", "café au lait", "pear", "full moon"]  # sorted path order, not the publisher's
    assert categories_of("clipart") == {"cat": "animals", "café au lait": "food", "pear": "food",
                                        "full moon": "geography"}
    assert all(Image.open(p).size == (64, 64) for p in subjects.values())
    report = json.loads((root / FETCH_REPORT).read_text())
    assert report["pictures"] == 4 and report["skipped"] == CLIPART_SKIPPED
    images, names = load_style_set("clipart", size=8, split="all")
    green = torch.tensor([-1.0, 1.0, -1.0])
    pear = images[names.index("pear")]  # cropped to its drawing: green to the corners, not a dot on white
    assert torch.allclose(pear[:, 0, 0], green, atol=0.15) and torch.allclose(pear[:, 7, 7], green, atol=0.15)
    assert torch.allclose(images[names.index("cat"), :, 4, 4], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)

    inode = root.stat().st_ino
    assert fetch_style_set("clipart") == root and root.stat().st_ino == inode  # already fetched: nothing done
    assert log.read_text().splitlines() == ["download openclipart-svg"]


def test_an_interrupted_clip_art_fetch_leaves_nothing_and_the_next_one_completes(tmp_home, tmp_path, monkeypatch):
    import oral.image.data as data

    deb = _deb(tmp_path)
    drawn = []

    def draw_then_stop(svg, *args, **kwargs):
        drawn.append(svg)
        if len(drawn) == 2:
            raise KeyboardInterrupt
        return real_draw(svg, *args, **kwargs)

    real_draw = data.draw_svg
    monkeypatch.setattr(data, "draw_svg", draw_then_stop)
    with pytest.raises(KeyboardInterrupt):
        data.fetch_style_set("clipart", archive=deb)
    assert len(drawn) == 2 and list((tmp_home / "images").iterdir()) == []  # no set, no temporary dir
    monkeypatch.setattr(data, "draw_svg", real_draw)
    root = data.fetch_style_set("clipart", archive=deb)
    assert sorted(os.listdir(tmp_home / "images")) == ["clipart"] and len(data.subjects_of("clipart")) == 4
    assert (root / FETCH_REPORT).is_file()


def test_a_clip_art_fetch_without_apt_get_or_of_another_version_says_what_to_do(tmp_home, tmp_path, monkeypatch):
    from oral.image.data import StyleSetError, fetch_style_set, style_dir

    deb = _deb(tmp_path, version="1:0.19-1")
    with pytest.raises(StyleSetError, match="version 1:0.19-1, not 0.18.*--archive"):
        fetch_style_set("clipart", archive=deb)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(StyleSetError, match=r"needs apt-get .*oral images fetch clipart --archive FILE"):
        fetch_style_set("clipart")
    assert not style_dir("clipart").exists()


# --- the judge and the measures on a set without categories -----------------


def test_the_judge_learns_a_set_without_categories_as_a_style_and_its_subject_accuracy_is_absent(tmp_home, tmp_path):
    """pixel-icons has no categories (its index's are ignored, though its subjects share the emoji sets' names):
    the judge tells it apart as a style, learns categories from the emoji sets only, and the image-styles
    measures give it no subject-acc (no row), where an emoji set has one."""
    from oral.experiments.image_styles import ImageStyles, format_tables, measure_rows
    from oral.image.data import load_style_set
    from oral.image.judge import Judge, JudgeConfig, train_judge

    for name, folder, flag, shade in (("emoji-google", "img/google/64", "has_img_google", 128),
                                      ("emoji-twitter", "img/twitter/64", "has_img_twitter", 0),
                                      ("pixel-icons", "png", "has_img", 255), ("clipart", "png", "has_img", 64)):
        write_fake_style_set(tmp_home, name, folder, flag, shade, n=40,
                             colour=lambda i, shade: (200 * (i % 2), 6 * i, shade))
    cfg = JudgeConfig(styles=["emoji-google", "emoji-twitter", "pixel-icons"], size=4, width=8, features=8,
                      steps=80, batch_size=32, lr=1e-2, warmup_steps=5, noise=0.05)
    assert {"pixel-icons", "clipart"} <= set(JudgeConfig().styles)  # the default judge knows every set the experiment draws
    judge = train_judge(tmp_path / "judge", cfg)
    held = judge.meta["heldout"]
    assert judge.meta["category_styles"] == ["emoji-google", "emoji-twitter"]
    assert held["style_acc_per_set"]["pixel-icons"] > 0.9 and held["category_acc"] > 0.9, held
    judge = Judge.from_pretrained(tmp_path / "judge")

    exp = ImageStyles.__new__(ImageStyles)  # only its judge is needed to measure
    exp.judge = judge
    rows = []
    for style in ("emoji-google", "pixel-icons"):
        pictures, subjects = load_style_set(style, 4, "test")
        measures = exp.measure(pictures, subjects, style, judge.features(pictures))
        assert (measures["subject-acc"] is None) == (style == "pixel-icons"), measures
        rows += measure_rows({"task": style, "method": "trained"}, measures, len(subjects))
    assert {r["metric"] for r in rows if r["task"] == "pixel-icons"} == {"fid-ours", "kid-ours", "style-acc"}
    assert json.loads(json.dumps(rows, allow_nan=False)) == rows
    assert "blank: the judge has no subject categories for pixel-icons" in format_tables({"rows": rows})

    # a judge of sets without Unicode categories only (clipart's are folders): a style head, no category head
    none = train_judge(tmp_path / "none", JudgeConfig(styles=["pixel-icons", "clipart"], size=4, width=8,
                                                      features=8, steps=2, batch_size=8))
    assert none.meta["categories"] == [] and none.meta["heldout"]["category_acc"] is None
    assert torch.equal(none.predict(torch.zeros(3, 3, 4, 4))[2], torch.full((3,), -1))
