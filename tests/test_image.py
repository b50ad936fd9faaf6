"""The image domain: style sets read from a fetched package, and the image base model (train, resume, sample)."""

import pytest
import torch
from conftest import TINY_IMAGE_BASE, write_fake_style_set


@pytest.fixture
def style_home(tmp_path, monkeypatch):
    """$ORAL_HOME with fetched emoji-google and emoji-twitter sets (the same 24 subjects, other colours)."""
    monkeypatch.setenv("ORAL_HOME", str(tmp_path / "home"))
    for name, shade in (("google", 128), ("twitter", 0), ("apple", 255)):
        write_fake_style_set(tmp_path / "home", f"emoji-{name}", f"img/{name}/64", f"has_img_{name}", shade)
    return tmp_path / "home"


TINY = TINY_IMAGE_BASE


def test_a_style_set_reads_named_pictures_on_white_and_holds_test_subjects_out_of_training(style_home):
    from oral.image.data import is_test_subject, load_style_set

    train, train_names = load_style_set("emoji-google", size=2, split="train")
    _, test_names = load_style_set("emoji-google", size=2, split="test")
    everything, names = load_style_set("emoji-google", size=4, split="all")
    assert len(names) == 24 and "no picture" not in names and names[0] == "subject 0"
    assert test_names and sorted(train_names + test_names) == sorted(names) and not set(train_names) & set(test_names)
    assert all(is_test_subject(n) for n in test_names) and not any(is_test_subject(n) for n in train_names)
    assert everything.shape == (24, 3, 4, 4) and train.shape == (len(train_names), 3, 2, 2)
    assert torch.equal(everything[:, :, 0, 0], torch.ones(24, 3))  # the transparent corner is white
    assert everything[1, :, 1, 1].tolist() == pytest.approx([10 / 127.5 - 1, 245 / 127.5 - 1, 128 / 127.5 - 1], abs=1e-6)
    again, _ = load_style_set("emoji-google", size=4, split="all")  # from the tensor cache
    assert torch.equal(again, everything)


def test_an_unknown_or_unfetched_style_set_says_how_to_get_one(tmp_path, monkeypatch):
    from oral.image.data import StyleSetError, load_style_set

    monkeypatch.setenv("ORAL_HOME", str(tmp_path))
    with pytest.raises(StyleSetError, match="known: emoji-google"):
        load_style_set("emoji-goggle")
    with pytest.raises(StyleSetError, match="oral images fetch emoji-twitter"):
        load_style_set("emoji-twitter")


def test_a_bad_image_base_config_is_refused_with_the_rule():
    from oral.image.base import ImageBaseConfig, ImageBaseError

    with pytest.raises(ImageBaseError, match="divisible by 2\\^2"):
        ImageBaseConfig(size=30, channels=[16, 32, 32])
    with pytest.raises(ImageBaseError, match="norm_groups"):
        ImageBaseConfig(channels=[16, 24], norm_groups=16)


def test_min_snr_weighting_keeps_the_noisy_steps_and_damps_the_clean_ones():
    from oral.image.base import ImageBaseConfig, ImageBaseError, build_scheduler, denoising_loss

    sched = build_scheduler(ImageBaseConfig())
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)  # (1000,)
    clean, noisy = int((snr > 100).nonzero().max()), int((snr < 1).nonzero().min())  # SNR far above / below gamma
    pred, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)  # squared error 1 everywhere
    t = torch.tensor([clean, noisy])
    assert denoising_loss(pred, target, t, sched, "v_prediction", None).item() == pytest.approx(1.0)
    # v: weight min(SNR, 5) / (SNR + 1): 5 / (SNR + 1) at the clean step, SNR / (SNR + 1) at the noisy one
    want = (5 / (snr[clean] + 1) + snr[noisy] / (snr[noisy] + 1)) / 2
    assert denoising_loss(pred, target, t, sched, "v_prediction", 5.0).item() == pytest.approx(float(want), rel=1e-5)
    # epsilon: min(SNR, 5) / SNR: 1 where SNR <= 5, 5 / SNR above
    want = (5 / snr[clean] + 1.0) / 2
    assert denoising_loss(pred, target, t, sched, "epsilon", 5.0).item() == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ImageBaseError, match="snr_gamma must be positive"):
        ImageBaseConfig(snr_gamma=0)


