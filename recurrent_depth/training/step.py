"""One training micro-step: seeded initial states, truncated-backprop forward, token-summed loss.

The initial latent state of every sequence is drawn from a generator seeded by (seed, step, global row), so a
sequence gets the same s0 whatever rank or accumulation slot processes it and whenever the run is resumed.
The loss is summed over tokens and divided by the token count of the whole global batch (times the world size,
because DDP and FSDP average gradients over ranks): accumulation and sharding then give the gradient of the
global-batch mean loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100


def initial_states(cfg, rows: Tensor, seq_len: int, step: int, seed: int, device: torch.device,
                   scale: float = 1.0) -> Tensor:
    """s0 (B, T, d) for global rows `rows`: truncated normal (std sqrt(2/(5d)), ±3σ) times sqrt(d), as Huginn's
    like-init, each row from its own generator; times `scale` (`depth.init_scale`; 1: Huginn's draw)."""
    std = cfg.init_values["std"]
    out = torch.empty(len(rows), seq_len, cfg.n_embd, device=device)
    for i, row in enumerate(rows.tolist()):
        g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_000_003 + row)
        torch.nn.init.trunc_normal_(out[i], mean=0.0, std=std, a=-3 * std, b=3 * std, generator=g)
    return out * (cfg.init_values["embed_scale"] * scale)


def token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy summed over the non-ignored tokens (fp32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def forward_backward(train_model: nn.Module, inputs: Tensor, labels: Tensor, s0: Tensor, num_steps: tuple[int, int],
                     scale: float, autocast) -> Tensor:
    """Forward with (n_no_grad, n_grad) recurrences from s0, backward of loss_sum * scale; returns the detached
    loss sum."""
    with autocast():
        out = train_model(inputs, num_steps=num_steps, input_states=s0)
    loss_sum = token_loss_sum(out.logits, labels)
    (loss_sum * scale).backward()
    return loss_sum.detach()
