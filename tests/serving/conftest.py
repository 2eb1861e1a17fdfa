"""Fixtures for the serving tests: a `debug`-preset model with a character tokenizer saved in a tmp folder, and a
live server on 127.0.0.1 (random free port, in-process thread) driven by the official `openai` client."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.data.tokenizer import char_tokenizer, save_tokenizer
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.serving.app import create_app
from recurrent_depth.serving.model import load_served_model
from recurrent_depth.serving.protocol import Limits
from recurrent_depth.serving.server import serve_in_thread

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.:?!\n"
API_KEY = "test-key"
MODEL_ID = "debug-char"
LIMITS = Limits(max_prompt_tokens=48, max_tokens=16, max_num_steps=24, max_n=4, max_body_bytes=16_384, max_queue=64)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(1234)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug", vocab_size=len(tok), block_size=96))
    model.save_pretrained(folder)
    save_tokenizer(tok, folder)
    return folder


@pytest.fixture(scope="session")
def served(ckpt: Path):
    return load_served_model(ckpt, model_id=MODEL_ID)


@pytest.fixture(scope="session")
def live(served):
    """(base_url, app) of a running server with an API key and batches of up to 8 rows."""
    app = create_app(served, LIMITS, max_batch=8, api_key=API_KEY)
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="session")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is much faster than two on a shared 2-core machine (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
