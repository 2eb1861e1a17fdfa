"""Save / load round trips in Huginn's layout, sharding, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.model.checkpoint import CheckpointError
from tests.conftest import fixture_dir


def _model(**overrides) -> RecurrentDepthForCausalLM:
    torch.manual_seed(0)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug", **overrides)).eval()
    with torch.no_grad():  # non-trivial norms and qk_bias, so a loader that drops them fails
        for name, p in model.named_parameters():
            if "norm" in name or "qk_bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_load_bit_identical(tmp_path: Path, shard) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=shard)
    if shard:
        assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
        assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) > 1
    loaded = RecurrentDepthForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, num_steps=3, init_scale=0.0).logits,
                                   model(ids, num_steps=3, init_scale=0.0).logits, rtol=0, atol=0)


def test_saved_layout_is_huginn(tmp_path: Path) -> None:
    _model().save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "huginn_raven" and cfg["n_layers"] == 4 and cfg["head_dim"] == 16
    names = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert "transformer.core_block.1.attn.qk_bias" in names and "transformer.adapter.weight" in names
    assert "lm_head.weight" not in names  # tied


def test_untied_head_round_trip(tmp_path: Path) -> None:
    model = _model(tie_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    model.save_pretrained(tmp_path / "ckpt")
    loaded = RecurrentDepthForCausalLM.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_bf16_save_and_auto_dtype(tmp_path: Path) -> None:
    _model().save_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert RecurrentDepthForCausalLM.from_pretrained(tmp_path / "ckpt", torch_dtype="auto").dtype == torch.bfloat16
    assert RecurrentDepthForCausalLM.from_pretrained(tmp_path / "ckpt").dtype == torch.float32


def _broken_copy(tmp_path: Path, edit) -> Path:
    src = fixture_dir("huginn-tiny")
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    dst.chmod(0o755)
    for f in dst.iterdir():
        f.chmod(0o644)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = _broken_copy(tmp_path, lambda s: s.pop("transformer.core_block.1.attn.qk_bias"))
    with pytest.raises(CheckpointError, match=r"missing tensors: transformer\.core_block\.1\.attn\.qk_bias"):
        RecurrentDepthForCausalLM.from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    path = _broken_copy(tmp_path, lambda s: s.__setitem__("transformer.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: transformer\.extra\.weight"):
        RecurrentDepthForCausalLM.from_pretrained(path)


def test_misshaped_tensor_is_named(tmp_path: Path) -> None:
    path = _broken_copy(tmp_path, lambda s: s.__setitem__("transformer.adapter.weight", torch.zeros(64, 64)))
    with pytest.raises(CheckpointError, match=r"transformer\.adapter\.weight has shape \(64, 64\)"):
        RecurrentDepthForCausalLM.from_pretrained(path)


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        RecurrentDepthForCausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        RecurrentDepthForCausalLM.from_pretrained(tmp_path / "empty")


def test_stored_lm_head_copy_is_accepted(fixture_name: str) -> None:
    path = fixture_dir(fixture_name)
    model = RecurrentDepthForCausalLM.from_pretrained(path)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("recurrent_depth.model.checkpoint.write_config", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_cast_save_holds_exactly_the_cast_values(tmp_path: Path, shard) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, max_shard_size=shard)
    stored = {}
    for file in (tmp_path / "ckpt").glob("*.safetensors"):  # read back with safetensors' own reader
        stored.update(load_file(str(file)))
    assert stored.pop("freqs_cis").dtype == torch.float32
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert sorted(stored) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(stored[name], tensor, rtol=0, atol=0, msg=name)
