"""The reference's `generate` keywords, mapped onto the engine, so notebooks written for Huginn run unchanged.

`RecurrentDepthForCausalLM.generate` calls `generate_reference_style` when any of `criterion`, `exit_threshold`,
`exit_evaluator`, `continuous_compute`, `draft_steps`, `lookahead_for_draft`, `verification_threshold`,
`cache_lookup_strategy` or `min_steps` is given. Dispatch follows the reference's own `generate`:

    criterion / exit_threshold / exit_evaluator  -> adaptive exit (generate_with_adaptive_compute)
    draft_steps / lookahead_for_draft / verification_threshold -> self-speculative (generate_speculative)
    continuous_compute                           -> warm start (generate_minimal)
    otherwise                                    -> fixed depth with the given cache lookup

Keyword mapping: `exit_threshold="auto"` -> the criterion's default (`exit.DEFAULT_THRESHOLDS`); any criterion name
containing "kl" other than "minp-kl" is `kl`, as in the reference; `min_steps=m` (no check at recurrence indices
below m) -> the engine's `min_steps=m+1` recurrences; `do_not_exit_in_prefill` -> `exit_in_prefill=False`;
`continuous_compute` warm-starts from the raw core output on the adaptive path and from ln_f of it elsewhere (the
reference's two behaviours); `cache_lookup_strategy` = `full` (or `skip`, which `full` equals) / `latest-m4` /
`…-compress-sN` (N a multiple of the core's layer count: N/C cyclic recurrence slots); speculative decoding defaults
to `num_steps=32`, `draft_steps=32`, `lookahead_for_draft=8`, as the reference's signature does. Sampling keywords
(do_sample, temperature, top_k, top_p, min_p, eos_token_id) are read from the keywords first, then from
`generation_config` (the reference reads only the latter). Stops: the config's EOS ids plus Huginn's fixed stop ids
{65504, 65505, 65508} where they are in the vocabulary.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from recurrent_depth.inference.cache import CyclicSharing, FullSharing, LatestSharing, SharingPolicy
from recurrent_depth.inference.exit import ExitCriterion

_HUGINN_STOPS = (65504, 65505, 65508)
_ADAPTIVE = ("criterion", "exit_threshold", "exit_evaluator")
_SPECULATIVE = ("draft_steps", "lookahead_for_draft", "verification_threshold")
_SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "min_p")
_IGNORED = frozenset({"use_cache", "return_dict", "output_scores", "output_attentions", "output_hidden_states",
                      "pad_token_id", "bos_token_id", "cache_implementation", "stopping_criteria"})


def cache_policy_from_lookup(strategy: str, n_core_layers: int) -> SharingPolicy:
    """Map a reference `cache_lookup_strategy` string onto a sharing policy object."""
    m = re.fullmatch(r"(full|skip|latest-m4)(?:-compress-s(\d+))?", strategy)
    if m is None:
        raise ValueError(f"unsupported cache_lookup_strategy {strategy!r}; supported: 'full', 'skip', 'latest-m4', "
                         "'latest-m4-compress-sN' (N a multiple of the core's layer count)")
    if m.group(2) is not None:
        n = int(m.group(2))
        if n < n_core_layers or n % n_core_layers:
            raise ValueError(f"cache_lookup_strategy {strategy!r}: compress-s{n} must be a positive multiple of the "
                             f"core's {n_core_layers} layers (k = N / {n_core_layers} recurrence slots)")
        return CyclicSharing(n // n_core_layers)
    return LatestSharing() if m.group(1) == "latest-m4" else FullSharing()


def _criterion_name(name: str) -> str:
    return "kl" if "kl" in name and name != "minp-kl" else name


def _max_new_tokens(input_ids: Tensor, generation_config: Any, kwargs: dict[str, Any]) -> int:
    """The reference's rule: `max_new_tokens` from the keywords, else max_length - prompt length."""
    if "max_new_tokens" in kwargs:
        n = kwargs.pop("max_new_tokens")
        if "max_length" in kwargs:
            n = min(n, kwargs.pop("max_length") - input_ids.shape[1])
        return n
    max_length = kwargs.pop("max_length", getattr(generation_config, "max_length", None) or 20)
    return max(max_length - input_ids.shape[1], 0)


def _stops(model: Any, generation_config: Any, tokenizer: Any, eos: Any) -> list[int]:
    ids: list[int] = []
    eos = eos if eos is not None else getattr(generation_config, "eos_token_id", None)
    if eos is not None:
        ids.extend([eos] if isinstance(eos, int) else list(eos))
    ids.extend(i for i in _HUGINN_STOPS if i < model.config.vocab_size and i not in ids)
    for text in getattr(generation_config, "stop_strings", None) or []:
        if tokenizer is None:
            raise ValueError("generation_config.stop_strings needs the tokenizer= argument")
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][0])
    return ids


