"""Kernels of the aggregation write path: compiled with numba when it is installed (the
aggregator's ``fast`` extra), numpy otherwise.

:func:`group_by_key` is a hash group-by of link observations (radix-partitioned, then an
open-addressing table per partition), O(n) instead of the O(n log n) sort it replaced. Each
group's sums add its rows in row order, so the statistics do not depend on the hash; groups
come out ordered by partition, then by first appearance. Without numba (or with
``CIRCUITS_NO_NUMBA=1``), :func:`group_by_key` is the numpy version (one sort, then segment
reductions; groups ordered by key), with the same statistics.

:func:`merge_partials` merges rows of partial statistics the same way (compaction).
"""

from __future__ import annotations

import os

import numpy as np

from circuits_core.jit import prepare_numba

try:
    if os.environ.get("CIRCUITS_NO_NUMBA"):
        raise ImportError("CIRCUITS_NO_NUMBA is set")
    _CACHE = prepare_numba() is not None  # no writable folder: compile in memory only
    from numba import njit
except ImportError:
    njit = None

#: Whether :func:`group_by_key` is the compiled kernel.
COMPILED = njit is not None


def _partitioned(keys):  # pragma: no cover - compiled with its callers
    """``(starts, dest, part_keys, part_hashes, table_bits)``: ``keys`` scattered (stably) into 256
    partitions by the top bits of their hash (one partition for small inputs). Row i moves to
    ``dest[i]``; partition p holds positions ``starts[p]:starts[p + 1]`` of ``part_keys`` (and of
    any column passed through :func:`_scatter`), with their hashes, partition bits shifted out;
    ``table_bits`` sizes an open-addressing table that holds the largest partition half full.

    Grouping one partition at a time keeps the table in cache (one big table missed the cache on
    nearly every row: ~100 ns a row), and the columns are read in order while grouping."""
    n = keys.shape[0]
    golden = np.uint64(0x9E3779B97F4A7C15)
    parts = 256 if n > 65536 else 1
    part_shift = np.uint64(56)
    sizes = np.zeros(parts + 1, dtype=np.int64)
    for i in range(n):
        h = np.uint64(keys[i]) * golden
        sizes[(np.int64(h >> part_shift) if parts > 1 else 0) + 1] += 1
    starts = np.cumsum(sizes)
    fill = starts[:-1].copy()
    dest = np.empty(n, dtype=np.int64)
    part_keys = np.empty(n, dtype=np.int64)
    part_hashes = np.empty(n, dtype=np.uint64)
    for i in range(n):
        h = np.uint64(keys[i]) * golden
        p = np.int64(h >> part_shift) if parts > 1 else 0
        j = fill[p]
        fill[p] = j + 1
        dest[i] = j
        part_keys[j] = keys[i]
        part_hashes[j] = h << np.uint64(8) if parts > 1 else h
    largest = 0
    for p in range(parts):
        largest = max(largest, starts[p + 1] - starts[p])
    table_bits = 4
    while (1 << table_bits) < 2 * largest:
        table_bits += 1
    return starts, dest, part_keys, part_hashes, table_bits


def _scatter(values, dest):  # pragma: no cover - compiled with its callers
    out = np.empty_like(values)
    for i in range(values.shape[0]):
        out[dest[i]] = values[i]
    return out


def _slot_of(slots, key, keys_out, h, mask):  # pragma: no cover - compiled with its callers
    """The slot of ``key`` (linear probing from hash ``h``): ``(slot, group)``, group -1 when new."""
    while True:
        g = slots[h]
        if g < 0 or keys_out[g] == key:
            return h, g
        h = (h + 1) & mask


def _group_columns(n):  # pragma: no cover - compiled with its callers
    """Room for ``n`` groups: key, count, sum, abs sum, sum of squares, min, max."""
    return (np.empty(n, dtype=np.int64), np.zeros(n, dtype=np.int64), np.empty(n, dtype=np.float64),
            np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64),
            np.empty(n, dtype=np.float64))  # fmt: skip


def _table_mask(rows):  # pragma: no cover - compiled with its callers
    """``(mask, shift)`` of a table for ``rows`` keys, at most half full."""
    bits = 4
    while (1 << bits) < 2 * rows:
        bits += 1
    return (1 << bits) - 1, np.uint64(64 - bits)


