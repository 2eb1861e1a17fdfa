"""Fixtures for the evaluation tests: a tiny seeded model with a per-character tokenizer, saved as a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.data.tokenizer import char_tokenizer, save_tokenizer
from recurrent_depth.tasks import combined_alphabet


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and the CI box is shared); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer(combined_alphabet() + " .\n")


@pytest.fixture(scope="session")
def model(tokenizer):
    torch.manual_seed(1234)
    cfg = RecurrentDepthConfig.from_name("debug", vocab_size=len(tokenizer), mean_recurrence=4)
    model = RecurrentDepthForCausalLM(cfg).eval()
    with torch.no_grad():  # larger embeddings: an untrained model's greedy outputs then vary (and hit <eos>)
        model.transformer.wte.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path
