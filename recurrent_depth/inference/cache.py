"""KV caches across recurrence steps, with the sharing policy as an object: `KVCache` (static batches: `generate()`,
speculative decoding, HF `generate`) and `RowKVCache` (paged, rows that join and leave: the server's row engine).

Every attention-layer invocation (prelude layer j, core layer j at recurrence i, coda layer j; see `LayerKey`) reads
and writes a *slot*. Which slot is the policy's choice:

    FullSharing()      one slot per (recurrence step, core layer): Huginn's default `full` lookup. A token that
                       exited early leaves holes in deeper slots; later tokens at those steps do not see it.
    LatestSharing()    same slots, but a token that exited after n steps is read, at deeper steps, from its latest
                       computed step (the reference's `latest-m4`): each engine calls `fill_exited` at the exit.
    CyclicSharing(k)   k recurrence slots per core layer, reused cyclically (step i -> slot i mod k); k = 1 is one
                       cache per physical layer (the reference's `latest-m4-compress-s{4k}` for a 4-layer core).

    make_kv_policy("full" | "latest" | k)  -> the policy object; anything else is a ValueError naming the choices.

`KVCache`'s storage is preallocated per slot, (B, H, capacity, D) for keys and values plus a (B, capacity) validity
mask; `capacity` is `max_length` when given (`generate()` passes prompt + new tokens), else it doubles on demand.
Writes go to positions [seq_len, seq_len + T); `commit(T)` advances. `rows` (an index tensor, or None for all rows)
restricts reads and writes to a subset of the batch: `forward_rows` uses it for rows that are still iterating
(adaptive exit) and rows that have not finished. Positions a row never wrote at a slot are invalid and masked out of
attention. `RowKVCache`'s storage is pages of positions, taken and given back per row (its class docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from recurrent_depth.model.layers import LayerKey

if TYPE_CHECKING:
    from recurrent_depth.config import RecurrentDepthConfig


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


class RowKVCache:
    """A KV cache whose rows are independent sequences, stored by pages of tokens: continuous batching.

    Rows join and leave between forwards, each with its own length, positions, depth and sharing policy, and rows
    at different recurrence steps share one core call. Storage is paged: for each part ("prelude", "core",
    "coda") a pool of pages of `page_size` positions per physical layer, (pages, page_size, H, D) for keys and
    values, and a page table per (row, slot step, page index) shared by the part's layers (every layer of a part
    writes the same positions). A row takes pages only for the slots and positions it writes, and gives them back
    on `release`; a pool that is mostly free is compacted, so a deep request's memory is returned when it ends
    (`bytes_in_use` counts live pages, `nbytes` what the pools hold).

    Before each forward the engine `bind`s the rows taking part, the position each writes from, T, the part and,
    for the core, each row's recurrence step and policy: layer j of row b writes slot
    `policy_b.slot(LayerKey("core", j, step_b))`. `update` writes k and v and returns each row's visible keys and
    values right-aligned to the longest row (the attention layer lets each query see the last T keys as its own),
    with a validity mask; positions of other rows never mix. What an exited token leaves at deeper steps is its
    policy's `fill_exited`, through `copy_slot`, as in `KVCache`. The fused CPU op reads (B, H, S, D) slots: `gather`
    lends it the bound rows' keys and values in that layout (right-aligned, as `update` returns them) and `scatter`
    writes back the new positions it filled (`recurrent_depth.inference.fused`).
    """

    is_compileable = False

    def __init__(self, n_heads: int, head_dim: int, n_layers: dict[str, int], max_rows: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, page_size: int = 16) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1 (positions per page), got {page_size}")
        self.H, self.D, self.n_layers, self.max_rows = n_heads, head_dim, dict(n_layers), max_rows
        self.P, self.dtype, self.device = page_size, dtype, torch.device(device)
        self.max_pages = -(-max_len // page_size)  # pages per row and slot
        self.k: dict[tuple[str, int], Tensor] = {}  # (part, layer) -> (pages, P, H, D)
        self.v: dict[tuple[str, int], Tensor] = {}
        self.valid: dict[str, Tensor] = {}  # part -> (pages, P) bool, shared by the part's layers
        self.table: dict[str, Tensor] = {}  # part -> (rows, slots, max_pages) page id, -1: none
        self.owned: dict[str, dict[int, dict[tuple[int, int], int]]] = {}  # part -> row -> (slot, page n) -> id
        self.free: dict[str, list[int]] = {}
        self._rows: Tensor | None = None
        self._start: Tensor | None = None
        self._slots: list[list[int]] = []  # per layer of the bound part: each bound row's slot
        self._index: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] = {}  # slots -> (write, read, ok) indices
        self._T, self._part = 0, "prelude"
        self._host: tuple[list[int], list[int]] = ([], [])

    # ------------------------------------------------------------------------------------------ binding
    def bind(self, rows: list[int], starts: list[int], T: int, part: str,
             steps: list[int] | None = None, policies: list[SharingPolicy] | None = None) -> None:
        """Set the rows of the next layer calls (store row ids), the position each writes from, the new tokens T
        per row and the part; for the core, each row's recurrence step and sharing policy. Pages for the positions
        the rows will write are taken here (host-side bookkeeping, no device sync in the layers)."""
        if part not in self.n_layers:
            raise ValueError(f"unknown part {part!r}; valid: {', '.join(self.n_layers)}")
        slots = [[0] * len(rows) for _ in range(self.n_layers[part])]
        if part == "core":
            if steps is None or policies is None:
                raise ValueError("binding the core needs each row's recurrence step and sharing policy")
            slots = [[self._core_slot(p, j, s) for p, s in zip(policies, steps)] for j in range(self.n_layers[part])]
        for i, (row, start) in enumerate(zip(rows, starts)):
            for slot in {j_slots[i] for j_slots in slots}:
                self._take_pages(part, row, slot, start, start + T)
        self._rows = torch.tensor(rows, device=self.device)
        self._start = torch.tensor(starts, device=self.device)
        self._T, self._part = T, part
        self._slots, self._index = slots, {}
        self._host = (rows, starts)

    @property
    def bound_rows(self) -> Tensor | None:
        """The store rows of the last `bind` (n,), as `SharingPolicy.fill_exited` takes them."""
        return self._rows

    @staticmethod
    def _core_slot(policy: SharingPolicy, layer: int, step: int) -> int:
        key = policy.slot(LayerKey("core", layer, step))
        if key.part != "core" or key.layer != layer:
            raise ValueError(f"RowKVCache stores a core layer's slots with that layer; policy {policy.name!r} maps "
                             f"core layer {layer} to {key}")
        return key.step

    # ---------------------------------------------------------------------------------------- protocol
    def update(self, key: LayerKey, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write k, v (n, H, T, D) of the bound rows; return each row's visible keys and values (n, H, S, D) and
        the validity mask (n, 1, 1, S), S = the longest bound row's length after this write, each row right-aligned."""
        K, V, (write, read, ok) = self._bound(key, k.shape[0], k.shape[2], "update")
        n, S = ok.shape
        # index_copy_ / index_select on flat 1-D indices: one pass each, cheaper than advanced-index put / gather
        K.index_copy_(0, write, k.transpose(1, 2).reshape(-1, self.H, self.D).to(K.dtype))
        V.index_copy_(0, write, v.transpose(1, 2).reshape(-1, self.H, self.D).to(V.dtype))
        k_all = K.index_select(0, read).view(n, S, self.H, self.D)
        v_all = V.index_select(0, read).view(n, S, self.H, self.D)
        return k_all.transpose(1, 2), v_all.transpose(1, 2), ok[:, None, None, :]

    def gather(self, key: LayerKey, n_rows: int, n_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """Copies of the bound rows' keys and values at layer `key`, (n, H, S, D) views of (n, S, H, D) memory,
        right-aligned as in `update` (row b's T new tokens at positions S - T .. S - 1, whatever is there to be
        overwritten), and which positions hold a key, (n, S): the slot layout of the fused op
        (`recurrent_depth.inference.fused`), which writes the new keys and values into them at position S - T;
        `scatter` then puts those into the pages."""
        K, V, (_, read, ok) = self._bound(key, n_rows, n_tokens, "gather")
        n, S = ok.shape
        k = K.index_select(0, read).view(n, S, self.H, self.D).transpose(1, 2)  # (n, H, S, D) view: no second copy
        v = V.index_select(0, read).view(n, S, self.H, self.D).transpose(1, 2)
        return k, v, ok

    def scatter(self, key: LayerKey, k: Tensor, v: Tensor) -> None:
        """Write the last T positions of k, v (n, H, S, D), as `gather` gave them and the fused op filled them (the
        bound rows' new tokens), into the rows' pages."""
        K, V, (write, _, _) = self._bound(key, k.shape[0], self._T, "scatter")
        K.index_copy_(0, write, k[:, :, -self._T:].transpose(1, 2).reshape(-1, self.H, self.D))
        V.index_copy_(0, write, v[:, :, -self._T:].transpose(1, 2).reshape(-1, self.H, self.D))

    def _bound(self, key: LayerKey, n_rows: int, n_tokens: int,
               caller: str) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The flat key and value pools (pages * P, H, D) of layer `key` and the bound rows' indices at its slots
        (`_indices`), once the call is checked against the last `bind` (part, rows, T)."""
        if self._rows is None or key.part != self._part or n_rows != self._rows.shape[0] or n_tokens != self._T:
            raise RuntimeError(f"RowKVCache.{caller} called without a matching bind()")
        K = self.k[(key.part, key.layer)].view(-1, self.H, self.D)
        V = self.v[(key.part, key.layer)].view(-1, self.H, self.D)
        return K, V, self._indices(self._slots[key.layer])

    def _indices(self, slots: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """For the bound rows at `slots` (one per row): the flat pool indices the T new positions go to (n * T,),
        those the S visible positions are read from (n * S; right-aligned) and which of those hold a key (n, S).
        Computed once per bind for the layers that share these slots (all of a part's layers, for the shipped
        policies), which write the same positions: the new positions are marked valid here, once, not per layer."""
        cached = self._index.get(tuple(slots))
        if cached is None:
            rows, start, T = self._rows, self._start, self._T
            slot = torch.tensor(slots, device=self.device)[:, None]  # (n, 1)
            write = self._flat(self._part, rows, slot, start[:, None] + torch.arange(T, device=self.device))
            S = max(self._host[1]) + T
            idx = start[:, None] + T - S + torch.arange(S, device=self.device)  # (n, S) positions, < 0 = padding
            read = self._flat(self._part, rows, slot, idx.clamp(min=0))
            ok_pages = self.valid[self._part].view(-1)
            ok_pages[write.view(-1)] = True
            inside = (idx >= 0) & (read >= 0)
            read = read.clamp(min=0)
            ok = ok_pages[read] & inside
            cached = self._index[tuple(slots)] = (write.view(-1), read.view(-1), ok)
        return cached

    def _flat(self, part: str, rows: Tensor, slot: Tensor, pos: Tensor) -> Tensor:
        """Flat pool indices (page * P + offset) of rows' positions pos (n, X) at slot (n, 1); < 0: no page."""
        page = self.table[part][rows[:, None], slot, pos // self.P]
        return torch.where(page >= 0, page * self.P + pos % self.P, -1)

    def copy_slot(self, src: LayerKey, dst: LayerKey, rows: Tensor, n_tokens: int) -> None:
        """Copy the bound rows' current positions (the forward just run) from core slot src into dst (the
        sharing policy's `fill_exited`); `rows` must be the bound rows."""
        if self._rows is None or not torch.equal(rows.to(self.device), self._rows) or n_tokens != self._T:
            raise RuntimeError("RowKVCache.copy_slot needs the rows and T of the last bind()")
        host_rows, starts = self._host
        for row, start in zip(host_rows, starts):
            self._take_pages("core", row, dst.step, start, start + n_tokens)
        pos = self._start[:, None] + torch.arange(n_tokens, device=self.device)
        src_flat = self._flat("core", self._rows, torch.full_like(self._rows, src.step)[:, None], pos)
        dst_flat = self._flat("core", self._rows, torch.full_like(self._rows, dst.step)[:, None], pos)
        for name in (("core", src.layer),):
            for pool in (self.k[name], self.v[name]):
                flat_pool = pool.view(-1, self.H, self.D)
                flat_pool[dst_flat] = flat_pool[src_flat]
        ok = self.valid["core"].view(-1)
        ok[dst_flat] = ok[src_flat]

    # ----------------------------------------------------------------------------------------------- pages
    def _take_pages(self, part: str, row: int, slot: int, start: int, end: int) -> None:
        """Give row `row` pages covering positions [start, end) at `slot` (no-op where it has them)."""
        if end > self.max_pages * self.P:
            raise ValueError(f"RowKVCache holds {self.max_pages * self.P} positions per row, a write reaches {end}")
        pages = range(start // self.P, -(-end // self.P))
        held = self.owned.get(part, {}).get(row)
        if held is not None and all((slot, n) in held for n in pages):
            return  # the common case (a decode step inside a page it holds): no table lookup, no tensor write
        table = self._table(part, slot)
        held = self.owned[part].setdefault(row, {})
        for n in pages:
            if (slot, n) not in held:
                held[slot, n] = page = self._new_page(part)
                table[row, slot, n] = page

    def _table(self, part: str, slot: int) -> Tensor:
        table = self.table.get(part)
        if table is None:
            table = torch.full((self.max_rows, slot + 1, self.max_pages), -1, dtype=torch.long, device=self.device)
            self.table[part], self.owned[part], self.free[part] = table, {}, []
        elif table.shape[1] <= slot:
            grow = max(slot + 1, 2 * table.shape[1]) - table.shape[1]
            table = torch.cat([table, table.new_full((self.max_rows, grow, self.max_pages), -1)], dim=1)
            self.table[part] = table
        return table

    def _new_page(self, part: str) -> int:
        if not self.free[part]:
            self._resize(part, max(8, 2 * self._capacity(part)))
        return self.free[part].pop()

    def _capacity(self, part: str) -> int:
        return self.valid[part].shape[0] if part in self.valid else 0

    def _resize(self, part: str, cap: int, keep: Tensor | None = None) -> None:
        """Make the part's pools hold `cap` pages; `keep` (live page ids, in order) compacts them to the front."""
        kept = self._capacity(part) if keep is None else len(keep)  # growing keeps every page where it is
        for j in range(self.n_layers[part]):
            for pools in (self.k, self.v):
                new = torch.empty(cap, self.P, self.H, self.D, dtype=self.dtype, device=self.device)
                if kept:
                    src = pools[(part, j)]
                    new[:kept] = src[:kept] if keep is None else src.index_select(0, keep)
                new[kept:].zero_()  # free pages stay finite: masked keys must not put NaN into attention
                pools[(part, j)] = new
        valid = torch.zeros(cap, self.P, dtype=torch.bool, device=self.device)
        if kept:
            valid[:kept] = self.valid[part][:kept] if keep is None else self.valid[part][keep]
        self.valid[part] = valid
        self.free[part] = list(range(cap - 1, kept - 1, -1))

    def release(self, row: int) -> None:
        """Give back every page row `row` holds (its request finished or its client left)."""
        for part, owned in self.owned.items():
            pages = list(owned.pop(row, {}).values())
            if not pages:
                continue
            self.table[part][row] = -1
            self.valid[part][pages] = False
            self.free[part].extend(pages)
            self._maybe_compact(part)

    def _maybe_compact(self, part: str) -> None:
        """Shrink a pool that is at most a quarter used to twice its live pages, moving them to the front."""
        cap, live = self._capacity(part), sum(len(p) for p in self.owned[part].values())
        if cap <= 8 or 4 * live > cap:
            return
        keep = sorted(page for held in self.owned[part].values() for page in held.values())
        remap = torch.full((cap,), -1, dtype=torch.long, device=self.device)
        remap[keep] = torch.arange(len(keep), device=self.device)
        table = self.table[part]
        self.table[part] = torch.where(table >= 0, remap[table.clamp(min=0)], -1)
        new_id = {old: new for new, old in enumerate(keep)}
        self.owned[part] = {row: {at: new_id[p] for at, p in held.items()} for row, held in self.owned[part].items()}
        self._resize(part, max(8, 2 * len(keep)), torch.tensor(keep, dtype=torch.long, device=self.device))

    # ---------------------------------------------------------------------------------------------- sizes
    def _page_bytes(self, part: str) -> int:
        """Bytes of one page of keys and values across the part's layers."""
        return 2 * self.n_layers[part] * self.P * self.H * self.D * torch.empty((), dtype=self.dtype).element_size()

    def bytes_in_use(self) -> int:
        """Bytes of keys and values in the pages live rows hold."""
        return sum(len(p) * self._page_bytes(part) for part, owned in self.owned.items() for p in owned.values())

    def nbytes(self) -> int:
        """Bytes the pools hold for keys and values, live or free (validity masks and page tables excluded)."""
        return sum(t.nbytes for d in (self.k, self.v) for t in d.values())


def kv_bytes_per_token(config: RecurrentDepthConfig, kv_sharing: str | int | SharingPolicy, num_steps: int,
                       dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values one token holds at recurrence depth `num_steps` under a sharing policy: the distinct
    slots its layer invocations map to (prelude + coda + the core's: every step for full and latest, whose fill
    makes an exited token occupy its deeper steps too; k per core layer for cyclic k) x 2 (k and v) x n_heads x
    head_dim x the dtype's size (bytes). Sizes a deployment: multiply by the live tokens."""
    policy = make_kv_policy(kv_sharing)
    keys = [LayerKey("prelude", j) for j in range(config.n_layers_in_prelude)]
    keys += [LayerKey("coda", j) for j in range(config.n_layers_in_coda)]
    keys += [LayerKey("core", j, i) for i in range(num_steps) for j in range(config.n_layers_in_recurrent_block)]
    slots = {policy.slot(key) for key in keys}
    return len(slots) * 2 * config.n_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
