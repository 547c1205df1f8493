"""Graph edges as columns: :class:`EdgeTable`, what a :class:`~circuits_core.schemas.Graph` holds.

Row ``r`` of every column is one edge ``(src_layer, src_index, src_position) -> (tgt_layer,
tgt_index, tgt_position)``, keyed like :attr:`~circuits_core.schemas.Unit.node_key`: a missing
position is ``NO_POSITION`` (-1) and a missing ``raw_weight`` is NaN, so every column is a plain
numpy array. The engine's columns, the packed protobuf ``EdgeTable`` and the aggregator's arrays
all map onto these without building one Python object per edge; :meth:`EdgeTable.rows` builds
:class:`~circuits_core.schemas.Edge` rows when someone asks for them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from circuits_core.errors import InvalidArgument
from circuits_core.schemas import MAX_NEURON_INDEX, MAX_NEURON_LAYER, Edge, Unit

#: Position column value of an edge endpoint without a token position.
NO_POSITION = -1

#: ``(layer, index, position)`` columns of a graph's units (int64; NO_POSITION = none).
UnitKeys = tuple[np.ndarray, np.ndarray, np.ndarray]

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1

KEY_COLUMNS: tuple[str, ...] = ("src_layer", "src_index", "src_position", "tgt_layer", "tgt_index", "tgt_position")
VALUE_COLUMNS: tuple[str, ...] = ("weight", "raw_weight")
COLUMNS: tuple[str, ...] = KEY_COLUMNS + VALUE_COLUMNS


def _column(name: str, values: Any, dtype: type, kinds: str) -> np.ndarray:
    """A read-only one-dimensional copy of ``values`` as ``dtype`` (numpy kinds ``kinds`` only)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise InvalidArgument(f"edge column {name} must be one-dimensional, got shape {array.shape}")
    if array.size and array.dtype.kind not in kinds:
        raise InvalidArgument(f"edge column {name} must hold {'integers' if kinds == 'iu' else 'numbers'}, got {array.dtype}")
    out = array.astype(dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class EdgeTable:
    """The edges of one graph as read-only numpy columns (see the module docstring).

    ``EdgeTable(src_layer=..., ..., raw_weight=...)`` copies and checks the columns (equal
    lengths, integer keys); ``raw_weight`` may be omitted (all NaN).
    """

    src_layer: np.ndarray  # int64 [E]
    src_index: np.ndarray  # int64 [E]
    src_position: np.ndarray  # int64 [E], NO_POSITION = none
    tgt_layer: np.ndarray  # int64 [E]
    tgt_index: np.ndarray  # int64 [E]
    tgt_position: np.ndarray  # int64 [E], NO_POSITION = none
    weight: np.ndarray  # float64 [E]
    raw_weight: Any = None  # float64 [E], NaN = not available

    def __post_init__(self) -> None:
        for name in KEY_COLUMNS:
            object.__setattr__(self, name, _column(name, getattr(self, name), np.int64, "iu"))
        object.__setattr__(self, "weight", _column("weight", self.weight, np.float64, "iuf"))
        raw = np.full(self.weight.shape[0], np.nan) if self.raw_weight is None else self.raw_weight
        object.__setattr__(self, "raw_weight", _column("raw_weight", raw, np.float64, "iuf"))
        lengths = {name: getattr(self, name).shape[0] for name in COLUMNS}
        if len(set(lengths.values())) != 1:
            shown = ", ".join(f"{k}={v}" for k, v in lengths.items())
            raise InvalidArgument(f"edge columns differ in length ({shown})")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def empty(cls) -> EdgeTable:
        empty_int = np.zeros(0, dtype=np.int64)
        return cls(**{name: empty_int for name in KEY_COLUMNS}, weight=np.zeros(0))

    @classmethod
    def from_edges(cls, edges: Iterable[Edge]) -> EdgeTable:
        """Columns of ``Edge`` rows (only the graph fields: keys, weight, raw_weight)."""
        rows = list(edges)
        if not rows:
            return cls.empty()
        for n, edge in enumerate(rows):
            if not isinstance(edge, Edge):
                raise InvalidArgument(f"edge {n} must be an Edge, got {type(edge).__name__}")
        none = NO_POSITION
        return cls(
            src_layer=[e.src_layer for e in rows],
            src_index=[e.src_index for e in rows],
            src_position=[none if e.src_position is None else e.src_position for e in rows],
            tgt_layer=[e.tgt_layer for e in rows],
            tgt_index=[e.tgt_index for e in rows],
            tgt_position=[none if e.tgt_position is None else e.tgt_position for e in rows],
            weight=[e.weight for e in rows],
            raw_weight=[math.nan if e.raw_weight is None else e.raw_weight for e in rows],
        )

    @classmethod
    def from_unit_rows(
        cls, unit_keys: UnitKeys, src: np.ndarray, tgt: np.ndarray, weight: Any, raw_weight: Any = None
    ) -> EdgeTable:
        """Edges given as row numbers into a graph's units (the protobuf and legacy JSON form),
        with the units' key columns from :func:`checked_unit_keys`. Rows must be in range."""
        layer, index, position = unit_keys
        return cls(
            src_layer=layer[src], src_index=index[src], src_position=position[src],
            tgt_layer=layer[tgt], tgt_index=index[tgt], tgt_position=position[tgt],
            weight=weight, raw_weight=raw_weight,
        )  # fmt: skip

    # -- views ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.weight.shape[0])

    @property
    def has_raw_weight(self) -> bool:
        """True when at least one edge carries a raw weight."""
        return bool(len(self)) and not bool(np.isnan(self.raw_weight).all())

    def rows(self) -> tuple[Edge, ...]:
        """One :class:`Edge` per row (positions -1 and NaN raw weights become None)."""
        none = NO_POSITION
        return tuple(
            Edge(
                src_layer=sl, src_index=si, src_position=None if sp == none else sp,
                tgt_layer=tl, tgt_index=ti, tgt_position=None if tp == none else tp,
                weight=w, raw_weight=None if r != r else r,
            )
            for sl, si, sp, tl, ti, tp, w, r in zip(*(getattr(self, name).tolist() for name in COLUMNS))
        )

    def endpoint_rows(self, units: Sequence[Unit]) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers into ``units`` of every edge's source and target (int64 arrays).

        Raises InvalidArgument when two units share a node key or an edge names a unit that is
        not in ``units``.
        """
        layer, index, position = unit_key_columns(units)
        keys = _KeyPacker((layer, index, position), (self.src_layer, self.src_index, self.src_position),
                          (self.tgt_layer, self.tgt_index, self.tgt_position))
        unit_keys = keys.pack(layer, index, position)
        order = np.argsort(unit_keys, kind="stable")
        ordered = unit_keys[order]
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        if same.size:
            row = int(order[same[0] + 1])
            raise InvalidArgument(f"duplicate unit {units[row].node_id} in graph")
        rows = []
        for end, cols in (("source", (self.src_layer, self.src_index, self.src_position)),
                          ("target", (self.tgt_layer, self.tgt_index, self.tgt_position))):
            wanted = keys.pack(*cols)
            at = np.minimum(np.searchsorted(ordered, wanted), max(len(ordered) - 1, 0))
            found = ordered[at] == wanted if len(ordered) else np.zeros(len(wanted), dtype=bool)
            if not found.all():
                n = int(np.flatnonzero(~found)[0])
                key = tuple(int(c[n]) for c in cols)
                shown = (key[0], key[1], None if key[2] == NO_POSITION else key[2])
                raise InvalidArgument(f"edge {n} {end} {shown} is not a unit of the graph")
            rows.append(order[at] if len(ordered) else np.zeros(0, dtype=np.int64))
        return rows[0], rows[1]

    # -- value semantics ------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EdgeTable):
            return NotImplemented
        if len(self) != len(other):
            return False
        return all(np.array_equal(getattr(self, n), getattr(other, n)) for n in KEY_COLUMNS) and all(
            np.array_equal(getattr(self, n), getattr(other, n), equal_nan=True) for n in VALUE_COLUMNS
        )

    def __hash__(self) -> int:
        digest = hashlib.blake2b(digest_size=8)
        for name in COLUMNS:
            digest.update(getattr(self, name).tobytes())
        return int.from_bytes(digest.digest(), "little")

    def __repr__(self) -> str:
        return f"EdgeTable({len(self)} edges)"


def check_unit_keys(layer: np.ndarray, index: np.ndarray, position: np.ndarray, is_neuron: np.ndarray) -> None:
    """What every graph reader requires of a graph's units, checked on their key columns.

    Layers, indices and positions fit in 32 bits (the protobuf fields), node keys ``(layer,
    index, position)`` are distinct (edges are keyed by them) and neurons
    have ``0 <= layer <= MAX_NEURON_LAYER`` and ``0 <= index <= MAX_NEURON_INDEX`` (the
    aggregator's packed keys). Raises InvalidArgument naming the first offending unit.
    """
    for name, values in (("layer", layer), ("index", index), ("position", position)):
        if values.size and (int(values.min()) < _INT32_MIN or int(values.max()) > _INT32_MAX):
            row = int(np.flatnonzero((values < _INT32_MIN) | (values > _INT32_MAX))[0])
            raise InvalidArgument(f"unit {row}: {name} {int(values[row])} is outside the 32-bit range graphs use")
    if is_neuron.any():
        n_layer, n_index = layer[is_neuron], index[is_neuron]
        for name, values, top in (("layer", n_layer, MAX_NEURON_LAYER), ("index", n_index, MAX_NEURON_INDEX)):
            bad = np.flatnonzero((values < 0) | (values > top))
            if bad.size:
                row = int(np.flatnonzero(is_neuron)[bad[0]])
                raise InvalidArgument(
                    f"unit {row}: neuron {name} {int(values[bad[0]])} is outside 0..{top}"
                )
    if layer.size > 1:
        keys = _KeyPacker((layer, index, position)).pack(layer, index, position)
        order = np.argsort(keys, kind="stable")
        same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
        if same.size:
            row = int(order[same[0] + 1])
            pos = int(position[row])
            where = "" if pos == NO_POSITION else f" at position {pos}"
            raise InvalidArgument(f"unit {row}: L{int(layer[row])}/N{int(index[row])}{where} appears twice in the graph")


def checked_unit_keys(units: Sequence[Unit]) -> UnitKeys:
    """The key columns of a graph's units after :func:`check_unit_keys` (raises InvalidArgument)."""
    keys = unit_key_columns(units)
    check_unit_keys(*keys, np.fromiter((u.kind == "neuron" for u in units), dtype=bool, count=len(units)))
    return keys


def unit_key_columns(units: Sequence[Unit]) -> UnitKeys:
    """``(layer, index, position)`` of every unit as int64 arrays (no position -> NO_POSITION)."""
    return key_columns(
        (u.layer for u in units), (u.index for u in units),
        (NO_POSITION if u.position is None else u.position for u in units), len(units),
    )  # fmt: skip


def key_columns(layer: Iterable[int], index: Iterable[int], position: Iterable[int], n: int) -> UnitKeys:
    """Key columns from ``n`` layers, indices and positions (NO_POSITION for none) as int64
    arrays; a value outside the 64-bit range raises InvalidArgument."""
    try:
        return (
            np.fromiter(layer, dtype=np.int64, count=n),
            np.fromiter(index, dtype=np.int64, count=n),
            np.fromiter(position, dtype=np.int64, count=n),
        )
    except OverflowError:
        raise InvalidArgument("a unit's layer, index or position is outside the 64-bit integer range") from None


class _KeyPacker:
    """Packs (layer, index, position) triples into one int64 per row for sorted lookups.

    Bit widths come from the value ranges actually present; triples too wide for 63 bits fall
    back to a dense renumbering through ``np.unique`` (slower, same result).
    """

    def __init__(self, *groups: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        self.offsets: list[int] = []
        self.shifts: list[int] = []
        widths = []
        for dim in range(3):
            parts = [g[dim] for g in groups if g[dim].size]
            lo = min((int(p.min()) for p in parts), default=0)
            hi = max((int(p.max()) for p in parts), default=0)
            self.offsets.append(lo)
            widths.append(max(hi - lo, 0).bit_length())
        self.dense = sum(widths) > 63
        if self.dense:
            stacked = np.concatenate([np.stack(g, axis=1) for g in groups], axis=0)
            self.table = np.unique(stacked, axis=0)
        self.shifts = [widths[1] + widths[2], widths[2], 0]

    def pack(self, layer: np.ndarray, index: np.ndarray, position: np.ndarray) -> np.ndarray:
        if self.dense:
            rows = np.stack((layer, index, position), axis=1)
            # lexicographic rank of each row in the sorted table of every key seen
            view = np.ascontiguousarray(rows).view([("l", np.int64), ("i", np.int64), ("p", np.int64)]).ravel()
            table = np.ascontiguousarray(self.table).view(view.dtype).ravel()
            return np.searchsorted(table, view).astype(np.int64)
        out = (layer - self.offsets[0]) << self.shifts[0]
        out |= (index - self.offsets[1]) << self.shifts[1]
        out |= position - self.offsets[2]
        return out
