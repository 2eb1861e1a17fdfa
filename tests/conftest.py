"""Shared test helpers: the reference fixtures in ../shared/fixtures (skipped, with the reason, where absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
FIXTURE_NAMES = ["huginn-tiny", "huginn-tiny-242"]


def fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"reference fixtures not found at {path} (../shared/fixtures beside the checkout)")
    return path


def fixture_json(name: str) -> dict:
    return json.loads((fixture_dir(name) / "reference_outputs.json").read_text())


@pytest.fixture(params=FIXTURE_NAMES)
def fixture_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _deterministic_one_thread():
    """Seeded global RNG; one intra-op thread (tiny models run fastest so, on a shared 2-core machine), restored."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
