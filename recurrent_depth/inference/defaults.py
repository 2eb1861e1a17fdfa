"""The inference defaults every entry point shares, resolved here and nowhere else.

`generate()`, `rdepth generate / chat / serve / eval / inspect` and the server's request fields all take these, so
one prompt gives one answer whichever way it is run:

    kv_sharing "auto"   -> "latest" when an exit criterion is set, "full" at fixed depth. Under "full" a token that
                           exited early has no keys at deeper recurrence steps, and later tokens that run deeper do not
                           see it there (on an addition checkpoint bundled earlier, `36+89=` decoded as `1<eos>`, not
                           `125`);
                           at fixed depth the two policies give the same tokens.
    init_scale 0.0      -> the initial latent state s0 is zeros: greedy output is deterministic. (The reference's
                           `model.generate` / forward default of 1.0 is kept on those reference-compatible paths.)

    resolve_kv_sharing("auto", "kl")  -> "latest"
"""

from __future__ import annotations

import math
from typing import Any

KV_SHARING_AUTO = "auto"
INIT_SCALE = 0.0
KV_SHARING_HELP = "KV cache policy: auto (latest with an exit criterion, else full), full, latest, or an integer k"


def has_exit(exit_criterion: Any) -> bool:
    """Whether `exit_criterion` (a name, an ExitCriterion or None) can end a token's recurrence early."""
    from recurrent_depth.inference.exit import NoExit

    return exit_criterion is not None and exit_criterion != "none" and not isinstance(exit_criterion, NoExit)


def resolve_kv_sharing(kv_sharing: Any, exit_criterion: Any) -> Any:
    """"auto" (or None) -> "latest" with an exit criterion, else "full"; any other value is returned unchanged (an
    integer k, a decimal string of one, "full", "latest" or a policy object; `make_kv_policy` validates it)."""
    if kv_sharing is None or kv_sharing == KV_SHARING_AUTO:
        return "latest" if has_exit(exit_criterion) else "full"
    if isinstance(kv_sharing, str) and kv_sharing.isdigit():
        return int(kv_sharing)
    return kv_sharing


def check_init_scale(init_scale: Any, name: str = "init_scale") -> float:
    """The initial-state noise scale as a float: finite and >= 0 (0: zero state), else a ValueError naming `name`."""
    if isinstance(init_scale, bool) or not isinstance(init_scale, int | float) or not math.isfinite(init_scale) \
            or init_scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0: zero initial state), got {init_scale!r}")
    return float(init_scale)
