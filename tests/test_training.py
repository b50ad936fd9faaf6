"""The helpers the three training loops share: one schedule, one checkpoint format."""

import pytest
import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from oral.training import (CheckpointError, checkpoint_dirs, latest_checkpoint, load_checkpoint, lr_at,
                           save_checkpoint)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_at_equals_transformers_schedule_at_the_one_based_step(schedule):
    lr, warmup, total = 2e-3, 10, 60
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if schedule == "cosine":
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=0.1)
    else:
        sched = get_constant_schedule_with_warmup(opt, warmup)
    factor = sched.lr_lambdas[0]
    for step in range(1, total + 1):
        assert lr_at(step, lr=lr, warmup_steps=warmup, total_steps=total, schedule=schedule,
                     min_lr_ratio=0.1) == pytest.approx(lr * factor(step), rel=1e-12, abs=1e-15), step
    assert lr_at(1, lr=lr, warmup_steps=warmup, total_steps=total) == pytest.approx(lr / warmup)  # never 0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(1, lr=lr, warmup_steps=1, total_steps=2, schedule="linear")


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    with torch.no_grad():  # a frozen tensor (the same "base" in every run) is not part of the checkpoint
        net[1].weight.copy_(torch.linspace(-1, 1, 16).view(2, 8)).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return net, opt


def _step(net, opt):
    torch.manual_seed(123)
    opt.zero_grad()
    net(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_checkpoint_round_trip_continues_bit_for_bit(tmp_path):
    net, opt = _trained()
    save_checkpoint(tmp_path, 3, net, opt, {"lr": 1e-2}, {"losses": [1.0, 0.5]}, tensors={"ema": {"w": torch.ones(2)}})
    files = sorted(p.name for p in (tmp_path / "0000003").iterdir())
    assert files == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    want = _step(net, opt)

    fresh, fresh_opt = _trained(seed=1)  # other weights and optimizer moments
    state, extra = load_checkpoint(tmp_path / "0000003", fresh, fresh_opt, {"lr": 1e-2}, tensors=("ema",))
    assert state["step"] == 3 and state["losses"] == [1.0, 0.5] and torch.equal(extra["ema"]["w"], torch.ones(2))
    got = _step(fresh, fresh_opt)
    trained = [k for k, p in net.named_parameters() if p.requires_grad]
    assert all(torch.equal(want[k], got[k]) for k in trained)


def test_checkpoint_of_another_setup_is_refused_naming_the_difference(tmp_path):
    net, opt = _trained()
    save_checkpoint(tmp_path, 1, net, opt, {"lr": 1e-2, "seed": 0})
    with pytest.raises(CheckpointError, match=r"differs in: lr\).*start over"):
        load_checkpoint(tmp_path / "0000001", net, opt, {"lr": 5e-3, "seed": 0}, fix="start over")


def test_only_the_latest_checkpoints_are_kept_and_debris_is_removed(tmp_path):
    net, opt = _trained()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, net, opt, {}, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["0000004", "0000006"]
    (tmp_path / ".0000008.x.tmp").mkdir()  # a writer killed inside atomic_dir
    (tmp_path / "0000008").mkdir()  # a dir without state.json is not a checkpoint
    assert latest_checkpoint(tmp_path).name == "0000006"
    assert not (tmp_path / ".0000008.x.tmp").exists()
