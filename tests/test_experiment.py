"""`oral experiment`: the methods, the long format, the caches and the memorization distances, on tiny-llama."""

import json
import math

import pytest
import torch

from oral.experiments.methods import METHODS, gibberish
from oral.experiments.runner import ExperimentConfig, format_table, run_experiment
from oral.hypernet import HypernetConfig

ALL = ["base", "oracle", "in-prompt", "nearest", "mean", "hypernet", "generated", "generated-cfg", "random-text", "random-model",
       "no-fingerprint"]


def _config(tiny_zoo, tiny_generator_dir, tmp_path, **kw) -> ExperimentConfig:
    base = dict(generator=str(tiny_generator_dir), zoo=str(tiny_zoo), root="tiny-llama", versions=[0], methods=ALL,
                descriptions=1, seeds=[0, 1], limit=8, val_limit=8, steps=5, guidances=[1.0, 2.0],
                hypernet=HypernetConfig(steps=30, hidden=64),
                out=str(tmp_path / "results"), cache=str(tmp_path / "cache"))
    return ExperimentConfig(**{**base, **kw})


def test_every_method_gives_rows_in_the_long_format_and_a_rerun_measures_nothing(tiny_zoo, tiny_generator_dir, tmp_path,
                                                                                  monkeypatch):
    cfg = _config(tiny_zoo, tiny_generator_dir, tmp_path)
    result = run_experiment("t", cfg)
    rows = result["rows"]
    keys = {"base", "version", "task", "method", "description", "seed", "split", "metric", "value", "n"}
    assert all(keys <= set(r) for r in rows)
    tasks = {"sms-spam", "movie-sentiment"}
    assert {r["task"] for r in rows} == tasks and {r["version"] for r in rows} == {0}
    count = {(t, m): sum(1 for r in rows if r["task"] == t and r["method"] == m) for t in tasks for m in ALL}
    for t in tasks:
        # one row for base/oracle/mean; one per description for in-prompt/nearest; description x seed for generated ones
        assert [count[t, m] for m in ALL] == [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2], (t, count)
    assert all(r["n"] == 8 and 0 <= r["value"] <= 1 for r in rows)
    gen = [r for r in rows if r["method"] == "generated"]
    assert all(r["description"] and r["seed"] in (0, 1) and isinstance(r["familiar"], bool) for r in gen)
    assert {r["guidance"] for r in rows if r["method"] == "generated-cfg"} <= {1.0, 2.0}
    near = [r for r in rows if r["method"] == "nearest"]
    assert all(r["from_task"] in tasks and r["from_version"] == 0 for r in near)
    # the files: json (the same rows), markdown table, png
    out = tmp_path / "results"
    assert json.loads((out / "exp-t.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| t0 | sms-spam |" in (out / "exp-t.md").read_text() and "oral generate` warns" in (out / "exp-t.md").read_text()
    assert (out / "exp-t.png").read_bytes()[:4] == b"\x89PNG"
    adapters = sorted((tmp_path / "cache" / "adapters").iterdir())

    # a rerun: every score and adapter comes from the caches
    from oral.evaluate import Evaluator
    from oral.generate import Generator

    def fail(*a, **k):
        raise AssertionError("measured or generated again")

    monkeypatch.setattr(Evaluator, "evaluate", fail)
    monkeypatch.setattr(Generator, "generate", fail)
    again = run_experiment("t", cfg)
    assert [r["value"] for r in again["rows"]] == [r["value"] for r in rows]
    assert sorted((tmp_path / "cache" / "adapters").iterdir()) == adapters


def test_controls_change_the_condition_and_unseen_versions_get_stale_baselines(tiny_zoo, tiny_generator_dir, tmp_path):
    from oral.experiments.runner import Experiment

    cfg = _config(tiny_zoo, tiny_generator_dir, tmp_path, methods=["generated", "random-model", "no-fingerprint", "random-text"],
                  sweep_steps=[3], sweep_guidance=[2.0],
                  tasks=["sms-spam"], seeds=[0])
    exp = Experiment("c", cfg)
    from oral.models import load_base

    model, tok = load_base("tiny-llama")
    from oral.evaluate import Evaluator

    cands = {c.method: c for c in exp.candidates(0, "sms-spam", Evaluator(model, tok, progress=False), model)}
    same = [torch.equal(cands["generated"].state[k], cands[m].state[k]) for m in ("random-model", "no-fingerprint", "random-text")
            for k in cands["generated"].state]
    assert not all(same)  # each control gives another adapter from the same seed
    assert {"generated-steps3", "generated-g2"} <= set(cands)
    assert cands["generated-steps3"].info["steps"] == 3 and cands["generated-g2"].info["guidance"] == 2.0
    for m in ("random-model", "no-fingerprint", "random-text", "generated-steps3", "generated-g2"):
        assert any(not torch.equal(cands["generated"].state[k], cands[m].state[k]) for k in cands[m].state), m
    # stale-* apply only to versions the generator was not trained on: t0 is a training version here
    cfg2 = _config(tiny_zoo, tiny_generator_dir, tmp_path, methods=["stale-t0", "stale-newest", "stale-best"], tasks=["sms-spam"])
    assert list(Experiment("s", cfg2).candidates(0, "sms-spam", None, model)) == []


def test_memorization_distances_find_the_training_adapter_itself(tiny_zoo, tiny_generator_dir, tmp_path):
    cfg = _config(tiny_zoo, tiny_generator_dir, tmp_path, methods=["oracle", "generated"], scores=False, distances=True,
                  tasks=["sms-spam"], seeds=[0])
    rows = run_experiment("m", cfg)["rows"]
    by = {(r["method"], r["metric"]): r for r in rows}
    assert set(by) == {(m, d) for m in ("oracle", "generated") for d in ("rel-l2-to-nearest", "cosine-to-nearest")} | {("oracle", "rel-l2-within-run")}
    assert 0 < by["oracle", "rel-l2-within-run"]["value"] < by["oracle", "rel-l2-to-nearest"]["value"]
    # the oracle's own run is left out of its pool: its nearest is the other task's run
    assert by["oracle", "rel-l2-to-nearest"]["nearest_task"] == "movie-sentiment"
    assert by["oracle", "rel-l2-to-nearest"]["value"] > 0
    assert -1 <= by["generated", "cosine-to-nearest"]["value"] <= 1
    assert "relative L2" in format_table(run_experiment("m", cfg))


def test_update_distance_matches_the_dense_updates():
    from oral.gauge import delta_weight, update_distance
    from oral.lora import LoraModule, LoraSpec

    spec = LoraSpec(modules=[LoraModule("layers.0.q_proj", 6, 5, 2, 4.0), LoraModule("layers.0.v_proj", 6, 3, 2, 4.0)])
    g = torch.Generator().manual_seed(0)
    a, b = ({k: torch.randn(*s, generator=g) for k, s in spec.shapes().items()} for _ in range(2))
    d = update_distance(spec, a, b)
    cos, rel = [], []
    for m in spec.modules:
        da, db = delta_weight(spec, a, m.name), delta_weight(spec, b, m.name)
        cos.append(float((da * db).sum() / da.norm() / db.norm()))
        rel.append(float((da - db).norm() / db.norm()))
    assert math.isclose(d["cosine"], sum(cos) / 2, rel_tol=1e-9) and math.isclose(d["rel_l2"], sum(rel) / 2, rel_tol=1e-9)
    assert update_distance(spec, a, a) == {"cosine": pytest.approx(1.0), "rel_l2": pytest.approx(0.0, abs=1e-6)}


def test_gibberish_keeps_the_word_lengths_and_says_nothing():
    text = "Classify the sentiment of a movie review."
    g = gibberish(text, 0)
    assert [len(w) for w in g.split()] == [len(w) for w in text.split()] and g != text and g == gibberish(text, 0)
    assert gibberish(text, 1) != g


def test_bad_requests_name_the_fix(tiny_zoo, tiny_generator_dir, tmp_path):
    from oral.cli import main
    from oral.experiments import ExperimentError

    with pytest.raises(ExperimentError, match="unknown method"):
        run_experiment("x", _config(tiny_zoo, tiny_generator_dir, tmp_path, methods=["base", "magic"]))
    with pytest.raises(ExperimentError, match=r"no runs on version\(s\) \[3\]"):
        run_experiment("x", _config(tiny_zoo, tiny_generator_dir, tmp_path, versions=[3]))
    with pytest.raises(ExperimentError, match="not a zoo"):
        run_experiment("x", _config(tiny_zoo, tiny_generator_dir, tmp_path, zoo=str(tmp_path)))
    assert main(["experiment", "limit=3"]) == 2
    assert set(METHODS) >= set(ALL)


def test_the_command_line_takes_overrides_after_the_config(tiny_zoo, tiny_generator_dir, tmp_path, capsys):
    from oral.cli import main

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"generator: {tiny_generator_dir}\nzoo: {tiny_zoo}\nroot: tiny-llama\nmethods: [base]\n"
                   f"out: {tmp_path / 'o'}\ncache: {tmp_path / 'c'}\n")
    assert main(["experiment", "cli", "--config", str(cfg), "limit=4", "tasks=[sms-spam]"]) == 0
    result = json.loads((tmp_path / "o" / "exp-cli.json").read_text())
    assert result["config"]["limit"] == 4 and [r["task"] for r in result["rows"]] == ["sms-spam"]
    assert "exp-cli.json" in capsys.readouterr().out


def test_the_hypernet_baseline_learns_its_training_adapters(tiny_zoo, tiny_generator_dir):
    """Trained by reconstruction on the zoo, it returns each task's adapter from a training description
    closer than the other task's adapter is."""
    from oral.experiments.methods import ZooAdapters
    from oral.gauge import update_distance
    from oral.generate import Generator
    from oral.hypernet import HypernetConfig, train_hypernet
    from oral.zoo import Zoo

    gen = Generator.from_pretrained(tiny_generator_dir, device="cpu")
    zoo = ZooAdapters(Zoo(tiny_zoo), "tiny-llama", 4, 0)
    tasks = gen.config["conditions"]["tasks"]
    texts = {t: list(gen.conditions.text_condition(tasks[t]["descriptions"])) for t in tasks}
    c_model = gen.model_condition("tiny-llama", 0)
    samples = [(state, c_model, texts[rec["task"]]) for rec, _, state in zoo.checkpoints({0}, set(tasks))]
    net = train_hypernet(HypernetConfig(steps=300, hidden=128, lr=3e-3), gen.tokenizers[0].spec, samples, progress=False)
    for task, other in (("sms-spam", "movie-sentiment"), ("movie-sentiment", "sms-spam")):
        state = net.adapter(torch.cat([c_model, texts[task][0]]))
        spec, own = zoo.final(0, task)
        _, theirs = zoo.final(0, other)
        assert update_distance(spec, state, own)["rel_l2"] < update_distance(spec, state, theirs)["rel_l2"], task


def test_the_oracle_can_come_from_another_zoo_of_the_family(tiny_zoo, tiny_generator_dir, tmp_path):
    import shutil

    other = tmp_path / "other-zoo"
    shutil.copytree(tiny_zoo, other)
    manifest = other / "manifest.jsonl"
    manifest.write_text("".join(line + "\n" for line in manifest.read_text().splitlines() if "movie-sentiment" not in line))
    cfg = _config(tiny_zoo, tiny_generator_dir, tmp_path, methods=["oracle"], oracle_zoo=str(other))
    rows = run_experiment("o", cfg)["rows"]
    assert [r["task"] for r in rows] == ["sms-spam"]  # the other zoo has no movie-sentiment run


def test_an_unseen_version_gets_the_stale_baselines_and_nearest_picks_a_training_version(tiny_zoo, tiny_generator_dir,
                                                                                        tmp_path):
    """A two-version family: t1 = tiny-llama + 2 steps of continued pretraining, with its own zoo runs. The generator
    was trained on t0 only, so t1 is unseen: stale-t0 / stale-newest / stale-best are t0's LoRAs, nearest too."""
    import shutil

    from oral.evolve import evolve
    from oral.finetune import train_lora

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox {i} jumps over {i * 7} lazy dogs." for i in range(60)))
    t1 = evolve("tiny-llama", corpus, steps=2, out=tmp_path / "t1", lr=1e-3, batch_size=2, seq_len=32, warmup_steps=1,
                progress=False)
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    train_lora(str(t1), "sms-spam", rank=4, steps=4, keep=2, save_every=2, out_dir=zoo, seed=0, lr=2e-2, warmup_steps=1,
               eval_limit=4, eval_base=False)
    cfg = _config(zoo, tiny_generator_dir, tmp_path, versions=[0, 1], tasks=["sms-spam"], seeds=[0],
                  methods=["oracle", "stale-t0", "stale-newest", "stale-best", "nearest", "generated", "shifted"])
    result = run_experiment("p", cfg)
    assert result["versions"]["1"] == str(t1.resolve()) and result["training"]["versions"] == [0]
    by = {(r["version"], r["method"]): r for r in result["rows"]}
    assert {m for v, m in by if v == 0} == {"oracle", "nearest", "generated"}  # no stale rows on a training version
    assert {m for v, m in by if v == 1} == {"oracle", "stale-t0", "stale-newest", "stale-best", "nearest", "generated",
                                            "shifted"}
    assert by[1, "stale-t0"]["from_version"] == by[1, "stale-best"]["from_version"] == by[1, "nearest"]["from_version"] == 0
    assert by[1, "shifted"]["from_version"] == 0 and by[1, "shifted"]["from_task"] == by[1, "nearest"]["from_task"]
    assert by[1, "generated"]["base_inside"] is False and by[0, "generated"]["base_inside"] is True


def test_a_shifted_adapter_is_its_start_plus_the_difference_of_two_updates(tiny_zoo):
    from oral.experiments.methods import shifted_adapter
    from oral.gauge import delta_weight
    from oral.lora import load_adapter
    from oral.zoo import Zoo

    zoo = Zoo(tiny_zoo)
    a, b = (load_adapter(zoo.path(r)) for r in [r for r in zoo.records() if r.get("final")][:2])
    spec = a[0]
    same = shifted_adapter(a, b, b)  # no difference: a's own update, refactorized at its rank
    shifted = shifted_adapter(a, b, a)  # a + (b - a) = b
    for m in spec.modules:
        for got, want in ((same, a), (shifted, b)):
            d_got, d_want = delta_weight(spec, got[1], m.name), delta_weight(spec, want[1], m.name)
            assert torch.allclose(d_got, d_want, atol=1e-5 * float(d_want.abs().max())), m.name


def test_the_bar_counts_cells_where_generated_clears_each_reference():
    from oral.experiments.runner import bar_lines

    table = {(3, "a"): {"generated": [0.80, 0.82], "oracle": [0.815], "stale-t0": [0.81], "nearest": [0.81]},
             (3, "b"): {"generated": [0.50], "oracle": [0.70], "stale-t0": [0.40], "nearest": [0.50]}}
    text = "\n".join(bar_lines("x", table))
    # cell a: 0.81 >= 0.815 - 0.01 and ties stale-t0 and nearest (no win); cell b: 0.5 < 0.69, > 0.4, ties nearest
    assert ">= oracle - 1 point: 1/2; > stale-t0: 1/2; > nearest: 0/2" in text
    assert "generated-cfg" not in text and bar_lines("x", {(0, "a"): {"base": [0.5]}}) == []
    # six equal scores average to a float a hair above the one score (fmean of six 0.925s): a tie, not a win
    assert "> nearest: 0/1" in "\n".join(bar_lines("x", {(3, "a"): {"generated": [0.925] * 6, "nearest": [0.925]}}))


def test_refined_starts_from_nearest_at_a_strength_chosen_on_validation(tiny_zoo, tiny_generator_dir, tmp_path):
    cfg = _config(tiny_zoo, tiny_generator_dir, tmp_path, tasks=["sms-spam"], methods=["nearest", "refined"],
                  strengths=[0.0, 0.5])
    result = run_experiment("r", cfg)
    near = next(r for r in result["rows"] if r["method"] == "nearest")
    refined = [r for r in result["rows"] if r["method"] == "refined"]
    assert [r["seed"] for r in refined] == [0, 1]  # one description x two seeds
    assert {r["strength"] for r in refined} <= {0.0, 0.5} and len({r["strength"] for r in refined}) == 1
    assert all(r["from_task"] == near["from_task"] and r["from_version"] == 0 for r in refined)
    if refined[0]["strength"] == 0.0:  # strength 0 keeps nearest's adapter: the same score, whatever the seed
        assert all(r["value"] == near["value"] for r in refined)
    assert "- `refined`: > nearest: " in (tmp_path / "results" / "exp-r.md").read_text()


def test_an_experiment_over_several_ranks_scores_each_against_the_runs_of_its_rank(tiny_zoo, tiny_generator_dir, tmp_path):
    """The tiny zoo has r=4 runs only: a second rank is an error naming it, before anything runs; the rows record it."""
    cfg = _config(tiny_zoo, tiny_generator_dir, tmp_path, tasks=["sms-spam"], methods=["base", "oracle"], ranks=[4])
    result = run_experiment("k", cfg)
    assert [(r["method"], r["rank"]) for r in result["rows"]] == [("base", 4), ("oracle", 4)]
    assert "| t0 | sms-spam r=4 |" in (tmp_path / "results" / "exp-k.md").read_text()
    with pytest.raises(Exception, match="at rank 2"):
        run_experiment("k2", _config(tiny_zoo, tiny_generator_dir, tmp_path, tasks=["sms-spam"], methods=["base"],
                                     ranks=[4, 2]))
