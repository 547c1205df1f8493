"""Keep the write path's large buffers in the heap between batches (glibc malloc only).

Each micro-batch allocates a few dozen arrays of 10-30 MB (concatenated columns, the group-by's
partitions and sums, the rows handed to storage). glibc serves blocks that large with a fresh
``mmap`` and unmaps them on free, so every batch faults all of that memory in again, page by
page: measured, the hash group-by of a 256-graph batch took ~150 ms with fresh pages and ~50 ms
with reused ones. :func:`keep_freed_memory` raises malloc's mmap and trim thresholds so those
blocks come from the heap and are reused, and keeps up to 256 MB of freed heap
instead of returning it at once. The resident set then stays nearer the write path's high-water
mark, which the batch size and one compaction pass bound (not the number of graphs): measured
with `benchmarks/aggregate_bench.py --rss`, 728 MiB after 100k small graphs (peak 1,295 MiB,
DuckDB's 1 GB buffer limit included); a run of the same ingest without this setting ended at
590 MiB with the same peak.

Called by the aggregator's server and by `circuits aggregate`; a no-op where the C library is
not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems (HEAP_MAX_SIZE / 2).
_MMAP_THRESHOLD_MAX = 32 << 20
_done = False


def keep_freed_memory(trim_threshold: int = 256 << 20) -> bool:
    """Serve allocations up to 32 MiB from malloc's heap and keep up to ``trim_threshold`` bytes of
    freed heap for reuse; True when glibc accepted both settings (once per process)."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1))
    )
    return _done