def _fold(keys, count, total, absolute, square, low, high, raw):  # pragma: no cover - compiled with its callers
    """Rows folded per distinct key: ``(n_groups, key, count, sum, abs sum, sum of squares, min,
    max)``, the first ``n_groups`` rows of each array. ``raw``: row i is one observation of weight
    ``total[i]`` (the other columns are not read); else row i holds partial statistics. Rows are
    folded one hash partition at a time (:func:`_partitioned`), each group in row order."""
    n = keys.shape[0]
    starts, dest, part_keys, part_hashes, table_bits = _partitioned(keys)
    t_in = _scatter(total, dest)
    if raw:
        c_in, a_in, s_in, lo_in, hi_in = count, t_in, t_in, t_in, t_in
    else:
        c_in, a_in, s_in = _scatter(count, dest), _scatter(absolute, dest), _scatter(square, dest)
        lo_in, hi_in = _scatter(low, dest), _scatter(high, dest)
    slots = np.empty(1 << table_bits, dtype=np.int64)
    key, c_out, t_out, a_out, s_out, lo_out, hi_out = _group_columns(n)
    groups = 0
    for p in range(starts.shape[0] - 1):
        mask, shift = _table_mask(starts[p + 1] - starts[p])
        slots[: mask + 1] = -1
        for j in range(starts[p], starts[p + 1]):
            k = part_keys[j]
            t = t_in[j]
            if raw:
                c, a, sq, lo, hi = 1, abs(t), t * t, t, t
            else:
                c, a, sq, lo, hi = c_in[j], a_in[j], s_in[j], lo_in[j], hi_in[j]
            h, g = _slot_of(slots, k, key, np.int64(part_hashes[j] >> shift), mask)
            if g < 0:
                slots[h] = groups
                key[groups] = k
                c_out[groups] = c
                t_out[groups] = t
                a_out[groups] = a
                s_out[groups] = sq
                lo_out[groups] = lo
                hi_out[groups] = hi
                groups += 1
            else:
                c_out[g] += c
                t_out[g] += t
                a_out[g] += a
                s_out[g] += sq
                if lo < lo_out[g]:
                    lo_out[g] = lo
                if hi > hi_out[g]:
                    hi_out[g] = hi
    return groups, key, c_out, t_out, a_out, s_out, lo_out, hi_out


def _group_by_key_hashed(keys, weights):  # pragma: no cover - compiled; the tests call it compiled and as .py_func
    """``(n_groups, key, count, weight_sum, weight_abs_sum, weight_sq_sum, weight_min, weight_max)``
    of the rows ``(keys[i], weights[i])``, per distinct key (first ``n_groups`` rows of each array)."""
    return _fold(keys, np.empty(0, dtype=np.int64), weights, weights, weights, weights, weights, True)


def _merge_partials_hashed(keys, count, total, absolute, square, low, high):  # pragma: no cover - compiled
    """Partial statistics rows (as :func:`group_by_key` returns them) merged per distinct key:
    ``(n_groups, key, count, weight_sum, weight_abs_sum, weight_sq_sum, weight_min, weight_max)``
    (compaction; the same statistics as grouping the original observations)."""
    return _fold(keys, count, total, absolute, square, low, high, False)


def _pack_edge_keys_into(src_layer, src_neuron, tgt_layer, tgt_neuron, out, at):  # pragma: no cover - compiled
    """``out[at:at + n]`` = the packed keys ``src_layer << 52 | src_neuron << 31 | tgt_layer << 21 |
    tgt_neuron`` of ``n`` edges (the store's edge key)."""
    for i in range(src_layer.shape[0]):
        out[at + i] = ((np.int64(src_layer[i]) << 52) | (np.int64(src_neuron[i]) << 31)
                       | (np.int64(tgt_layer[i]) << 21) | np.int64(tgt_neuron[i]))  # fmt: skip


def _pack_edge_keys_into_numpy(src_layer, src_neuron, tgt_layer, tgt_neuron, out, at):
    out[at:at + src_layer.shape[0]] = (
        (src_layer.astype(np.int64) << 52) | (src_neuron.astype(np.int64) << 31)
        | (tgt_layer.astype(np.int64) << 21) | tgt_neuron.astype(np.int64)
    )  # fmt: skip


