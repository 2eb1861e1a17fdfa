"""transformers integration: Auto classes without remote code, GenerationMixin with our recurrent KV cache."""

from __future__ import annotations

from pathlib import Path

import pytest
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


@pytest.mark.parametrize("order", ["package_first", "transformers_first", "config_only_first", "model_module_first",
                                   "hf_module_first"])
def test_import_recurrent_depth_registers_in_either_order(order: str) -> None:
    """`import recurrent_depth` (which imports neither torch nor transformers) is enough for the Auto classes to
    load a Huginn folder, whether transformers is imported before or after it."""
    import subprocess
    import sys
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "huginn-tiny"
    if not fixture.is_dir():
        pytest.skip(f"reference fixtures not found at {fixture}")
    lines = {
        "package_first": ["import sys, recurrent_depth",
                          "assert 'torch' not in sys.modules and 'transformers' not in sys.modules",
                          "from transformers import AutoModelForCausalLM"],
        "transformers_first": ["from transformers import AutoModelForCausalLM", "import recurrent_depth"],
        "model_module_first": ["import recurrent_depth.model", "from transformers import AutoModelForCausalLM"],
        "hf_module_first": ["import recurrent_depth.hf", "from transformers import AutoModelForCausalLM"],
        "config_only_first": ["from transformers import AutoConfig", "import recurrent_depth",
                              f"assert type(AutoConfig.from_pretrained({str(fixture)!r})).__name__ "
                              "== 'RecurrentDepthConfig'",
                              "from transformers import AutoModelForCausalLM"],
    }[order]
    code = "\n".join([*lines, f"m = AutoModelForCausalLM.from_pretrained({str(fixture)!r})",
                      "print(type(m).__name__)"])
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True,
                            text=True, timeout=120,
                            env={"PYTHONPATH": str(repo), "PATH": "", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "RecurrentDepthForCausalLM"
