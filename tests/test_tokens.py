"""The weight tokenizer: exact round trips, positions and mask, fitted statistics, persistence."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, MistralConfig

from oral.lora import AdapterError, LoraModule, LoraSpec
from oral.tokens import TokenBatch, WeightTokenizer

TYPES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"]


def random_state(spec: LoraSpec, seed: int = 0, scale_A: float = 1.0, scale_B: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in spec.modules:
        state[m.key_A] = torch.randn(m.shape_A, generator=g) * scale_A
        state[m.key_B] = torch.randn(m.shape_B, generator=g) * scale_B
    return state


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@st.composite
def specs(draw) -> LoraSpec:
    """Random specs: several layers and module types, GQA-like out < in, mixed ranks."""
    n_layers = draw(st.integers(1, 3))
    types = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=4, unique=True))
    hidden = draw(st.integers(1, 48))
    modules = []
    for layer in range(n_layers):
        for t in types:
            out = hidden
            if t in ("self_attn.k_proj", "self_attn.v_proj"):  # GQA: fewer kv heads than query heads
                out = max(1, hidden // draw(st.sampled_from([1, 2, 3])))
            fin = draw(st.integers(1, 70)) if t == "mlp.down_proj" else hidden
            rank = draw(st.integers(1, 8))
            modules.append(LoraModule(f"model.layers.{layer}.{t}", fin, out, rank, float(2 * rank)))
    return LoraSpec(tuple(modules))


def test_token_layout_positions_and_mask_for_a_gqa_config_with_mixed_ranks():
    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=100)
    spec = LoraSpec.from_base_config(config, ["q_proj", "v_proj"], 4, 8, rank_pattern={"v_proj": 2})
    D = 16
    tok = WeightTokenizer(spec, D)
    sizes = [m.rank * m.in_features for m in spec.modules] + [m.rank * m.out_features for m in spec.modules]
    assert tok.num_tokens == sum(math.ceil(n / D) for n in sizes)
    assert int(tok.mask.sum()) == spec.num_params
    batch = tok.encode(random_state(spec))
    assert batch.tokens.shape == (tok.num_tokens, D) and batch.tokens.dtype == torch.float32
    assert batch.positions.shape == (tok.num_tokens, 4) and batch.positions.dtype == torch.long
    assert (batch.tokens[~batch.mask] == 0).all()
    # The v_proj B of layer 2: (16, 2) -> 32 values -> 2 tokens; its positions say so.
    v = spec["model.layers.2.self_attn.v_proj"]
    slot = next(s for s in tok.layout if s.key == v.key_B)
    assert slot.num_rows == 2
    rows = batch.positions[slot.row : slot.row + 2].tolist()
    t = spec.module_types.index("self_attn.v_proj")
    assert rows == [[2, t, 1, 0], [2, t, 1, 1]]
    assert set(batch.positions[:, 0].tolist()) == {0, 1, 2}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), token_size=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
def test_round_trip_is_bitwise_for_random_specs(spec, token_size, seed, magnitude):
    state = random_state(spec, seed, scale_A=magnitude, scale_B=magnitude / 7)
    tok = WeightTokenizer(spec, token_size)
    back = tok.decode(tok.encode(state))
    assert list(back) == spec.keys()
    assert all(bitwise_equal(back[k], state[k]) for k in spec.keys())
    # Fitted statistics (power-of-two scales, no centering) keep it bitwise.
    tok.fit([random_state(spec, seed + 1, magnitude, magnitude), state])
    batch = tok.encode(state)
    back = tok.decode(batch)
    assert all(bitwise_equal(back[k], state[k]) for k in spec.keys())


def test_fitted_stats_normalize_each_tensor_and_still_round_trip_exactly():
    spec = LoraSpec.from_base_config(
        MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=100),
        ["q_proj", "k_proj", "down_proj"], 8, 16, rank_pattern={"k_proj": 4})
    zoo = [random_state(spec, s, scale_A=0.02, scale_B=3e-4) for s in range(5)]
    tok = WeightTokenizer(spec, 32).fit(iter(zoo))  # a generator: stats are streamed
    assert tok.num_fitted == 5
    batch = tok.encode(zoo[0])
    real = batch.tokens[batch.mask]
    assert 0.5 < real.std().item() < 2.0  # raw values are ~1e-2 and ~3e-4
    for i, slot in enumerate(tok.layout):
        s = tok.scale[i].item()
        assert s == 2.0 ** round(math.log2(s))  # a power of two
    back = tok.decode(batch.tokens)
    assert all(bitwise_equal(back[k], zoo[0][k]) for k in spec.keys())


def test_centered_stats_round_trip_to_float_precision():
    spec = LoraSpec((LoraModule("model.layers.0.q", 20, 12, 3, 6.0),))
    zoo = [{k: v + 0.5 for k, v in random_state(spec, s).items()} for s in range(3)]
    tok = WeightTokenizer(spec, 7).fit(zoo, center=True)
    assert tok.center and abs(tok.mean[0].item() - 0.5) < 0.3
    batch = tok.encode(zoo[0])
    assert abs(batch.tokens[batch.mask].mean().item()) < 0.3
    back = tok.decode(batch)
    for k in spec.keys():
        assert torch.allclose(back[k], zoo[0][k], rtol=1e-6, atol=1e-6)


def test_encode_writes_into_a_preallocated_buffer_and_decode_accepts_lower_precision():
    spec = LoraSpec((LoraModule("model.layers.0.q", 10, 6, 2, 4.0), LoraModule("model.layers.1.q", 10, 6, 2, 4.0)))
    tok = WeightTokenizer(spec, 8)
    buf = torch.full((3, tok.num_tokens, 8), float("nan"))
    for i in range(3):
        batch = tok.encode(random_state(spec, i), out=buf[i])
        assert batch.tokens.data_ptr() == buf[i].data_ptr()
    assert not buf.isnan().any()  # padding was zeroed too
    back = tok.decode(buf[1].to(torch.bfloat16))
    ref = random_state(spec, 1)
    assert all(torch.allclose(back[k], ref[k], rtol=1e-2, atol=1e-2) for k in spec.keys())
    with pytest.raises(ValueError, match="shape"):
        tok.decode(buf[0, :-1])


def test_save_and_load_restore_the_same_tokenizer(tmp_path):
    spec = LoraSpec.from_base_config(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100),
        ["q_proj", "v_proj"], 4, 8, rank_pattern={"v_proj": 2})
    zoo = [random_state(spec, s, 0.1, 0.01) for s in range(3)]
    tok = WeightTokenizer(spec, 24).fit(zoo)
    tok.save(tmp_path / "tok")
    loaded = WeightTokenizer.load(tmp_path / "tok")
    assert loaded.spec == spec and loaded.num_tokens == tok.num_tokens and loaded.num_fitted == 3
    a, b = tok.encode(zoo[1]), loaded.encode(zoo[1])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions, b.positions) and torch.equal(a.mask, b.mask)


def test_state_for_another_spec_is_refused():
    spec = LoraSpec((LoraModule("model.layers.0.q", 10, 6, 2, 4.0),))
    other = LoraSpec((LoraModule("model.layers.0.q", 10, 6, 3, 4.0),))
    tok = WeightTokenizer(spec, 8)
    with pytest.raises(AdapterError, match="shape"):
        tok.encode(random_state(other))
    with pytest.raises(AdapterError, match="lacks"):
        tok.encode({})
    assert isinstance(tok.encode(random_state(spec)), TokenBatch)


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


@pytest.mark.slow
def test_mistral_7b_r16_adapter_streams_within_two_copies():
    import gc
    from pathlib import Path

    config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8)
    spec = LoraSpec.from_base_config(config, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], 16, 32)
    assert spec.num_params == 41_943_040
    tok = WeightTokenizer(spec, 128)
    tok.positions, tok.mask  # shared, built once
    state = {k: torch.randn(shape) for k, shape in spec.shapes().items()}
    copy_kb = spec.num_params * 4 / 1024
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
    base = _rss_kb("VmRSS")
    batch = tok.encode(state)
    assert _rss_kb("VmHWM") - base < 1.15 * copy_kb  # only the output buffer is added
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kb("VmRSS")
    back = tok.decode(batch)
    assert _rss_kb("VmHWM") - base < 1.15 * copy_kb
    assert all(torch.equal(back[k], state[k]) for k in spec.keys())
