"""The image domain's evaluation: SVG style sets, the judge (FID-ours, KID-ours, style and subject accuracy),
style runs in `oral zoo` grids, and the image-styles experiment end to end on tiny assets."""

import io
import json
import os
import shutil
import tarfile

import pytest
import torch
from conftest import TINY_IMAGE_BASE, write_fake_style_set

TINY = TINY_IMAGE_BASE


@pytest.fixture
def style_home(tmp_path, monkeypatch):
    """$ORAL_HOME with three fetched sets of 40 subjects: the blue channel is the style, the red the category."""
    monkeypatch.setenv("ORAL_HOME", str(tmp_path / "home"))
    for name, shade in (("google", 128), ("twitter", 0), ("apple", 255)):
        write_fake_style_set(tmp_path / "home", f"emoji-{name}", f"img/{name}/64", f"has_img_{name}", shade, n=40,
                             colour=lambda i, shade: (200 * (i % 2), 6 * i, shade))
    return tmp_path / "home"


def test_an_svg_style_set_is_drawn_at_fetch_time_and_named_by_code_point(style_home, tmp_path, monkeypatch):
    """OpenMoji's SVGs, fetched by `npm pack`, are rasterised once and take emoji-datasource's names (joined on
    the code point); skin-tone variants and code points it does not know are left out."""
    from oral.image.data import load_style_set

    svg = b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8"><rect width="8" height="8" fill="#ff0000"/></svg>'
    meta = [{"hexcode": "1F600", "annotation": "grinning face", "skintone": ""},
            {"hexcode": "1F601", "annotation": "beaming face", "skintone": ""},
            {"hexcode": "1F601-1F3FB", "annotation": "beaming face: light", "skintone": "1"},
            {"hexcode": "E000", "annotation": "an OpenMoji extra", "skintone": ""}]
    pkg = tmp_path / "openmoji-17.0.0.tgz"
    with tarfile.open(pkg, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("data/openmoji.json", json.dumps(meta).encode())
        for m in meta:
            add(f"color/svg/{m['hexcode']}.svg", svg)
    (tmp_path / "bin").mkdir()
    npm = tmp_path / "bin" / "npm"  # `npm pack` without the network
    npm.write_text(f"#!/bin/sh\ncp {pkg} .\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{npm.parent}:{os.environ['PATH']}")

    from oral.image.data import fetch_style_set

    fetch_style_set("openmoji-color")
    images, names = load_style_set("openmoji-color", size=4, split="all")
    assert names == ["subject 0", "subject 1"]  # emoji-google's names of 1F600, 1F601
    assert torch.allclose(images[0, :, 2, 2], torch.tensor([1.0, -1.0, -1.0]))  # the red square, drawn


def test_frechet_distance_and_kid_follow_their_definitions():
    from oral.image.judge import frechet_distance, kernel_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0, 0, 0, 0.5], dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)  # same covariance
    assert frechet_distance(a, 3 * a) > frechet_distance(a, 1.1 * a) > 0
    b = torch.randn(400, 6, generator=g, dtype=torch.float64)
    assert abs(kernel_distance(a, b)) < kernel_distance(a, a + shift)  # unbiased: ~0 for one distribution


def test_the_judge_tells_styles_and_subject_categories_apart_on_held_out_subjects(style_home, tmp_path):
    from oral.image.judge import Judge, JudgeConfig, JudgeError, train_judge

    with pytest.raises(JudgeError, match="at least two"):
        JudgeConfig(styles=["emoji-google"])
    cfg = JudgeConfig(styles=["emoji-google", "emoji-twitter", "emoji-apple"], size=4, width=8, features=8,
                      steps=150, batch_size=32, lr=1e-2, warmup_steps=5, noise=0.05)
    judge = train_judge(tmp_path / "judge", cfg)
    held = judge.meta["heldout"]
    assert held["style_acc"] > 0.9 and held["category_acc"] > 0.9, held
    again = Judge.from_pretrained(tmp_path / "judge")
    x = torch.rand(5, 3, 4, 4) * 2 - 1
    f1, s1, c1 = judge.predict(x)
    f2, s2, c2 = again.predict(x)
    assert torch.allclose(f1, f2) and torch.equal(s1, s2) and torch.equal(c1, c2) and f1.shape == (5, 8)
    big = torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")  # the same pictures at 16 px
    assert torch.equal(judge.predict(big)[1], s1)
    with pytest.raises(JudgeError, match="oral images train-judge"):
        Judge.from_pretrained(tmp_path / "nothing")


