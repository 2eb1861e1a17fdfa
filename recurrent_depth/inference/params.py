"""One typed request object for test-time compute and sampling, validated once, read by every entry point.

`generate()` builds a `DepthParams` from its keywords, the HTTP layer (`recurrent_depth.serving.protocol`) from a
request body, the server's engine reads it per sequence; so a value is checked, and its default resolved, in one
place (`recurrent_depth.inference.defaults` holds the defaults themselves).

    depth = DepthParams(num_steps=32, exit_criterion="kl", warm_start=True)
    depth.criterion()   # KLExit(...)        (NoExit at fixed depth)
    depth.policy()      # LatestSharing()    ("auto" resolved: latest with an exit criterion)
    depth.warm          # "latent"           (None: every token starts from a fresh s0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from recurrent_depth.inference.cache import SharingPolicy, make_kv_policy
from recurrent_depth.inference.defaults import INIT_SCALE, KV_SHARING_AUTO, check_init_scale, resolve_kv_sharing
from recurrent_depth.inference.exit import ExitCriterion, make_exit_criterion
from recurrent_depth.inference.sampling import Sampler

WARM_STARTS = (False, True, "latent", "raw")


def check_warm_start(value: object) -> bool | str:
    """warm_start as given if it is False, True, "latent" or "raw" (not 0, 1 or 1.0), else a ValueError."""
    if not isinstance(value, bool | str) or value not in WARM_STARTS:
        raise ValueError(f"warm_start must be false, true, 'latent' or 'raw', got {value!r}")
    return value


@dataclass(frozen=True)
class DepthParams:
    """Test-time compute of one request.

    num_steps: recurrence count r (core applications) per token, the cap when an exit criterion is set;
    exit_criterion / exit_threshold: `recurrent_depth.inference.exit` name or object ("none" / None: fixed depth;
    threshold None: the criterion's default); warm_start: False, True / "latent" (start each token from the
    previous token's final ln_f(s)) or "raw" (from the raw core output); kv_sharing: "auto" (latest with an exit
    criterion, else full), "full", "latest", an int k or a policy object (`recurrent_depth.inference.cache`);
    init_scale: std scale of the random initial state (0: zeros, deterministic); min_steps: recurrences every token
    runs before its first exit check; exit_in_prefill: whether the prompt's forward (the first new token) may exit
    early (the reference's default: yes). Invalid values raise ValueError whose message starts with the field's
    name."""

    num_steps: int
    exit_criterion: str | ExitCriterion | None = "none"
    exit_threshold: float | None = None
    warm_start: bool | str = False
    kv_sharing: str | int | SharingPolicy = KV_SHARING_AUTO
    init_scale: float = INIT_SCALE
    min_steps: int = 0
    exit_in_prefill: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 0:
            raise ValueError(f"num_steps must be an integer >= 0 (recurrences per token), got {self.num_steps!r}")
        if self.exit_criterion is None and self.exit_threshold is not None:
            raise ValueError("exit_threshold was given without an exit_criterion")
        try:
            self.criterion()
        except ValueError as err:
            field_name = "exit_criterion" if str(err).startswith("unknown") else "exit_threshold"
            raise ValueError(f"{field_name}: {err}") from None
        check_warm_start(self.warm_start)
        try:
            self.policy()
        except ValueError as err:
            raise ValueError(f"kv_sharing: {err}") from None
        object.__setattr__(self, "init_scale", check_init_scale(self.init_scale))
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"min_steps must be an integer >= 0, got {self.min_steps!r}")
        if not isinstance(self.exit_in_prefill, bool):
            raise ValueError(f"exit_in_prefill must be true or false, got {self.exit_in_prefill!r}")

    def criterion(self) -> ExitCriterion:
        """A fresh exit criterion object (NoExit at fixed depth)."""
        return make_exit_criterion(self.exit_criterion or "none", self.exit_threshold)

    def policy(self) -> SharingPolicy:
        """The KV sharing policy, "auto" resolved against the exit criterion."""
        return make_kv_policy(resolve_kv_sharing(self.kv_sharing, self.exit_criterion))

    @property
    def warm(self) -> Literal["raw", "latent"] | None:
        """Which state the next token starts from: the raw core output, ln_f of it, or None (a fresh s0)."""
        if not self.warm_start:
            return None
        return "raw" if self.warm_start == "raw" else "latent"


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens >= 1; temperature 0 = greedy; top_p nucleus mass; top_k / min_p (None: off); seed for s0 draws
    and sampling (None: random); stop: strings that end the text (not included); stop_token_ids: tokens that end it
    (EOS)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    top_k: int | None = None
    min_p: float | None = None

    def sampler(self, generator: torch.Generator | None) -> Sampler:
        """The `Sampler` these parameters mean, drawing from `generator`."""
        return Sampler(do_sample=self.temperature > 0, temperature=self.temperature or 1.0,
                       top_p=self.top_p if self.top_p < 1 else None, top_k=self.top_k, min_p=self.min_p,
                       generator=generator)
