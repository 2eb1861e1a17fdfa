"""Huginn's "takase" initialisation, in one function.

| tensor                                                   | init (trunc-normal cut at ±3σ)          |
|----------------------------------------------------------|-----------------------------------------|
| wte, Wqkv, mlp.fc (both halves), adapter, untied lm_head | std σ = sqrt(2/(5d))                    |
| attn.proj, mlp.proj                                      | std σ / sqrt(2 L), L = P + Cd + C * r̄   |
| RMSNorm weights                                          | 1                                       |
| qk_bias                                                  | 0                                       |
| RoPE table (buffer `transformer.rope`)                   | recomputed exactly, fp32                |

Both halves of `mlp.fc` use the input std, as Huginn's training code does (its inference file scales the second
half like an output projection; the trained model was initialised by the training code).
"""

from __future__ import annotations

import torch
from torch import nn

from recurrent_depth.model.layers import Attention, GatedMLP, RMSNorm


def _trunc(w: torch.Tensor, std: float, generator: torch.Generator | None = None) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)


@torch.no_grad()
def init_weights(model: nn.Module, std: float, out_std: float, generator: torch.Generator | None = None) -> None:
    """Initialise every parameter of `model` (a RecurrentDepthForCausalLM or its `transformer`) in place."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, Attention):
            _trunc(module.Wqkv.weight, std, generator)
            _trunc(module.proj.weight, out_std, generator)
            if module.qk_bias is not None:
                module.qk_bias.zero_()
        elif isinstance(module, GatedMLP):
            _trunc(module.fc.weight, std, generator)
            _trunc(module.proj.weight, out_std, generator)
        elif isinstance(module, nn.Embedding):
            _trunc(module.weight, std, generator)
    transformer = getattr(model, "transformer", model)
    _trunc(transformer.adapter.weight, std, generator)
    transformer.reset_rope()  # not a parameter, but uninitialised after `to_empty` like one
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is not transformer.wte.weight:
        _trunc(head.weight, std, generator)
