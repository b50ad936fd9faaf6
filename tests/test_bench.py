"""`oral bench` and the streamed sampling it measures: 7B-class layouts from shipped configs, the bench's
JSON on the smallest layout, and chunked prototypes / sampling / decoding against the one-pass path.
No test here depends on timing."""

import json

import pytest
import torch

from oral.bench import BenchError, bench_generator, bench_spec, model_config, shipped_model_configs
from oral.generator import GeneratorNet, generator_config
from oral.lora import load_adapter, read_provenance
from oral.tokens import WeightTokenizer


@pytest.mark.parametrize("name, targets, rank, params, modules", [
    ("mistral-7b", ["q_proj", "v_proj"], 4, 1_703_936, 64),
    ("mistral-7b", "all-linear", 16, 41_943_040, 224),
    ("llama-3.1-8b", "all-linear", 16, 41_943_040, 224),
    ("qwen2.5-7b", "all-linear", 16, 40_370_176, 196),
])
def test_shipped_configs_give_the_published_7b_layouts(name, targets, rank, params, modules):
    spec = bench_spec(name, targets, rank)
    assert (spec.num_params, len(spec)) == (params, modules)
    assert spec.modules[0].rank == rank and spec.lora_config().lora_alpha == 2 * rank


def test_stable_diffusion_unet_layout_from_its_diffusers_config():
    from oral.bench import default_targets

    # 16 transformer blocks (down 3 x 2, mid 1, up 3 x 3), each with self-attention (q, k, v, out: C -> C) and
    # cross-attention (k, v: 1024 -> C): r * (56 C + 2 * 1024) per block at r=4, summed over the blocks' widths C
    widths = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    spec = bench_spec("sd-2.1-unet", default_targets("sd-2.1-unet"), 4)
    assert (spec.num_params, len(spec)) == (sum(4 * (14 * c + 2048) for c in widths), 128)
    assert {m.name.rsplit(".", 2)[-2] if m.name.endswith("to_out.0") else m.name.rsplit(".", 1)[-1]
            for m in spec.modules} == {"to_q", "to_k", "to_v", "to_out"}
    assert default_targets("mistral-7b") == ["q_proj", "v_proj"]


def test_every_weight_token_of_the_unet_layout_has_its_own_position_and_llm_layers_keep_their_index():
    """down_blocks.1 and up_blocks.1 hold modules of the same type: their layer position is the block's ordinal
    then, so no two tokens share (layer, type, A/B, chunk). A language model's stays its layer index."""
    from oral.bench import default_targets
    from oral.tokens import WeightTokenizer

    unet = bench_spec("sd-2.1-unet", default_targets("sd-2.1-unet"), 4)
    pos = WeightTokenizer(unet, 256).positions
    assert len({tuple(r) for r in pos.tolist()}) == len(pos)
    down, up = (next(m.name for m in unet.modules if m.name.startswith(b)) for b in ("down_blocks.1.", "up_blocks.1."))
    assert unet.layer_of(down) != unet.layer_of(up) and len(unet.layers) == 7  # down 0-2, mid, up 1-3
    smol = bench_spec("smollm2-135m", ["q_proj", "v_proj"], 4)
    assert [smol.layer_of(m.name) for m in smol.modules] == [m.layer_index for m in smol.modules]


def test_model_configs_are_shipped_by_name_and_read_from_a_path(tmp_path):
    assert {"mistral-7b", "llama-3.1-8b", "qwen2.5-7b"} <= set(shipped_model_configs())
    cfg = model_config("qwen2.5-7b")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (3584, 28, 18944)
    path = tmp_path / "my.json"
    path.write_text(json.dumps(cfg))
    assert model_config(path) == cfg
    with pytest.raises(BenchError, match="no model config"):
        model_config(tmp_path / "missing.json")


