"""`rdepth inspect` end to end on a random debug checkpoint: the files it writes, the page's content and data, and
its errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from inspection_stubs import PAGE_PROMPT, PAGE_STEPS

from recurrent_depth.cli.main import main
from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.inspection import CRITERIA, inspect_prompt
from recurrent_depth.inspection.page import page_data, render_page

FIGURES = ["overview", "convergence", "exit_steps", "trajectories", "logit_lens"]


def _page_json(html: str) -> dict:
    block = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert block, "the page has no data block"
    return json.loads(block.group(1))


def test_inspect_writes_figures_and_one_page(inspect_out: Path) -> None:
    for name in FIGURES:
        data = (inspect_out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert (inspect_out / "index.html").stat().st_size > 20000


def test_page_is_self_contained(inspect_out: Path) -> None:
    html = (inspect_out / "index.html").read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', html)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs[:3]
    assert not re.search(r"<link|@import|url\(|https?://(?!www\.w3\.org/2000/svg)", html)
    # the data block cannot be closed early by the prompt's own "</script>": exactly two closing tags
    assert html.count("</script>") == 2
    assert html.count("<img ") == 4


def test_page_data_holds_the_inspection(inspect_out: Path) -> None:
    data = _page_json((inspect_out / "index.html").read_text(encoding="utf-8"))
    T = len(PAGE_PROMPT)  # per-character tokenizer: one token per character
    assert data["prompt"] == PAGE_PROMPT
    assert "".join(t["text"] for t in data["tokens"]) == PAGE_PROMPT
    assert data["num_steps"] == PAGE_STEPS and data["criteria"] == list(CRITERIA)
    assert data["thresholds"]["kl"] == 1e-3  # --exit kl:1e-3 reached the criterion
    for c in CRITERIA:
        steps = data["exit_step"][c]
        assert len(steps) == T and all(1 <= s <= PAGE_STEPS for s in steps)
        assert all(s == PAGE_STEPS for s, ok in zip(steps, data["exited"][c]) if not ok)
        assert len(data["values"][c]) == T and all(len(v) == PAGE_STEPS for v in data["values"][c])
    assert len(data["lens"]) == T and all(len(pos) == PAGE_STEPS and len(pos[0]) == 5 for pos in data["lens"])
    assert all(0 <= prob <= 1 for pos in data["lens"] for step in pos for _, prob in step)


def test_page_matches_the_library(model_dir: Path) -> None:
    model = RecurrentDepthForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    result = inspect_prompt(model, tok, "ab\nc", num_steps=5, tokens=["b", -1], top_k=2, init_scale=0.0)
    assert [t.position for t in result.trajectories] == [1, 3]
    data = page_data(result, colour_by="latent-diff")
    conv = result.convergence
    for c in CRITERIA:
        assert data["exit_step"][c] == conv.exit_step[c].tolist()
        for p in range(4):
            for t in range(5):
                v = float(conv.values[c][t, p])
                shown = data["values"][c][p][t]
                assert (shown is None) == (not torch.isfinite(torch.tensor(v)))
                if shown is not None:
                    assert shown == pytest.approx(v, rel=1e-3, abs=1e-12)
    assert data["lens"][2][4][0][0] == result.lens[2][4][0].text
    with pytest.raises(ValueError, match="unknown criterion 'nope' to colour by"):
        render_page(result, colour_by="nope")


def test_cli_errors_name_the_problem(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["--model", str(tmp_path / "missing"), "--prompt", "x"], "is not a checkpoint folder"),
        (["--model", str(tmp_path), "--prompt", "x"], "no tokenizer.json"),
        (["--model", str(model_dir), "--prompt", "x", "--exit", "kl=1e-3"], "--exit: exit 'kl=1e-3': unknown exit "
         "criterion 'kl=1e-3'; expected NAME[:THRESHOLD] with NAME one of kl, minp-kl"),
        (["--model", str(model_dir), "--prompt", "x", "--exit", "kl:abc"], "'abc' is not a number"),
        (["--model", str(model_dir), "--prompt", "x", "--exit", "none"], "'none' never exits"),
        (["--model", str(model_dir), "--prompt", "abc", "--tokens", "z"], "no token 'z' in the prompt"),
        (["--model", str(model_dir), "--prompt", "", "--num-steps", "2"], "prompt is empty"),
        (["--model", str(model_dir), "--prompt", "ab", "--num-steps", "0"], "--num-steps must be >= 1"),
    ]
    for args, message in cases:
        assert main(["inspect", *args, "--out", str(tmp_path / "o")]) == 2, args
        assert message in capsys.readouterr().err, args
