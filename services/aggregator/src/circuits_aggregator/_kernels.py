"""Kernels of the aggregation write path: compiled with numba when it is installed (the
aggregator's ``fast`` extra), numpy otherwise.

:func:`group_by_key` is a hash group-by of link observations (radix-partitioned, then an
open-addressing table per partition), O(n) instead of the O(n log n) sort it replaced. Each
group's sums add its rows in row order, so the statistics do not depend on the hash; groups
come out ordered by partition, then by first appearance. Without numba (or with
``CIRCUITS_NO_NUMBA=1``), :func:`group_by_key` is the numpy version (one sort, then segment
reductions; groups ordered by key), with the same statistics.
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


def _group_by_key_hashed(keys, weights):  # pragma: no cover - compiled; the tests call it compiled and as .py_func
    """``(n_groups, key, count, weight_sum, weight_abs_sum, weight_sq_sum, weight_min, weight_max)``
    of the rows ``(keys[i], weights[i])``, per distinct key (first ``n_groups`` rows of each array).

    Radix-partitioned: rows are first scattered (stably) into 256 partitions by the top bits of
    their hash, then each partition is grouped with an open-addressing table small enough to stay
    in cache (one big table missed the cache on nearly every row: ~100 ns a row).
    """
    n = keys.shape[0]
    golden = np.uint64(0x9E3779B97F4A7C15)
    parts = 256 if n > 65536 else 1
    part_shift = np.uint64(56)
    hashes = np.empty(n, dtype=np.uint64)
    sizes = np.zeros(parts + 1, dtype=np.int64)
    for i in range(n):
        h = np.uint64(keys[i]) * golden
        hashes[i] = h
        if parts > 1:
            sizes[np.int64(h >> part_shift) + 1] += 1
        else:
            sizes[1] += 1
    starts = np.cumsum(sizes)  # partition p holds rows starts[p]:starts[p + 1]
    fill = starts[:-1].copy()
    part_keys = np.empty(n, dtype=np.int64)
    part_weights = np.empty(n, dtype=np.float64)
    part_hashes = np.empty(n, dtype=np.uint64)
    for i in range(n):
        p = np.int64(hashes[i] >> part_shift) if parts > 1 else 0
        j = fill[p]
        fill[p] = j + 1
        part_keys[j] = keys[i]
        part_weights[j] = weights[i]
        part_hashes[j] = hashes[i] << np.uint64(8) if parts > 1 else hashes[i]
    largest = 0
    for p in range(parts):
        largest = max(largest, starts[p + 1] - starts[p])
    table_bits = 4
    while (1 << table_bits) < 2 * largest:
        table_bits += 1
    slots = np.empty(1 << table_bits, dtype=np.int64)
    key = np.empty(n, dtype=np.int64)
    count = np.zeros(n, dtype=np.int64)
    total = np.empty(n, dtype=np.float64)
    absolute = np.empty(n, dtype=np.float64)
    square = np.empty(n, dtype=np.float64)
    low = np.empty(n, dtype=np.float64)
    high = np.empty(n, dtype=np.float64)
    groups = 0
    for p in range(parts):
        lo = starts[p]
        hi = starts[p + 1]
        bits = 4
        while (1 << bits) < 2 * (hi - lo):
            bits += 1
        mask = (1 << bits) - 1
        shift = np.uint64(64 - bits)
        slots[: 1 << bits] = -1
        for i in range(lo, hi):
            k = part_keys[i]
            w = part_weights[i]
            h = np.int64(part_hashes[i] >> shift)
            while True:
                g = slots[h]
                if g < 0:
                    slots[h] = groups
                    key[groups] = k
                    count[groups] = 1
                    total[groups] = w
                    absolute[groups] = abs(w)
                    square[groups] = w * w
                    low[groups] = w
                    high[groups] = w
                    groups += 1
                    break
                if key[g] == k:
                    count[g] += 1
                    total[g] += w
                    absolute[g] += abs(w)
                    square[g] += w * w
                    if w < low[g]:
                        low[g] = w
                    if w > high[g]:
                        high[g] = w
                    break
                h = (h + 1) & mask
    return groups, key, count, total, absolute, square, low, high

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


group_by_key = njit(cache=_CACHE, nogil=True)(_group_by_key_hashed) if COMPILED else group_by_key_sorted


def warm() -> None:
    """Compile (or load from the disk cache) the kernels now: a server's first Ingest does not wait."""
    from circuits_core import wire

    group_by_key(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float64))
    wire.warm_graph_scan()
