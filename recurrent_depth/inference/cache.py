"""KV caches across recurrence steps, with the sharing policy as an object: `RowKVCache` (paged, rows that join and
leave, each at its own position: every decoder's store, through `recurrent_depth.inference.rows.RowEngine`) and
`KVCache` (one dense slot per layer invocation: the transformers-facing cache of `model(ids, use_cache=True)` and HF
`generate`).

Every attention-layer invocation (prelude layer j, core layer j at recurrence i, coda layer j; see `LayerKey`) reads
and writes a *slot*. Which slot is the policy's choice:

    FullSharing()      one slot per (recurrence step, core layer): Huginn's default `full` lookup. A token that
                       exited early leaves holes in deeper slots; later tokens at those steps do not see it.
    LatestSharing()    same slots, but a token that exited after n steps is read, at deeper steps, from its latest
                       computed step (the reference's `latest-m4`): the engine calls `fill_exited` at the exit.
    CyclicSharing(k)   k recurrence slots per core layer, reused cyclically (step i -> slot i mod k); k = 1 is one
                       cache per physical layer (the reference's `latest-m4-compress-s{4k}` for a 4-layer core).

    make_kv_policy("full" | "latest" | k)  -> the policy object; anything else is a ValueError naming the choices.

`RowKVCache`'s storage is pages of positions, taken and given back per row (its class docstring); positions a row
never wrote at a slot are invalid and masked out of attention. `KVCache`'s is one (B, H, capacity, D) tensor per slot
for keys and values; writes go to positions [seq_len, seq_len + T) of every row, `commit(T)` advances.
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
    """What a policy needs from a cache to fill an exited token's deeper slots (`RowKVCache`): for each (src, dst)
    pair of core slots, copy the positions being written now (the forward in progress) of `rows` from src to dst."""

    def copy_slots(self, pairs: list[tuple[LayerKey, LayerKey]], rows: Tensor, n_tokens: int) -> None:
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
        pairs = [(self.slot(LayerKey("core", j, last_step)), self.slot(LayerKey("core", j, i)))
                 for j in range(n_core_layers) for i in range(last_step + 1, num_steps)]
        if pairs:
            cache.copy_slots(pairs, rows, n_tokens)


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
        self.k, self.v, self.valid = k, v, valid  # (B, H, C, D), (B, H, C, D), (C,)
        self.written = 0  # positions [0, written) have been reached
        self.holes = False  # some position below `written` was never written


class KVCache:
    """The transformers-facing cache: one slot per layer invocation under a sharing policy (default: Huginn's
    `full`), for `model(ids, use_cache=True)`, `past_key_values` / `cache` and HF `generate`.

    Every forward writes the T positions [seq_len, seq_len + T) of every slot it computes, for every row (padding is
    the forward's own mask), then calls `commit(T)`. A slot that a forward skipped (a later forward ran more
    recurrences than an earlier one) has holes there, masked out of attention. `KVCache()` with no arguments grows
    on demand; `max_length` preallocates. Our own decoders use the paged `RowKVCache`.
    """

    is_compileable = False  # transformers' generate inspects this

    def __init__(self, policy: str | int | SharingPolicy | None = "full", max_length: int | None = None) -> None:
        self.policy = make_kv_policy(policy)
        self.max_length = max_length
        self.seq_len = 0
        self.slots: dict[LayerKey, _Slot] = {}
        self.peak_bytes = 0

    # -------------------------------------------------------------------------------------------- protocol
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seq_len

    def reserve(self, key: LayerKey, like: Tensor) -> _Slot:
        """The bookkeeping of a write of T positions [seq_len, seq_len + T), without the write: the slot (allocated
        or grown as needed), its holes and validity. `like` gives the write's shape (B, H, T, D), dtype and device:
        the keys themselves (`update`) or an expanded scalar (the fused forward, `recurrent_depth.inference.fused`,
        which writes keys and values in place)."""
        start, end = self.seq_len, self.seq_len + like.shape[2]
        slot = self._slot(self.policy.slot(key), like, end)
        if start > slot.written and not slot.holes:  # positions [written, start) never written
            slot.valid[: slot.written] = True  # validity is tracked from the first hole on
            slot.holes = True
        if slot.holes:
            slot.valid[start:end] = True
        slot.written = max(slot.written, end)
        return slot

    def update(self, key: LayerKey, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write k, v (B, H, T, D) at [seq_len, seq_len + T); return keys and values (B, H, S, D) with
        S = seq_len + T and a validity mask (B, 1, 1, S), or None when every position is valid."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        slot = self.reserve(key, k)
        slot.k[:, :, start:end] = k
        slot.v[:, :, start:end] = v
        ks, vs = slot.k[:, :, :end], slot.v[:, :, :end]
        if not slot.holes:
            return ks, vs, None
        return ks, vs, slot.valid[:end].expand(k.shape[0], 1, 1, end)

    def commit(self, n_tokens: int) -> None:
        """Advance past the T positions the last forward wrote."""
        self.seq_len += n_tokens

    def crop(self, length: int) -> None:
        """Drop every position at or after `length`."""
        self.seq_len = min(self.seq_len, length)
        for slot in self.slots.values():
            if slot.written > length:
                if slot.holes:
                    slot.valid[length:] = False
                slot.written = length

    def nbytes(self) -> int:
        """Bytes currently allocated for keys and values (validity masks excluded)."""
        return sum(s.k.nbytes + s.v.nbytes for s in self.slots.values())

    def core_nbytes(self) -> int:
        """Bytes allocated for the core's slots only."""
        return sum(s.k.nbytes + s.v.nbytes for key, s in self.slots.items() if key.part == "core")

    # -------------------------------------------------------------------------------------------- storage
    def _slot(self, key: LayerKey, like: Tensor, end: int) -> _Slot:
        """The slot `key` with room for `end` positions, allocated (shaped and typed after `like`, (B, H, T, D)) or
        grown as needed."""
        slot = self.slots.get(key)
        if slot is None:
            B, H, _, D = like.shape
            if self.max_length is not None and end > self.max_length:
                raise ValueError(f"KV cache holds {self.max_length} positions, a write reaches {end}")
            cap = self.max_length if self.max_length is not None else max(end, 16)
            slot = _Slot(like.new_zeros(B, H, cap, D), like.new_zeros(B, H, cap, D),
                         torch.zeros(cap, dtype=torch.bool, device=like.device))
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
            slot.valid = torch.cat([slot.valid, slot.valid.new_zeros(grow)])
            self.peak_bytes = max(self.peak_bytes, self.nbytes())
        return slot


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
    policy's `fill_exited`, through `copy_slots`. The fused CPU op reads and writes the pages in
    place through the bound rows' page tables (`paged`; `recurrent_depth.inference.fused`), for one or several
    recurrences per call.
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
        self._slots: list[list[list[int]]] = []  # per bound recurrence, per layer: each bound row's slot
        self._index: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] = {}  # slots -> (write, read, ok) indices
        self._T, self._part = 0, "prelude"
        self._host: tuple[list[int], list[int]] = ([], [])
        self.live_pages: dict[str, int] = {}  # part -> pages live rows hold
        self.peak_bytes = 0  # the most bytes of keys and values live rows held at once (`bytes_in_use`'s peak)
        self.peak_core_bytes = 0  # the same for the core's pages alone

    # ------------------------------------------------------------------------------------------ binding
    def bind(self, rows: list[int], starts: list[int], T: int, part: str,
             steps: list[int] | None = None, policies: list[SharingPolicy] | None = None, num_steps: int = 1) -> None:
        """Set the rows of the next layer calls (store row ids), the position each writes from, the new tokens T
        per row and the part; for the core, each row's first recurrence step and sharing policy, and how many
        recurrences (`num_steps`) the calls run: core layer j at recurrence `steps_b + o` is `LayerKey("core", j, o)`
        to `update` and the fused op. Pages for every position the rows will write are taken here (host-side
        bookkeeping, no device sync in the layers)."""
        if part not in self.n_layers:
            raise ValueError(f"unknown part {part!r}; valid: {', '.join(self.n_layers)}")
        L = self.n_layers[part]
        slots = [[[0] * len(rows) for _ in range(L)]]
        if part == "core":
            if steps is None or policies is None:
                raise ValueError("binding the core needs each row's recurrence step and sharing policy")
            slots = [[[self._core_slot(p, j, s + o) for p, s in zip(policies, steps)] for j in range(L)]
                     for o in range(num_steps)]
        for i, (row, start) in enumerate(zip(rows, starts)):
            for slot in {j_slots[i] for o_slots in slots for j_slots in o_slots}:
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

    def paged(self, part: str, n_rows: int, n_tokens: int, first: int,
              num_steps: int) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor, Tensor]:
        """The fused op's view of the bound rows (`torch.ops.rdepth.blocks_paged`): the part's key and value pools,
        one per layer, (pages, P, H, D); one page table (n, max_pages) per (recurrence, layer), recurrence-major,
        for the bound offsets first .. first + num_steps - 1; each row's first new position (n,); and the part's
        validity flags (pages * P,), which the op sets where it writes. No key is copied."""
        if (self._rows is None or part != self._part or n_rows != self._rows.shape[0] or n_tokens != self._T
                or first < 0 or first + num_steps > len(self._slots)):
            raise RuntimeError("RowKVCache.paged called without a matching bind()")
        L = self.n_layers[part]
        table, tables, made = self.table[part], [], {}
        for o in range(first, first + num_steps):
            for j in range(L):
                slots = tuple(self._slots[o][j])
                if slots not in made:
                    made[slots] = table[self._rows, torch.tensor(slots, device=self.device)].contiguous()
                tables.append(made[slots])
        return ([self.k[(part, j)] for j in range(L)], [self.v[(part, j)] for j in range(L)], tables, self._start,
                self.valid[part].view(-1))

    def _bound(self, key: LayerKey, n_rows: int, n_tokens: int,
               caller: str) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The flat key and value pools (pages * P, H, D) of layer `key` and the bound rows' indices at its slots
        (`_indices`), once the call is checked against the last `bind` (part, rows, T)."""
        offset = key.step if key.part == "core" else 0
        if (self._rows is None or key.part != self._part or n_rows != self._rows.shape[0] or n_tokens != self._T
                or not 0 <= offset < len(self._slots)):
            raise RuntimeError(f"RowKVCache.{caller} called without a matching bind()")
        K = self.k[(key.part, key.layer)].view(-1, self.H, self.D)
        V = self.v[(key.part, key.layer)].view(-1, self.H, self.D)
        return K, V, self._indices(self._slots[offset][key.layer])

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
        """Flat pool indices (page * P + offset) of rows' positions pos (n, X) at slot (n, 1), or at each of m slots
        (m, 1, 1) -> (m, n, X); < 0: no page."""
        page = self.table[part][rows[:, None], slot, pos // self.P]
        return torch.where(page >= 0, page * self.P + pos % self.P, -1)

    def copy_slots(self, pairs: list[tuple[LayerKey, LayerKey]], rows: Tensor, n_tokens: int) -> None:
        """For each (src, dst) pair of core slots, copy the bound rows' current positions (the forward just run) from
        src to dst (the sharing policy's `fill_exited`): the page lookups once for all the slots named, then one
        gather and one write per layer's pools; `rows` must be the bound rows."""
        if self._rows is None or not torch.equal(rows.to(self.device), self._rows) or n_tokens != self._T:
            raise RuntimeError("RowKVCache.copy_slots needs the rows and T of the last bind()")
        host_rows, starts = self._host
        steps = sorted({key.step for pair in pairs for key in pair})
        for step in {dst.step for _, dst in pairs}:
            for row, start in zip(host_rows, starts):
                self._take_pages("core", row, step, start, start + n_tokens)
        pos = self._start[:, None] + torch.arange(n_tokens, device=self.device)  # (n, T)
        slots = torch.tensor(steps, device=self.device)[:, None, None]
        flat = self._flat("core", self._rows, slots, pos).view(len(steps), -1)  # (slots, n * T)
        at = {step: i for i, step in enumerate(steps)}
        by_layer: dict[int, tuple[list[int], list[int]]] = {}
        for src, dst in pairs:
            src_i, dst_i = by_layer.setdefault(src.layer, ([], []))
            src_i.append(at[src.step])
            dst_i.append(at[dst.step])
        ok = self.valid["core"].view(-1)
        for layer, (src_i, dst_i) in by_layer.items():
            src_flat, dst_flat = flat[src_i].view(-1), flat[dst_i].view(-1)
            for pool in (self.k[("core", layer)], self.v[("core", layer)]):
                flat_pool = pool.view(-1, self.H, self.D)
                flat_pool[dst_flat] = flat_pool[src_flat]
            ok[dst_flat] = ok[src_flat]

    # ----------------------------------------------------------------------------------------------- pages
    def _take_pages(self, part: str, row: int, slot: int, start: int, end: int) -> None:
        """Give row `row` pages covering positions [start, end) at `slot` (no-op where it has them)."""
        if end > self.max_pages * self.P:
            raise ValueError(f"RowKVCache holds {self.max_pages * self.P} positions per row, a write reaches {end}")
        first, last = start // self.P, (end - 1) // self.P
        held = self.owned.get(part, {}).get(row)
        if held is not None and ((slot, first) in held if first == last else
                                 all((slot, n) in held for n in range(first, last + 1))):
            return  # the common case (a decode step inside a page it holds): no table lookup, no tensor write
        table = self._table(part, slot)
        held = self.owned[part].setdefault(row, {})
        missing = [n for n in range(first, last + 1) if (slot, n) not in held]
        for n in missing:
            held[slot, n] = page = self._new_page(part)
            table[row, slot, n] = page
        if missing:
            self.live_pages[part] = self.live_pages.get(part, 0) + len(missing)
            self.peak_bytes = max(self.peak_bytes, self.bytes_in_use())
            if part == "core":
                self.peak_core_bytes = max(self.peak_core_bytes, self.live_pages[part] * self._page_bytes(part))

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

    def truncate(self, row: int, length: int) -> None:
        """Mark row `row`'s positions at and after `length` as holding no key, in every slot (its pages stay)."""
        for part, owned in self.owned.items():
            for (_, n), page in owned.get(row, {}).items():
                if (n + 1) * self.P > length:
                    self.valid[part][page, max(0, length - n * self.P):] = False

    def release(self, row: int) -> None:
        """Give back every page row `row` holds (its request finished or its client left)."""
        for part, owned in self.owned.items():
            pages = list(owned.pop(row, {}).values())
            if not pages:
                continue
            self.table[part][row] = -1
            self.valid[part][pages] = False
            self.free[part].extend(pages)
            self.live_pages[part] -= len(pages)
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
        return 2 * self.n_layers[part] * self.P * self.H * self.D * self.dtype.itemsize

    def bytes_in_use(self) -> int:
        """Bytes of keys and values in the pages live rows hold."""
        return sum(n * self._page_bytes(part) for part, n in self.live_pages.items())

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
