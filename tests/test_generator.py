"""The network and the diffusion: shapes, presets, samplers against an exact denoiser, masking."""

import pytest
import torch

from oral.diffusion import PREDICTION_TYPES, Diffusion, DiffusionConfig
from oral.generator import GENERATOR_PRESETS, GeneratorNet, generator_config


def _inputs(cfg, B=2, N=12, K=5):
    positions = torch.stack([torch.randint(0, 3, (B, N)), torch.randint(0, 2, (B, N)),
                             torch.randint(0, 2, (B, N)), torch.arange(N).expand(B, N)], dim=-1)
    cm = torch.randn(B, cfg.model_cond_dim)
    ct = torch.randn(B, cfg.text_cond_dim)
    idx = torch.rand(B, N).argsort(1)[:, :K]
    u = torch.randn(B * K, cfg.token_size)
    t = torch.randint(0, 1000, (B * K,))
    return positions, cm, ct, idx, u, t


@pytest.mark.parametrize("denoiser", ["mlp", "conv"])
def test_forward_shapes_and_gradients_reach_every_part(denoiser):
    cfg = generator_config("tiny", denoiser=denoiser, model_cond_dim=10, text_cond_dim=8)
    net = GeneratorNet(cfg)
    assert net.mamba.config.use_mambapy
    positions, cm, ct, idx, u, t = _inputs(cfg)
    eps = net(positions, cm, ct, torch.tensor([False, True]), idx, u, t)
    assert eps.shape == u.shape
    eps.pow(2).mean().backward()
    for name in ("cond.0.weight", "pos.mix.weight", "null_text"):
        g = dict(net.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if n.startswith("mamba."))


def test_prototypes_depend_on_text_unless_it_is_dropped():
    cfg = generator_config("tiny", model_cond_dim=4, text_cond_dim=8)
    net = GeneratorNet(cfg).eval()
    positions, cm, _, _, _, _ = _inputs(cfg, B=1)
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    with torch.no_grad():
        pa = net.prototypes(positions, net.condition(cm, a, torch.tensor([False])))
        pb = net.prototypes(positions, net.condition(cm, b, torch.tensor([False])))
        na = net.prototypes(positions, net.condition(cm, a, torch.tensor([True])))
        nb = net.prototypes(positions, net.condition(cm, b, torch.tensor([True])))
    assert not torch.allclose(pa, pb)
    assert torch.equal(na, nb)


def test_the_blockwise_scan_matches_transformers_mamba_in_values_and_gradients():
    """prototypes() scans in power-of-two blocks (no padding to 512 for 300 tokens); it is the same function
    as transformers' MambaModel (mambapy path), forward and backward, to float rounding."""
    from oral.generator import pow2_blocks

    assert pow2_blocks(300) == [256, 32, 8, 4] and pow2_blocks(512) == [512] and pow2_blocks(7) == [4, 2, 1]
    torch.manual_seed(0)
    cfg = generator_config("tiny", model_cond_dim=4, text_cond_dim=8)
    net = GeneratorNet(cfg)
    positions, cm, ct, *_ = _inputs(cfg, N=75)
    drop = torch.tensor([False, False])
    params = [p for n, p in net.named_parameters() if "embeddings" not in n]

    def run(prototypes):
        out = prototypes(positions, net.condition(cm, ct, drop))
        return out, torch.autograd.grad(out.pow(2).sum(), params, allow_unused=True)

    ours, g_ours = run(net.prototypes)
    ref, g_ref = run(lambda pos, c: net.mamba(inputs_embeds=net._mamba_input(pos, c)).last_hidden_state)
    assert torch.allclose(ours, ref, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6 * max(1.0, float(b.abs().max())))


def test_presets_registry_and_bad_names():
    assert {"tiny", "small", "base"} <= set(GENERATOR_PRESETS)
    assert generator_config("small", d_model=128).d_model == 128
    with pytest.raises(ValueError, match="unknown generator preset"):
        generator_config("huge")
    with pytest.raises(ValueError, match="unknown generator setting"):
        generator_config("tiny", width=3)
    with pytest.raises(ValueError, match="unknown denoiser"):
        generator_config("tiny", denoiser="unet")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_recover_the_data_with_an_exact_denoiser(prediction_type, sampler):
    d = Diffusion(DiffusionConfig(prediction_type=prediction_type))
    ab = d.scheduler.alphas_cumprod
    x0 = torch.randn(6, 16)

    def exact(x, t):  # the ideal prediction when the data is the single point x0
        a = ab[t][:, None]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "sample": x0.expand_as(x), "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]

    x = d.sample(exact, (6, 16), steps=25, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, x0, atol=1e-4)


