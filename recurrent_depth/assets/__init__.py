"""Files shipped inside the package: the bundled default checkpoint (`default-model/`), used by every `rdepth`
command when no `--model` is given. It is produced by `rdepth bundle` (see README: "The bundled checkpoint")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(__file__).resolve().parent / "default-model"


def default_model_path() -> Path:
    """The bundled checkpoint folder; a clear error if this install has none."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"no bundled checkpoint at {DEFAULT_MODEL}; pass --model PATH "
                                "(or build one with `rdepth bundle`)")
    return DEFAULT_MODEL


def resolve_model(path: str | Path | None) -> Path:
    """`path` if given, else the bundled checkpoint."""
    return Path(path) if path else default_model_path()


def bundle_info(path: str | Path | None = None) -> dict[str, Any]:
    """The `bundle.json` written beside a bundled checkpoint (task, difficulty, training mean depth, command)."""
    file = Path(path or DEFAULT_MODEL) / "bundle.json"
    return json.loads(file.read_text()) if file.is_file() else {}