def test_the_image_base_trains_resumes_to_the_same_weights_and_samples_through_diffusers(style_home, tmp_path):
    from diffusers import UNet2DConditionModel

    from oral.image.base import ImageBase, ImageBaseConfig, train_image_base

    cfg = ImageBaseConfig(**TINY, steps=6, save_every=3)
    straight = train_image_base(tmp_path / "straight", cfg)
    train_image_base(tmp_path / "resumed", cfg, stop_at=3)
    assert not (tmp_path / "resumed" / "samples.png").exists()
    resumed = train_image_base(tmp_path / "resumed", cfg)
    a = UNet2DConditionModel.from_pretrained(straight / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(resumed / "unet").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    losses = [r.split(",")[1] for r in (straight / "loss.csv").read_text().splitlines()[1:]]
    assert losses == [r.split(",")[1] for r in (resumed / "loss.csv").read_text().splitlines()[1:]] and len(losses) == 6
    assert (straight / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    base = ImageBase.from_pretrained(straight)
    x = base.sample(["subject 1", "a red square"], steps=3, guidance=2.0, seed=1)
    assert x.shape == (2, 3, 8, 8) and x.abs().max() <= 1
    assert torch.equal(x, base.sample(["subject 1", "a red square"], steps=3, guidance=2.0, seed=1))
    assert not torch.equal(x[0], x[1])


def test_a_latent_base_trains_its_autoencoder_first_resumes_it_and_draws_through_it(style_home, tmp_path):
    from diffusers import AutoencoderKL

    from oral.image.base import (
        VAE_CHECKPOINTS,
        ImageBase,
        ImageBaseConfig,
        ImageBaseError,
        copy_image_base,
        recipe,
        train_autoencoder,
        train_image_base,
    )

    assert not any(k.startswith("vae_") for k in recipe(ImageBaseConfig(**TINY)))  # pixel bases keep their recipe
    with pytest.raises(ImageBaseError, match="latents' side 4"):
        ImageBaseConfig(**{**TINY, "channels": [8, 16, 16, 16], "vae_channels": [8, 8]})
    cfg = ImageBaseConfig(**{**TINY, "vae_channels": [8, 8]}, vae_latent_channels=4, steps=2, save_every=2,
                          vae_steps=4, vae_styles=["emoji-google", "emoji-twitter"])
    straight = train_image_base(tmp_path / "straight", cfg)
    vae = AutoencoderKL.from_pretrained(straight / "vae")
    assert vae.config.scaling_factor != 1.0 and vae.config.latent_channels == 4
    train_autoencoder(tmp_path / "resumed", cfg, torch.device("cpu"), stop_at=2)
    assert (tmp_path / "resumed" / VAE_CHECKPOINTS).is_dir() and not (tmp_path / "resumed" / "vae").exists()
    resumed = train_image_base(tmp_path / "resumed", cfg)
    a, b = vae.state_dict(), AutoencoderKL.from_pretrained(resumed / "vae").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    base = ImageBase.from_pretrained(straight)
    assert base.vae is not None and (base.channels, base.model_size) == (4, 4)
    # latents are not pictures in [-1, 1]: the sampler must not clip them there (pixel bases' does)
    assert not base.noise_scheduler().config.clip_sample
    assert ImageBase.from_pretrained(train_image_base(tmp_path / "pixels", ImageBaseConfig(**TINY, steps=1))
                                     ).noise_scheduler().config.clip_sample
    x = base.sample(["subject 1", "a red square"], steps=3, guidance=2.0, seed=1)
    assert x.shape == (2, 3, 8, 8) and x.abs().max() <= 1 and not torch.equal(x[0], x[1])
    assert base.encode(x).shape == (2, 4, 4, 4)
    shipped = copy_image_base(straight, tmp_path / "package", card="# a card\n")
    assert (shipped / "vae" / "config.json").is_file() and not (shipped / VAE_CHECKPOINTS).exists()
    assert torch.equal(ImageBase.from_pretrained(shipped).sample(["subject 1"], steps=3, seed=1), base.sample(
        ["subject 1"], steps=3, seed=1))
    # a style LoRA learns the latents of its pictures
    from oral.image.lora import StyleLoraConfig, load_style_unet, train_style_lora

    lcfg = StyleLoraConfig(steps=2, keep=1, batch_size=4, warmup_steps=1, checkpoint_every=0, eval_limit=4, device="cpu")
    (adapter,) = train_style_lora(straight, "emoji-twitter", rank=2, out_dir=tmp_path / "zoo", cfg=lcfg)
    drawn = base.sample(["subject 1"], steps=3, seed=1, unet=load_style_unet(base, adapter))
    assert drawn.shape == (1, 3, 8, 8)


def test_a_base_the_package_ships_is_copied_for_its_own_recipe_only(style_home, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    import oral.image.base as image_base
    from oral.image.base import ImageBaseConfig, copy_image_base, list_image_bases, train_image_base

    cfg = ImageBaseConfig(**TINY, steps=2)
    trained = train_image_base(tmp_path / "trained", cfg)
    shipped = copy_image_base(trained, tmp_path / "package" / "image-base", card="# a card\n")
    assert (shipped / "README.md").read_text() == "# a card\n" and not (shipped / "checkpoints").exists()
    monkeypatch.setattr(image_base, "BUNDLED", shipped)
    assert image_base.bundled_recipe() == image_base.recipe(cfg)
    assert "copies it here in seconds" in list_image_bases()[-1]["source"]  # the default dir is not installed

    copied = train_image_base(tmp_path / "copied", cfg)  # the same recipe: copied, not trained
    assert not (copied / "checkpoints").exists() and (copied / "samples.png").is_file()
    a = UNet2DConditionModel.from_pretrained(trained / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(copied / "unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (copied / "image_base.json").read_text() == (trained / "image_base.json").read_text()
    # another recipe, or asked to retrain: trained
    assert (train_image_base(tmp_path / "other", ImageBaseConfig(**TINY, steps=2, lr=1e-3)) / "checkpoints").is_dir()
    assert (train_image_base(tmp_path / "again", cfg, use_bundled=False) / "checkpoints").is_dir()
    (shipped / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # an install without it: nothing shipped
    assert image_base.bundled_recipe() is None


def test_the_package_copy_of_a_base_stores_float16_and_draws_as_the_float32_base(style_home, tmp_path):
    from safetensors.torch import load_file

    from oral.image.base import ImageBase, ImageBaseConfig, copy_image_base, train_image_base

    trained = train_image_base(tmp_path / "trained", ImageBaseConfig(**TINY, steps=2))
    half = copy_image_base(trained, tmp_path / "half", card="# a card\n", dtype=torch.float16)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert {v.dtype for v in load_file(half / weights).values()} == {torch.float16}
    assert (half / weights).stat().st_size < 0.6 * (trained / weights).stat().st_size
    full, read = ImageBase.from_pretrained(trained), ImageBase.from_pretrained(half)
    assert {p.dtype for p in read.unet.parameters()} == {torch.float32}
    a, b = (base.sample(["subject 1", "subject 2"], steps=3, seed=1) for base in (full, read))
    assert (a - b).abs().max() < 1e-2


def test_a_style_lora_trains_into_a_zoo_resumes_and_loads_the_same_through_peft_and_diffusers(style_home, tmp_path):
    from oral.image.base import ImageBase, ImageBaseConfig, train_image_base
    from oral.image.lora import (
        DIFFUSERS_WEIGHTS,
        StyleLoraConfig,
        StyleLoraError,
        load_style_unet,
        train_style_lora,
    )
    from oral.lora import load_adapter
    from oral.zoo import Zoo

    base_dir = train_image_base(tmp_path / "base", ImageBaseConfig(**TINY, steps=2, save_every=2))
    cfg = StyleLoraConfig(steps=4, keep=2, batch_size=4, warmup_steps=1, checkpoint_every=0, eval_limit=8, device="cpu")
    with pytest.raises(StyleLoraError, match="already draws emoji-google"):
        train_style_lora(base_dir, "emoji-google", out_dir=tmp_path / "zoo", cfg=cfg)
    straight = train_style_lora(base_dir, "emoji-twitter", rank=2, out_dir=tmp_path / "zoo", cfg=cfg)
    train_style_lora(base_dir, "emoji-twitter", rank=2, out_dir=tmp_path / "zoo2", cfg=cfg, stop_at=3)
    resumed = train_style_lora(base_dir, "emoji-twitter", rank=2, out_dir=tmp_path / "zoo2", cfg=cfg)
    assert [p.name for p in straight] == ["step-000003", "step-000004"] == [p.name for p in resumed]
    (final,) = [r for r in Zoo(tmp_path / "zoo").records() if r["final"]]
    assert (final["task"], final["rank"], final["domain"], final["val_metric"]["metric"]) == ("emoji-twitter", 2, "image", "denoise-mse")
    assert final["val_metric"]["n"] == final["base_val_metric"]["n"] > 0
    spec, state = load_adapter(straight[-1])  # the PEFT dir the generator reads
    _, again = load_adapter(resumed[-1])
    assert all(torch.allclose(state[k], again[k], atol=1e-6) for k in state)
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    assert {next(t for t in targets if m.name.endswith(t)) for m in spec.modules} == set(targets)
    assert {m.rank for m in spec.modules} == {2} and all(".attn" in m.name for m in spec.modules)
    assert (straight[-1] / DIFFUSERS_WEIGHTS).is_file()

    # diffusers' load_lora_adapter gives the same UNet as PEFT's wrapper (the adapter's effect is not zero)
    from peft import PeftModel

    base = ImageBase.from_pretrained(base_dir)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    emb, mask = base.names(["subject 1", "subject 2"])
    kw = dict(encoder_hidden_states=emb, encoder_attention_mask=mask)
    with torch.no_grad():
        plain = base.unet(x, t, **kw).sample
        ours = load_style_unet(base, straight[-1])(x, t, **kw).sample
        peft = PeftModel.from_pretrained(ImageBase.from_pretrained(base_dir).unet, straight[-1])(x, t, **kw).sample
    assert torch.allclose(ours, peft, atol=1e-6) and not torch.allclose(ours, plain, atol=1e-4)


def test_the_generator_learns_style_loras_by_the_language_code_path_and_writes_what_diffusers_loads(
        style_home, tmp_path, tiny_style_stack):
    """A style zoo -> `oral train` -> `oral generate --base IMAGE_BASE`: the same conditions, tokens and
    generator as for language models; the written dir is a PEFT adapter and diffusers' LoRA file."""
    from oral.generate import Generator, generate_adapters
    from oral.image.base import ImageBase
    from oral.image.lora import DIFFUSERS_WEIGHTS, load_style_unet
    from oral.lora import load_adapter

    base_dir, _, gen_dir = tiny_style_stack()
    gen = Generator.from_pretrained(gen_dir, device="cpu")
    assert sorted(gen.config["conditions"]["tasks"]) == ["emoji-apple", "emoji-twitter"]
    assert gen.config["conditions"]["bases"][0]["metadata"].startswith("UNet2DConditionModel (diffusers)")
    (out,) = generate_adapters(gen, str(base_dir), "flat pastel emoji in the Twitter style", tmp_path / "a", steps=2)
    spec, state = load_adapter(out)
    assert spec.modules[0].rank == 2 and (out / DIFFUSERS_WEIGHTS).is_file()
    base = ImageBase.from_pretrained(base_dir)
    x = base.sample(["subject 3"], steps=2, seed=0, unet=load_style_unet(base, out))
    assert x.shape == (1, 3, 8, 8) and torch.isfinite(x).all()


def test_sampling_with_a_perfect_noise_predictor_returns_its_picture(style_home, tmp_path):
    """The sampler (DDIM steps, guidance, the schedule as saved) is right independently of training: a
    UNet that predicts the exact noise toward one picture must draw that picture."""
    from diffusers import DDPMScheduler

    from oral.image.base import ImageBase, ImageBaseConfig, train_image_base

    base = ImageBase.from_pretrained(train_image_base(tmp_path / "base", ImageBaseConfig(**TINY, steps=1, save_every=1)))
    target = torch.rand(1, 3, 8, 8) * 2 - 1
    alphas = DDPMScheduler.from_config(base.scheduler_config).alphas_cumprod

    class Oracle(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states=None, encoder_attention_mask=None):
            ab = alphas[int(t)]
            eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
            return type("Out", (), {"sample": eps})()

    for guidance in (1.0, 3.0):
        x = base.sample(["subject 1", "subject 2"], steps=20, guidance=guidance, seed=0, unet=Oracle())
        assert torch.allclose(x, target.expand(2, -1, -1, -1), atol=1e-3), (x - target).abs().max()


def test_the_shipped_image_configs_load():
    """Every image-base and style-zoo config in configs/ builds its config (a typo'd key or a style set
    that does not exist fails here, not an hour into a run)."""
    from pathlib import Path

    from oral.config import load_config
    from oral.grid import ZooConfig
    from oral.image.base import ImageBaseConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    bases = sorted(configs.glob("image-base-*.yaml"))
    zoos = sorted(configs.glob("zoo-styles*.yaml"))
    assert len(bases) >= 3 and len(zoos) >= 2
    for path in bases:
        cfg = load_config(ImageBaseConfig, path)
        assert cfg.style == "emoji-google", path
    wide = load_config(ImageBaseConfig, configs / "image-base-emoji-latent-wide.yaml")
    assert wide.vae_channels and len(wide.vae_styles) == 6 and wide.latent_size == 8
    for path in zoos:
        cfg = load_config(ZooConfig, path)
        assert cfg.grid, path
