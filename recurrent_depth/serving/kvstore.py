"""A KV store for continuous batching: one row per request, each with its own length, positions and depth.

`inference.cache.KVCache` grows one shared sequence for the whole batch. A server needs rows that join and leave
between decode steps, that sit at different recurrence steps in the same core call, and that differ in cache
sharing. This store keeps, for every physical layer, one tensor with a row axis and a recurrence-slot axis:

    k[(part, layer)]: (rows, slots, cap, H, D)      valid[(part, layer)]: (rows, slots, cap) bool

Prelude and coda layers have one slot; core layer j at recurrence step i of a row uses the slot its sharing policy
names (`recurrent_depth.inference.cache`: `i` for "full" and "latest", `i % k` for cyclic k). Before each layer
call the engine `bind`s the rows taking part, the position each row writes from and each row's core slot; `update`
then writes k and v for those rows and returns the keys and values each row may see (positions of other rows never
mix), with a validity mask that the attention layer combines with its causal mask. Positions that exited before
this step are holes: "full" and cyclic leave them out; "latest" reads them from the last step that position ran
(Huginn's `latest-m4`; kept per position in `last_*` rather than copied into every deeper slot).
"""

from __future__ import annotations

import torch
from torch import Tensor

from recurrent_depth.model.layers import LayerKey


