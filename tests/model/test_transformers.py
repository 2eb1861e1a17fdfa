"""transformers integration: Auto classes without remote code, GenerationMixin with our recurrent KV cache."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import recurrent_depth  # noqa: F401  (registers huginn_raven)
from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.inference.cache import KVCache
from tests.conftest import fixture_dir


def test_auto_classes_load_fixture_without_remote_code(fixture_name: str) -> None:
    path = fixture_dir(fixture_name)
    cfg = AutoConfig.from_pretrained(path)
    assert isinstance(cfg, RecurrentDepthConfig)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, RecurrentDepthForCausalLM)


def test_auto_round_trip_of_fresh_model(tmp_path: Path) -> None:
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).eval()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids, num_steps=2, init_scale=0.0).logits,
                                   model(ids, num_steps=2, init_scale=0.0).logits, rtol=0, atol=0)


def test_generate_keeps_one_cache_entry_per_step_and_layer() -> None:
    cfg = RecurrentDepthConfig.from_name("debug")
    model = RecurrentDepthForCausalLM(cfg).eval()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, num_steps=5,
                         init_scale=0.0, return_dict_in_generate=True)
    cache = out.past_key_values if transformers.__version__.startswith("4.") else out.cache
    assert isinstance(cache, KVCache)
    expected = cfg.n_layers_in_prelude + 5 * cfg.n_layers_in_recurrent_block + cfg.n_layers_in_coda
    assert len(cache.slots) == expected


def test_generate_equals_manual_greedy_loop() -> None:
    torch.manual_seed(1)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).eval()
    ids = torch.tensor([[7, 8, 9, 10]])
    out = model.generate(ids, max_new_tokens=5, do_sample=False, num_steps=3, init_scale=0.0)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            nxt = model(seq, num_steps=3, init_scale=0.0).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert out.tolist() == seq.tolist()
