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


def _drifted(model, scale: float, seed: int = 0):
    """A copy of `model` whose targeted weights moved by `scale` of their own norm, in a fixed direction."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in QV:
            w = other.get_submodule(name).weight
            noise = torch.randn(w.shape, generator=g)
            w.add_(scale * w.norm() * noise / noise.norm())
    return other


def test_drift_fingerprint_is_zero_on_the_reference_and_grows_with_the_change(tiny):
    from oral.conditions import drift_fingerprint, weight_fingerprint

    model, _ = tiny
    ref = {n: model.get_submodule(n).weight.detach().float().clone() for n in QV}
    f0 = drift_fingerprint(model, ref, QV, probes=4, bins=2)
    assert f0.shape == (ConditionConfig(fingerprint_probes=4, fingerprint_bins=2, fingerprint_kind="drift",
                                        fingerprint_reference="tiny-llama").fingerprint_dim,)
    assert torch.count_nonzero(f0) == 0
    # a 0.5% change (one link of continued pretraining moves q/v by about that much): O(1) features,
    # where the weight sketch of the same change moves by about 1e-3 of its norm
    small, large = _drifted(model, 0.005), _drifted(model, 0.01)
    f1, f2 = drift_fingerprint(small, ref, QV, probes=4, bins=2), drift_fingerprint(large, ref, QV, probes=4, bins=2)
    assert 0.3 < float(f1[-2]) < 1.0  # mean relative change in percent: 0.5
    assert float(f2[-2]) == pytest.approx(2 * float(f1[-2]), rel=1e-4)  # linear in the change
    s0, s1 = weight_fingerprint(model, QV, probes=4), weight_fingerprint(small, QV, probes=4)
    assert (f1 - f0).norm() > 100 * (s1 - s0).norm() / s0.norm()
    # per depth bin: only the layer that moved shows it
    one = copy.deepcopy(model)
    with torch.no_grad():
        w = one.get_submodule(QV[3]).weight
        w.mul_(1.01)
    f = drift_fingerprint(one, ref, QV, probes=4, bins=2)
    assert float(f[0]) == 0 and float(f[1]) == 0 and float(f[3]) == pytest.approx(1.0, rel=1e-4)  # bin 1's max: 1%


def test_drift_fingerprint_needs_a_reference_of_the_family(tiny):
    from oral.conditions import ConditionEncoder

    with pytest.raises(ConditionError, match="fingerprint_reference"):
        ConditionConfig(fingerprint_kind="drift")
    with pytest.raises(ConditionError, match="'sketch' or 'drift'"):
        ConditionConfig(fingerprint_kind="weights")
    model, _ = tiny
    enc = ConditionEncoder(ConditionConfig(fingerprint_kind="drift", fingerprint_reference="tiny-llama",
                                           fingerprint_probes=4, fingerprint_bins=2))
    c_ref = enc.model_condition(model.config, model, QV)
    c_new = enc.model_condition(model.config, _drifted(model, 0.005), QV)
    assert c_ref.shape == (enc.model_dim,) and torch.count_nonzero(c_ref[enc.text_dim:]) == 0
    assert (c_new - c_ref).norm() > 0.3
