"""Conditions: the metadata string, the weight fingerprint and the text encoder."""

import copy

import pytest
import torch

from oral.conditions import ConditionConfig, ConditionError, model_metadata, weight_fingerprint

QV = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
      "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_metadata_string_names_the_architecture(tiny):
    model, _ = tiny
    s = model_metadata(model.config)
    assert s.startswith("LlamaForCausalLM (llama)")
    for part in ("hidden size 64", "2 layers", "4 attention heads", "2 key-value heads", "vocabulary 49152"):
        assert part in s, s


def test_fingerprint_is_stable_and_moves_when_any_targeted_weight_moves(tiny):
    model, _ = tiny
    f1 = weight_fingerprint(model, QV, probes=4, seed=0)
    f2 = weight_fingerprint(model, QV, probes=4, seed=0)
    assert f1.shape == (ConditionConfig(fingerprint_probes=4).fingerprint_dim,)
    assert torch.equal(f1, f2)
    other = copy.deepcopy(model)
    with torch.no_grad():
        w = other.get_submodule(QV[3]).weight
        w.add_(0.1 * w.std() * torch.randn_like(w, generator=None))
    f3 = weight_fingerprint(other, QV, probes=4, seed=0)
    assert (f3 - f1).norm() > 1e-3 * f1.norm()
    # another probe seed is another (fixed) projection
    assert not torch.allclose(weight_fingerprint(model, QV, probes=4, seed=1), f1)


def test_fingerprint_of_a_missing_module_is_a_clear_error(tiny):
    model, _ = tiny
    with pytest.raises(ConditionError, match="no module 'model.layers.7.self_attn.q_proj'"):
        weight_fingerprint(model, ["model.layers.7.self_attn.q_proj"])


def test_text_encoder_separates_tasks_and_caches(tiny):
    from oral.conditions import ConditionEncoder

    enc = ConditionEncoder(ConditionConfig(fingerprint_probes=4))
    e = enc.text_condition(["classify movie reviews as positive or negative",
                            "say whether a film review is favourable",
                            "detect spam in text messages"])
    assert e.shape == (3, enc.text_dim) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-4)
    assert e[0] @ e[1] > e[0] @ e[2]  # paraphrases are closer than another task
    again = enc.text_condition(["detect spam in text messages"])
    assert torch.equal(again[0], e[2])
    model, _ = tiny
    cm = enc.model_condition(model.config, model, QV)
    assert cm.shape == (enc.model_dim,) == (enc.text_dim + ConditionConfig(fingerprint_probes=4).fingerprint_dim,)
    off = ConditionEncoder(ConditionConfig(fingerprint=False, model_text=False))
    assert off.model_dim == 0 and off.model_condition(model.config, None, QV).numel() == 0
    with pytest.raises(ConditionError, match="weights must be given"):
        enc.model_condition(model.config, None, QV)
