"""The KV stores and sharing policies: slot mapping, holes and validity masks, the `latest` fill, truncation, crop,
growth, pages, and the reference's lookup strings."""

from __future__ import annotations

import pytest
import torch

from recurrent_depth.inference.cache import (
    CyclicSharing,
    FullSharing,
    KVCache,
    LatestSharing,
    RowKVCache,
    kv_bytes_per_token,
    make_kv_policy,
)
from recurrent_depth.inference.compat import cache_policy_from_lookup
from recurrent_depth.model.layers import LayerKey


def _kv(B: int, T: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((B, 2, T, 4), value), torch.full((B, 2, T, 4), -value)


def _kv1(B: int, T: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, 1 head, T, 2) for the RowKVCache tests."""
    return torch.full((B, 1, T, 2), value), torch.full((B, 1, T, 2), -value)


def test_policies_map_slots() -> None:
    key = LayerKey("core", 1, 5)
    assert FullSharing().slot(key) == key and LatestSharing().slot(key) == key
    assert CyclicSharing(2).slot(key) == LayerKey("core", 1, 1)
    assert CyclicSharing(1).slot(LayerKey("prelude", 0)) == LayerKey("prelude", 0)
    assert isinstance(make_kv_policy(3), CyclicSharing) and make_kv_policy("4").k == 4
    with pytest.raises(ValueError, match="valid: full, latest, <int k>"):
        make_kv_policy("most")


def test_row_cache_leaves_masked_holes_where_a_row_skipped_a_step() -> None:
    """Row 1's first token exited after one recurrence under `full`: at step 1 it has no key at position 0, and its
    next token does not see one there; row 0's does."""
    store = RowKVCache(n_heads=1, head_dim=2, n_layers={"core": 1}, max_rows=2, max_len=8,
                       dtype=torch.float32, device="cpu", page_size=4)
    policy, key = FullSharing(), LayerKey("core", 0, 0)
    store.bind([0, 1], [0, 0], 1, "core", [0, 0], [policy] * 2)
    store.update(key, *_kv1(2, 1, 1.0))
    store.bind([0], [0], 1, "core", [1], [policy])
    store.update(key, *_kv1(1, 1, 2.0))
    store.bind([0, 1], [1, 1], 1, "core", [1, 1], [policy] * 2)
    k, _, ok = store.update(key, *_kv1(2, 1, 3.0))
    assert ok[:, 0, 0].tolist() == [[True, True], [False, True]]
    assert k[0, 0, :, 0].tolist() == [2.0, 3.0]


def test_row_cache_truncate_forgets_later_positions() -> None:
    store = RowKVCache(n_heads=1, head_dim=2, n_layers={"prelude": 1}, max_rows=1, max_len=16,
                       dtype=torch.float32, device="cpu", page_size=4)
    key = LayerKey("prelude", 0)
    store.bind([0], [0], 6, "prelude")
    store.update(key, *_kv1(1, 6, 1.0))
    store.truncate(0, 3)  # positions 3.. (inside the first page and the whole second) hold nothing now
    store.bind([0], [5], 1, "prelude")
    _, _, ok = store.update(key, *_kv1(1, 1, 2.0))
    assert ok.flatten().tolist() == [True, True, True, False, False, True]


def test_gap_in_a_slot_is_masked() -> None:
    cache = KVCache("full")
    cache.update(LayerKey("core", 0, 0), *_kv(1, 2, 1.0))
    cache.commit(2)  # step 1's slot never saw these two positions (the tokens exited after one step)
    _, _, mask = cache.update(LayerKey("core", 0, 1), *_kv(1, 1, 2.0))
    assert mask[0, 0, 0].tolist() == [False, False, True]


def test_crop_and_growth() -> None:
    cache = KVCache()
    key = LayerKey("prelude", 0)
    for t in range(40):  # grows past its first 16 positions
        cache.update(key, *_kv(1, 1, float(t)))
        cache.commit(1)
    assert cache.slots[key].k.shape[2] >= 40 and cache.get_seq_length() == 40
    cache.crop(10)
    k, _, mask = cache.update(key, *_kv(1, 1, 99.0))
    assert k.shape[2] == 11 and mask is None and k[0, 0, :, 0].tolist() == [*map(float, range(10)), 99.0]
    full = KVCache("full", max_length=4)
    full.update(key, *_kv(1, 4, 1.0))
    full.commit(4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        full.update(key, *_kv(1, 1, 1.0))


def test_reference_lookup_strings() -> None:
    assert isinstance(cache_policy_from_lookup("full", 4), FullSharing)
    assert isinstance(cache_policy_from_lookup("latest-m4", 4), LatestSharing)
    assert cache_policy_from_lookup("latest-m4-compress-s4", 4) == CyclicSharing(1)
    assert cache_policy_from_lookup("latest-m4-compress-s16", 4) == CyclicSharing(4)
    with pytest.raises(ValueError, match="unsupported cache_lookup_strategy 'compress-anchor'"):
        cache_policy_from_lookup("compress-anchor", 4)


def test_row_cache_rows_are_right_aligned_and_isolated() -> None:  # moved from tests/serving (RowKVStore)
    store = RowKVCache(n_heads=1, head_dim=2, n_layers={"prelude": 1}, max_rows=3, max_len=32,
                       dtype=torch.float32, device="cpu", page_size=2)
    key = LayerKey("prelude", 0)
    store.bind([2], [0], 3, "prelude")
    k = torch.arange(6, dtype=torch.float32).view(1, 1, 3, 2)
    store.update(key, k, k)
    store.bind([0, 2], [0, 3], 1, "prelude")
    k_all, _, ok = store.update(key, torch.full((2, 1, 1, 2), 7.0), torch.full((2, 1, 1, 2), 7.0))
    assert k_all.shape == (2, 1, 4, 2)
    assert ok[:, 0, 0].tolist() == [[False, False, False, True], [True, True, True, True]]
    assert k_all[0, 0, -1].tolist() == [7.0, 7.0] and k_all[1, 0, :3].flatten().tolist() == list(range(6))
    store.release(2)
    store.bind([2], [0], 1, "prelude")
    _, _, ok = store.update(key, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    assert ok.flatten().tolist() == [True]  # nothing of the released row's earlier request is visible


def test_row_cache_pages_follow_live_tokens() -> None:
    page = 2 * 4 * 1 * 2 * 4  # k and v, page_size 4, H 1, D 2, fp32: one core layer
    store = RowKVCache(n_heads=1, head_dim=2, n_layers={"core": 1}, max_rows=2, max_len=64,
                       dtype=torch.float32, device="cpu", page_size=4)
    policy = FullSharing()
    for step in range(40):  # row 0: 5 positions at 40 recurrence steps -> 2 pages per step
        store.bind([0], [0], 5, "core", [step], [policy])
        store.update(LayerKey("core", 0, 0), *_kv1(1, 5, 1.0))
    store.bind([1], [0], 1, "core", [0], [policy])
    store.update(LayerKey("core", 0, 0), *_kv1(1, 1, 2.0))
    assert store.bytes_in_use() == (80 + 1) * page
    grown = store.nbytes()
    store.release(0)
    assert store.bytes_in_use() == page and store.nbytes() < grown / 8  # compacted: the pool shrank
    store.bind([1], [1], 1, "core", [0], [policy])
    k, _, ok = store.update(LayerKey("core", 0, 0), *_kv1(1, 1, 3.0))
    assert k[0, 0, :, 0].tolist() == [2.0, 3.0] and ok.flatten().tolist() == [True, True]  # row 1 moved intact


def test_row_cache_uses_the_layer_of_the_policy_slot() -> None:
    class SwapLayers(FullSharing):
        def slot(self, key: LayerKey) -> LayerKey:
            return LayerKey(key.part, 1 - key.layer, key.step) if key.part == "core" else key

    store = RowKVCache(n_heads=1, head_dim=2, n_layers={"core": 2}, max_rows=1, max_len=8,
                       dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="maps core layer 0"):
        store.bind([0], [0], 1, "core", [0], [SwapLayers()])


def test_latest_fill_in_the_row_cache() -> None:
    store = RowKVCache(n_heads=1, head_dim=2, n_layers={"core": 1}, max_rows=2, max_len=8,
                       dtype=torch.float32, device="cpu")
    policy = LatestSharing()
    for step in range(2):
        store.bind([1], [0], 1, "core", [step], [policy])
        store.update(LayerKey("core", 0, 0), *_kv1(1, 1, 10.0 + step))
    store.bind([1], [0], 1, "core", [1], [policy])
    policy.fill_exited(store, store.bound_rows, last_step=1, num_steps=4, n_core_layers=1, n_tokens=1)
    store.bind([1], [1], 1, "core", [3], [policy])
    k, _, ok = store.update(LayerKey("core", 0, 0), *_kv1(1, 1, 5.0))
    assert k[0, 0, :, 0].tolist() == [11.0, 5.0] and ok.flatten().tolist() == [True, True]


def test_kv_bytes_per_token_at_the_huginn_shape() -> None:
    from recurrent_depth.config import RecurrentDepthConfig

    cfg = RecurrentDepthConfig.from_name("huginn-3.5b")
    entry = 2 * 5280 * 4  # keys and values of one layer invocation, fp32
    assert kv_bytes_per_token(cfg, "full", 32) == (2 + 4 * 32 + 2) * entry  # 132 entries, ~5.6 MB
    assert kv_bytes_per_token(cfg, "latest", 32) == kv_bytes_per_token(cfg, "full", 32)
    assert kv_bytes_per_token(cfg, 1, 32) == 8 * entry
    assert kv_bytes_per_token(cfg, 1, 32, torch.bfloat16) == 4 * entry


@pytest.mark.parametrize("kv_sharing", ["full", 3])
def test_kv_bytes_per_token_matches_what_generate_holds(debug_model, kv_sharing) -> None:
    from recurrent_depth.inference.generate import generate

    ids = torch.tensor([[3, 4, 5, 6]])
    out = generate(debug_model, ids, max_new_tokens=4, num_steps=5, kv_sharing=kv_sharing)
    assert out.kv_cache_bytes == 8 * kv_bytes_per_token(debug_model.config, kv_sharing, 5)
