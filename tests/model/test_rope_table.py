"""The RoPE table is the exact fp32 one in every path: after casts, after meta init + to_empty, in saved files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.model.layers import rope_table
from tests.conftest import fixture_dir


def _exact(cfg: RecurrentDepthConfig) -> torch.Tensor:
    return rope_table(cfg.head_dim, cfg.block_size, cfg.rope_base)


def _model() -> RecurrentDepthForCausalLM:
    torch.manual_seed(0)
    return RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).eval()


def test_table_equals_the_reference_freqs_cis(fixture_name: str) -> None:
    path = fixture_dir(fixture_name)
    model = RecurrentDepthForCausalLM.from_pretrained(path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor("freqs_cis")
    torch.testing.assert_close(model.transformer.rope, stored, rtol=0, atol=0)


_CASTS = {"bfloat16": lambda m: m.bfloat16(), "half": lambda m: m.half(),
          "to_bf16": lambda m: m.to(torch.bfloat16), "to_cpu_bf16": lambda m: m.to("cpu", torch.bfloat16)}


@pytest.mark.parametrize("cast", sorted(_CASTS))
def test_casts_keep_the_table_exact_fp32(cast: str) -> None:
    model = _CASTS[cast](_model())
    assert model.transformer.wte.weight.dtype != torch.float32
    assert model.transformer.rope.dtype == torch.float32
    torch.testing.assert_close(model.transformer.rope, _exact(model.config), rtol=0, atol=0)


def test_bf16_inference_reads_the_exact_table() -> None:
    model = _model().to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 40))
    ctx = model.transformer.attention_context(ids)
    assert ctx.rope.dtype == torch.float32
    torch.testing.assert_close(ctx.rope, _exact(model.config)[0, :40][None], rtol=0, atol=0)


def test_cast_then_save_writes_the_exact_table(tmp_path: Path) -> None:
    model = _model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor("freqs_cis")
        assert f.get_tensor("transformer.adapter.weight").dtype == torch.bfloat16
    assert stored.dtype == torch.float32
    torch.testing.assert_close(stored, _exact(model.config), rtol=0, atol=0)


@pytest.mark.parametrize("init", [True, False])
def test_meta_init_then_to_empty_equals_a_normal_build(init: bool) -> None:
    normal = _model()
    with torch.device("meta"):
        meta = RecurrentDepthForCausalLM(normal.config)
    meta.to_empty(device="cpu")
    if init:
        meta.init_weights()
    meta.load_state_dict(normal.state_dict())
    meta.tie_weights()
    meta.eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(meta(ids, num_steps=3, init_scale=0.0).logits,
                                   normal(ids, num_steps=3, init_scale=0.0).logits, rtol=0, atol=0)


def test_init_weights_resets_the_table() -> None:
    model = _model()
    model.transformer.rope.zero_()
    model.init_weights()
    torch.testing.assert_close(model.transformer.rope, _exact(model.config), rtol=0, atol=0)
