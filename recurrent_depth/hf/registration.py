"""Register `huginn_raven` with transformers' AutoConfig / AutoModelForCausalLM, so that
`AutoModelForCausalLM.from_pretrained(folder)` loads a Huginn checkpoint with our code and no `trust_remote_code`.

Nothing downloads unless asked: `AutoModelForCausalLM.from_pretrained(name)` with a `name` that is not a local folder
looks only in the local Hugging Face cache and fails at once if it is not there (instead of transformers retrying an
unreachable hub for ~25 s). Passing `local_files_only=False` explicitly asks for transformers' usual hub download.
This is the one change registration makes to a transformers class, and it applies to every model loaded through
`AutoModelForCausalLM` in the process; local folders and explicit `local_files_only` values pass through untouched.
"""

from __future__ import annotations

import os
from typing import Any

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.hf.causal_lm import RecurrentDepthForCausalLM


def register_with_transformers() -> None:
    """Idempotent: safe to call more than once. The Auto classes are imported here, not with this module, so that
    the package's post-import hook (`recurrent_depth._register`), which their import fires, finds this function."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("huginn_raven", RecurrentDepthConfig, exist_ok=True)
    AutoModelForCausalLM.register(RecurrentDepthConfig, RecurrentDepthForCausalLM, exist_ok=True)
    if not getattr(AutoModelForCausalLM.from_pretrained, "_local_unless_asked", False):
        AutoModelForCausalLM.from_pretrained = _local_unless_asked(AutoModelForCausalLM.from_pretrained.__func__)


def _local_unless_asked(from_pretrained: Any) -> classmethod:
    """Wrap the Auto class's `from_pretrained` so that a name that is not a local folder is looked up in the local
    cache only, unless the caller passed `local_files_only` themselves."""

    def wrapped(cls: type, name: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        if os.path.isdir(name) or "local_files_only" in kwargs:
            return from_pretrained(cls, name, *args, **kwargs)
        try:
            return from_pretrained(cls, name, *args, local_files_only=True, **kwargs)
        except OSError as err:
            raise OSError(f"{str(name)!r} is not a local checkpoint folder (nor in the local Hugging Face cache): "
                          f"give the path of a folder holding config.json and model.safetensors; nothing is "
                          f"downloaded unless you pass local_files_only=False") from err

    wrapped._local_unless_asked = True  # type: ignore[attr-defined]
    wrapped.__doc__ = from_pretrained.__doc__
    return classmethod(wrapped)
