"""The KV cache (`engine/cache.py`): growth in 256-steps, the max_size cap, reserve, trim."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx.engine.cache import STEP, KVCache

BATCH, KV_HEADS, HEAD_DIM = 1, 2, 4


def positions(start: int, count: int) -> tuple[mx.array, mx.array]:
    """Keys and values for positions start..start+count-1 whose entries encode the position
    (keys: +p, values: -p), so any misplaced or lost entry is visible."""
    p = np.arange(start, start + count, dtype=np.float32)[None, None, :, None]
    keys = np.broadcast_to(p + np.arange(HEAD_DIM) / 10, (BATCH, KV_HEADS, count, HEAD_DIM))
    return mx.array(keys), mx.array(-keys)


def expected(count: int) -> tuple[np.ndarray, np.ndarray]:
    keys, values = positions(0, count)
    return np.array(keys), np.array(values)


def fill(cache: KVCache, sizes: list[int]) -> tuple[mx.array, mx.array]:
    out = None
    for size in sizes:
        out = cache.update_and_fetch(*positions(cache.offset, size))
    return out


def test_step_is_256():
    assert STEP == 256


def test_empty_cache_holds_nothing():
    cache = KVCache(4096)
    assert (cache.capacity, cache.offset, cache.nbytes) == (0, 0, 0)


def test_capacity_grows_in_steps_of_256():
    cache = KVCache(4096)
    capacities = []
    for _ in range(600):
        fill(cache, [1])
        capacities.append(cache.capacity)
    assert capacities[0] == 256 and capacities[255] == 256
    assert capacities[256] == 512 and capacities[511] == 512
    assert capacities[512] == 768
    assert all(c % 256 == 0 for c in capacities)
    assert cache.nbytes == 2 * BATCH * KV_HEADS * 768 * HEAD_DIM * 4


def test_one_big_write_rounds_up_to_a_step():
    cache = KVCache(4096)
    keys, values = fill(cache, [300])
    assert cache.capacity == 512 and cache.offset == 300
    assert keys.shape == (BATCH, KV_HEADS, 300, HEAD_DIM)


def test_values_survive_growth():
    cache = KVCache(4096)
    keys, values = fill(cache, [200, 1, 55, 1, 300, 7])  # crosses 256 and 512 (twice growing)
    assert cache.offset == 564 and cache.capacity == 768
    want_keys, want_values = expected(564)
    np.testing.assert_array_equal(np.array(keys), want_keys)
    np.testing.assert_array_equal(np.array(values), want_values)


def test_capacity_never_exceeds_max_size():
    cache = KVCache(300)
    fill(cache, [250])
    assert cache.capacity == 256
    keys, _ = fill(cache, [10])
    assert cache.capacity == 300  # a whole step would be 512: capped
    fill(cache, [40])
    assert cache.offset == cache.capacity == 300
    np.testing.assert_array_equal(np.array(cache.keys), expected(300)[0])


def test_write_past_max_size_raises_and_changes_nothing():
    cache = KVCache(300)
    fill(cache, [299])
    with pytest.raises(ValueError, match="300"):
        cache.update_and_fetch(*positions(299, 2))
    assert cache.offset == 299
    fill(cache, [1])  # the last position still fits
    with pytest.raises(ValueError):
        cache.update_and_fetch(*positions(300, 1))
    np.testing.assert_array_equal(np.array(cache.values), expected(300)[1])


def test_reserve_before_the_first_write_sizes_the_first_allocation():
    cache = KVCache(4096)
    cache.reserve(700)
    assert cache.capacity == 0  # nothing allocated until the shapes are known
    fill(cache, [5])
    assert cache.capacity == 768
    fill(cache, [1] * 700)  # decode up to the reservation: no further growth
    assert cache.capacity == 768


def test_reserve_grows_an_existing_cache_ahead_and_keeps_values():
    cache = KVCache(4096)
    fill(cache, [100])
    cache.reserve(1000)
    assert cache.capacity == 1024
    keys, values = fill(cache, [1])
    np.testing.assert_array_equal(np.array(keys), expected(101)[0])
    cache.reserve(10)  # smaller than what is there: nothing shrinks
    assert cache.capacity == 1024


def test_reserve_is_capped_by_max_size_and_refuses_more():
    cache = KVCache(1000)
    fill(cache, [1])
    cache.reserve(1000)
    assert cache.capacity == 1000
    with pytest.raises(ValueError, match="1000"):
        cache.reserve(1001)


def test_trim_forgets_the_tail_and_later_writes_replace_it():
    cache = KVCache(4096)
    fill(cache, [50])
    cache.trim(30)
    assert cache.offset == 30
    new_keys = mx.full((BATCH, KV_HEADS, 5, HEAD_DIM), 1000.0)
    keys, values = cache.update_and_fetch(new_keys, -new_keys)
    assert keys.shape[2] == 35
    want = expected(30)[0]
    np.testing.assert_array_equal(np.array(keys)[:, :, :30], want)
    assert (np.array(keys)[:, :, 30:] == 1000.0).all() and (np.array(values)[:, :, 30:] == -1000.0).all()


def test_trim_never_extends():
    cache = KVCache(4096)
    fill(cache, [10])
    cache.trim(50)
    assert cache.offset == 10
    cache.trim(0)
    assert cache.offset == 0
    keys, _ = cache.update_and_fetch(*positions(0, 3))
    np.testing.assert_array_equal(np.array(keys), expected(3)[0])


def test_dtype_follows_the_keys():
    cache = KVCache(512)
    keys, values = positions(0, 3)
    out_keys, out_values = cache.update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
    assert cache.keys.dtype == mx.float16 and out_values.dtype == mx.float16


@pytest.mark.parametrize("padded, reserve, max_size, nodes", [(128, 0, 4096, 1), (256, 0, 4096, 1),
                                                              (128, 600, 4096, 1), (256, 0, 200, 2)])
def test_fill_leaves_what_a_write_leaves_in_one_node_per_array(padded, reserve, max_size, nodes):
    """`fill` from a padded prefill's keys: the offset, capacity and contents below the offset of
    the eager write of the same positions, each array one graph node (a pad, or a contiguous copy; a cut as well where max_size is below the
    padded length)."""
    from foundry_mlx.engine.decoder import graph_nodes

    length = 100 if padded == 128 else 150
    keys, values = positions(0, padded)
    mx.eval(keys, values)
    filled, written = KVCache(max_size), KVCache(max_size)
    for cache in (filled, written):
        cache.reserve(reserve)
    filled.fill(keys, values, length)
    written.update_and_fetch(keys[..., :length, :], values[..., :length, :])
    assert filled.offset == written.offset == length
    assert filled.capacity == written.capacity
    assert graph_nodes(filled.keys) == graph_nodes(filled.values) == nodes
    np.testing.assert_array_equal(np.array(filled.keys[..., :length, :]), expected(length)[0])
    np.testing.assert_array_equal(np.array(filled.values[..., :length, :]), expected(length)[1])


def test_fill_needs_an_empty_cache():
    cache = KVCache(512)
    fill(cache, [3])
    with pytest.raises(ValueError, match="empty"):
        cache.fill(*positions(0, 128), 5)