def _split_once(groups, key, count, total, absolute, square, low, high):  # pragma: no cover - compiled
    """The first ``groups`` rows of grouped statistics split, in order, into those of keys seen once
    ``(key, weight)`` and the others ``(key, count, sum, abs sum, sum of squares, min, max)``."""
    once = 0
    for g in range(groups):
        if count[g] == 1:
            once += 1
    many = groups - once
    single_k, single_w = np.empty(once, dtype=np.int64), np.empty(once, dtype=np.float64)
    k, c, t, a, s, lo, hi = _group_columns(many)
    i = j = 0
    for g in range(groups):
        if count[g] == 1:
            single_k[i] = key[g]
            single_w[i] = total[g]
            i += 1
        else:
            k[j], c[j], t[j], a[j], s[j], lo[j], hi[j] = key[g], count[g], total[g], absolute[g], square[g], low[g], high[g]
            j += 1
    return single_k, single_w, k, c, t, a, s, lo, hi


def _split_once_numpy(groups, key, count, total, absolute, square, low, high):
    once = count[:groups] == 1
    many = np.flatnonzero(~once)
    return (key[:groups][once], total[:groups][once],
            *(column[many] for column in (key, count, total, absolute, square, low, high)))  # fmt: skip


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Row numbers where each run of equal keys starts in ``sorted_keys`` (non-empty)."""
    change = np.empty(sorted_keys.shape[0], dtype=bool)
    change[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=change[1:])
    return np.flatnonzero(change)


def group_by_key_sorted(keys, weights):
    """:func:`group_by_key` in numpy: one sort of the keys, then segment reductions."""
    n = keys.shape[0]
    if not n:
        empty = np.empty(0, dtype=np.float64)
        return 0, keys.copy(), np.empty(0, dtype=np.int64), empty, empty, empty, empty, empty
    order = np.argsort(keys)
    k = keys[order]
    w = weights[order]
    starts = group_starts(k)
    return (starts.shape[0], k[starts], np.diff(np.append(starts, n)), np.add.reduceat(w, starts),
            np.add.reduceat(np.abs(w), starts), np.add.reduceat(w * w, starts), np.minimum.reduceat(w, starts),
            np.maximum.reduceat(w, starts))  # fmt: skip


def merge_partials_sorted(keys, count, total, absolute, square, low, high):
    """:func:`merge_partials` in numpy: one sort of the keys, then segment reductions."""
    if not keys.shape[0]:
        return 0, keys.copy(), count.copy(), total.copy(), absolute.copy(), square.copy(), low.copy(), high.copy()
    order = np.argsort(keys)
    k = keys[order]
    starts = group_starts(k)
    sums = (np.add.reduceat(column[order], starts) for column in (count, total, absolute, square))
    return (starts.shape[0], k[starts], *sums, np.minimum.reduceat(low[order], starts),
            np.maximum.reduceat(high[order], starts))  # fmt: skip


if COMPILED:
    _partitioned = njit(cache=_CACHE, nogil=True)(_partitioned)
    _scatter = njit(cache=_CACHE, nogil=True)(_scatter)
    _slot_of = njit(cache=_CACHE, nogil=True)(_slot_of)
    _table_mask = njit(cache=_CACHE, nogil=True)(_table_mask)
    _group_columns = njit(cache=_CACHE, nogil=True)(_group_columns)
    _fold = njit(cache=_CACHE, nogil=True, inline="always")(_fold)  # the raw flag folds away in each caller
    group_by_key = njit(cache=_CACHE, nogil=True)(_group_by_key_hashed)
    merge_partials = njit(cache=_CACHE, nogil=True)(_merge_partials_hashed)
    pack_edge_keys_into = njit(cache=_CACHE, nogil=True)(_pack_edge_keys_into)
    split_once = njit(cache=_CACHE, nogil=True)(_split_once)
else:
    group_by_key = group_by_key_sorted
    merge_partials = merge_partials_sorted
    pack_edge_keys_into = _pack_edge_keys_into_numpy
    split_once = _split_once_numpy


def warm() -> None:
    """Compile (or load from the disk cache) the kernels now: a server's first Ingest does not wait."""
    from circuits_core import wire

    groups = group_by_key(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float64))
    split_once(*groups)
    small = np.zeros(1, dtype=np.int32)
    pack_edge_keys_into(small, small, small, small, np.zeros(1, dtype=np.int64), 0)
    one = np.zeros(1, dtype=np.float64)
    merge_partials(np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64), one, one, one, one, one)
    wire.warm_graph_scan()
