"""The LoRA layer: specs from configs and adapters, PEFT parity, validation, the canonical gauge."""

import copy
import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaConfig, MistralConfig

from oral.gauge import apply_gauge, canonicalize, delta_weight, factorize, random_gauge
from oral.lora import (
    AdapterError, LoraModule, LoraSpec, adapter_state_from_peft_model, load_adapter, read_provenance, save_adapter,
    spec_for_model, spec_from_peft_model, validate_adapter,
)
from oral.models import load_base

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mistral_7b_config() -> MistralConfig:
    return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8)


def llama3_8b_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)


def random_state(spec: LoraSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in spec.modules:
        state[m.key_A] = torch.randn(m.shape_A, generator=g) / math.sqrt(m.in_features)
        state[m.key_B] = torch.randn(m.shape_B, generator=g) * 0.1
    return state


_TINY = {}


def fresh_tiny():
    """A fresh copy of tiny-llama (loaded once per test run)."""
    if "model" not in _TINY:
        _TINY["model"] = load_base("tiny-llama")[0]
    return copy.deepcopy(_TINY["model"])


@pytest.fixture(scope="module")
def tiny():
    return fresh_tiny(), None


def peft_with_random_B(model, config: LoraConfig, seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return pm.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# -----------------------------------------------------------------------------
# Specs


def test_mistral_7b_spec_from_config_alone_has_42m_params_and_gqa_shapes():
    spec = LoraSpec.from_base_config(mistral_7b_config(), SEVEN, rank=16, alpha=32)
    assert len(spec) == 32 * 7 and len(spec.layers) == 32 and len(spec.module_types) == 7
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert spec.num_params == 32 * per_layer == 41_943_040
    k = spec["model.layers.5.self_attn.k_proj"]
    assert (k.in_features, k.out_features, k.rank, k.alpha) == (4096, 1024, 16, 32.0)  # GQA: 8 kv heads x 128
    assert spec.position("model.layers.5.self_attn.k_proj")[0] == 5
    assert spec.keys()[:2] == ["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
                               "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]


def test_llama3_8b_spec_from_config_dict_with_rank_and_alpha_patterns():
    d = llama3_8b_config().to_dict()
    spec = LoraSpec.from_base_config(d, ["q_proj", "v_proj"], rank=8, alpha=16,
                                     rank_pattern={"v_proj": 4}, alpha_pattern={"layers.0.self_attn.q_proj": 1})
    assert len(spec) == 64
    assert spec["model.layers.3.self_attn.v_proj"].rank == 4
    assert spec["model.layers.3.self_attn.v_proj"].out_features == 1024
    assert spec["model.layers.3.self_attn.q_proj"].rank == 8
    assert spec["model.layers.0.self_attn.q_proj"].alpha == 1 and spec["model.layers.10.self_attn.q_proj"].alpha == 16
    assert spec.num_params == 32 * (8 * (4096 + 4096) + 4 * (4096 + 1024))


def test_spec_for_model_matches_what_peft_builds_with_patterns(tiny):
    model = fresh_tiny()
    kwargs = dict(rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 3}, alpha_pattern={"q_proj": 5})
    ours = spec_for_model(model, ["q_proj", "v_proj", "down_proj"], 4, 8, **kwargs)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **kwargs))
    theirs = spec_from_peft_model(pm)
    assert ours.modules == theirs.modules
    assert {m.rank for m in ours.modules} == {2, 3, 4}


def test_spec_from_config_equals_spec_from_model(tiny):
    model, _ = tiny
    a = LoraSpec.from_base_config(model.config, ["q_proj", "v_proj"], 4, 8)
    b = spec_for_model(model, ["q_proj", "v_proj"], 4, 8)
    assert a.modules == b.modules and len(a) == 4


def test_unknown_target_modules_is_a_clear_error(tiny):
    with pytest.raises(AdapterError, match="no linear module"):
        spec_for_model(tiny[0], ["qkv_proj"], 4, 8)


# -----------------------------------------------------------------------------
# PEFT parity and I/O


@pytest.mark.parametrize("patterns", [{}, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}}],
                         ids=["uniform", "mixed-rank"])
def test_adapter_written_by_us_gives_same_logits_through_plain_peft(tmp_path, patterns):
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **patterns)
    pm = peft_with_random_B(fresh_tiny(), config)
    expected = logits(pm, ids)

    spec, state = spec_from_peft_model(pm), adapter_state_from_peft_model(pm)
    save_adapter(tmp_path / "ours", spec, state, provenance={"generator": "test", "seed": 0})

    loaded = PeftModel.from_pretrained(fresh_tiny(), str(tmp_path / "ours")).eval()
    assert torch.equal(logits(loaded, ids), expected)
    # Same through our reader, and PEFT sees neither missing nor unexpected keys.
    spec2, state2 = load_adapter(tmp_path / "ours")
    assert spec2.modules == spec.modules
    assert all(torch.equal(state2[k], state[k]) for k in spec.keys())
    target = get_peft_model(fresh_tiny(), LoraConfig.from_pretrained(str(tmp_path / "ours")))
    result = set_peft_model_state_dict(target, state2)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]


