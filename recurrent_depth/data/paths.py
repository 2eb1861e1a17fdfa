"""Paths as configs write them: `{stdlib}` stands for Python's standard-library folder (a corpus every machine has),
`~` for the home folder."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def expand_path(path: str) -> Path:
    """`{stdlib}` -> Python's standard-library folder; `~` expanded."""
    return Path(path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])).expanduser()