def generate_reference_style(model: Any, input_ids: Tensor, generation_config: Any = None,
                             **reference_kwargs: Any) -> Any:
    """Run `model.generate(...)` with the reference's keywords on the engine; see the module docstring.

    Returns the sequences (B, prompt + new), or a transformers `GenerateDecoderOnlyOutput` when
    `return_dict_in_generate` is set (in the keywords or the generation config)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    from recurrent_depth.inference.generate import generate

    kw = dict(reference_kwargs)
    generation_config = generation_config if generation_config is not None else model.generation_config
    tokenizer = kw.pop("tokenizer", None)
    streamer = kw.pop("streamer", None)
    attention_mask = kw.pop("attention_mask", None)
    return_dict = kw.pop("return_dict_in_generate", getattr(generation_config, "return_dict_in_generate", False))
    max_new_tokens = _max_new_tokens(input_ids, generation_config, kw)
    sampling = {name: kw.pop(name, getattr(generation_config, name, None)) for name in _SAMPLING}
    sampling["do_sample"] = bool(sampling["do_sample"])
    sampling["temperature"] = sampling["temperature"] or 1.0
    eos = _stops(model, generation_config, tokenizer, kw.pop("eos_token_id", None))
    policy = cache_policy_from_lookup(kw.pop("cache_lookup_strategy", "full"), model.config.n_layers_in_recurrent_block)
    continuous = bool(kw.pop("continuous_compute", False))
    init_scale = kw.pop("init_scale", 1.0)
    common = dict(attention_mask=attention_mask, max_new_tokens=max_new_tokens, kv_sharing=policy,
                  init_scale=init_scale, eos_token_id=eos or None, streamer=streamer, **sampling)

    if any(k in kw for k in _ADAPTIVE):
        criterion = kw.pop("criterion", "none")
        threshold = kw.pop("exit_threshold", "auto")
        evaluator = kw.pop("exit_evaluator", None)
        if evaluator is not None and not isinstance(evaluator, ExitCriterion):
            raise TypeError("exit_evaluator must implement recurrent_depth.inference.exit.ExitCriterion (the "
                            "reference's PerIterationExitEvaluator objects are not supported)")
        if kw.pop("check_criterion_every_n_steps", 1) != 1:
            raise ValueError("check_criterion_every_n_steps other than 1 is not supported")
        exit_in_prefill = not kw.pop("do_not_exit_in_prefill", False)
        min_steps = kw.pop("min_steps", 0)
        num_steps = kw.pop("num_steps", model.config.mean_recurrence)
        _no_leftovers(kw)
        crit = evaluator if evaluator is not None else _criterion_name(criterion)
        out = generate(model, input_ids, num_steps=num_steps, exit_criterion=crit,
                       exit_threshold=None if evaluator is not None or threshold == "auto" else float(threshold),
                       min_steps=min_steps + 1, warm_start="raw" if continuous else False,
                       exit_in_prefill=exit_in_prefill, **common)
    elif any(k in kw for k in _SPECULATIVE):
        if continuous:
            raise ValueError("continuous_compute cannot be combined with speculative decoding (the reference's "
                             "verifier pass fails on it too)")
        if kw.pop("verification_threshold", 1) < 1:
            raise ValueError("verification_threshold < 1 (probability-ratio acceptance) is not supported; use 1")
        if sampling["do_sample"]:
            raise ValueError("speculative decoding here is greedy: set do_sample=False")
        num_steps = kw.pop("num_steps", 32)
        draft_steps, lookahead = kw.pop("draft_steps", 32), kw.pop("lookahead_for_draft", 8)
        _no_leftovers(kw)
        out = generate(model, input_ids, num_steps=num_steps, draft_steps=draft_steps, lookahead=lookahead,
                       **common)
    else:
        num_steps = kw.pop("num_steps", model.config.mean_recurrence)
        min_steps = kw.pop("min_steps", 0)  # no criterion: never exits, min_steps has no effect
        del min_steps
        _no_leftovers(kw)
        out = generate(model, input_ids, num_steps=num_steps, warm_start="latent" if continuous else False, **common)
    if return_dict:
        result = GenerateDecoderOnlyOutput(sequences=out.sequences)
        result.steps, result.kv_cache_bytes = out.steps, out.kv_cache_bytes
        return result
    return out.sequences


def _no_leftovers(kw: dict[str, Any]) -> None:
    unknown = sorted(set(kw) - _IGNORED)
    if unknown:
        raise TypeError(f"generate() got keyword arguments the engine does not support: {unknown}")
