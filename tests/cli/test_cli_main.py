"""`rdepth` itself: --help and --version without importing torch, the verb list, and one set of inference defaults
across every verb, generate() and the server."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recurrent_depth.cli.main import VERBS, build_parser, main
from recurrent_depth.inference.defaults import INIT_SCALE, KV_SHARING_AUTO, resolve_kv_sharing

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_answer_without_importing_torch(flag: str) -> None:
    code = (f"import sys\nfrom recurrent_depth.cli.main import main\ntry:\n    main([{flag!r}])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                            env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False False", result.stdout


def test_version_is_the_package_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert capsys.readouterr().out.strip() == f"rdepth (recurrent_depth) {version}"


def test_the_verb_list_matches_each_verbs_own_summary() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    own = {choice.dest: choice.help for choice in sub._choices_actions}
    assert own == {verb: summary for verb, (_, summary) in VERBS.items()}


def _defaults(argv: list[str]) -> dict:
    return vars(build_parser().parse_args(argv))


def test_every_verb_resolves_the_same_inference_defaults() -> None:
    from recurrent_depth.inference.generate import generate
    from recurrent_depth.serving.engine import DepthParams
    from recurrent_depth.serving.protocol import Limits, parse_depth

    signature = inspect.signature(generate).parameters
    assert signature["kv_sharing"].default == KV_SHARING_AUTO and signature["init_scale"].default == INIT_SCALE
    assert (DepthParams(8).kv_sharing, DepthParams(8).init_scale) == (KV_SHARING_AUTO, INIT_SCALE)
    for argv in (["generate"], ["chat"], ["eval", "--out", "x"]):
        args = _defaults(argv)
        assert (args["kv_sharing"], args["init_scale"]) == (KV_SHARING_AUTO, INIT_SCALE), argv
    assert _defaults(["inspect", "--prompt", "x"])["init_scale"] == INIT_SCALE
    for exit_criterion, expected in ((None, "full"), ("kl", "latest")):  # the server resolves through the same rule
        served = parse_depth({} if exit_criterion is None else {"exit_criterion": exit_criterion}, 8, Limits())
        assert served.kv_sharing == resolve_kv_sharing(KV_SHARING_AUTO, exit_criterion) == expected
        assert served.init_scale == INIT_SCALE


def test_evaluation_decoding_leaves_kv_sharing_to_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    import recurrent_depth.inference.generate as gen
    from recurrent_depth.data.tokenizer import char_tokenizer
    from recurrent_depth.evaluation.decode import greedy_decode
    from tests.inference.conftest import make_debug_model

    seen = {}
    real = gen.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    tok = char_tokenizer("abc")
    model = make_debug_model(vocab_size=max(len(tok), 8))
    greedy_decode(model, tok, ["ab"], num_steps=2, max_new_tokens=2, exit_criterion="kl", exit_threshold=1e-3)
    assert seen and seen.get("kv_sharing", KV_SHARING_AUTO) == KV_SHARING_AUTO