def test_a_zoo_grid_on_an_image_base_trains_style_runs(style_home, tmp_path):
    from oral.grid import GridBlock, ZooConfig, run_grid
    from oral.image.base import ImageBaseConfig, train_image_base
    from oral.image.lora import StyleLoraConfig
    from oral.zoo import Zoo

    base_dir = train_image_base(tmp_path / "base", ImageBaseConfig(**TINY, steps=2, save_every=2))
    cfg = ZooConfig(out=str(tmp_path / "zoo"), grid=[GridBlock(bases=[str(base_dir)], tasks=["emoji-twitter"],
                                                               ranks=[2], seeds=[0, 1])],
                    style_train=StyleLoraConfig(steps=2, keep=1, batch_size=4, warmup_steps=1, checkpoint_every=0,
                                                eval_limit=4, device="cpu"))
    counts = run_grid(cfg)
    finals = [r for r in Zoo(tmp_path / "zoo").records() if r["final"]]
    assert counts["style_runs"] == 2 and sorted(r["seed"] for r in finals) == [0, 1]
    assert {(r["domain"], r["task"], r["rank"]) for r in finals} == {("image", "emoji-twitter", 2)}


def test_the_image_styles_experiment_writes_rows_tables_and_grids_and_reuses_its_cache(style_home, tmp_path,
                                                                                     tiny_style_stack):
    """Tiny base, a two-style zoo, a generator that saw one style, a judge: base / trained / generated rows
    for every measure, the unseen style marked, a grid for the free style only; a rerun draws nothing."""
    from oral.config import load_config
    from oral.experiments.image_styles import (
        ImageStyles,
        ImageStylesConfig,
        format_tables,
    )
    from oral.image.judge import JudgeConfig, train_judge
    from oral.train import GeneratorTrainConfig, train_generator

    base_dir, zoo_dir, gen_dir = tiny_style_stack(("tasks=[emoji-twitter]",))
    train_judge(tmp_path / "judge", JudgeConfig(styles=["emoji-google", "emoji-twitter", "emoji-apple"], size=8,
                                                width=8, features=8, steps=5, batch_size=8))
    cfg = ImageStylesConfig(base=str(base_dir), zoo=str(zoo_dir), generator=str(gen_dir),
                            judge=str(tmp_path / "judge"), rank=2, descriptions=1, seeds=[0, 1], gen_steps=2,
                            subjects=4, steps=2, out=str(tmp_path / "out"), cache=str(tmp_path / "cache"))
    result = ImageStyles(cfg).run()
    rows = result["rows"]
    assert {r["task"] for r in rows} == {"emoji-twitter", "emoji-apple"}
    assert {r["metric"] for r in rows} == {"fid-ours", "kid-ours", "style-acc", "subject-acc", "rel-l2-to-nearest"}
    distances = [r for r in rows if r["metric"] == "rel-l2-to-nearest"]
    assert {r["method"] for r in distances} == {"generated"} and {r["nearest_task"] for r in distances} == {"emoji-twitter"}
    per = lambda style, method: [r for r in rows if r["task"] == style and r["method"] == method]
    assert len(per("emoji-apple", "base")) == 4 and len(per("emoji-apple", "generated")) == 2 * 5
    assert {r["seen"] for r in per("emoji-apple", "trained")} == {False}
    assert {r["seen"] for r in per("emoji-twitter", "generated")} == {True}
    assert {r["from_task"] for r in per("emoji-apple", "nearest")} == {"emoji-twitter"}  # the only style it saw
    assert all(0 <= r["value"] <= 1 for r in rows if r["metric"].endswith("-acc"))
    out = tmp_path / "out"
    assert json.loads((out / "exp-image-styles.json").read_text())["rows"] == rows
    assert (out / "exp-image-styles-emoji-twitter.png").is_file()
    assert not (out / "exp-image-styles-emoji-apple.png").exists()  # not a free style: no pictures in docs
    assert "held out of the generator" in format_tables(result)

    again = ImageStyles(cfg)
    drawn = []
    again.draw = lambda *a, **k: drawn.append(a)
    assert again.run()["rows"] == rows and not drawn

    # a generator trained again in the same dir is another generator: its adapters are not the cached ones
    shutil.rmtree(gen_dir)
    train_generator([zoo_dir], gen_dir, load_config(GeneratorTrainConfig, "configs/generator-tiny.yaml",
                    ["steps=4", "save_every=4", "device=cpu", "tasks=[emoji-twitter]", "seed=1"]))
    retrained = ImageStyles(cfg)
    assert retrained.gen_digest != again.gen_digest
    assert [d.adapter for d in retrained.candidates("emoji-twitter") if d.method == "generated"] != \
        [d.adapter for d in again.candidates("emoji-twitter") if d.method == "generated"]


def test_oral_models_lists_built_image_bases_or_says_how_to_build_one(style_home, tmp_path):
    from oral.image.base import (
        BUILD_COMMAND,
        ImageBaseConfig,
        list_image_bases,
        train_image_base,
    )

    (row,) = list_image_bases()
    assert row["path"] is None and BUILD_COMMAND in row["source"]
    train_image_base(style_home / "image-bases" / "emoji-google", ImageBaseConfig(**TINY, steps=1, save_every=1))
    (row,) = list_image_bases()
    assert row["path"] == str(style_home / "image-bases" / "emoji-google") and row["num_params"] > 0


