"""KV cache across recurrence steps, with the sharing policy as an object.

Every attention-layer invocation (prelude layer j, core layer j at recurrence i, coda layer j; see `LayerKey`) reads
and writes a *slot*. Which slot is the policy's choice:

    FullSharing()      one slot per (recurrence step, core layer): Huginn's default `full` lookup. A token that
                       exited early leaves holes in deeper slots; later tokens at those steps do not see it.
    LatestSharing()    same slots, but a token that exited after n steps is read, at deeper steps, from its latest
                       computed step (the reference's `latest-m4`): the engine calls `fill_latest` at the exit.
    CyclicSharing(k)   k recurrence slots per core layer, reused cyclically (step i -> slot i mod k); k = 1 is one
                       cache per physical layer (the reference's `latest-m4-compress-s{4k}` for a 4-layer core).

    make_kv_policy("full" | "latest" | k)  -> the policy object; anything else is a ValueError naming the choices.

Storage is preallocated per slot, (B, H, capacity, D) for keys and values plus a (B, capacity) validity mask;
`capacity` is `max_length` when given (the engine passes prompt + new tokens), else it doubles on demand. Writes go to
positions [seq_len, seq_len + T); `commit(T)` advances. `rows` (an index tensor, or None for all rows) restricts reads
and writes to a subset of the batch: the engine uses it for rows that are still iterating (adaptive exit) and rows
that have not finished. Positions a row never wrote at a slot are invalid and masked out of attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from recurrent_depth.model.layers import LayerKey


class SlotCopier(Protocol):
    """What a policy needs from a cache to fill an exited token's deeper slots: both `KVCache` and
    `RowKVCache` copy the positions being written now (the forward in progress) of `rows` from slot src to dst."""

    def copy_slot(self, src: LayerKey, dst: LayerKey, rows: Tensor, n_tokens: int) -> None:
        ...


class SharingPolicy(Protocol):
    """Maps a layer invocation to the cache slot it reads and writes, and owns what an exited token leaves in the
    deeper slots (`fill_exited`, called by every engine at the exit, the one place that behaviour lives)."""

    name: str
    fills_exited: bool  # whether fill_exited writes anything (engines skip the call otherwise)

    def slot(self, key: LayerKey) -> LayerKey:
        ...

    def fill_exited(self, cache: SlotCopier, rows: Tensor, last_step: int, num_steps: int, n_core_layers: int,
                    n_tokens: int) -> None:
        ...


@dataclass(frozen=True)
class FullSharing:
    """One slot per layer invocation (no sharing)."""

    name: str = "full"
    fills_exited: bool = False

    def slot(self, key: LayerKey) -> LayerKey:
        return key

    def fill_exited(self, cache: SlotCopier, rows: Tensor, last_step: int, num_steps: int, n_core_layers: int,
                    n_tokens: int) -> None:
        """Nothing: an exited token is a hole at deeper steps."""


@dataclass(frozen=True)
class LatestSharing(FullSharing):
    """One slot per layer invocation, as `full`; exited tokens are read from their latest computed recurrence."""

    name: str = "latest"
    fills_exited: bool = True

    def fill_exited(self, cache: SlotCopier, rows: Tensor, last_step: int, num_steps: int, n_core_layers: int,
                    n_tokens: int) -> None:
        """Copy rows' keys/values at recurrence `last_step` (their final one) into steps last_step+1 .. num_steps-1
        for the positions being written (the reference's `latest` lookup, done once at the exit)."""
        for j in range(n_core_layers):
            src = self.slot(LayerKey("core", j, last_step))
            for i in range(last_step + 1, num_steps):
                cache.copy_slot(src, self.slot(LayerKey("core", j, i)), rows, n_tokens)


@dataclass(frozen=True)
class CyclicSharing:
    """k recurrence slots per core layer, step i -> slot i mod k (k = 1: one cache per physical layer)."""

    k: int
    name: str = "cyclic"
    fills_exited: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"cyclic KV sharing needs an integer k >= 1 (recurrence slots per core layer), "
                             f"got {self.k!r}")

    def slot(self, key: LayerKey) -> LayerKey:
        if key.part != "core":
            return key
        return LayerKey("core", key.layer, key.step % self.k)

    def fill_exited(self, cache: SlotCopier, rows: Tensor, last_step: int, num_steps: int, n_core_layers: int,
                    n_tokens: int) -> None:
        """Nothing: deeper steps read whatever their shared slot holds."""


