"""The CLI's flag surface is frozen: every verb's flags and defaults equal tests/cli/cli_surface.json, and the flags
several verbs share are one definition (cli/options.py) with one spelling, help text and default.

A flag that is added, renamed or given a new default must be a decision, not an accident (torchtitan's
test_no_new_cli_options). After an intended change, regenerate the file and commit it with the change:

    RDEPTH_UPDATE_CLI_SURFACE=1 python -m pytest tests/cli/test_cli_surface.py
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from recurrent_depth.cli.main import VERBS, build_parser
from recurrent_depth.inference.exit import EXIT_CRITERIA

SURFACE = Path(__file__).with_name("cli_surface.json")
UPDATE = "RDEPTH_UPDATE_CLI_SURFACE=1 python -m pytest tests/cli/test_cli_surface.py"
SHARED = ("--model", "--device", "--dtype", "--num-steps", "--threads")
# Verbs that load a model but do not use cli/options.py yet (their files were being changed elsewhere when the shared
# flags were introduced); remove a verb from here once it calls add_model_args / add_exit_arg.
PENDING: set[str] = set()


def _subparsers(monkeypatch: pytest.MonkeyPatch) -> dict[str, argparse.ArgumentParser]:
    monkeypatch.delenv("RDEPTH_API_KEY", raising=False)  # serve's --api-key default reads it
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {max(a.option_strings, key=len): a for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)}


def surface(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, object]]:
    """verb -> {flag: default}, flags sorted."""
    return {verb: {flag: action.default for flag, action in sorted(_flags(p).items())}
            for verb, p in _subparsers(monkeypatch).items()}


def test_the_flag_surface_is_the_checked_in_one(monkeypatch: pytest.MonkeyPatch) -> None:
    current = surface(monkeypatch)
    if os.environ.get("RDEPTH_UPDATE_CLI_SURFACE") == "1":
        SURFACE.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    expected = json.loads(SURFACE.read_text())
    assert set(current) == set(VERBS) == set(expected), f"the verbs changed; if intended, run: {UPDATE}"
    for verb in VERBS:
        assert current[verb] == expected[verb], (
            f"`rdepth {verb}`'s flags or defaults changed:\n  now:      {current[verb]}\n  expected: {expected[verb]}\n"
            f"If this is intended, update the frozen surface and commit it with the change: {UPDATE}")


def test_flags_shared_by_verbs_are_one_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    parsers = {verb: _flags(p) for verb, p in _subparsers(monkeypatch).items()}
    loaders = sorted(verb for verb, flags in parsers.items() if "--model" in flags and verb not in PENDING)
    assert {"generate", "chat", "serve", "inspect"} <= set(loaders)
    for flag in SHARED:
        # a verb that sweeps depths takes a list under the same name (eval, demo: --num-steps 1,2,4)
        verbs = [v for v in loaders if flag != "--num-steps" or parsers[v][flag].type is int]
        assert flag == "--num-steps" or verbs == loaders
        seen = {verb: (parsers[verb][flag].help, parsers[verb][flag].default,
                       tuple(parsers[verb][flag].choices or ()))
                for verb in verbs}
        assert len(set(seen.values())) == 1, f"{flag} differs between verbs: {seen}"
    exits = sorted(verb for verb, flags in parsers.items() if "--exit" in flags and verb not in PENDING)
    assert exits == ["chat", "eval", "generate", "inspect"]
    for verb in exits:
        action = parsers[verb]["--exit"]
        assert action.metavar == "NAME[:THRESHOLD]" and action.dest == "exit", verb
        assert ", ".join(EXIT_CRITERIA) in action.help, (verb, action.help)  # the names come from the registry


def test_no_flag_spells_the_recurrence_count_another_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recurrence count is --num-steps (a cap: --max-num-steps); optimizer steps are --train-steps; an exit is
    --exit NAME[:THRESHOLD]. The spellings these replaced stay gone."""
    old = {"--n-steps", "--depth", "--steps", "--max-steps", "--exit-criterion", "--exit-threshold", "--threshold",
           "--cap", "--colour-by"}
    for verb, flags in ((v, _flags(p)) for v, p in _subparsers(monkeypatch).items()):
        if verb not in PENDING:
            assert not old & set(flags), (verb, sorted(old & set(flags)))