def test_sampling_is_deterministic_given_the_seed():
    d = Diffusion()
    fn = lambda x, t: 0.5 * x  # noqa: E731
    a = d.sample(fn, (3, 8), steps=10, sampler="ddpm", generator=torch.Generator().manual_seed(1))
    b = d.sample(fn, (3, 8), steps=10, sampler="ddpm", generator=torch.Generator().manual_seed(1))
    c = d.sample(fn, (3, 8), steps=10, sampler="ddpm", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="unknown sampler"):
        d.sample(fn, (3, 8), sampler="euler")


def test_sampling_from_an_init_keeps_it_at_strength_0_ignores_it_at_1_and_moves_it_less_in_between():
    d = Diffusion()
    fn = lambda x, t: 0.5 * x  # noqa: E731
    init = torch.randn(3, 8)
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(d.sample(fn, (3, 8), steps=10, init=init, strength=0.0, generator=seed()), init)
    plain = d.sample(fn, (3, 8), steps=10, generator=seed())
    assert torch.equal(d.sample(fn, (3, 8), steps=10, init=init, strength=1.0, generator=seed()), plain)
    moved = [float((d.sample(fn, (3, 8), steps=10, init=init, strength=s, generator=seed()) - init).norm())
             for s in (0.1, 0.5, 0.9)]
    assert 0 < moved[0] < moved[1] < moved[2]
    with pytest.raises(ValueError, match="strength must be between 0 and 1"):
        d.sample(fn, (3, 8), init=init, strength=1.5)
    with pytest.raises(ValueError, match="init has shape"):
        d.sample(fn, (3, 8), init=torch.randn(2, 8), strength=0.5)


def test_padding_is_left_out_of_the_loss():
    d = Diffusion(DiffusionConfig(prediction_type="epsilon"))
    x0 = torch.randn(4, 8)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[-1, 5:] = False
    pred = torch.randn(4, 8)
    target = torch.randn(4, 8)
    loss = Diffusion.masked_mse(pred, target, mask)
    pred2 = pred.clone()
    pred2[-1, 5:] += 100.0  # garbage at the padding changes nothing
    assert torch.equal(loss, Diffusion.masked_mse(pred2, target, mask))
    assert torch.isclose(loss, ((pred - target) ** 2)[mask].mean())
    # padding values of x0 (e.g. NaN) never reach the loss
    x0[-1, 5:] = float("nan")
    g = torch.Generator().manual_seed(0)
    assert torch.isfinite(d.loss(lambda x, t: torch.zeros_like(x), x0, mask, g))


def test_learned_token_embeddings_start_at_zero_and_refuse_longer_sequences():
    cfg = generator_config("tiny", model_cond_dim=4, text_cond_dim=8, max_tokens=12)
    net = GeneratorNet(cfg)
    assert net.token_emb.shape == (12, cfg.d_model) and not net.token_emb.any()
    positions, cm, ct, idx, u, t = _inputs(cfg, N=12)
    net(positions, cm, ct, torch.tensor([False, False]), idx, u, t).pow(2).mean().backward()
    assert net.token_emb.grad.abs().sum() > 0
    positions, cm, ct, idx, u, t = _inputs(cfg, N=13)
    with pytest.raises(ValueError, match="learned embeddings for 12"):
        net(positions, cm, ct, torch.tensor([False, False]), idx, u, t)


def test_a_generator_path_may_name_oral_home(tiny_generator_dir, monkeypatch):
    from oral.generate import Generator

    monkeypatch.setenv("ORAL_HOME", str(tiny_generator_dir.parent))
    assert Generator.from_pretrained(f"$ORAL_HOME/{tiny_generator_dir.name}").path == tiny_generator_dir