def _tiny_sd_pipeline(out, unet_config: dict):
    """A Stable Diffusion pipeline dir with seeded random weights, built from configs alone (no download):
    a UNet of `unet_config` on 4 latent channels, a one-block VAE, a one-layer CLIP text model as wide as the
    UNet's cross-attention and a byte-level CLIP tokenizer."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]  # GPT-2's byte map
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    out.mkdir(parents=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**unet_config, "in_channels": 4, "out_channels": 4})
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), norm_num_groups=4,
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, sample_size=16)
    width = unet.config.cross_attention_dim
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=16))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "pipe")
    return out / "pipe"


def test_a_generated_lora_for_a_stable_diffusion_pipeline_dir_loads_with_load_lora_weights(style_home, tmp_path,
                                                                                        tiny_style_stack):
    """A diffusers pipeline dir is a base: its UNet's layout comes from unet/config.json, and the written dir
    holds the file `StableDiffusionPipeline.load_lora_weights` reads; the pipeline then draws otherwise.
    (A generator writes LoRAs for the UNet layouts of its zoo: this pipeline's UNet has the tiny image base's
    layout, on 4 latent channels; Stable Diffusion 2.1 itself needs a zoo on its UNet.)"""
    from diffusers import StableDiffusionPipeline

    from oral.generate import generate_adapters
    from oral.image.lora import StyleLoraConfig, train_style_lora
    from oral.models import is_image_base, is_unet_base, load_base_config

    base_dir, _, gen_dir = tiny_style_stack()
    pipe_dir = _tiny_sd_pipeline(tmp_path / "sd", load_base_config(base_dir))
    assert is_unet_base(pipe_dir) and not is_image_base(pipe_dir)
    assert load_base_config(pipe_dir)["_class_name"] == "UNet2DConditionModel"
    cfg = StyleLoraConfig(steps=3, keep=3, batch_size=4, warmup_steps=1, checkpoint_every=0, eval_limit=4, device="cpu")

    (out,) = generate_adapters(gen_dir, str(pipe_dir), "flat pastel emoji in the Twitter style", tmp_path / "a",
                               steps=2, device="cpu")
    # a style LoRA trains on the pipeline itself (its VAE's latents, its CLIP names) and draws through it
    from oral.image.base import ImageBase
    from oral.image.lora import load_style_unet
    from oral.zoo import Zoo

    kept = train_style_lora(pipe_dir, "emoji-twitter", rank=2, out_dir=tmp_path / "sd-zoo", cfg=cfg)
    (final,) = [r for r in Zoo(tmp_path / "sd-zoo").records() if r["final"]]
    assert final["base"] == str(pipe_dir.resolve()) and final["val_metric"]["value"] > 0
    sd = ImageBase.from_pretrained(pipe_dir)
    x = sd.sample(["subject 3"], steps=2, guidance=2.0, seed=0, unet=load_style_unet(sd, kept[-1]))
    assert x.shape == (1, 3, 8, 8) and torch.isfinite(x).all()

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    kw = {"num_inference_steps": 2, "height": 8, "width": 8, "output_type": "pt"}
    plain = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(out))
    styled = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert styled.shape == plain.shape == (1, 3, 8, 8) and not torch.allclose(plain, styled)


def test_image_styles_measures_the_base_alone_without_a_zoo_and_needs_one_for_trained(style_home, tmp_path):
    from oral.experiments.compare import ExperimentError
    from oral.experiments.image_styles import ImageStyles, ImageStylesConfig
    from oral.image.base import ImageBaseConfig, train_image_base
    from oral.image.judge import JudgeConfig, train_judge

    base_dir = train_image_base(tmp_path / "base", ImageBaseConfig(**TINY_IMAGE_BASE, steps=2))
    train_judge(tmp_path / "judge", JudgeConfig(styles=["emoji-google", "emoji-twitter", "emoji-apple"], size=8,
                                                width=8, features=8, steps=3, batch_size=8))
    common = dict(base=str(base_dir), zoo=str(tmp_path / "no-zoo"), judge=str(tmp_path / "judge"), subjects=4, steps=2,
                  out=str(tmp_path / "out"), cache=str(tmp_path / "cache"))
    result = ImageStyles(ImageStylesConfig(**common, methods=["base"], styles=["emoji-twitter"])).run()
    assert {(r["task"], r["method"]) for r in result["rows"]} == {("emoji-twitter", "base")}
    assert {r["metric"] for r in result["rows"]} == {"fid-ours", "kid-ours", "style-acc", "subject-acc"}
    with pytest.raises(ExperimentError, match="holds no finished style runs"):
        ImageStyles(ImageStylesConfig(**common, methods=["base", "trained"], styles=["emoji-twitter"]))
