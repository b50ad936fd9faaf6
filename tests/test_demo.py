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
    monkeypatch.setattr("oral.demo.generate_adapters", never)  # the adapter in the demo's dir is this request's
    again = run_demo(prompt="Recognize unsolicited bulk messages on a phone.", generator=tiny_generator_dir,
                     base="tiny-llama", limit=16, steps=10)
    assert again["rows"] == result["rows"] and again["adapter"] == result["adapter"]
    with pytest.raises(AssertionError, match="measured again"):  # another number of steps: a new adapter, scored
        monkeypatch.undo()
        monkeypatch.setattr(Evaluator, "evaluate", never)
        run_demo(prompt="Recognize unsolicited bulk messages on a phone.", generator=tiny_generator_dir,
                 base="tiny-llama", limit=16, steps=5)


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


def test_snap_gives_a_far_prompt_the_nearest_descriptions_adapter_and_says_so(tiny_generator_dir, tmp_path):
    from oral.generate import generate_adapters
    from oral.lora import load_adapter, read_provenance

    gen = Generator.from_pretrained(tiny_generator_dir, device="cpu")
    far, close = "Translate English poems into French.", get_task("sms-spam").heldout_descriptions[1]
    nearest = gen.familiarity(far)["nearest"][0]["description"]
    assert gen.conditioning_prompt(far) == far and gen.conditioning_prompt(far, snap=True) == nearest
    assert gen.conditioning_prompt(close, snap=True) == close  # a familiar prompt is generated for as it is
    (snapped,) = generate_adapters(gen, "tiny-llama", far, tmp_path / "snapped", seed=3, steps=5, snap=True)
    (direct,) = generate_adapters(gen, "tiny-llama", nearest, tmp_path / "direct", seed=3, steps=5)
    (plain,) = generate_adapters(gen, "tiny-llama", far, tmp_path / "plain", seed=3, steps=5)
    a, b, c = (load_adapter(p)[1] for p in (snapped, direct, plain))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert read_provenance(snapped)["prompt"] == far and read_provenance(snapped)["conditioned_on"] == nearest
    assert "conditioned_on" not in read_provenance(plain)


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


def test_a_bundled_generator_names_evolved_bases_under_oral_home_and_finds_them_elsewhere(tiny_generator_dir, tmp_path,
                                                                                          monkeypatch):
    import shutil

    here = tmp_path / "here"
    gen = tmp_path / "gen"
    shutil.copytree(tiny_generator_dir, gen)
    config = json.loads((gen / "config.json").read_text())
    evolved = str((here / "evolved" / "kjv-s100").resolve())
    config["conditions"]["bases"][0]["id"] = evolved  # as a generator trained on an evolved version records it
    config["groups"][0]["bases"] = [evolved]
    (gen / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("ORAL_HOME", str(here))
    out = bundle_generator(gen, tmp_path / "bundled")
    shipped = json.loads((out / "config.json").read_text())
    assert shipped["conditions"]["bases"][0]["id"] == "$ORAL_HOME/evolved/kjv-s100"
    assert shipped["groups"][0]["bases"] == ["$ORAL_HOME/evolved/kjv-s100"]
    monkeypatch.setenv("ORAL_HOME", str(tmp_path / "elsewhere"))
    loaded = Generator.from_pretrained(out, device="cpu")
    assert (0, str(tmp_path / "elsewhere" / "evolved" / "kjv-s100")) in loaded.c_model_cache


def test_the_generator_card_reads_an_experiment_result(tiny_generator_dir):
    from oral.generate import score_table

    def row(version, task, method, value, seed=None):
        return {"base": f"b{version}", "version": version, "task": task, "method": method, "description": None,
                "seed": seed, "split": "test", "metric": "accuracy", "value": value, "n": 200}

    result = {"experiment": "family-seen", "versions": {"0": "tiny-llama", "1": "/x/evolved/kjv"}, "wall_s": 12.0,
              "config": {"versions": [0, 1], "descriptions": 2, "seeds": [0, 1], "limit": 200, "split": "test", "steps": 10},
              "rows": [row(0, "sms-spam", "base", 0.2), row(0, "sms-spam", "oracle", 1.0),
                       row(0, "sms-spam", "generated", 0.9, 0), row(0, "sms-spam", "generated", 0.7, 1),
                       {**row(0, "sms-spam", "generated", 0.4, 0), "metric": "cosine-to-nearest"},
                       row(1, "trec-question", "base", 0.5), row(1, "trec-question", "generated", 0.6, 0)]}
    (cell,) = score_table(result)  # t1 trec-question has no oracle: left out; the distance row is not a score
    assert (cell["version"], cell["task"], cell["samples"]) == ("t0", "sms-spam", 2)
    assert cell["generated_mean"] == pytest.approx(0.8) and cell["recovered"] == pytest.approx(0.75)
    card = generator_card(tiny_generator_dir, result)
    assert "| t0 | sms-spam | 200 | 0.200 | 1.000 | 0.800 +- 0.141 (2) | 75% |" in card
    assert "tiny-llama (t0)" in card and "oral experiment family-seen" in card
