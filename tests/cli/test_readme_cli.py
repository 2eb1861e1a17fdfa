"""README stays true to the CLI: every `rdepth VERB --flag` it shows is a flag of that verb. (Its lists of exit
criteria are checked against the registry with the package's docstrings, in tests/test_vocabulary.py.)"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from recurrent_depth.cli.main import VERBS, build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _examples() -> list[tuple[str, str]]:
    """(verb, command text) for each `rdepth VERB ...` in an inline code span or at the start of a code-block line."""
    spans = re.findall(r"`(rdepth [^`]+)`", README)
    lines = [ln.strip() for ln in README.splitlines() if ln.strip().startswith("rdepth ")]
    found = []
    for text in spans + lines:
        words = text.split()
        if len(words) > 1 and words[1] in VERBS:
            found.append((words[1], text.split("#")[0]))
    return found


def test_every_readme_example_uses_flags_its_verb_has() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    examples = _examples()
    assert {verb for verb, _ in examples} >= {"generate", "eval", "inspect", "serve", "chat", "train"}
    for verb, text in examples:
        known = {s for a in sub.choices[verb]._actions for s in a.option_strings}
        used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
        assert used <= known, f"README's `{text.strip()}` uses {sorted(used - known)}, not flags of rdepth {verb}"

