"""Columns of a serialized ``circuits.v1.Graph``, read in one compiled pass (private to wire).

Parsing a graph with protobuf builds 500 ``Unit`` objects and reading them back costs ~3 µs
each in Python - most of the time the aggregator spends decoding a graph. :func:`scan` instead
reads the message's bytes with a numba kernel (:mod:`circuits_core._graph_scan_kernel`) and
fills the unit and edge columns directly; the remaining top-level fields (id, model, prompt,
metadata: the *header*) are parsed by protobuf from their own bytes.

The scan only takes the shapes a protobuf serializer writes; for anything else (malformed
bytes, unpacked columns, unit labels) it returns None and the caller parses the whole message
with protobuf, so acceptance never depends on the scan. Without numba installed (numba is a
dependency of the aggregator, not of circuits_core) :func:`scan` returns None too.

wire.py owns the protobuf format; this module is its private helper.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
        from circuits_core._graph_scan_kernel import scan_graph
    except ImportError:  # numba not installed
        _KERNEL = False
        return _KERNEL
    _KERNEL = scan_graph
    return _KERNEL


def warm() -> bool:
    """Compile (or load from the disk cache) the kernel now, so a server's first request does not
    wait for it; False when numba is unavailable."""
    if _compile() is False:
        return False
    return scan(b"") is not None


def available() -> bool:
    """Whether the compiled scan can run here."""
    return _compile() is not False


@dataclass(frozen=True, slots=True, kw_only=True)
class Scan:
    """What :func:`scan` read from a serialized Graph.

    Unit columns (one row per unit, in order): layer, index, kind (int64; int32 fields
    sign-extended as protobuf does), position with has_position, activation / attribution /
    probability (float64, 0.0 when absent) with has_activation / has_attribution, token_start /
    token_end (byte range of each unit's token in ``data``). Edge columns: src, tgt (int64),
    weight and raw_weight (float64; raw_weight empty when not sent). ``header``: the bytes of
    every other top-level field, a Graph without units and edges.
    """

    data: bytes
    header: bytes
    layer: np.ndarray
    index: np.ndarray
    kind: np.ndarray
    position: np.ndarray
    has_position: np.ndarray
    has_activation: np.ndarray
    has_attribution: np.ndarray
    activation: np.ndarray
    attribution: np.ndarray
    probability: np.ndarray
    token_start: np.ndarray
    token_end: np.ndarray
    src: np.ndarray
    tgt: np.ndarray
    weight: np.ndarray
    raw_weight: np.ndarray

    @property
    def n_units(self) -> int:
        return self.layer.shape[0]


def _doubles(data: bytes, span: np.ndarray) -> np.ndarray:
    start, stop = int(span[0]), int(span[1])
    if start < 0:
        return np.empty(0, dtype=np.float64)
    return np.frombuffer(data, dtype="<f8", count=(stop - start) // 8, offset=start).astype(np.float64)


def scan(data: bytes) -> Scan | None:
    """The columns of the serialized Graph ``data``, or None when the compiled scan is unavailable
    or declines these bytes (then protobuf parses them, and says what is wrong if anything is)."""
    kernel = _compile()
    if kernel is False:
        return None
    status, ints, token_end, flags, value_bytes, src, tgt, spans = kernel(np.frombuffer(data, dtype=np.uint8))
    if status < 0:
        return None
    values = value_bytes.view("<f8").astype(np.float64, copy=False)
    header = b"".join(data[int(s):int(e)] for s, e in spans[2:] if s >= 0)
    return Scan(
        data=data, header=header,
        layer=ints[:, 0], index=ints[:, 1], kind=ints[:, 2], position=ints[:, 3],
        has_position=flags[:, 0], has_activation=flags[:, 1], has_attribution=flags[:, 2],
        activation=values[:, 0], attribution=values[:, 1], probability=values[:, 2],
        token_start=ints[:, 4], token_end=token_end,
        src=src, tgt=tgt, weight=_doubles(data, spans[0]), raw_weight=_doubles(data, spans[1]),
    )  # fmt: skip


_COLUMNS: Any = None  # the compiled column kernel; False = numba unavailable


def columns(scanned: Scan, num_layers: int, d_mlp: int, max_layer: int, max_neuron: int) -> tuple | None:
    """The aggregator's columns of ``scanned`` in one compiled pass (see
    :func:`circuits_core._graph_scan_kernel.graph_columns`): ``(unit_layer, unit_neuron,
    unit_activation, unit_attribution, edge_src_layer, edge_src_neuron, edge_tgt_layer,
    edge_tgt_neuron, edge_weight, logit_src_layer, logit_src_neuron, logit_token_id, logit_weight,
    logit_rows)``, or None when numba is unavailable or a check fails (the caller's reference
    reader then says what is wrong)."""
    global _COLUMNS
    if _COLUMNS is None:
        _COLUMNS = False
        if _compile() is not False:
            from circuits_core._graph_scan_kernel import graph_columns

            _COLUMNS = graph_columns
    if _COLUMNS is False:
        return None
    edges = scanned.src.shape[0]
    if scanned.tgt.shape[0] != edges or scanned.weight.shape[0] != edges or scanned.raw_weight.shape[0] not in (0, edges):
        return None
    ok, *out = _COLUMNS(
        scanned.layer, scanned.index, scanned.kind, scanned.position, scanned.has_position, scanned.has_activation,
        scanned.has_attribution, scanned.activation, scanned.attribution, scanned.probability, scanned.src,
        scanned.tgt, scanned.weight, num_layers, d_mlp, max_layer, max_neuron,
    )  # fmt: skip
    return tuple(out) if ok else None
