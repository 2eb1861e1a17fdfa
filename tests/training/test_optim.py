"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import pytest

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.training.config import OptimSection
from recurrent_depth.training.optim import build_optimizer, lr_at, param_groups


def test_no_weight_decay_on_norms_biases_and_qk_bias() -> None:
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug"))
    decay, plain = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert plain["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert any("qk_bias" in n for n in plain_names) and any("norm" in n for n in plain_names)
    assert all("norm" not in n and "qk_bias" not in n for n in decay_names)
    assert "transformer.wte.weight" in decay_names
    n_unique = len({id(p) for p in model.parameters()})
    assert len(plain["params"]) + len(decay["params"]) == n_unique  # tied head counted once
    opt = build_optimizer(model, OptimSection(lr=1e-3, betas=[0.9, 0.95]))
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_plain_cpu_parameters_get_the_fused_adamw_step() -> None:
    """Fused AdamW for plain CPU tensors; its step matches the default (foreach) implementation."""
    import torch

    torch.manual_seed(0)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug"))
    twin = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug"))
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, OptimSection(lr=1e-2))
    assert all(g["fused"] for g in opt.param_groups)
    ref = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref.param_groups[0]["weight_decay"] = opt.param_groups[0]["weight_decay"]
    ref.param_groups[1]["weight_decay"] = opt.param_groups[1]["weight_decay"]
    for group, twin_group in zip(opt.param_groups, ref.param_groups):
        twin_group["betas"], twin_group["eps"] = group["betas"], group["eps"]
    for m in (model, twin):
        for p in m.parameters():
            p.grad = torch.ones_like(p) * 0.1
    opt.step()
    ref.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_warmup_then_cosine() -> None:
    s = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, s, 110) == pytest.approx(0.1)
    assert lr_at(9, s, 110) == pytest.approx(1.0)
    assert lr_at(10, s, 110) == pytest.approx(1.0)
    assert lr_at(60, s, 110) == pytest.approx(0.55)
    assert lr_at(110, s, 110) == pytest.approx(0.1)
    values = [lr_at(i, s, 110) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_trapezoid_and_constant() -> None:
    s = OptimSection(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="trapezoid", cooldown_steps=10)
    assert [lr_at(i, s, 100) for i in (0, 50, 89)] == [1.0, 1.0, 1.0]
    assert lr_at(90, s, 100) == pytest.approx(0.9)
    assert lr_at(99, s, 100) == pytest.approx(0.0)
    c = OptimSection(lr=0.5, warmup_steps=0, schedule="constant")
    assert lr_at(1000, c, 10) == 0.5
