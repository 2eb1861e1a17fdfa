"""Config presets and validation, and forward-pass errors for bad inputs."""

from __future__ import annotations

import pytest
import torch

from recurrent_depth import PRESETS, RecurrentDepthConfig, RecurrentDepthForCausalLM


def test_huginn_preset_has_exactly_the_reference_parameter_count() -> None:
    cfg = RecurrentDepthConfig.from_name("huginn-3.5b")
    with torch.device("meta"):
        model = RecurrentDepthForCausalLM(cfg)
    assert model.num_parameters() == 3_564_976_800
    assert cfg.estimate_params() == 3_564_976_800
    assert cfg.effective_expected_depth == 132 and cfg.head_dim == 96


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta(name: str) -> None:
    cfg = RecurrentDepthConfig.from_name(name)
    with torch.device("meta"):
        model = RecurrentDepthForCausalLM(cfg)
    assert model.num_parameters() == cfg.estimate_params()


def test_small_and_medium_shapes() -> None:
    small = RecurrentDepthConfig.from_name("small")
    assert (small.n_embd, small.n_heads, small.vocab_size, small.intermediate_size) == (256, 4, 4096, 704)
    medium = RecurrentDepthConfig.from_name("medium")
    assert (medium.n_embd, medium.n_heads, medium.vocab_size, medium.intermediate_size) == (768, 12, 32768, 2048)


@pytest.mark.parametrize(("fields", "message"), [
    ({"n_embd": 100, "n_heads": 3}, r"`n_embd` \(100\) must be divisible by `n_heads` \(3\)"),
    ({"n_heads": 0}, "`n_heads` must be a positive integer"),
    ({"mean_recurrence": -1}, "`mean_recurrence` must be a non-negative integer"),
    ({"norm_eps": 0}, "`norm_eps` must be > 0"),
    ({"injection_type": "add"}, "`injection_type`: only 'linear'"),
])
def test_config_errors_name_the_field(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        RecurrentDepthConfig.from_name("debug", **fields)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        RecurrentDepthConfig.from_name("huge")


def test_config_json_round_trip() -> None:
    cfg = RecurrentDepthConfig.from_name("tiny")
    again = RecurrentDepthConfig(**cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


@pytest.fixture(scope="module")
def model() -> RecurrentDepthForCausalLM:
    torch.manual_seed(0)
    return RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).eval()


@pytest.mark.parametrize(("num_steps", "message"), [
    (-1, "non-negative"), ((2, -1), "non-negative"), (2.5, "integers"), ((1, 2, 3), "pair"), ("4", "integers"),
])
def test_bad_depth_raises(model, num_steps, message) -> None:
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 3, dtype=torch.long), num_steps=num_steps)


def test_token_ids_outside_vocabulary(model) -> None:
    with pytest.raises(ValueError, match=r"vocabulary"):
        model(torch.tensor([[1, 256]]), num_steps=1)
    with pytest.raises(ValueError, match=r"vocabulary"):
        model(torch.tensor([[-3, 1]]), num_steps=1)


def test_bad_shapes(model) -> None:
    with pytest.raises(ValueError, match="input_states has shape"):
        model(torch.zeros(1, 3, dtype=torch.long), num_steps=1, input_states=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="input_ids must be a"):
        model(torch.zeros(3, dtype=torch.long), num_steps=1)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 300, dtype=torch.long), num_steps=1)


def test_zero_steps_decodes_initial_state(model) -> None:
    out = model(torch.tensor([[1, 2, 3]]), num_steps=0, init_scale=0.0)
    assert torch.count_nonzero(out.latent_states) == 0


def test_default_depth_is_mean_recurrence_in_eval(model) -> None:
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(ids, init_scale=0.0).logits, model(ids, num_steps=4, init_scale=0.0).logits)