def test_base_model_changes_logits_so_parity_is_not_vacuous(tmp_path):
    ids = torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(1))
    base_logits = logits(fresh_tiny(), ids)
    pm = peft_with_random_B(fresh_tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert (logits(pm, ids) - base_logits).abs().max() > 1e-3


def test_adapter_written_by_plain_peft_loads_with_its_spec(tmp_path, tiny):
    pm = peft_with_random_B(fresh_tiny(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(str(tmp_path / "peft"))
    spec, state = load_adapter(tmp_path / "peft")
    assert spec == LoraSpec.from_adapter_dir(tmp_path / "peft")
    assert spec.modules == spec_for_model(tiny[0], ["q_proj", "v_proj"], 4, 16).modules
    validate_adapter(spec, state, base_model=tiny[0])
    validate_adapter(spec, state, base_model="tiny-llama")


def test_provenance_goes_to_metadata_and_side_file_never_to_the_config(tmp_path):
    spec = spec_for_model(fresh_tiny(), ["q_proj"], 2, 4)
    prov = {"generator": "oral", "prompt": "classify sentiment", "seed": 3}
    save_adapter(tmp_path / "a", spec, random_state(spec), provenance=prov)
    assert read_provenance(tmp_path / "a") == prov
    (tmp_path / "a" / "oral_provenance.json").unlink()
    assert read_provenance(tmp_path / "a") == prov  # from the safetensors metadata
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(config) <= {f.name for f in fields(LoraConfig)}


def test_existing_dir_is_not_overwritten_unless_asked(tmp_path):
    spec = spec_for_model(fresh_tiny(), ["q_proj"], 2, 4)
    save_adapter(tmp_path / "a", spec, random_state(spec, 0))
    with pytest.raises(FileExistsError):
        save_adapter(tmp_path / "a", spec, random_state(spec, 1))
    assert torch.equal(load_adapter(tmp_path / "a")[1][spec.keys()[0]], random_state(spec, 0)[spec.keys()[0]])
    save_adapter(tmp_path / "a", spec, random_state(spec, 1), overwrite=True)
    assert torch.equal(load_adapter(tmp_path / "a")[1][spec.keys()[0]], random_state(spec, 1)[spec.keys()[0]])


# -----------------------------------------------------------------------------
# Model cards and the base other tools load


def test_saved_adapter_has_a_model_card_and_loads_with_auto_peft_offline(tmp_path):
    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForCausalLM

    from oral.models import resolve

    pm = peft_with_random_B(fresh_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(2))
    spec = spec_for_model(fresh_tiny(), ["q_proj", "v_proj"], 4, 8)  # load_base's model: base "tiny-llama"
    assert spec.base_model_name_or_path == "tiny-llama"
    prov = {"generator": "/g", "prompt": "classify the sentiment of movie reviews", "seed": 7, "steps": 60,
            "guidance": 1.0, "sampler": "ddim", "base": "tiny-llama", "base_fingerprint": "ab12"}
    save_adapter(tmp_path / "a", spec, adapter_state_from_peft_model(pm), provenance=prov)

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == resolve("tiny-llama")  # a local dir any tool loads
    assert read_provenance(tmp_path / "a")["base"] == "tiny-llama"  # oral's exact id stays in the provenance
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.base_model == config["base_model_name_or_path"] and card.data.library_name == "peft"
    assert {"lora", "oral", "generated"} <= set(card.data.tags)
    for shown in ("> classify the sentiment of movie reviews", "| seed | 7 |", "| sampler | ddim |",
                  "AutoPeftModelForCausalLM.from_pretrained", "vllm serve", "random weights", "Not measured yet"):
        assert shown in card.text, shown
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()  # finds the base by itself
    assert torch.equal(logits(auto, ids), logits(pm, ids))


def test_smollm2_adapter_names_the_hub_model_and_its_provenance_keeps_the_embedded_id(tmp_path):
    from huggingface_hub import ModelCard

    from oral.models import load_base_config

    spec = LoraSpec.from_base_config(load_base_config("smollm2-135m"), ["q_proj", "v_proj"], 4, 8,
                                     base_model_name_or_path="smollm2-135m")
    save_adapter(tmp_path / "s", spec, random_state(spec), provenance={"base": "smollm2-135m", "seed": 0})
    config = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert read_provenance(tmp_path / "s")["base"] == "smollm2-135m"
    card = ModelCard.load(tmp_path / "s" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "generated" not in card.data.tags
    assert "dequantized to float32 from its Q4_1 GGUF" in card.text
    assert 'oral.models.load_base("smollm2-135m")' in card.text
    assert LoraSpec.from_adapter_dir(tmp_path / "s").modules == spec.modules


def test_scores_join_the_card_and_a_new_score_replaces_the_one_of_its_task_split_and_base(tmp_path):
    from oral.cards import read_model_card
    from oral.lora import write_model_card

    spec = spec_for_model(fresh_tiny(), ["q_proj"], 2, 4)
    first = {"task": "sms-spam", "split": "test", "metric": "accuracy", "value": 0.5, "n": 10, "base": "tiny-llama"}
    save_adapter(tmp_path / "a", spec, random_state(spec), provenance={"base": "tiny-llama"}, scores=[first])
    write_model_card(tmp_path / "a", [{**first, "task": "trec-question", "value": 0.25}])
    write_model_card(tmp_path / "a", [{**first, "value": 0.75, "n": 20}])
    scores = read_model_card(tmp_path / "a")["oral"]["scores"]
    assert [(s["task"], s["value"], s["n"]) for s in scores] == [("trec-question", 0.25, 10), ("sms-spam", 0.75, 20)]
    text = (tmp_path / "a" / "README.md").read_text()
    assert "| sms-spam | test | accuracy | 0.7500 | 20 | tiny-llama |" in text and "0.5000" not in text


def test_oral_eval_records_its_score_in_the_card_and_leaves_a_foreign_card_alone(tmp_path, capsys):
    from oral.cli import main
    from oral.lora import read_model_card

    spec = spec_for_model(fresh_tiny(), ["q_proj"], 2, 4)
    save_adapter(tmp_path / "a", spec, random_state(spec), provenance={"base": "tiny-llama"})
    assert main(["eval", "--base", "tiny-llama", "--adapter", str(tmp_path / "a"), "--task", "sms-spam",
                 "--limit", "4", "--json"]) == 0
    out = capsys.readouterr()
    value = json.loads(out.out)["results"]["sms-spam"]["value"]  # stdout stays plain JSON
    [score] = read_model_card(tmp_path / "a")["oral"]["scores"]
    assert (score["task"], score["split"], score["n"], score["value"], score["base"]) == (
        "sms-spam", "test", 4, value, "tiny-llama")
    (tmp_path / "a" / "README.md").write_text("# my own notes\n")
    assert main(["eval", "--base", "tiny-llama", "--adapter", str(tmp_path / "a"), "--task", "sms-spam",
                 "--limit", "4"]) == 0
    assert "not written by oral" in capsys.readouterr().err
    assert (tmp_path / "a" / "README.md").read_text() == "# my own notes\n"


# -----------------------------------------------------------------------------
# Validation: each bad input gives its error and writes nothing


def _bad_inputs():
    def nan(spec, s):
        s[spec.keys()[0]][0, 0] = float("nan")
    def inf(spec, s):
        s[spec.keys()[1]][1, 0] = float("inf")
    def wrong_shape(spec, s):
        k = spec.keys()[0]
        s[k] = torch.randn(s[k].shape[0], s[k].shape[1] + 1)
    def missing(spec, s):
        del s[spec.keys()[1]]
    def stray(spec, s):
        s["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.randn(2, 64)
    def zero_B(spec, s):
        s[spec.keys()[1]].zero_()
    return [
        (nan, "non-finite"), (inf, "non-finite"), (wrong_shape, r"shape \(2, 65\)"),
        (missing, "missing key"), (stray, "stray key"), (zero_B, "all zero"),
    ]


@pytest.mark.parametrize("corrupt,message", _bad_inputs(), ids=["nan", "inf", "shape", "missing", "stray", "zero-B"])
def test_bad_state_raises_its_error_and_writes_nothing(tmp_path, corrupt, message):
    spec = spec_for_model(fresh_tiny(), ["q_proj", "v_proj"], 2, 4)
    state = random_state(spec)
    validate_adapter(spec, state)  # the clean state is valid
    corrupt(spec, state)
    with pytest.raises(AdapterError, match=message):
        save_adapter(tmp_path / "out", spec, state)
    assert leftovers(tmp_path) == []


def test_module_absent_in_base_or_wrong_features_is_caught(tmp_path, tiny):
    model = tiny[0]
    spec = spec_for_model(model, ["q_proj"], 2, 4)
    state = random_state(spec)
    bogus = LoraModule("model.layers.7.self_attn.q_proj", 64, 64, 2, 4)
    spec_absent = LoraSpec(spec.modules + (bogus,), spec.target_modules)
    state_absent = {**state, **random_state(LoraSpec((bogus,)))}
    with pytest.raises(AdapterError, match="absent from the base model"):
        save_adapter(tmp_path / "a", spec_absent, state_absent, base_model=model)
    # A spec for a wider model: the same module names, other in/out features.
    wide = LoraSpec.from_base_config(LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
                                     ["q_proj"], 2, 4)
    with pytest.raises(AdapterError, match="wrong base model"):
        save_adapter(tmp_path / "b", wide, random_state(wide), base_model="tiny-llama")
    # Only layer 0 adapted while target_modules=["q_proj"] also targets layer 1: PEFT would miss keys.
    partial = LoraSpec(spec.modules[:1], ("q_proj",))
    with pytest.raises(AdapterError, match="lacks"):
        save_adapter(tmp_path / "c", partial, random_state(partial), base_model=model)
    assert leftovers(tmp_path) == []


def test_invalid_adapter_on_disk_is_rejected_on_read(tmp_path):
    spec = spec_for_model(fresh_tiny(), ["q_proj"], 2, 4)
    save_adapter(tmp_path / "a", spec, random_state(spec))
    state = load_adapter(tmp_path / "a")[1]
    state[spec.keys()[0]][0, 0] = float("nan")
    save_file(state, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="non-finite"):
        load_adapter(tmp_path / "a")
    spec_read, _ = load_adapter(tmp_path / "a", validate=False)
    assert spec_read.modules == spec.modules


def test_rank_in_config_that_disagrees_with_tensors_is_caught(tmp_path):
    spec = spec_for_model(fresh_tiny(), ["q_proj"], 2, 4)
    save_adapter(tmp_path / "a", spec, random_state(spec))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["r"] = 3
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(tmp_path / "a")


# -----------------------------------------------------------------------------
# Canonical gauge


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def gauge_spec() -> LoraSpec:
    return LoraSpec.from_base_config(
        LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                    num_key_value_heads=2, vocab_size=100),
        ["q_proj", "k_proj", "down_proj"], rank=6, alpha=12, rank_pattern={"k_proj": 3})


def test_canonical_gauge_keeps_every_BA():
    spec = gauge_spec()
    state = random_state(spec, 1)
    canon = canonicalize(spec, state)
    for m in spec.modules:
        assert _rel(delta_weight(spec, canon, m.name), delta_weight(spec, state, m.name)) < 1e-5
        A, B = canon[m.key_A].double(), canon[m.key_B].double()
        # Balanced: A A^T = B^T B = S (diagonal), so both factors carry sqrt(S).
        assert torch.allclose(A @ A.T, B.T @ B, atol=1e-4 * B.norm().item() ** 2)
        assert torch.allclose(A @ A.T, torch.diag(torch.diagonal(A @ A.T)), atol=1e-4 * A.norm().item() ** 2)


def test_two_gauge_transformed_copies_map_to_the_same_canonical_tensors():
    spec = gauge_spec()
    state = random_state(spec, 2)
    g1, g2 = apply_gauge(spec, state, random_gauge(spec, seed=1)), apply_gauge(spec, state, random_gauge(spec, seed=2))
    assert _rel(g1[spec.keys()[0]], g2[spec.keys()[0]]) > 0.1  # the raw forms really differ
    c1, c2 = canonicalize(spec, g1), canonicalize(spec, g2)
    for k in spec.keys():
        assert _rel(c1[k], c2[k]) < 1e-4, k
    c0 = canonicalize(spec, state)
    assert all(_rel(c0[k], c1[k]) < 1e-4 for k in spec.keys())


def test_canonical_form_is_idempotent_and_equals_factorized_dense_update():
    spec = gauge_spec()
    state = random_state(spec, 3)
    c = canonicalize(spec, state)
    cc = canonicalize(spec, c)
    f = factorize(spec, {m.name: delta_weight(spec, state, m.name) for m in spec.modules})
    for k in spec.keys():
        assert _rel(cc[k], c[k]) < 1e-5
        assert _rel(f[k], c[k]) < 1e-4


def test_canonical_adapter_gives_same_logits_through_peft(tmp_path):
    ids = torch.randint(0, 49152, (1, 10), generator=torch.Generator().manual_seed(2))
    pm = peft_with_random_B(fresh_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    expected = logits(pm, ids)
    spec, state = spec_from_peft_model(pm), adapter_state_from_peft_model(pm)
    save_adapter(tmp_path / "c", spec, canonicalize(spec, state))
    got = logits(PeftModel.from_pretrained(fresh_tiny(), str(tmp_path / "c")).eval(), ids)
    assert _rel(got, expected) < 1e-5