def _grow(t: Tensor, dim: int, size: int) -> Tensor:
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class RowKVStore:
    """Per-row KV storage implementing the attention layers' `KVStore.update` protocol (see module docstring)."""

    is_compileable = False

    def __init__(self, n_heads: int, head_dim: int, max_rows: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.H, self.D, self.max_rows, self.max_len = n_heads, head_dim, max_rows, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.k: dict[tuple[str, int], Tensor] = {}
        self.v: dict[tuple[str, int], Tensor] = {}
        self.valid: dict[tuple[str, int], Tensor] = {}
        self.last_k: dict[int, Tensor] = {}  # core layer -> (rows, cap, H, D): KV of each position's final step
        self.last_v: dict[int, Tensor] = {}
        self.last_valid: dict[int, Tensor] = {}
        self._rows = self._start = self._slot = self._latest = None
        self._T = self._max_end = self._n_slots = 0

    # ------------------------------------------------------------------------------------------ binding
    def bind(self, rows: Tensor, start: Tensor, T: int, core_slot: Tensor | None = None,
             latest: Tensor | None = None, max_end: int | None = None, n_slots: int | None = None) -> None:
        """Set the rows (n,) of the next layer calls, the position each writes from (n,), the number T of new
        tokens per row, each row's core slot (n,) and whether it reads holes from the last step ((n,) bool, None:
        no row does). max_end (= max(start) + T) and n_slots (= max(core_slot) + 1), given by a caller that knows
        them as Python ints, spare a device sync in every layer."""
        self._rows, self._start, self._T = rows, start, T
        self._slot = core_slot if core_slot is not None else torch.zeros_like(rows)
        self._latest = latest
        self._max_end = max_end if max_end is not None else int((start + T).max())
        self._n_slots = n_slots if n_slots is not None else int(self._slot.max()) + 1

    def _tensors(self, name: tuple[str, int], slots: int, cap: int) -> tuple[Tensor, Tensor, Tensor]:
        if name not in self.k:
            self.k[name] = torch.zeros(self.max_rows, slots, cap, self.H, self.D, dtype=self.dtype, device=self.device)
            self.v[name] = torch.zeros_like(self.k[name])
            self.valid[name] = torch.zeros(self.max_rows, slots, cap, dtype=torch.bool, device=self.device)
        k, v, valid = self.k[name], self.v[name], self.valid[name]
        if k.shape[1] < slots or k.shape[2] < cap:
            new_slots = max(slots, 2 * k.shape[1]) if k.shape[1] < slots else k.shape[1]  # double: few copies
            new_cap = max(cap, k.shape[2])
            k = _grow(_grow(k, 1, new_slots), 2, new_cap)
            v = _grow(_grow(v, 1, new_slots), 2, new_cap)
            valid = _grow(_grow(valid, 1, new_slots), 2, new_cap)
            self.k[name], self.v[name], self.valid[name] = k, v, valid
        return k, v, valid

    def _capacity(self, needed: int) -> int:
        cap = 16
        while cap < needed:
            cap *= 2
        return min(max(cap, needed), max(self.max_len, needed))

    # ---------------------------------------------------------------------------------------- protocol
    def update(self, key: LayerKey, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write k, v (n, H, T, D) of the bound rows; return each row's visible keys and values (n, H, S, D) and
        the validity mask (n, 1, 1, S), S = the longest bound row's length after this write, each row right-aligned."""
        rows, start, T = self._rows, self._start, self._T
        if rows is None or k.shape[0] != rows.shape[0] or k.shape[2] != T:
            raise RuntimeError("RowKVStore.update called without a matching bind()")
        core = key.part == "core"
        slot = self._slot if core else torch.zeros_like(rows)
        end = start + T
        S = self._max_end
        name = (key.part, key.layer)
        K, V, valid = self._tensors(name, self._n_slots if core else 1, self._capacity(S))
        pos = start[:, None] + torch.arange(T, device=start.device)  # (n, T)
        r_idx, s_idx = rows[:, None], slot[:, None]
        K[r_idx, s_idx, pos] = k.transpose(1, 2).to(K.dtype)  # (n, T, H, D)
        V[r_idx, s_idx, pos] = v.transpose(1, 2).to(V.dtype)
        valid[r_idx, s_idx, pos] = True
        # Right-align every row: its own new positions are the last T keys, as the attention layer assumes when it
        # lets each query see itself (`_keep_diagonal`); shorter rows are padded on the left with invalid keys.
        idx = end[:, None] - S + torch.arange(S, device=end.device)  # (n, S) positions, < 0 = padding
        inside = idx >= 0
        idx = idx.clamp(min=0)
        k_all, v_all, ok = K[r_idx, s_idx, idx], V[r_idx, s_idx, idx], valid[r_idx, s_idx, idx] & inside
        if core and self._latest is not None and key.layer in self.last_k:
            lk, lv, lok = self._last(key.layer, S)
            fill = self._latest[:, None] & ~ok & inside & lok[r_idx, idx]  # (n, S)
            f = fill[:, :, None, None]
            k_all = torch.where(f, lk[r_idx, idx], k_all)
            v_all = torch.where(f, lv[r_idx, idx], v_all)
            ok = ok | fill
        return k_all.transpose(1, 2), v_all.transpose(1, 2), ok[:, None, None, :]

    def _last(self, layer: int, S: int) -> tuple[Tensor, Tensor, Tensor]:
        """The layer's last-step tensors (rows, cap, ...), grown to hold S positions."""
        lk, lv, lok = self.last_k[layer], self.last_v[layer], self.last_valid[layer]
        if lk.shape[1] < S:
            cap = self._capacity(S)
            lk, lv, lok = _grow(lk, 1, cap), _grow(lv, 1, cap), _grow(lok, 1, cap)
            self.last_k[layer], self.last_v[layer], self.last_valid[layer] = lk, lv, lok
        return lk, lv, lok

    # --------------------------------------------------------------------------------------- bookkeeping
    def record_last(self, row: int, start: int, T: int, last_slot: int | None) -> None:
        """After a row's tokens [start, start+T) finished their recurrence, remember the KV of their final core
        step (slot `last_slot`; None if they ran no core step) for "latest" reads by later tokens."""
        for (part, layer), K in self.k.items():
            if part != "core":
                continue
            if layer not in self.last_k:
                self.last_k[layer] = torch.zeros(self.max_rows, K.shape[2], self.H, self.D, dtype=self.dtype,
                                                 device=self.device)
                self.last_v[layer] = torch.zeros_like(self.last_k[layer])
                self.last_valid[layer] = torch.zeros(self.max_rows, K.shape[2], dtype=torch.bool, device=self.device)
            self._last(layer, start + T)
            if last_slot is None:
                self.last_valid[layer][row, start:start + T] = False
                continue
            self.last_k[layer][row, start:start + T] = K[row, last_slot, start:start + T]
            self.last_v[layer][row, start:start + T] = self.v[(part, layer)][row, last_slot, start:start + T]
            self.last_valid[layer][row, start:start + T] = self.valid[(part, layer)][row, last_slot, start:start + T]

    def release(self, row: int) -> None:
        """Forget everything row `row` stored (its request finished or its client left)."""
        for valid in self.valid.values():
            valid[row] = False
        for ok in self.last_valid.values():
            ok[row] = False

    def nbytes(self) -> int:
        return sum(t.nbytes for d in (self.k, self.v, self.last_k, self.last_v) for t in d.values())
