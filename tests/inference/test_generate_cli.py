"""`rdepth generate`: text in, text and per-token steps out (plain when piped), JSON, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recurrent_depth.cli.main import main
from recurrent_depth.data.tokenizer import char_tokenizer, save_tokenizer
from tests.inference.conftest import make_converging_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    make_converging_model().save_pretrained(path)
    save_tokenizer(char_tokenizer("abcdefghijklmnopqrstuvwxyz ."), path)
    return path


def test_generate_prints_text_and_steps_when_piped(checkpoint, capsys) -> None:
    rc = main(["generate", "--model", str(checkpoint), "--prompt", "hello world", "--max-new-tokens", "5",
               "--num-steps", "12", "--exit", "kl:5e-4"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    steps = [int(x) for x in lines[-1].removeprefix("steps:").split()]
    assert lines[-1].startswith("steps:") and len(steps) == 5
    assert all(1 <= s < 12 for s in steps)  # the converging model exits early


def test_generate_json_batch_and_stream(checkpoint, capsys) -> None:
    rc = main(["generate", "--model", str(checkpoint), "--prompt", "ab", "--prompt", "a longer prompt",
               "--max-new-tokens", "3", "--num-steps", "4", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and all(r["steps"] == [4, 4, 4] and len(r["tokens"]) == 3 for r in rows)
    rc = main(["generate", "--model", str(checkpoint), "--prompt", "ab", "--max-new-tokens", "3", "--num-steps", "4",
               "--stream"])
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "steps: 4 4 4"


def test_generate_errors_are_clear(checkpoint, capsys) -> None:
    assert main(["generate", "--model", str(checkpoint), "--prompt", "ab", "--exit", "nope"]) == 2
    assert "unknown exit criterion 'nope'" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint), "--prompt", "ab", "--kv-sharing", "some"]) == 2
    assert "unknown KV sharing policy" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint / "missing"), "--prompt", "ab"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
