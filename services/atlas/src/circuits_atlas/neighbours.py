"""The neighbour index: the one owner of the ``<atlas>.neighbours`` file (writer, reader, checks).

``circuits build-db`` writes it beside the DuckDB file so ``GetEdgesForUnit`` answers from a
memory-mapped CSR instead of a SQL query: both directions of a unit's edges are one contiguous
slice, already in the order :meth:`CircuitDatabase.get_edges_for_unit` returns them, and the
pages are shared by every server process that maps the file.

Layout (little-endian; version :data:`FORMAT_VERSION`)::

    0      8 bytes   MAGIC
    8      8 bytes   header length H (uint64)
    16     H bytes   header: UTF-8 JSON {format, version, build_id, edges, sections, sha256}
    ...    sections, each at a 64-byte aligned offset given by the header:
      records      E x RECORD_DTYPE: every edge once, grouped by source unit; within a source unit
                   ordered count DESC, mean_abs_weight DESC, tgt_layer, tgt_neuron (the downstream order)
      out_keys     U_out int64, sorted unit keys (layer * 2**32 + neuron) of the source units
      out_offsets  U_out + 1 int64: a source unit's records are records[out_offsets[i]:out_offsets[i+1]]
      in_order     E uint32 (int64 when E >= 2**32): record positions grouped by target unit, ordered
                   count DESC, mean_abs_weight DESC, src_layer, src_neuron (the upstream order)
      in_keys      U_in int64, in_offsets U_in + 1 int64: as out_*, over in_order

``build_id`` is the ``metadata.build_id`` of the atlas the index was made from: an index beside a
different atlas (rebuilt, copied over) is stale and not used. ``sha256`` covers the section
bytes; :func:`verify_index` with ``deep=True`` recomputes it, the reader checks the structure
(sizes, offsets, key order, position range) when it opens the file. A missing, stale or corrupt
index raises :class:`NeighbourIndexUnusable`; the database then answers from DuckDB.

Both orders are computed here with the same keys and the same NaN rule as the SQL (DuckDB sorts
NaN above every number); edges that tie on every sort key (duplicate unit pairs with equal count
and mean |w|, which an aggregator export never has) keep the table's order.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from circuits_core.errors import FailedPrecondition

MAGIC = b"CIRCNBR\x00"
FORMAT = "circuits-atlas-neighbours"
FORMAT_VERSION = 1
SUFFIX = ".neighbours"
_ALIGN = 64
_MAX_HEADER = 1 << 20

#: One edge as GetEdgesForUnit returns it (the same fields, in the order of database.EDGE_SELECT).
RECORD_DTYPE = np.dtype(
    [
        ("src_layer", "<i4"), ("src_neuron", "<i4"), ("tgt_layer", "<i4"), ("tgt_neuron", "<i4"),
        ("count", "<i8"), ("weight_sum", "<f8"), ("weight_abs_sum", "<f8"), ("weight_sq_sum", "<f8"),
        ("weight_min", "<f8"), ("weight_max", "<f8"), ("mean_weight", "<f8"),
    ]
)  # fmt: skip
_SECTIONS = ("records", "out_keys", "out_offsets", "in_order", "in_keys", "in_offsets")
_STAT_COLUMNS = ("count", "weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max", "mean_weight")


class NeighbourIndexUnusable(FailedPrecondition):
    """The neighbour index file is missing, stale (another atlas) or corrupt."""


def index_path(atlas_path: str | Path) -> Path:
    """Where the index of ``atlas_path`` lives: ``atlas.duckdb`` -> ``atlas.duckdb.neighbours``."""
    p = Path(atlas_path)
    return p.with_name(p.name + SUFFIX)


def unit_keys(layer: np.ndarray, neuron: np.ndarray) -> np.ndarray:
    """int64 keys ordered like (layer, neuron) for any int32 pair."""
    return layer.astype(np.int64) * (1 << 32) + neuron.astype(np.int64)


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexReport:
    """What :func:`write_index` wrote."""

    path: Path
    edges: int
    source_units: int
    target_units: int
    bytes: int
    seconds: float


# ------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------
def _desc_float_keys(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two ascending lexsort keys giving DuckDB's ``ORDER BY values DESC`` (NaN first, then the
    numbers from largest to smallest)."""
    nan = np.isnan(values)
    return (~nan).astype(np.int8), np.where(nan, 0.0, -values)


