"""cli/options.py: the one --exit parser (naming the registry's criteria), the threshold-sweep form, and the shared
model flags (--device / --dtype through runtime's one dtype map)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recurrent_depth.cli.main import build_parser, main
from recurrent_depth.cli.options import load_model, parse_exit, parse_exit_sweep, resolve_num_steps
from recurrent_depth.inference.exit import EXIT_CRITERIA


def test_parse_exit_names_every_registered_criterion_on_error() -> None:
    assert parse_exit(None) is None
    crit = parse_exit("argmax-stability:3")
    assert (crit.name, crit.threshold) == ("argmax-stability", 3.0)
    assert parse_exit("kl").threshold == EXIT_CRITERIA["kl"].default_threshold
    for bad, problem in (("magic", "unknown exit criterion 'magic'"), ("kl=5e-4", "unknown exit criterion"),
                         ("kl:abc", "threshold 'abc' is not a number"), (":1e-3", "unknown exit criterion ''")):
        with pytest.raises(ValueError) as info:
            parse_exit(bad, "--exit")
        message = str(info.value)
        assert message.startswith(f"--exit: exit {bad!r}") and problem in message, message
        assert ", ".join(EXIT_CRITERIA) in message, message
    with pytest.raises(ValueError, match="finite number >= 0"):
        parse_exit("kl:-1")


def test_parse_exit_sweep_checks_every_threshold_with_the_same_parser() -> None:
    assert parse_exit_sweep("kl:1e-2,1e-3") == ("kl", [1e-2, 1e-3])
    assert parse_exit_sweep("latent-diff") == ("latent-diff", [])
    with pytest.raises(ValueError, match=r"--exit: exit 'kl:x'.*not a number"):
        parse_exit_sweep("kl:1e-2,x")
    with pytest.raises(ValueError, match="unknown exit criterion 'kll'"):
        parse_exit_sweep("kll:1e-2")


def test_dtype_names_have_one_map() -> None:
    from recurrent_depth import runtime
    from recurrent_depth.model import checkpoint

    assert checkpoint._DTYPES is runtime.DTYPES
    for verb in ("generate", "chat", "serve", "inspect"):
        argv = [verb, "--prompt", "x"] if verb in ("generate", "inspect") else [verb]
        assert build_parser().parse_args([*argv, "--dtype", "bf16"]).dtype == "bf16"  # runtime's aliases too


def test_model_flags_load_on_the_device_in_the_dtype(tmp_path: Path) -> None:
    from tests.inference.conftest import make_debug_model

    make_debug_model().save_pretrained(tmp_path)
    args = build_parser().parse_args(["generate", "--model", str(tmp_path), "--device", "cpu", "--dtype", "bfloat16",
                                      "--threads", "1", "--prompt-ids", "1,2"])
    path, model, tokenizer = load_model(args)
    assert path == tmp_path and tokenizer is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert resolve_num_steps(args, model) == model.config.mean_recurrence
    args.num_steps = -1
    with pytest.raises(ValueError, match="--num-steps must be >= 0, got -1"):
        resolve_num_steps(args, model)


def test_generate_takes_the_shared_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.inference.conftest import make_debug_model

    make_debug_model().save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1,2", "--max-new-tokens", "2",
                 "--num-steps", "2", "--device", "cpu", "--dtype", "float32", "--threads", "1", "--json"]) == 0
    assert '"steps": [2, 2]' in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_training_steps_are_not_spelled_like_recurrences(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["reproduce", "--out", str(tmp_path), "--train-steps", "0"]) == 2
    assert "--train-steps must be >= 1, got 0" in capsys.readouterr().err
    assert build_parser().parse_args(["reproduce", "--out", "x", "--train-steps", "5"]).train_steps == 5


def test_parse_num_steps_list_names_the_flag() -> None:
    from recurrent_depth.cli.options import parse_num_steps_list

    assert parse_num_steps_list("1, 2,4,") == [1, 2, 4]
    for bad, problem in (("1,x", "be comma-separated integers"), ("", "list non-negative integers"),
                         ("2,-1", "list non-negative integers")):
        with pytest.raises(ValueError, match=f"--num-steps must {problem}, got {bad!r}"):
            parse_num_steps_list(bad)


@pytest.mark.parametrize("verb", ["demo", "eval"])
def test_a_bad_depth_list_is_refused_naming_the_flag_before_a_model_loads(verb: str, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """Both sweeping verbs read --num-steps 1,2,4 with the one parser; --model names a folder that is not there,
    so a run that got as far as loading would fail differently."""
    data = ["--text", "some text"] if verb == "eval" else []
    rc = main([verb, "--model", str(tmp_path / "absent"), "--num-steps", "1,x", "--out", str(tmp_path / "o"), *data])
    err = capsys.readouterr().err
    assert rc == 2 and "--num-steps must be comma-separated integers, got '1,x'" in err, err
