"""`rdepth serve` (a real subprocess on loopback) and `rdepth chat` (in-process, scripted input)."""

from __future__ import annotations

import io
import os
import signal
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
    from recurrent_depth.cli.options import model_path

    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "config.json").write_text("{}")
    monkeypatch.setattr(assets, "DEFAULT_MODEL", tmp_path / "bundle")
    assert model_path(build_parser().parse_args(["serve"])) == tmp_path / "bundle"
    with pytest.raises(FileNotFoundError, match="--model 'elsewhere' is not a checkpoint folder"):
        model_path(build_parser().parse_args(["serve", "--model", "elsewhere"]))


def test_serve_num_steps_is_the_depth_of_requests_that_name_none(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    from recurrent_depth.cli.serve import load_for_serving
    from recurrent_depth.serving.protocol import Limits, parse_depth

    served = load_for_serving(build_parser().parse_args(["serve", "--model", str(ckpt), "--num-steps", "3"]))
    assert served.default_num_steps == 3 != served.model.config.mean_recurrence
    assert parse_depth({}, served.default_num_steps, Limits()).num_steps == 3
    assert main(["serve", "--model", str(ckpt), "--num-steps", "9", "--max-num-steps", "8"]) == 2
    assert "--num-steps 9 is above --max-num-steps 8" in capsys.readouterr().err


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
    assert "(num_steps = 5)" in text and "(exit = kl:100)" in text
    assert "steps per token: 1" in text  # kl with a huge threshold exits after the first step
    assert "(commands:" in text and "not reached" not in text


def test_loopback_detection() -> None:
    from recurrent_depth.cli.serve import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5") and not _is_loopback("example.org")


def _chat_args(*extra: str, model: Path | None = None):
    argv = ["chat"] + (["--model", str(model)] if model else []) + ["--threads", "1", *extra]
    return build_parser().parse_args(argv)


def test_chat_answers_on_the_bundled_model_with_its_defaults() -> None:
    out = io.StringIO()
    assert chat.run(_chat_args(), stdin=io.StringIO("5+5*5-6+6*2-4=\n/quit\n"), stdout=out) == 0
    text = out.getvalue()
    assert "error" not in text and "not sent" not in text, text
    assert "tokens; steps per token:" in text
    assert "model> 6\n" in text, text  # the README's example, answered right: the message reaches it as a prompt


def test_chat_refuses_bad_commands_at_once_and_keeps_the_old_settings(ckpt: Path) -> None:
    out = io.StringIO()
    script = "/exit kl:nan\n/exit kl:abc\n/exit magic\n/temp -1\n/temp nan\n/steps 100000\n/steps -2\nhello\n/quit\n"
    args = _chat_args("--max-tokens", "3", "--num-steps", "3", model=ckpt)
    assert chat.run(args, stdin=io.StringIO(script), stdout=out) == 0
    text = out.getvalue()
    for field in ("temperature", "num_steps"):
        assert f"(rejected: {field}:" in text, (field, text)
    for message in ("must be a finite number >= 0, got nan", "threshold 'abc' is not a number",
                    "unknown exit criterion 'magic'; expected NAME[:THRESHOLD] with NAME one of kl, minp-kl"):
        assert message in text, (message, text)  # /exit is parsed as --exit is (one parser, naming the criteria)
    assert text.count("(rejected:") == 7
    assert "steps per token: 3 3 3;" in text  # the reply ran with the settings from before the bad commands
    assert (args.num_steps, args.temperature, args.exit) == (3, 0.0, None)


def test_chat_flags_are_checked_at_start(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    for flag, value, field in (("--temperature", "-1", "temperature"), ("--num-steps", "100000", "num_steps"),
                               ("--init-scale", "nan", "init_scale"), ("--max-tokens", "0", "--max-tokens")):
        assert main(["chat", "--model", str(ckpt), flag, value]) == 2
        assert field in capsys.readouterr().err


class _InterruptOnce(io.StringIO):
    """A terminal where Ctrl-C arrives while the first reply is being written."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = True

    def write(self, text: str) -> int:
        if self.armed and text and not text.startswith(("model>", "rdepth chat")):
            self.armed = False
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_reply_and_the_conversation_goes_on(served) -> None:
    args = _chat_args("--max-tokens", "8", "--num-steps", "2")
    session = chat.Chat(served, args)
    session.scheduler.start()
    try:
        out = _InterruptOnce()
        session.reply("hello", out)
        assert session.stopped and not out.armed
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
        steps = session.reply("again", io.StringIO())
        assert not session.stopped and steps == [2] * len(steps) and steps
        assert [m["content"] for m in session.messages[::2]] == ["hello", "again"]
    finally:
        session.scheduler.stop()


def test_ctrl_c_in_a_real_process_stops_only_the_reply(ckpt: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "recurrent_depth", "chat", "--model", str(ckpt), "--threads", "1",
                             "--num-steps", "5000", "--max-num-steps", "5000", "--kv-sharing", "1",
                             "--max-tokens", "16"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        proc.stdin.write("a slow reply please\n")
        proc.stdin.flush()
        seen = ""
        while "model> " not in seen:
            char = proc.stdout.read(1)
            assert char, seen
            seen += char
        time.sleep(1.0)  # the reply is under way (5000 recurrences per token)
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/steps 1\nquick\n/quit\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, seen + rest
    assert "(reply stopped)" in rest and "(num_steps = 1)" in rest
    assert "steps per token: 1" in rest  # the next message was answered


def test_chat_past_the_context_says_so_and_reset_recovers(ckpt: Path) -> None:
    args = _chat_args("--max-tokens", "4", "--num-steps", "1", model=ckpt)
    out = io.StringIO()
    long = "hello there " * 6  # 72 characters: with the template about 90 of the 96-token context
    assert chat.run(args, stdin=io.StringIO(f"{long}\n{long}\n/reset\nhi\n/quit\n"), stdout=out) == 0
    text = out.getvalue()
    assert "no longer fits the model's context of 96 tokens; /reset" in text, text
    assert text.count("tokens; steps per token:") == 2  # the first long message and "hi" after /reset


def test_serve_refuses_an_empty_api_key(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RDEPTH_API_KEY", "")
    assert main(["serve", "--model", str(ckpt)]) == 2
    assert "RDEPTH_API_KEY" in capsys.readouterr().err


def test_serve_loads_the_bundled_checkpoint_without_model() -> None:
    from recurrent_depth.cli.serve import load_for_serving

    args = build_parser().parse_args(["serve", "--threads", "1"])
    served = load_for_serving(args)
    assert served.model_id == "default-model" and served.block_size == 256


@pytest.mark.timeout(60)
def test_ctrl_c_on_the_last_token_ends_the_reply(served) -> None:
    session = chat.Chat(served, _chat_args("--max-tokens", "1", "--num-steps", "1"))
    session.scheduler.start()
    try:
        out = _InterruptOnce()
        assert len(session.reply("hello", out)) == 1 and session.stopped and not out.armed
    finally:
        session.scheduler.stop()
