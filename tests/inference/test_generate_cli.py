"""`rdepth generate`: text in, text and per-token steps out (plain when piped), JSON, and clear errors."""

from __future__ import annotations

import json
import re
import shlex
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


REPO = Path(__file__).resolve().parents[2]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


PROMPT = "5+5*5-6+6*2-4="  # ((5 + 5) * 5 - 6 + 6) * 2 - 4 = 96: the bundled modular_chain model answers 6


def test_the_readme_generate_example_answers_right_on_the_bundled_model(capsys) -> None:
    command = re.search(r"`(rdepth generate --prompt [^`]+)`", (REPO / "README.md").read_text()).group(1)
    rc, out, _ = _run(capsys, *shlex.split(command)[1:])
    assert rc == 0 and out.splitlines()[0] == "8<eos>", out  # (((9 - 4) * 3 + 8 - 7) * 2 + 6) mod 10, left to right


@pytest.mark.parametrize("max_new", ["1", "8"])
def test_speculative_stream_prints_exactly_the_result(capsys, max_new: str) -> None:
    common = ["generate", "--prompt", PROMPT, "--num-steps", "16", "--draft-steps", "2", "--max-new-tokens", max_new]
    _, out, _ = _run(capsys, *common, "--json")
    final = json.loads(out)
    _, streamed, _ = _run(capsys, *common, "--stream")
    assert streamed.splitlines()[0] == final["text"] == {"1": "6", "8": "6<eos>"}[max_new]


def test_json_stream_is_pure_json_lines_that_add_up_to_the_result(capsys) -> None:
    for extra in (["--exit", "kl:5e-4"], ["--draft-steps", "2"]):
        rc, out, _ = _run(capsys, "generate", "--prompt", PROMPT, "--num-steps", "16", "--stream", "--json", *extra)
        rows = [json.loads(line) for line in out.splitlines()]  # every line is JSON
        tokens, final = rows[:-1], rows[-1]
        assert rc == 0 and [t["token"] for t in tokens] == final["tokens"]
        assert "".join(t["text"] for t in tokens) == final["text"] and [t["steps"] for t in tokens] == final["steps"]


def test_bad_numbers_are_clear_errors_before_loading(checkpoint, capsys) -> None:
    base = ["generate", "--model", str(checkpoint), "--prompt", "ab"]
    for flags, named in ((["--init-scale", "nan"], "--init-scale"), (["--init-scale", "-1"], "--init-scale"),
                         (["--sample", "--temperature", "nan"], "temperature"),
                         (["--sample", "--temperature", "inf"], "temperature"),
                         (["--sample", "--temperature", "-1"], "temperature"), (["--top-p", "nan"], "top_p")):
        rc, _, err = _run(capsys, *base, *flags)
        assert rc == 2 and named in err, (flags, err)


def test_progress_goes_to_stderr_and_json_stdout_stays_clean(checkpoint, capsys, monkeypatch) -> None:
    import io

    from recurrent_depth.cli import generate as cli_generate
    from recurrent_depth.progress import Progress

    class Terminal(io.StringIO):  # stderr as a terminal: the progress line is live
        def isatty(self) -> bool:
            return True

    stderr = Terminal()
    monkeypatch.setattr(cli_generate, "Progress", lambda: Progress(stderr))
    rc, out, _ = _run(capsys, "generate", "--model", str(checkpoint), "--prompt", "ab", "--max-new-tokens", "3",
                      "--num-steps", "2", "--json")
    assert rc == 0 and "loading" in stderr.getvalue() and "generated 3/3 tokens" in stderr.getvalue()
    assert json.loads(out)["tokens"]  # stdout holds the JSON object only


def test_generate_never_emits_vocabulary_rows_beyond_the_tokenizer(checkpoint, capsys) -> None:
    from recurrent_depth.data.tokenizer import load_tokenizer

    n_tok = len(load_tokenizer(checkpoint))
    rc = main(["generate", "--model", str(checkpoint), "--prompt", "abc", "--prompt", "hello", "--max-new-tokens",
               "12", "--num-steps", "4", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert n_tok < 256 and all(t < n_tok for r in rows for t in r["tokens"])  # the embedding has 256 rows
