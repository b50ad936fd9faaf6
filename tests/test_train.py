"""The generator end to end on tiny-llama: a tiny zoo (2 tasks), a short training, generation."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TASKS = ("sms-spam", "movie-sentiment")  # the tasks of the tiny_zoo fixture (conftest.py)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is many times faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def zoo(tiny_zoo) -> Path:
    return tiny_zoo


@pytest.fixture(scope="module")
def gen_dir(tiny_generator_dir) -> Path:
    assert json.loads((tiny_generator_dir / "config.json").read_text())["step"] == 200
    return tiny_generator_dir


@pytest.fixture(scope="module")
def generator(gen_dir):
    from oral.generate import Generator

    return Generator.from_pretrained(gen_dir, device="cpu")


@pytest.fixture(scope="module")
def evaluator():
    from oral.evaluate import Evaluator
    from oral.models import load_base

    model, tok = load_base("tiny-llama")  # its own copy: the evaluator injects LoRA layers into it
    return Evaluator(model, tok, batch_size=32, progress=False)


def test_training_loss_falls(gen_dir):
    from oral.train import read_loss_log

    rows = read_loss_log(gen_dir)
    assert rows[-1]["step"] == 200
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert (gen_dir / "loss.png").stat().st_size > 1000


def test_checkpoints_are_safetensors_and_json_only_and_record_zoo_and_conditions(gen_dir, zoo):
    from oral.zoo_data import manifest_sha256

    files = [p for p in gen_dir.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json", ".csv", ".png") for p in files), files
    assert [p.name for p in (gen_dir / "checkpoints").iterdir()] and all(
        p.name.isdigit() for p in (gen_dir / "checkpoints").iterdir())
    cfg = json.loads((gen_dir / "config.json").read_text())
    assert cfg["zoos"][0]["manifest_sha256"] == manifest_sha256(zoo)
    assert set(cfg["conditions"]["tasks"]) == set(TASKS)
    assert cfg["conditions"]["bases"][0]["id"] == "tiny-llama"
    from oral.tasks import get_task

    for t in TASKS:  # training descriptions only; held-out ones never reach the generator
        assert cfg["conditions"]["tasks"][t]["descriptions"] == get_task(t).descriptions
        assert not set(get_task(t).heldout_descriptions) & set(cfg["conditions"]["tasks"][t]["descriptions"])


def test_generated_adapter_lowers_the_task_loss_like_the_zoo_adapters(generator, evaluator, zoo, tiny):
    from oral.lora import load_adapter
    from oral.tasks import get_task
    from oral.zoo import Zoo

    for name in TASKS:
        task = get_task(name)
        evaluator.set_adapter(None)
        base = evaluator.task_loss(task, "validation", limit=32)
        final = next(r for r in Zoo(zoo).records(task=name) if r.get("final"))
        spec, state = load_adapter(Zoo(zoo).path(final))
        evaluator.set_adapter(state, spec)
        trained = evaluator.task_loss(task, "validation", limit=32)
        spec, state = generator.generate("tiny-llama", task.heldout_descriptions[0], seed=0, base_model=tiny[0])
        evaluator.set_adapter(state, spec)
        generated = evaluator.task_loss(task, "validation", limit=32)
        assert trained < base - 0.2, (name, base, trained)  # the zoo itself learned something
        # the generated adapter recovers at least half of the trained adapter's gain
        assert generated < base - 0.5 * (base - trained), (name, base, trained, generated)
        # control: the adapter made from the other task's prompt does worse on this task than its own
        other = get_task(next(t for t in TASKS if t != name)).heldout_descriptions[0]
        spec, state = generator.generate("tiny-llama", other, seed=0, base_model=tiny[0])
        evaluator.set_adapter(state, spec)
        swapped = evaluator.task_loss(task, "validation", limit=32)
        assert swapped > generated + 0.1 * (base - trained), (name, generated, swapped)


def test_two_task_prompts_give_different_adapters_and_same_seed_the_same(generator):
    from oral.tasks import get_task

    a = get_task(TASKS[0]).heldout_descriptions[0]
    b = get_task(TASKS[1]).heldout_descriptions[0]
    _, s1 = generator.generate("tiny-llama", a, seed=3)
    _, s2 = generator.generate("tiny-llama", a, seed=3)
    _, s3 = generator.generate("tiny-llama", b, seed=3)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    diff = torch.cat([(s1[k] - s3[k]).flatten() for k in s1]).norm()
    size = torch.cat([s1[k].flatten() for k in s1]).norm()
    assert diff > 0.2 * size, (diff, size)


def test_the_layout_of_a_base_is_found_once_and_a_changed_config_is_looked_at_again(generator, monkeypatch):
    import oral.generate as generate_module
    from oral.lora import LoraSpec

    built = []
    real = LoraSpec.from_base_config
    monkeypatch.setattr(LoraSpec, "from_base_config", lambda *a, **k: built.append(1) or real(*a, **k))
    generator.layout_cache.clear()
    assert generator.layout_for("tiny-llama") == generator.layout_for("tiny-llama") == 0
    assert len(built) == len(generator.tokenizers)  # the second call is answered from the cache
    config = generate_module.load_base_config("tiny-llama")
    config.num_hidden_layers += 1  # another architecture under the same name: not the cached answer
    monkeypatch.setattr(generate_module, "load_base_config", lambda base: config)
    with pytest.raises(generate_module.GenerationError, match="not trained for base"):
        generator.layout_for("tiny-llama")


def test_resumed_training_matches_an_uninterrupted_run(zoo, tmp_path):
    from oral.config import load_config
    from oral.train import GeneratorTrainConfig, read_loss_log, train_generator

    cfg = load_config(GeneratorTrainConfig, None, ["preset=tiny", "steps=8", "log_every=1", "save_every=2", "device=cpu",
                                          "warmup_steps=2"])
    train_generator([zoo], tmp_path / "a", cfg)
    train_generator([zoo], tmp_path / "b", cfg, stop_at=4)  # interrupted after step 4
    assert read_loss_log(tmp_path / "b")[-1]["step"] == 4
    train_generator([zoo], tmp_path / "b", cfg)  # the same call again resumes
    a, b = read_loss_log(tmp_path / "a"), read_loss_log(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    # what the generator exports (the EMA weights) and its last checkpoint, bit for bit
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca, cb = (load_file(str(tmp_path / d / "checkpoints" / "0000008" / "optimizer.safetensors")) for d in ("a", "b"))
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)


def test_resume_with_another_setup_is_refused(zoo, tmp_path):
    from oral.config import load_config
    from oral.train import GeneratorTrainConfig, train_generator
    from oral.training import CheckpointError

    base = ["preset=tiny", "steps=4", "save_every=2", "device=cpu"]
    train_generator([zoo], tmp_path / "g", load_config(GeneratorTrainConfig, None, base))
    with pytest.raises(CheckpointError, match="different training setup"):
        train_generator([zoo], tmp_path / "g", load_config(GeneratorTrainConfig, None, base + ["lr=0.5"]))


def test_cli_writes_peft_loadable_adapters_with_provenance(gen_dir, tmp_path, tiny):
    from peft import PeftModel

    from oral.cli import main
    from oral.lora import read_provenance
    from oral.models import load_base

    out = tmp_path / "adapters"
    assert main(["generate", "--generator", str(gen_dir), "--base", "tiny-llama", "--prompt",
                 "flag junk text messages", "--out", str(out), "--num", "2", "--seed", "5",
                 "--steps", "20", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["seed-5", "seed-6"]
    prov = read_provenance(out / "seed-6")
    assert prov["seed"] == 6 and prov["prompt"] == "flag junk text messages" and prov["zoo_manifest_sha256"]
    model, _ = load_base("tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on missing / unexpected keys
        peft = PeftModel.from_pretrained(model, str(out / "seed-5"))
    assert any("lora_B" in n for n, _ in peft.named_parameters())


def test_an_existing_adapter_is_refined_kept_at_strength_0_and_a_wrong_layout_is_refused(gen_dir, zoo, tmp_path, capsys):
    from oral.cli import main
    from oral.lora import load_adapter, read_provenance
    from oral.zoo import Zoo

    z = Zoo(zoo)
    start = z.path(next(r for r in z.records() if r["final"] and r["task"] == "sms-spam"))
    _, init = load_adapter(start)
    common = ["generate", "--generator", str(gen_dir), "--base", "tiny-llama", "--prompt", "flag junk text messages",
              "--steps", "10", "--device", "cpu", "--init", str(start)]
    assert main([*common, "--out", str(tmp_path / "kept"), "--strength", "0"]) == 0
    _, kept = load_adapter(tmp_path / "kept")
    assert all(torch.allclose(kept[k], init[k], rtol=1e-5, atol=1e-7) for k in init)
    assert main([*common, "--out", str(tmp_path / "moved")]) == 0  # the default strength
    _, moved = load_adapter(tmp_path / "moved")
    prov = read_provenance(tmp_path / "moved")
    assert prov["init"] == str(start.resolve()) and prov["strength"] == 0.1 and prov["init_digest"]
    assert any(not torch.allclose(moved[k], init[k]) for k in init)
    # an adapter of another layout (rank 2 instead of 4) is refused, naming both layouts; nothing is written
    from oral.lora import LoraSpec, save_adapter
    from oral.models import load_base_config

    spec, _ = load_adapter(start)
    lc = spec.lora_config()
    spec2 = LoraSpec.from_base_config(load_base_config("tiny-llama"), spec.target_modules, 2, lc.lora_alpha)
    other_dir = tmp_path / "rank-2"
    save_adapter(other_dir, spec2, {k: v[:2].clone() if "lora_A" in k else v[:, :2].clone() for k, v in init.items()})
    capsys.readouterr()
    assert main([*common[:-1], str(other_dir), "--out", str(tmp_path / "bad")]) == 2
    assert "the adapter to refine has the layout" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*common[:-2], "--strength", "0.3", "--out", str(tmp_path / "no-init")]) == 2
    assert "--strength only applies with --init" in capsys.readouterr().err


def test_cli_refuses_a_base_of_another_architecture(gen_dir, tmp_path, capsys):
    from oral.cli import main

    rc = main(["generate", "--generator", str(gen_dir), "--base", "smollm2-135m", "--prompt", "x y",
               "--out", str(tmp_path / "a"), "--device", "cpu"])
    assert rc == 2
    assert "not trained for base 'smollm2-135m'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_canonical_gauge_trains_on_canonical_tokens_and_generates_a_valid_adapter(zoo, tmp_path):
    from oral.config import load_config
    from oral.generate import Generator
    from oral.gauge import canonicalize
    from oral.lora import load_adapter
    from oral.train import GeneratorTrainConfig, train_generator
    from oral.zoo_data import prepare_training_data
    from oral.zoo import Zoo

    cfg = load_config(GeneratorTrainConfig, None, ["preset=tiny", "steps=4", "save_every=4", "device=cpu", "gauge=canonical"])
    data = prepare_training_data([zoo], tmp_path / "g", cfg)
    rec = Zoo(zoo).records()[0]
    spec, state = load_adapter(Zoo(zoo).path(rec))
    tok = data.groups[0].tokenizer
    canon = tok.encode(canonicalize(spec, state)).tokens
    assert any(torch.allclose(canon, t, atol=1e-6) for t in data.groups[0].tokens)
    assert not any(torch.allclose(tok.encode(state).tokens, t, atol=1e-3) for t in data.groups[0].tokens)
    train_generator([zoo], tmp_path / "g", cfg)
    spec, state = Generator.from_pretrained(tmp_path / "g", device="cpu").generate("tiny-llama", "spam filter", steps=5)
    assert set(state) == set(spec.keys())


def test_a_generator_of_another_format_version_is_refused_with_the_fix(gen_dir, tmp_path):
    import shutil

    from oral.generate import FORMAT_VERSION, GenerationError, Generator

    copy = tmp_path / "gen"
    shutil.copytree(gen_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "data"))
    config = json.loads((copy / "config.json").read_text())
    for version, fix in ((FORMAT_VERSION + 1, "upgrade oral"), (0, "retrain it")):
        (copy / "config.json").write_text(json.dumps({**config, "format_version": version}))
        with pytest.raises(GenerationError, match=f"format version {version}.*{fix}"):
            Generator.from_pretrained(copy, device="cpu")


def test_a_drift_fingerprint_generator_tells_a_new_version_from_its_training_base(zoo, tmp_path, tiny):
    """Trained with c_model = what changed from the family's root: a drifted copy of the base gets another
    c_model (the root maps to zeros) and, from the same seed and prompt, another adapter."""
    import copy

    from oral.config import load_config
    from oral.generate import Generator
    from oral.train import GeneratorTrainConfig, train_generator

    cfg = load_config(GeneratorTrainConfig, None, ["preset=tiny", "steps=20", "save_every=20", "device=cpu",
                                                   "conditions.fingerprint_kind=drift",
                                                   "conditions.fingerprint_reference=tiny-llama"])
    train_generator([zoo], tmp_path / "g", cfg)
    gen = Generator.from_pretrained(tmp_path / "g", device="cpu")
    assert gen.config["conditions"]["fingerprint_kind"] == "drift"
    model, tok = tiny
    newer = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in newer.named_parameters():
            p.add_(0.01 * p.norm() * torch.randn(p.shape, generator=g) / p.numel() ** 0.5)
    newer.save_pretrained(tmp_path / "t1")
    tok.save_pretrained(tmp_path / "t1")
    c0 = gen.model_condition("tiny-llama", 0)
    c1 = gen.model_condition(str(tmp_path / "t1"), 0)
    fp = gen.conditions.config.fingerprint_dim
    assert torch.count_nonzero(c0[-fp:]) == 0 and (c1 - c0).norm() > 0.5
    s0 = gen.generate("tiny-llama", "spam filter", seed=0, steps=5)[1]
    s1 = gen.generate(str(tmp_path / "t1"), "spam filter", seed=0, steps=5)[1]
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)


def test_a_base_outside_the_training_versions_is_reported_and_warned_about(gen_dir, tmp_path, tiny, caplog):
    import copy
    import logging

    from oral.generate import Generator

    gen = Generator.from_pretrained(gen_dir, device="cpu")
    assert gen.base_familiarity("tiny-llama", 0) == {"seen": True, "distance": 0.0, "spread": 0.0, "beyond": False,
                                                     "inside": True}
    model, tok = tiny
    newer = copy.deepcopy(model)
    with torch.no_grad():
        newer.get_submodule("model.layers.0.self_attn.q_proj").weight.mul_(1.5)
    newer.save_pretrained(tmp_path / "t1")
    tok.save_pretrained(tmp_path / "t1")
    where = gen.base_familiarity(str(tmp_path / "t1"), 0)
    assert not where["seen"] and not where["inside"] and where["distance"] > 0
    with caplog.at_level(logging.WARNING, logger="oral.generate"):
        gen.generate(str(tmp_path / "t1"), "Detect spam in SMS text messages.", steps=2)
    assert "outside their range" in caplog.text


def test_training_data_can_be_restricted_to_versions_ranks_and_seeds(zoo, tmp_path):
    from oral.config import load_config
    from oral.train import GeneratorTrainConfig
    from oral.zoo_data import DataError, prepare_training_data

    base = ["preset=tiny", "steps=2", "device=cpu"]
    data = prepare_training_data([zoo], tmp_path / "a", load_config(GeneratorTrainConfig, None, base + ["versions=[0]", "ranks=[4]"]))
    assert sum(len(g.tokens) for g in data.groups) == data.num_samples > 0
    seeded = prepare_training_data([zoo], tmp_path / "c", load_config(GeneratorTrainConfig, None, base + ["zoo_seeds=[0]"]))
    assert seeded.num_samples == data.num_samples  # this zoo's runs are all seed 0
    for bad in ("versions=[1]", "ranks=[8]", "zoo_seeds=[7]"):
        with pytest.raises(DataError, match=bad.split("=")[0]):
            prepare_training_data([zoo], tmp_path / "b", load_config(GeneratorTrainConfig, None, base + [bad]))


def test_the_default_guidance_is_the_one_recorded_with_the_generator(gen_dir, tmp_path):
    from oral.generate import Generator, bundle_generator, generate_adapters
    from oral.lora import read_provenance

    assert Generator.from_pretrained(gen_dir, device="cpu").default_guidance == 1.0
    assert Generator.from_pretrained(gen_dir, device="cpu").default_steps == 60
    out = bundle_generator(gen_dir, tmp_path / "b", sampling={"guidance": 2.5, "steps": 3, "chosen_by": "validation"})
    gen = Generator.from_pretrained(out, device="cpu")
    assert gen.default_guidance == 2.5 and gen.default_steps == 3
    (path,) = generate_adapters(gen, "tiny-llama", "spam filter", tmp_path / "a")
    assert read_provenance(path)["guidance"] == 2.5 and read_provenance(path)["steps"] == 3
    (path,) = generate_adapters(gen, "tiny-llama", "spam filter", tmp_path / "c", steps=2, guidance=1.0)
    assert read_provenance(path)["guidance"] == 1.0


def test_a_base_past_the_end_of_the_training_chain_is_outside_though_near(gen_dir, monkeypatch):
    from oral.generate import Generator

    gen = Generator.from_pretrained(gen_dir, device="cpu")
    e = torch.zeros_like(gen.c_model_cache[(0, "tiny-llama")])
    e[0] = 1.0
    gen.config["conditions"]["bases"] = [{"id": f"t{k}"} for k in range(3)]
    for k in range(3):  # t0, t1, t2 one step apart on a line (a chain of versions)
        gen.c_model_cache[(0, f"t{k}")] = k * e
    where = lambda c: (monkeypatch.setattr(gen, "model_condition", lambda *a: c), gen.base_familiarity("new", 0))[1]  # noqa: E731
    between, past, aside = where(1.5 * e), where(3 * e), where(e + 0.5 * torch.roll(e, 1))
    assert between["inside"] and not between["beyond"]
    assert past["distance"] == 1.0 <= past["spread"] and past["beyond"] and not past["inside"]  # t3: near t2, but past it
    assert aside["inside"] and not aside["beyond"]


def test_bf16_precision_trains_and_a_bad_setting_is_refused(zoo, tmp_path):
    from oral.config import load_config
    from oral.train import GeneratorTrainConfig, TrainError, read_loss_log, train_generator

    cfg = load_config(GeneratorTrainConfig, REPO / "configs" / "generator-tiny.yaml",
                      ["device=cpu", "steps=4", "log_every=1", "precision=bf16"])
    train_generator([zoo], tmp_path / "gen", cfg)
    losses = [r["loss"] for r in read_loss_log(tmp_path / "gen")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    with pytest.raises(TrainError, match="precision must be one of fp32, bf16"):
        GeneratorTrainConfig(precision="fp8")
