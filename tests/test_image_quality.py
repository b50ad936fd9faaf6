"""How well an image base draws its own style: `oral images eval-base` (oral.image.quality)."""

import json

import pytest
import torch
from conftest import TINY_IMAGE_BASE, write_fake_style_set


@pytest.fixture
def style_home(tmp_path, monkeypatch):
    """$ORAL_HOME with two fetched sets of 60 subjects: the blue channel is the style, the red the category."""
    monkeypatch.setenv("ORAL_HOME", str(tmp_path / "home"))
    for name, shade in (("google", 128), ("twitter", 0)):
        write_fake_style_set(tmp_path / "home", f"emoji-{name}", f"img/{name}/64", f"has_img_{name}", shade, n=60,
                             colour=lambda i, shade: (200 * (i % 2), 4 * i, shade))
    return tmp_path / "home"


def test_match_at_k_finds_each_drawing_s_own_picture_and_nothing_else():
    from oral.image.quality import match_at

    real = torch.arange(6 * 12, dtype=torch.float).reshape(6, 3, 2, 2)  # six distinct pictures
    assert match_at(real, real, 1) == 1.0
    shifted = real.roll(1, dims=0)  # drawing i is exactly real picture i - 1
    assert match_at(shifted, real, 1) == 0.0
    assert match_at(shifted, real, 6) == 1.0  # k = n: every picture is among the k nearest
    # drawing i sits between real i - 1 and real i, nearer i - 1: found at k = 2, never at k = 1
    between = 0.6 * shifted + 0.4 * real
    assert match_at(between, real, 1) == 0.0 and match_at(between[1:], real[1:], 2) == 1.0


def test_eval_base_judges_training_and_held_out_drawings_and_writes_a_grid(style_home, tmp_path, capsys,
                                                                          monkeypatch):
    import oral.image.base as image_base
    from oral.cli import main
    from oral.image.base import ImageBaseConfig, train_image_base
    from oral.image.judge import JudgeConfig, train_judge

    base_dir = train_image_base(tmp_path / "base", ImageBaseConfig(**TINY_IMAGE_BASE, steps=3))
    judge_dir = tmp_path / "judge"
    train_judge(judge_dir, JudgeConfig(styles=["emoji-google", "emoji-twitter"], size=8, width=8, features=8, steps=5,
                                       batch_size=8))
    argv = ["images", "eval-base", "--base", str(base_dir), "--judge", str(judge_dir), "--subjects", "5",
            "--steps", "2", "--out", str(tmp_path / "grid.png"), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["style"] == "emoji-google" and report["config"]["guidance"] == 1.0
    for split in ("train", "test"):
        r = report[split]
        assert r["n"] == 5 and r["chance@1"] == 0.2
        assert 0 <= r["match@1"] <= r["match@5"] == 1.0  # k = n
        assert all(0 <= r[m] <= 1 for m in ("style-acc", "subject-acc", "real-subject-acc"))
        assert r["fid-ours"] >= 0 and "vae-psnr" not in r  # a pixel base has no autoencoder
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(image_base, "BUNDLED", tmp_path / "package" / "image-base")
    assert main(argv[:-3] + ["--bundle"]) == 0  # the table, then the package's copy with it in its card
    table = capsys.readouterr().out
    assert "| training | 5 |" in table and "| held-out | 5 |" in table and "match@1" in table
    card = (tmp_path / "package" / "image-base" / "README.md").read_text()
    assert "| training | 5 |" in card and "emoji-google" in card
    assert image_base.bundled_recipe() == image_base.recipe(image_base.ImageBase.from_pretrained(base_dir).meta["train"])


def test_eval_base_of_a_latent_base_reports_its_autoencoder_s_round_trip_and_the_card_says_latent(style_home,
                                                                                                    tmp_path):
    import math

    import yaml

    from oral.image.base import ImageBase, ImageBaseConfig, recipe, train_image_base
    from oral.image.data import load_style_set
    from oral.image.judge import JudgeConfig, train_judge
    from oral.image.quality import evaluate_base, model_card

    latent = {**TINY_IMAGE_BASE, "vae_channels": [8, 8]}
    base_dir = train_image_base(tmp_path / "base", ImageBaseConfig(**latent, steps=2, vae_steps=3))
    judge = train_judge(tmp_path / "judge", JudgeConfig(styles=["emoji-google", "emoji-twitter"], size=8, width=8,
                                                        features=8, steps=3, batch_size=8))
    base = ImageBase.from_pretrained(base_dir)
    report = evaluate_base(base, judge, subjects=5, steps=2)
    real, _ = load_style_set("emoji-google", 8, "test", limit=5)
    back = base.decode(base.encode(real))
    assert report["test"]["vae-psnr"] == round(-10 * math.log10(float(((back - real) / 2).pow(2).mean())), 2)
    assert report["train"]["vae-fid-ours"] >= 0
    card = model_card(base, report)
    assert "latents of its own AutoencoderKL" in card and "emoji-google (Apache-2.0)" in card
    # the card's recipe, saved as a YAML config, is this base's recipe: what train-base would rebuild (or copy)
    assert recipe(yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])) == recipe(base.meta["train"])


def test_eval_base_refuses_too_few_subjects_and_a_dir_without_a_base(style_home, tmp_path, capsys):
    from oral.cli import main

    with pytest.raises(SystemExit, match="--subjects must be at least 5"):
        main(["images", "eval-base", "--base", str(tmp_path), "--subjects", "3"])
    assert main(["images", "eval-base", "--base", str(tmp_path)]) == 2
    assert "holds no trained image base" in capsys.readouterr().err
