"""Unit columns of a serialized ``circuits.v1.Graph``, read in one compiled pass (private to wire).

Reading 500 ``Unit`` submessages attribute by attribute costs ~3 µs each in Python, most of the
time the aggregator spends decoding a graph. :func:`unit_columns` instead scans the message's
bytes with a numba kernel and fills the columns directly. Only bytes that upb itself produced
are scanned (``msg.SerializeToString()`` of a parsed, valid message), so the input is
well-formed; the kernel still checks every length and wire type and reports failure rather than
guessing, and the caller then reads the units the slow way. Without numba installed (numba is a
dependency of the aggregator, not of circuits_core) :func:`unit_columns` returns None.

wire.py owns the protobuf format; this module is its private helper.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

_KERNEL: Any = None  # the compiled kernel; False = numba unavailable


def _compile() -> Any:
    """The numba kernel (compiled once per process; cached on disk where a cache dir is writable)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    if os.environ.get("CIRCUITS_NO_NUMBA"):
        _KERNEL = False
        return _KERNEL
    try:  # the kernel module chooses numba's cache folder before it imports numba
        from circuits_core._unit_scan_kernel import _scan_units
    except ImportError:  # numba not installed
        _KERNEL = False
        return _KERNEL
    _KERNEL = _scan_units
    return _KERNEL


def warm() -> bool:
    """Compile (or load from the disk cache) the kernel now, so a server's first request does not
    wait for it; False when numba is unavailable."""
    if _compile() is False:
        return False
    return unit_columns(b"", 0) is not None


def available() -> bool:
    """Whether the compiled scan can run here."""
    return _compile() is not False


def unit_columns(data: bytes, n_units: int) -> dict[str, np.ndarray] | None:
    """Per-unit columns of the serialized Graph ``data`` holding ``n_units`` units, or None when
    the compiled scan is unavailable or the bytes are not what it expects.

    Columns: layer, index, kind (int64; int32 fields sign-extended as protobuf does), position
    (int64) with has_position, activation / attribution / probability (float64, 0.0 when absent)
    with has_activation / has_attribution, token_start / token_end (byte range of each unit's
    token in ``data``; equal when empty).
    """
    kernel = _compile()
    if kernel is False:
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    ints = np.zeros((n_units, 5), dtype=np.int64)  # layer, index, kind, position, token_start
    token_end = np.zeros(n_units, dtype=np.int64)
    flags = np.zeros((n_units, 3), dtype=np.bool_)  # has position, activation, attribution
    values = np.zeros((n_units, 3), dtype=np.float64)  # activation, attribution, probability
    found = kernel(buf, ints, token_end, flags, values.view(np.uint8))
    if found != n_units:
        return None
    return {
        "layer": ints[:, 0], "index": ints[:, 1], "kind": ints[:, 2], "position": ints[:, 3],
        "token_start": ints[:, 4], "token_end": token_end,
        "has_position": flags[:, 0], "has_activation": flags[:, 1], "has_attribution": flags[:, 2],
        "activation": values[:, 0], "attribution": values[:, 1], "probability": values[:, 2],
    }  # fmt: skip