POLICY_NAMES = ("full", "latest", "<int k>")


def make_kv_policy(spec: str | int | SharingPolicy | None) -> SharingPolicy:
    """'full' (default), 'latest', an integer k >= 1 (or its decimal string), or a policy object."""
    if spec is None or spec == "full":
        return FullSharing()
    if spec == "latest":
        return LatestSharing()
    if isinstance(spec, str) and spec.isdigit():
        spec = int(spec)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return CyclicSharing(spec)
    if all(hasattr(spec, name) for name in ("slot", "fills_exited", "fill_exited")):
        return spec  # type: ignore[return-value]
    raise ValueError(f"unknown KV sharing policy {spec!r}; valid: {', '.join(POLICY_NAMES)}")


class _Slot:
    __slots__ = ("k", "v", "valid", "written", "holes")

    def __init__(self, k: Tensor, v: Tensor, valid: Tensor) -> None:
        self.k, self.v, self.valid = k, v, valid  # (B, H, C, D), (B, H, C, D), (B, C)
        self.written = 0  # positions [0, written) have been written for some row
        self.holes = False  # some row may lack a position below `written`


class KVCache:
    """Preallocated KV cache with one slot per layer invocation under a sharing policy (default: Huginn's `full`).

    The model writes the T positions [seq_len, seq_len + T) of every slot it computes during a forward, then calls
    `commit(T)`. `KVCache()` with no arguments is the dynamic cache transformers' generate and `model.forward` use.
    """

    is_compileable = False  # transformers' generate inspects this

    def __init__(self, policy: str | int | SharingPolicy | None = "full", max_length: int | None = None,
                 batch_size: int | None = None) -> None:
        self.policy = make_kv_policy(policy)
        self.max_length = max_length
        self.batch_size = batch_size
        self.seq_len = 0
        self.rows: Tensor | None = None  # restrict reads/writes to these batch rows (None: all)
        self.slots: dict[LayerKey, _Slot] = {}
        self.peak_bytes = 0

    # -------------------------------------------------------------------------------------------- protocol
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seq_len

    def slot_for(self, key: LayerKey) -> LayerKey:
        """The slot a layer invocation reads and writes."""
        return self.policy.slot(key)

    def reserve(self, key: LayerKey, like: Tensor) -> _Slot:
        """The bookkeeping of a write of T positions [seq_len, seq_len + T) by the selected rows, without the write:
        the slot (allocated or grown as needed), its holes and validity. `like` gives the write's shape (R, H, T, D),
        dtype and device: the keys themselves (`update`) or an expanded scalar (the fused forward,
        `recurrent_depth.inference.fused`, which writes keys and values in place)."""
        start, end = self.seq_len, self.seq_len + like.shape[2]
        slot = self._slot(self.policy.slot(key), like, end)
        rows = self.rows
        if start > slot.written or rows is not None:
            self._mark_holes(slot)  # positions [written, start) never written, or only some rows written
        if rows is not None:
            slot.valid[rows, start:end] = True
        elif slot.holes:
            slot.valid[:, start:end] = True
        slot.written = max(slot.written, end)
        return slot

    def update(self, key: LayerKey, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write k, v (R, H, T, D) at [seq_len, seq_len + T) for the selected rows; return keys and values
        (R, H, S, D) with S = seq_len + T and a validity mask (R, 1, 1, S), or None when every position is valid."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        slot = self.reserve(key, k)
        rows = self.rows
        if rows is None:
            slot.k[:, :, start:end] = k
            slot.v[:, :, start:end] = v
            ks, vs = slot.k[:, :, :end], slot.v[:, :, :end]
        else:
            slot.k[rows, :, start:end] = k
            slot.v[rows, :, start:end] = v
            ks, vs = slot.k[rows, :, :end], slot.v[rows, :, :end]
        if not slot.holes:
            return ks, vs, None
        valid = slot.valid[:, :end] if rows is None else slot.valid[rows, :end]
        return ks, vs, valid[:, None, None, :]

    @staticmethod
    def _mark_holes(slot: _Slot) -> None:
        """Switch a slot to explicit validity tracking. Until its first hole every row wrote every position below
        `written` (the mask is only maintained from then on, which saves a write per layer in plain decoding)."""
        if not slot.holes:
            slot.valid[:, : slot.written] = True
            slot.holes = True

    def commit(self, n_tokens: int) -> None:
        """Advance past the T positions the last forward wrote."""
        self.seq_len += n_tokens

    def crop(self, length: int) -> None:
        """Drop every position at or after `length` (speculative decoding rejects drafted tokens)."""
        self.seq_len = min(self.seq_len, length)
        for slot in self.slots.values():
            if slot.written > length:
                if slot.holes:
                    slot.valid[:, length:] = False
                slot.written = length

    # -------------------------------------------------------------------------------------------- engine
    def copy_slot(self, src: LayerKey, dst: LayerKey, rows: Tensor, n_tokens: int) -> None:
        """Copy rows' keys/values at positions [seq_len, seq_len + n_tokens) from slot src into slot dst (the
        sharing policy's `fill_exited` for a token that exited; a missing src is left alone)."""
        source = self.slots.get(src)
        if source is None:
            return
        start, end = self.seq_len, self.seq_len + n_tokens
        dest = self._slot(dst, source.k, end)
        self._mark_holes(dest)  # only some rows are filled
        dest.k[rows, :, start:end] = source.k[rows, :, start:end]
        dest.v[rows, :, start:end] = source.v[rows, :, start:end]
        dest.valid[rows, start:end] = True
        dest.written = max(dest.written, end)

    def nbytes(self) -> int:
        """Bytes currently allocated for keys and values (validity masks excluded)."""
        return sum(s.k.nbytes + s.v.nbytes for s in self.slots.values())

    def core_nbytes(self) -> int:
        """Bytes allocated for the core's slots only."""
        return sum(s.k.nbytes + s.v.nbytes for key, s in self.slots.items() if key.part == "core")

    # -------------------------------------------------------------------------------------------- storage
    def _slot(self, key: LayerKey, like: Tensor, end: int) -> _Slot:
        """The slot `key` with room for `end` positions, allocated (shaped and typed after `like`, (R, H, T, D)) or
        grown as needed."""
        slot = self.slots.get(key)
        if slot is None:
            _, H, _, D = like.shape
            B = self._batch_size(like)
            if self.max_length is not None and end > self.max_length:
                raise ValueError(f"KV cache holds {self.max_length} positions, a write reaches {end}")
            cap = self.max_length if self.max_length is not None else max(end, 16)
            slot = _Slot(like.new_zeros(B, H, cap, D), like.new_zeros(B, H, cap, D),
                         torch.zeros(B, cap, dtype=torch.bool, device=like.device))
            self.slots[key] = slot
            self.peak_bytes = max(self.peak_bytes, self.nbytes())
        elif end > slot.k.shape[2]:
            if self.max_length is not None:
                raise ValueError(f"KV cache holds {self.max_length} positions, a write reaches {end}")
            cap = max(2 * slot.k.shape[2], end)
            grow = cap - slot.k.shape[2]
            B, H, _, D = slot.k.shape
            slot.k = torch.cat([slot.k, slot.k.new_zeros(B, H, grow, D)], dim=2)
            slot.v = torch.cat([slot.v, slot.v.new_zeros(B, H, grow, D)], dim=2)
            slot.valid = torch.cat([slot.valid, slot.valid.new_zeros(B, grow)], dim=1)
            self.peak_bytes = max(self.peak_bytes, self.nbytes())
        return slot

    def _batch_size(self, k: Tensor) -> int:
        if self.rows is None:
            return k.shape[0]
        if self.batch_size is None:
            raise ValueError("KVCache.rows is set but the cache was not told its batch size (set batch_size)")
        return self.batch_size
