"""`rdepth serve` (a real subprocess on loopback) and `rdepth chat` (in-process, scripted input)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from recurrent_depth.cli import chat
from recurrent_depth.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def test_serve_without_model_or_bundle_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    import recurrent_depth.assets as assets

    monkeypatch.setattr(assets, "DEFAULT_MODEL", tmp_path / "no-bundle")
    assert main(["serve"]) == 2
    assert "pass --model PATH" in capsys.readouterr().err


def test_serve_defaults_to_the_bundled_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import recurrent_depth.assets as assets
    from recurrent_depth.cli.serve import resolve_model_path

    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "config.json").write_text("{}")
    monkeypatch.setattr(assets, "DEFAULT_MODEL", tmp_path / "bundle")
    assert resolve_model_path(None) == str(tmp_path / "bundle")
    assert resolve_model_path("elsewhere") == "elsewhere"


def test_serve_rejects_bad_limits(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--model", str(ckpt), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rdepth_serve_subprocess(ckpt: Path) -> None:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "recurrent_depth", "serve", "--model", str(ckpt), "--port",
                             str(port), "--api-key", "k", "--max-batch", "2", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "rdepth serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = client.completions.create(model=ckpt.name, prompt="hi", max_tokens=3, temperature=0,
                                      extra_body={"num_steps": 2})
        assert r.usage.recurrence_steps == 2 * r.usage.completion_tokens
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chat_streams_and_shows_steps(ckpt: Path) -> None:
    args = build_parser().parse_args(["chat", "--model", str(ckpt), "--max-tokens", "4", "--num-steps", "3",
                                      "--inline-steps"])
    out = io.StringIO()
    script = "hello\n/steps 5\n/exit kl:100\nagain\n/bogus\n/quit\nnot reached\n"
    assert chat.run(args, stdin=io.StringIO(script), stdout=out) == 0
    text = out.getvalue()
    assert "[3]" in text and "steps per token: 3" in text  # first reply at depth 3
    assert "(num_steps = 5)" in text and "(exit criterion = kl:100)" in text
    assert "steps per token: 1" in text  # kl with a huge threshold exits after the first step
    assert "(commands:" in text and "not reached" not in text


def test_loopback_detection() -> None:
    from recurrent_depth.cli.serve import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5") and not _is_loopback("example.org")
