"""Shared helpers for the training tests: a tiny corpus and a tiny, fast config (char tokenizer, one thread)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recurrent_depth.training.config import config_from_dict

REPO = Path(__file__).resolve().parents[2]


def tiny_tree(corpus: Path, **sections) -> dict:
    """A raw config tree for a ~10k-parameter model on `corpus`, overridable per section."""
    tree = {
        "model": {"preset": "debug", "n_embd": 16, "n_heads": 2, "intermediate_size": 32, "mean_recurrence": 3,
                  "mean_backprop_depth": 2, "n_layers_in_recurrent_block": 1},
        "data": {"kind": "text", "paths": [str(corpus)], "tokenizer": "char", "seq_len": 16, "val_fraction": 0.1},
        "train": {"steps": 8, "batch_size": 4, "seed": 0},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "checkpoint": {"every": 0},
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "eval": {"every": 0, "depths": [1, 2], "batches": 1},
        "runtime": {"device": "cpu", "dtype": "float32", "threads": 1},
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return tree


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}." for i in range(120)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_config(corpus: Path):
    def make(**sections):
        return config_from_dict(tiny_tree(corpus, **sections))

    return make


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(json.dumps(tree))  # JSON is YAML
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_CBWR="AUTO", PYTHONPATH=str(REPO))
    return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recurrent_depth", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=REPO)


def losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
