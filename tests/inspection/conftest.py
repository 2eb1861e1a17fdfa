"""Fixtures for the inspection tests: a random `debug` checkpoint folder and one real `rdepth inspect` run."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from inspection_stubs import PAGE_PROMPT, PAGE_STEPS

from recurrent_depth.cli.main import main
from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.data.tokenizer import char_tokenizer, save_tokenizer
from recurrent_depth.hf import RecurrentDepthForCausalLM


@pytest.fixture(scope="session")
def debug_model() -> RecurrentDepthForCausalLM:
    torch.manual_seed(0)
    return RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, debug_model: RecurrentDepthForCausalLM) -> Path:
    """A checkpoint folder: the random `debug` model and a per-character tokenizer (fits its 256-token vocab)."""
    folder = tmp_path_factory.mktemp("inspect_model")
    debug_model.save_pretrained(folder)
    save_tokenizer(char_tokenizer(string.printable), folder)
    return folder


@pytest.fixture(scope="session")
def inspect_out(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """The folder one `rdepth inspect` run wrote (PNG figures + index.html)."""
    out = tmp_path_factory.mktemp("inspect_out")
    rc = main(["inspect", "--model", str(model_dir), "--prompt", PAGE_PROMPT, "--num-steps", str(PAGE_STEPS),
               "--out", str(out), "--exit", "kl:1e-3"])
    assert rc == 0
    return out
