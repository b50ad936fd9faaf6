"""oral demo, the bundled generator and how far a prompt is from what a generator learned."""

import json
from pathlib import Path

import pytest
import torch

from oral.config import load_config
from oral.demo import format_demo, run_demo, scratch_configs
from oral.generate import FAMILIAR_SIMILARITY, GenerationError, Generator, bundle_generator, generator_card
from oral.grid import ZooConfig
from oral.tasks import get_task
from oral.train import GeneratorTrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_the_from_scratch_recipe_is_the_quick_configs():
    zoo, gen = scratch_configs()
    quick_zoo = load_config(ZooConfig, REPO / "configs" / "zoo-quick.yaml")
    quick_gen = load_config(GeneratorTrainConfig, REPO / "configs" / "generator-quick.yaml")
    assert zoo.grid == quick_zoo.grid and zoo.train == quick_zoo.train
    assert zoo.out.endswith("zoos/quick") and quick_zoo.out.endswith("zoos/quick")
    assert gen == quick_gen


def test_demo_generates_scores_three_ways_and_reuses_its_scores(tiny_generator_dir, tmp_home, monkeypatch, capsys):
    result = run_demo(prompt="Recognize unsolicited bulk messages on a phone.", generator=tiny_generator_dir,
                      base="tiny-llama", limit=16, steps=10)
    assert result["task"] == "sms-spam" and result["familiar"]  # the nearest trained task
    assert [r["method"] for r in result["rows"]] == ["base", "base + prompt in context", "base + generated adapter"]
    assert all(r["n"] == 16 and 0.0 <= r["value"] <= 1.0 for r in result["rows"])
    assert (Path(result["adapter"]) / "adapter_model.safetensors").is_file()
    table = format_demo(result)
    assert "base + generated adapter" in table and result["adapter"] in table

    from oral.evaluate import Evaluator

    def never(*a, **k):
        raise AssertionError("a cached score was measured again")

    monkeypatch.setattr(Evaluator, "evaluate", never)
    again = run_demo(prompt="Recognize unsolicited bulk messages on a phone.", generator=tiny_generator_dir,
                     base="tiny-llama", limit=16, steps=10)
    assert again["rows"] == result["rows"]


def test_prompt_in_context_prefixes_every_example_and_keeps_labels():
    task = get_task("sms-spam")
    pre = task.prefixed("Flag spam.")
    a, b = task.split("test")[:5], pre.split("test")[:5]
    assert [e.prompt for e in b] == [f"Flag spam.\n{e.prompt}" for e in a]
    assert [e.target for e in b] == [e.target for e in a] and pre.labels == task.labels


def test_far_prompts_are_flagged_and_near_ones_are_not(tiny_generator_dir):
    gen = Generator.from_pretrained(tiny_generator_dir, device="cpu")
    near = gen.familiarity(get_task("sms-spam").heldout_descriptions[1])
    far = gen.familiarity("Translate English poems into French.")
    assert near["familiar"] and near["nearest"][0]["task"] == "sms-spam"
    assert not far["familiar"] and far["nearest"][0]["similarity"] < FAMILIAR_SIMILARITY


def test_bundled_generator_is_fp16_loads_as_fp32_and_is_used_when_none_is_named(tiny_generator_dir, tmp_path,
                                                                                 monkeypatch):
    import oral.generate as g

    monkeypatch.setattr(g, "BUNDLED", tmp_path / "absent")
    with pytest.raises(GenerationError, match="build_generator.sh"):
        Generator.from_pretrained()
    card = generator_card(tiny_generator_dir)
    out = bundle_generator(tiny_generator_dir, tmp_path / "bundled", card=card)
    monkeypatch.setattr(g, "BUNDLED", out)
    assert json.loads((out / "config.json").read_text())["storage_dtype"] == "float16"
    assert "## Limits" in (out / "README.md").read_text()
    full, small = Generator.from_pretrained(tiny_generator_dir, device="cpu"), Generator.from_pretrained()
    assert all(p.dtype == torch.float32 for p in small.net.parameters())
    prompt = get_task("movie-sentiment").heldout_descriptions[0]
    _, a = full.generate("tiny-llama", prompt, seed=1, steps=10)
    _, b = small.generate("tiny-llama", prompt, seed=1, steps=10)
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm() / torch.cat([a[k].flatten() for k in a]).norm()
    assert 0 < diff < 0.02, diff  # fp16 storage changes the adapter by rounding only
    assert not (out / "checkpoints").exists() and not (out / "data").exists()
    from oral.generate import list_generators

    assert list_generators(tmp_path / "none")[0]["name"] == "bundled"
