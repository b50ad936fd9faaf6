import os
from pathlib import Path

import pytest

# Embedded models are converted once into $ORAL_HOME; tests share that cache (read-mostly) unless
# the caller set ORAL_HOME themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the embedded tiny-llama, loaded once per test session: read-only
    (a test that injects adapter layers loads a copy of its own)."""
    from oral.models import load_base

    return load_base("tiny-llama")


@pytest.fixture()
def tmp_home(tmp_path: Path, monkeypatch) -> Path:
    """An empty $ORAL_HOME for tests that must not see the shared cache."""
    home = tmp_path / "oral-home"
    monkeypatch.setenv("ORAL_HOME", str(home))
    return home


TINY_TASKS = ("sms-spam", "movie-sentiment")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """2 tasks x 1 seed on tiny-llama, the last 4 checkpoints of each 20-step run."""
    from oral.finetune import train_lora

    root = tmp_path_factory.mktemp("zoo")
    for task in TINY_TASKS:
        train_lora("tiny-llama", task, rank=4, steps=20, keep=4, save_every=2, out_dir=root, seed=0,
                   lr=2e-2, warmup_steps=2, eval_limit=8, eval_base=False)
    return root


@pytest.fixture(scope="session")
def tiny_generator_dir(tiny_zoo, tmp_path_factory) -> Path:
    """A generator trained on tiny_zoo with configs/generator-tiny.yaml (200 steps)."""
    import torch

    from oral.config import load_config
    from oral.train import GeneratorTrainConfig, train_generator

    out = tmp_path_factory.mktemp("gen") / "gen"
    cfg = load_config(GeneratorTrainConfig, Path(__file__).resolve().parents[1] / "configs" / "generator-tiny.yaml",
                      ["device=cpu"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is many times faster than two on a shared machine
    try:
        return train_generator([tiny_zoo], out, cfg)
    finally:
        torch.set_num_threads(threads)


def write_fake_style_set(home: Path, name: str, folder: str, flag: str, shade: int, n: int = 24,
                         colour=lambda i, shade: (10 * i, 255 - 10 * i, shade)) -> None:
    """A fetched style set under home/images/NAME: n subjects ("SUBJECT i", code point 1F600 + i, category by
    the parity of i) drawn as 4x4 squares of `colour(i, shade)` with one transparent corner, and one index
    entry without a picture."""
    import json

    from PIL import Image

    root = home / "images" / name
    (root / folder).mkdir(parents=True)
    entries = []
    for i in range(n):
        im = Image.new("RGBA", (4, 4), (*colour(i, shade), 255))
        im.putpixel((0, 0), (0, 0, 0, 0))
        im.save(root / folder / f"{i:04x}.png")
        entries.append({"name": f"SUBJECT {i}", "unified": f"{0x1F600 + i:X}", "image": f"{i:04x}.png", flag: True,
                        "sort_order": i, "category": ["Smileys & Emotion", "Animals & Nature"][i % 2]})
    entries.append({"name": "NO PICTURE", "image": "ffff.png", flag: False, "sort_order": 99})
    (root / "emoji.json").write_text(json.dumps(entries))


# A tiny image base config (8 px, two UNet levels): the image tests' model
TINY_IMAGE_BASE = {"size": 8, "channels": [8, 16], "vae_channels": None, "norm_groups": 8, "head_dim": 4,
                   "text_tokens": 6, "batch_size": 4, "warmup_steps": 2, "log_every": 1, "sample_steps": 3,
                   "device": "cpu"}


@pytest.fixture()
def tiny_style_stack(tmp_path):
    """A builder, on the style sets of the $ORAL_HOME the test set up: a tiny image base, a style zoo of
    emoji-twitter and emoji-apple (rank 2, 3 steps) and a tiny generator trained on it (`generator`:
    key=value overrides). Returns (base_dir, zoo_dir, gen_dir)."""
    def build(generator: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
        from oral.config import load_config
        from oral.image.base import ImageBaseConfig, train_image_base
        from oral.image.lora import StyleLoraConfig, train_style_lora
        from oral.train import GeneratorTrainConfig, train_generator

        base_dir = train_image_base(tmp_path / "base", ImageBaseConfig(**TINY_IMAGE_BASE, steps=2, save_every=2))
        cfg = StyleLoraConfig(steps=3, keep=3, batch_size=4, warmup_steps=1, checkpoint_every=0, eval_limit=4,
                              device="cpu")
        for style in ("emoji-twitter", "emoji-apple"):
            train_style_lora(base_dir, style, rank=2, out_dir=tmp_path / "zoo", cfg=cfg)
        gcfg = load_config(GeneratorTrainConfig, "configs/generator-tiny.yaml",
                           ["steps=4", "save_every=4", "device=cpu", *generator])
        return base_dir, tmp_path / "zoo", train_generator([tmp_path / "zoo"], tmp_path / "gen", gcfg)
    return build