def test_bench_generate_json_has_the_numbers_and_writes_a_valid_peft_adapter(tmp_path, capsys):
    from oral.cli import main

    out = tmp_path / "adapter"
    assert main(["bench", "generate", "--spec", "tiny-llama", "--steps", "2", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    spec, state = load_adapter(out)  # validated
    tok = WeightTokenizer(spec, r["token_size"])
    assert r["params"] == spec.num_params == sum(v.numel() for v in state.values())
    assert (r["tokens"], r["steps"], r["rank"], r["preset"]) == (tok.num_tokens, 2, 4, "small")
    assert r["wall_s"] > 0 and r["peak_rss_mb"] >= r["base_rss_mb"] > 0
    assert r["adapter_mb"] == pytest.approx(spec.num_params * 4 / 2**20, rel=0.05, abs=0.05)
    assert r["generator_params"] > 0
    assert read_provenance(out)["source"] == "oral bench"


# -----------------------------------------------------------------------------
# Streaming: chunks against one pass


def test_chunked_prototypes_carry_the_mamba_state_and_match_one_pass():
    torch.manual_seed(0)
    net = GeneratorNet(generator_config("tiny", model_cond_dim=4, text_cond_dim=8, max_tokens=64)).eval()
    N = 50
    positions = torch.stack([torch.arange(N) // 10, torch.arange(N) % 2, torch.arange(N) % 2, torch.arange(N) % 10], -1)[None]
    c = net.condition(torch.randn(1, 4), torch.randn(1, 8))
    with torch.no_grad():
        one = net.prototypes(positions, c)  # (1, N, d)
        assert torch.equal(torch.cat(list(net.prototype_chunks(positions, c, N)), 1), one)
        for chunk, block in ((1, None), (7, None), (16, None), (16, 4), (20, 8)):
            parts = list(net.prototype_chunks(positions, c, chunk, block))
            assert [p.shape[1] for p in parts] == [chunk] * (N // chunk) + ([N % chunk] if N % chunk else [])
            torch.testing.assert_close(torch.cat(parts, 1), one, atol=1e-5, rtol=1e-5)
        # without the carried state (each chunk from a zero state) the chunks would not match
        fresh = torch.cat([net.prototypes(positions[:, s:s + 16], c) for s in range(0, N, 16)], 1)
        assert (fresh - one).abs().max() > 1e-3


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    (base / "config.json").write_text(json.dumps(model_config("tiny-llama")))
    spec = bench_spec("tiny-llama", ["q_proj", "v_proj"], 4)
    gen = bench_generator(spec, str(base), "tiny")
    return gen, str(base), next(iter(gen.c_model_cache.values()))


@pytest.mark.parametrize("kw", [dict(steps=4), dict(steps=3, guidance=2.0)])
def test_streamed_sampling_gives_the_one_shot_tokens_for_a_small_layout(tiny_bench, kw):
    gen, _, c_model = tiny_bench
    one = gen.sample_tokens(0, c_model, "detect spam", seed=3, **kw)  # 28 tokens: one piece
    for chunk in (1, 5, 16):
        streamed = gen.sample_tokens(0, c_model, "detect spam", seed=3, chunk=chunk, **kw)
        torch.testing.assert_close(streamed, one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(gen.sample_tokens(0, c_model, "detect spam", seed=4, **kw), one)


def test_generate_decodes_the_streamed_chunks_into_the_sampled_adapter(tiny_bench):
    gen, base, c_model = tiny_bench
    chunk, gen.chunk = gen.chunk, 5
    try:
        _, state = gen.generate(base, "detect spam", seed=1, steps=3)
        tokens = gen.sample_tokens(0, c_model, "detect spam", seed=1, steps=3)
    finally:
        gen.chunk = chunk
    expected = gen.tokenizers[0].decode(tokens)
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_decoding_rows_chunk_by_chunk_equals_decode():
    spec = bench_spec("tiny-llama", ["q_proj", "v_proj"], 4)
    tok = WeightTokenizer(spec, 48)  # tensors of 256 and 128 values: 6 and 3 tokens, the last one padded
    tok.scale = torch.exp2(torch.randint(-6, 2, tok.scale.shape).float())
    tokens = torch.randn(tok.num_tokens, tok.token_size)
    whole = tok.decode(tokens)
    state, start = {}, 0
    for n in (1, 3, 8, 2, tok.num_tokens):
        tok.decode_rows(tokens[start:start + n], start, state)
        start = min(start + n, tok.num_tokens)
    assert list(state) == list(whole) and all(torch.equal(state[k], whole[k]) for k in whole)


# -----------------------------------------------------------------------------
# Start-up: a known base is neither loaded nor hashed twice


def test_a_cached_base_fingerprint_skips_loading_the_base_and_gives_the_same_adapter(tiny, tmp_home, tmp_path, monkeypatch):
    import oral.generate as generate
    from oral.models import weights_fingerprint

    base = tmp_path / "base"
    tiny[0].save_pretrained(base)
    tiny[1].save_pretrained(base)
    assert generate.base_fingerprint(str(base)) is None
    gen = bench_generator(bench_spec(str(base), ["q_proj", "v_proj"], 4), str(base), "tiny")
    loads = []
    real_load = generate.load_base
    monkeypatch.setattr(generate, "load_base", lambda b: loads.append(b) or real_load(b))
    (a,) = generate.generate_adapters(gen, str(base), "detect spam", tmp_path / "a", steps=2)
    (b,) = generate.generate_adapters(gen, str(base), "detect spam", tmp_path / "b", steps=2)
    assert loads == [str(base)]  # the first call loads and fingerprints it; the second reads the cache
    assert read_provenance(a)["base_fingerprint"] == read_provenance(b)["base_fingerprint"] == weights_fingerprint(tiny[0])
    (sa, ta), (sb, tb) = load_adapter(a), load_adapter(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    (base / "config.json").touch()  # a changed file is another base: computed again
    assert generate.base_fingerprint(str(base)) is None


def test_time_to_adapter_times_both_ways_and_finds_the_first_checkpoint_that_gets_there(tiny_generator_dir, tmp_path):
    from oral.bench_time import TimeToAdapterError, plot_time_to_adapter, time_to_adapter

    r = time_to_adapter("sms-spam", tiny_generator_dir, limit=8, val_limit=8, sampling_steps=(2,), ddpm_steps=3,
                        finetune_steps=4, every=2, progress=False)
    default = r["steps"]
    assert [(x["sampler"], x["steps"]) for x in r["sampling"]] == [("ddim", s) for s in sorted({2, default})] + [("ddpm", 3)]
    assert r["accuracy"] == next(x["accuracy"] for x in r["sampling"] if (x["sampler"], x["steps"]) == ("ddim", default))
    assert [x["step"] for x in r["finetune"]] == [2, 4]
    assert 0 < r["finetune"][0]["wall_s"] <= r["finetune"][1]["wall_s"]
    first = next((x for x in r["finetune"] if x["accuracy"] >= r["accuracy"] - r["tolerance"]), None)
    assert r["reached"] == (first is not None)
    assert r["finetune_s"] == (first or r["finetune"][-1])["wall_s"]
    assert r["ratio"] == round(r["finetune_s"] / r["generate_s"], 1) and r["generate_s"] > 0
    assert r["chosen_steps"] in {x["steps"] for x in r["sampling"] if x["sampler"] == "ddim"}
    assert plot_time_to_adapter(r)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TimeToAdapterError, match="not trained on 'trec-question'"):
        time_to_adapter("trec-question", tiny_generator_dir)
