"""KV cache across recurrence steps: one slot per (recurrence step, layer) invocation, as Huginn lays it out.

A token at recurrence i, core layer j attends to the keys and values that earlier tokens wrote at the same slot.
Tokens that exited early leave holes in deeper slots; the validity mask returned by `update` says which stored
positions exist. Sharing policies (which slot a layer invocation reads and writes) live in `SlotPolicy` objects.
"""

from __future__ import annotations

import torch
from torch import Tensor

from recurrent_depth.model.layers import LayerKey


class KVCache:
    """Dynamic KV cache with one slot per layer invocation (Huginn's `full` lookup).

    The model writes the T positions [seq_len, seq_len + T) of every slot it computes during a forward, then calls
    `commit(T)`. A slot that skipped positions (rows or tokens that exited early) holds them as invalid.
    """

    is_compileable = False  # transformers' generate inspects this

    def __init__(self) -> None:
        self.seq_len = 0
        self.slots: dict[LayerKey, list[Tensor]] = {}  # key -> [k (B,H,S,D), v (B,H,S,D), valid (B,S)]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seq_len

    def slot_for(self, key: LayerKey) -> LayerKey:
        """The slot a layer invocation reads and writes (identity for the full cache)."""
        return key

    def update(self, key: LayerKey, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        B, H, T, D = k.shape
        slot = self.slot_for(key)
        if slot not in self.slots:
            self.slots[slot] = [k.new_zeros(B, H, 0, D), v.new_zeros(B, H, 0, D),
                                torch.zeros(B, 0, dtype=torch.bool, device=k.device)]
        ks, vs, valid = self.slots[slot]
        gap = self.seq_len - ks.shape[2]
        if gap < 0:  # rewriting positions (a reused slot within one forward) -> overwrite from seq_len
            ks, vs, valid = ks[:, :, : self.seq_len], vs[:, :, : self.seq_len], valid[:, : self.seq_len]
            gap = 0
        if gap:
            ks = torch.cat([ks, k.new_zeros(B, H, gap, D)], dim=2)
            vs = torch.cat([vs, v.new_zeros(B, H, gap, D)], dim=2)
            valid = torch.cat([valid, torch.zeros(B, gap, dtype=torch.bool, device=k.device)], dim=1)
        ks, vs = torch.cat([ks, k], dim=2), torch.cat([vs, v], dim=2)
        valid = torch.cat([valid, torch.ones(B, T, dtype=torch.bool, device=k.device)], dim=1)
        self.slots[slot] = [ks, vs, valid]
        all_valid = gap == 0 and bool(valid.all()) if valid.numel() else True
        return ks, vs, None if all_valid else valid[:, None, None, :]

    def commit(self, n_tokens: int) -> None:
        """Advance past the T positions the last forward wrote."""
        self.seq_len += n_tokens

    def crop(self, length: int) -> None:
        """Drop every position at or after `length` (speculative decoding rejects drafted tokens)."""
        self.seq_len = min(self.seq_len, length)
        for slot, (ks, vs, valid) in self.slots.items():
            self.slots[slot] = [ks[:, :, :length], vs[:, :, :length], valid[:, :length]]

    def nbytes(self) -> int:
        return sum(ks.nbytes + vs.nbytes for ks, vs, _ in self.slots.values())
