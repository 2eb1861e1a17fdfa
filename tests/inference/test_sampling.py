"""Sampler filters: top-k, top-p, min-p keep the right tokens; greedy is argmax; bad settings are clear errors."""

from __future__ import annotations

import pytest
import torch

from recurrent_depth.inference.sampling import Sampler


def test_filters_keep_the_right_support() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert (Sampler(True, top_k=2).probs(logits) > 0).tolist() == [[True, True, False, False, False]]
    assert (Sampler(True, top_p=0.8).probs(logits) > 0).tolist() == [[True, True, True, False, False]]
    assert (Sampler(True, min_p=0.25).probs(logits) > 0).tolist() == [[True, True, True, False, False]]
    probs = Sampler(True, top_k=3).probs(logits)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))
    torch.testing.assert_close(probs[0, :3], torch.tensor([0.5, 0.2, 0.15]) / 0.85)
    assert Sampler().__call__(logits).tolist() == [0]


def test_temperature_sharpens_and_samples_follow_probabilities() -> None:
    logits = torch.tensor([[1.0, 0.0]])
    cold, hot = Sampler(True, temperature=0.5).probs(logits), Sampler(True, temperature=2.0).probs(logits)
    assert cold[0, 0] > hot[0, 0]
    draws = Sampler(True, generator=torch.Generator().manual_seed(0))(logits.expand(4000, 2))
    assert abs(draws.float().mean().item() - float(torch.softmax(logits, -1)[0, 1])) < 0.03


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Sampler(True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p must lie in"):
        Sampler(True, top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be a non-negative integer"):
        Sampler(True, top_k=-1)