def _group_bounds(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys of a sorted key array and the CSR offsets of their runs."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    starts = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts = np.concatenate(([0], starts)).astype(np.int64)
    return sorted_keys[starts].astype(np.int64), np.concatenate((starts, [n])).astype(np.int64)


def read_edges(con: Any, *, batch_rows: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """All rows of the atlas ``edges`` table as (records, mean_abs_weight), streamed in batches.

    Raises :class:`NeighbourIndexUnusable` when a statistic the index stores is NULL (the SQL path
    cannot answer such an edge either)."""
    total = con.execute("SELECT count(*) FROM edges").fetchone()[0]
    records = np.empty(total, RECORD_DTYPE)
    mean_abs = np.empty(total, np.float64)
    cols = ", ".join(RECORD_DTYPE.names) + ", mean_abs_weight"
    reader = con.execute(f"SELECT {cols} FROM edges").fetch_record_batch(batch_rows)
    at = 0
    for batch in reader:
        n = batch.num_rows
        if at + n > total:
            raise NeighbourIndexUnusable("the edges table grew while it was read")
        for i, name in enumerate((*RECORD_DTYPE.names, "mean_abs_weight")):
            column = batch.column(i)
            if column.null_count:
                raise NeighbourIndexUnusable(f"edges.{name} has NULL values; no neighbour index for this atlas")
            target = mean_abs if name == "mean_abs_weight" else records[name]
            target[at : at + n] = column.to_numpy(zero_copy_only=False)
        at += n
    if at != total:
        raise NeighbourIndexUnusable(f"read {at} of {total} edges")
    return records, mean_abs


def _layout(sections: list[tuple[str, np.dtype, int]], header_room: int) -> tuple[dict[str, dict[str, Any]], int]:
    offset = 16 + header_room
    out: dict[str, dict[str, Any]] = {}
    for name, dtype, length in sections:
        offset = -(-offset // _ALIGN) * _ALIGN
        out[name] = {"offset": offset, "dtype": dtype.str if dtype.names is None else "record", "length": int(length)}
        offset += dtype.itemsize * int(length)
    return out, offset


def _header_bytes(build_id: str, edges: int, sections: dict[str, Any], sha256: str) -> bytes:
    header = {"format": FORMAT, "version": FORMAT_VERSION, "build_id": build_id, "edges": int(edges),
              "record_fields": list(RECORD_DTYPE.names), "sections": sections, "sha256": sha256}  # fmt: skip
    return json.dumps(header, sort_keys=True).encode("utf-8")


def write_index(
    con: Any, path: str | Path, *, build_id: str, progress: Callable[[str], None] | None = None
) -> IndexReport:
    """Write the neighbour index of the atlas open on ``con`` (its ``edges`` table) to ``path``.

    Written to a temporary file in the same folder, fsynced and renamed over ``path``: a reader
    never sees half a file, and a failure leaves no temporary file behind."""
    import time

    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    path = Path(path)
    if not build_id:
        raise ValueError("build_id is required")
    records, mean_abs = read_edges(con)
    n = len(records)
    say(f"neighbour index: sorting {n:,} edges")
    src_key = unit_keys(records["src_layer"], records["src_neuron"])
    tgt_key = unit_keys(records["tgt_layer"], records["tgt_neuron"])
    valid, neg_abs = _desc_float_keys(mean_abs)
    neg_count = -records["count"]
    del mean_abs
    # np.lexsort: the LAST key is the primary one.
    out_perm = np.lexsort((tgt_key, neg_abs, valid, neg_count, src_key))
    in_perm = np.lexsort((src_key, neg_abs, valid, neg_count, tgt_key))
    del neg_abs, valid, neg_count
    rank = np.empty(n, np.int64)
    rank[out_perm] = np.arange(n, dtype=np.int64)
    in_dtype = np.dtype("<u4") if n < 2**32 else np.dtype("<i8")
    in_order = rank[in_perm].astype(in_dtype)
    del rank
    out_keys, out_offsets = _group_bounds(src_key[out_perm])
    in_keys, in_offsets = _group_bounds(tgt_key[in_perm])
    del src_key, tgt_key, in_perm

    plan = [
        ("records", RECORD_DTYPE, n), ("out_keys", np.dtype("<i8"), len(out_keys)),
        ("out_offsets", np.dtype("<i8"), len(out_offsets)), ("in_order", in_dtype, n),
        ("in_keys", np.dtype("<i8"), len(in_keys)), ("in_offsets", np.dtype("<i8"), len(in_offsets)),
    ]  # fmt: skip
    # The header's length must be known before the sections are placed: reserve room for it
    # (sha256 is a fixed-width hex string), then write it padded with spaces.
    placeholder = _header_bytes(build_id, n, _layout(plan, 0)[0], "0" * 64)
    room = len(placeholder) + 256
    sections, size = _layout(plan, room)

    tmp = path.with_name(f".{path.name}.writing-{os.getpid()}")
    say(f"neighbour index: writing {size / 2**20:,.1f} MiB")
    try:
        with open(tmp, "wb") as fh:
            fh.truncate(size)
        with open(tmp, "r+b") as fh:
            mm = mmap.mmap(fh.fileno(), size)
            try:
                def view(name: str, dtype: np.dtype) -> np.ndarray:
                    s = sections[name]
                    return np.frombuffer(mm, dtype=dtype, count=s["length"], offset=s["offset"])

                rec = view("records", RECORD_DTYPE)
                for name in RECORD_DTYPE.names:
                    rec[name] = records[name][out_perm]
                del rec
                del records, out_perm
                view("out_keys", np.dtype("<i8"))[:] = out_keys
                view("out_offsets", np.dtype("<i8"))[:] = out_offsets
                view("in_order", in_dtype)[:] = in_order
                view("in_keys", np.dtype("<i8"))[:] = in_keys
                view("in_offsets", np.dtype("<i8"))[:] = in_offsets
                digest = _sections_digest(mm, sections)
                header = _header_bytes(build_id, n, sections, digest)
                if len(header) > room:
                    raise AssertionError("neighbour index header outgrew its reserved room")
                mm[0:8] = MAGIC
                mm[8:16] = len(header).to_bytes(8, "little")
                mm[16 : 16 + room] = header + b" " * (room - len(header))
                mm.flush()
            finally:
                _close_quietly(mm)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return IndexReport(path=path, edges=n, source_units=len(out_keys), target_units=len(in_keys), bytes=size,
                       seconds=time.perf_counter() - t0)  # fmt: skip


def index_atlas(atlas_path: str | Path, *, progress: Callable[[str], None] | None = None) -> IndexReport:
    """(Re)write the neighbour index of an existing atlas (one built before the index existed, or
    whose index was lost). An atlas without ``metadata.build_id`` gets one first."""
    import uuid

    from circuits_core.errors import InvalidArgument

    from circuits_atlas.duck import connect
    from circuits_atlas.schema import verify_atlas

    path = Path(atlas_path)
    if not path.is_file():
        raise InvalidArgument(f"{path}: atlas file not found")
    con = connect(path, read_only=False)
    try:
        verify_atlas(con, path)
        rows = con.execute("SELECT value FROM metadata WHERE key = 'build_id'").fetchall()
        build_id = rows[0][0] if rows and rows[0][0] else uuid.uuid4().hex
        if not rows or rows[0][0] != build_id:
            con.execute("INSERT OR REPLACE INTO metadata VALUES ('build_id', ?)", [build_id])
            con.execute("CHECKPOINT")
        return write_index(con, index_path(path), build_id=build_id, progress=progress)
    finally:
        con.close()


def _sections_digest(buf: Any, sections: dict[str, Any]) -> str:
    h = hashlib.sha256()
    view = memoryview(buf)
    try:
        for name in _SECTIONS:
            s = sections[name]
            start = s["offset"]
            end = start + _dtype_of(s["dtype"]).itemsize * s["length"]
            for at in range(start, end, 1 << 24):
                h.update(view[at : min(end, at + (1 << 24))])
    finally:
        view.release()
    return h.hexdigest()


def _dtype_of(name: str) -> np.dtype:
    if name == "record":
        return RECORD_DTYPE
    if name not in ("<i8", "<u4"):
        raise NeighbourIndexUnusable(f"unknown section type {name!r}")
    return np.dtype(name)


# ------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------
class NeighbourIndex:
    """A read-only, memory-mapped neighbour index; thread-safe (lookups only read).

    ``NeighbourIndex.open(path, build_id=...)`` checks the file and raises
    :class:`NeighbourIndexUnusable` with the reason when it must not be used."""

    def __init__(self, path: Path, mm: mmap.mmap, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self._mm = mm
        self.header = header
        self.build_id: str = header["build_id"]
        self.edges: int = header["edges"]
        self._records = arrays["records"]
        self._sides = (
            (arrays["out_keys"], arrays["out_offsets"], None),
            (arrays["in_keys"], arrays["in_offsets"], arrays["in_order"]),
        )

    @classmethod
    def open(cls, path: str | Path, *, build_id: str | None, edges: int | None = None) -> NeighbourIndex:
        path = Path(path)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise NeighbourIndexUnusable(f"{path}: no neighbour index (build-db writes it)") from None
        except OSError as exc:
            raise NeighbourIndexUnusable(f"{path}: cannot open the neighbour index ({exc.strerror})") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 16:
                raise NeighbourIndexUnusable(f"{path}: corrupt neighbour index (truncated)")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            header, arrays = _check(path, mm, size, build_id=build_id, edges=edges)
        except BaseException:
            _close_quietly(mm)
            raise
        return cls(path, mm, header, arrays)

    def close(self) -> None:
        self._records = None  # type: ignore[assignment]
        self._sides = ()  # type: ignore[assignment]
        _close_quietly(self._mm)

    def edges_of(self, layer: int, neuron: int, side: int, limit: int, min_count: int) -> list[tuple]:
        """Rows (EDGE_SELECT field order) of the edges leaving (side 0) or entering (side 1) a unit,
        at most ``limit`` with ``count >= min_count``, in the SQL path's order."""
        keys, offsets, order = self._sides[side]
        key = layer * (1 << 32) + neuron
        i = int(np.searchsorted(keys, key))
        if i >= len(keys) or int(keys[i]) != key:
            return []
        start, stop = int(offsets[i]), int(offsets[i + 1])
        counts = self._records["count"]
        if int(counts[stop - 1] if order is None else counts[order[stop - 1]]) < min_count:
            # Counts do not increase along a unit's run (the last is the smallest): find the
            # first edge below min_count.
            lo, hi = start, stop
            while lo < hi:
                mid = (lo + hi) // 2
                c = counts[mid] if order is None else counts[order[mid]]
                if c >= min_count:
                    lo = mid + 1
                else:
                    hi = mid
            stop = lo
        stop = min(stop, start + limit)
        if stop <= start:
            return []
        rows = self._records[start:stop] if order is None else self._records[order[start:stop]]
        own = ("src_layer", "src_neuron") if side == 0 else ("tgt_layer", "tgt_neuron")
        if int(rows[own[0]][0]) != layer or int(rows[own[1]][0]) != neuron:
            raise NeighbourIndexUnusable(f"{self.path}: corrupt neighbour index (run of L{layer}/N{neuron} holds another unit)")
        return rows.tolist()


def _close_quietly(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # an array still views the mapping; it is unmapped when the last view goes


def _check(path: Path, mm: mmap.mmap, size: int, *, build_id: str | None, edges: int | None
           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:  # fmt: skip
    def corrupt(why: str) -> NeighbourIndexUnusable:
        return NeighbourIndexUnusable(f"{path}: corrupt neighbour index ({why})")

    if mm[0:8] != MAGIC:
        raise corrupt("not a neighbour index file")
    length = int.from_bytes(mm[8:16], "little")
    if not 0 < length <= min(_MAX_HEADER, size - 16):
        raise corrupt("bad header length")
    try:
        header = json.loads(bytes(mm[16 : 16 + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise corrupt("unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise corrupt("not a neighbour index file")
    if header.get("version") != FORMAT_VERSION:
        raise NeighbourIndexUnusable(f"{path}: neighbour index version {header.get('version')!r}, this version reads "
                                     f"{FORMAT_VERSION}; rebuild it with `circuits build-db`")  # fmt: skip
    if header.get("record_fields") != list(RECORD_DTYPE.names):
        raise corrupt("unexpected record fields")
    if build_id is None or header.get("build_id") != build_id:
        raise NeighbourIndexUnusable(f"{path}: stale neighbour index (made for another atlas build: "
                                     f"{str(header.get('build_id'))[:40]!r}, atlas has {build_id!r})")  # fmt: skip
    n = header.get("edges")
    if not isinstance(n, int) or n < 0 or (edges is not None and n != edges):
        raise NeighbourIndexUnusable(f"{path}: stale neighbour index ({n} edges, the atlas has {edges})")
    sections = header.get("sections")
    if not isinstance(sections, dict) or set(sections) != set(_SECTIONS):
        raise corrupt("unexpected sections")
    arrays: dict[str, np.ndarray] = {}
    end = 16 + length
    for name in _SECTIONS:
        s = sections[name]
        try:
            dtype = _dtype_of(s["dtype"])
            offset, count = int(s["offset"]), int(s["length"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad section {name}") from None
        if offset < end or offset % _ALIGN or count < 0 or offset + count * dtype.itemsize > size:
            raise corrupt(f"section {name} out of bounds")
        end = offset + count * dtype.itemsize
        arrays[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=offset)
    if end != size:
        raise corrupt(f"file is {size} bytes, the sections end at {end}")
    if len(arrays["records"]) != n or len(arrays["in_order"]) != n:
        raise corrupt("section lengths disagree with the edge count")
    for side in ("out", "in"):
        keys, offsets = arrays[f"{side}_keys"], arrays[f"{side}_offsets"]
        if len(offsets) != len(keys) + 1 or offsets[0] != 0 or offsets[-1] != n:
            raise corrupt(f"{side}_offsets do not span the edges")
        if len(keys) and (np.any(keys[1:] <= keys[:-1]) or np.any(offsets[1:] <= offsets[:-1])):
            raise corrupt(f"{side} keys or offsets out of order")
    if n and int(arrays["in_order"].max()) >= n:
        raise corrupt("in_order points past the records")
    return header, arrays


def verify_index(path: str | Path, *, build_id: str | None, edges: int | None = None, deep: bool = False) -> dict[str, Any]:
    """Check an index file (structure; with ``deep`` also the sha256 of every section). Returns its
    header; raises :class:`NeighbourIndexUnusable` with the reason."""
    index = NeighbourIndex.open(path, build_id=build_id, edges=edges)
    try:
        if deep:
            digest = _sections_digest(index._mm, index.header["sections"])
            if digest != index.header.get("sha256"):
                raise NeighbourIndexUnusable(f"{index.path}: corrupt neighbour index (sha256 differs)")
        return dict(index.header)
    finally:
        index.close()
