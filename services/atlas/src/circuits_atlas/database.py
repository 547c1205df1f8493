"""Read-only queries over a built atlas (relp-spec §I.2), safe to share between threads.

Every query binds user values as parameters; no user text is ever part of the SQL string. Each
thread gets its own DuckDB cursor on the one database instance, every query runs under a time
limit (the cursor is interrupted when it expires -> DeadlineExceeded) and results are capped at
``max_results`` rows.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuits_core.atlas_types import (
    EDGE_DIRECTIONS, AtlasStats, ClusterInfo, ClusterMembers, SearchHit, UnitActivationStats, UnitCard,
)  # fmt: skip
from circuits_core.connectivity import UnitProjections, WeightEdge
from circuits_core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, echo
from circuits_core.schemas import Edge, Unit, UnitLabel

from circuits_atlas.duck import FTS_SCHEMA, connect
from circuits_atlas.schema import verify_atlas

log = logging.getLogger("circuits_atlas.database")

_INT32_MAX = 2**31 - 1
_CLUSTER_PATH = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9}){0,31}$")

UNIT_COLUMNS = (
    "layer", "neuron", "label", "input_label", "output_label", "description", "label_source",
    "appearance_count", "cluster_path",
)  # fmt: skip
EDGE_SELECT = (
    "src_layer, src_neuron, tgt_layer, tgt_neuron, count, weight_sum, weight_abs_sum, "
    "weight_sq_sum, weight_min, weight_max, mean_weight"
)


#: BM25 (k1 = 1.2, b = 0.75, the fts extension's defaults) summed from the per-(term, document)
#: contributions precomputed at build (``search_postings``); the extension's match_bm25 macro
#: re-scores per row and is ~100x slower on a large atlas. Same tokenizer and Porter stemmer as
#: the index. Ties break by docid (build order). A document's contributions are added in termid
#: order (an ordered aggregate): a plain sum adds them in whatever order the join and the threads
#: deliver, which moves scores by an ulp from run to run and reorders exact ties.
BM25_SQL = """
WITH tokens AS (
    SELECT DISTINCT stem(unnest({fts}.tokenize(?)), 'porter') AS term
), qterms AS (
    SELECT d.termid FROM {fts}.dict d JOIN tokens t ON d.term = t.term
), scores AS (
    SELECT p.docid, sum(p.score ORDER BY p.termid) AS score
    FROM search_postings p WHERE p.termid IN (SELECT termid FROM qterms)
    GROUP BY p.docid
    ORDER BY score DESC, p.docid
    LIMIT ?
)
SELECT {cols}, s.score
FROM scores s JOIN {fts}.docs d ON d.docid = s.docid JOIN neurons n ON n.unit_id = d.name
ORDER BY s.score DESC, s.docid
"""


#: BM25_SQL with a detection-score filter on the neurons before the limit (``min_score``).
BM25_FILTERED_SQL = """
WITH tokens AS (
    SELECT DISTINCT stem(unnest({fts}.tokenize(?)), 'porter') AS term
), qterms AS (
    SELECT d.termid FROM {fts}.dict d JOIN tokens t ON d.term = t.term
), scores AS (
    SELECT p.docid, sum(p.score ORDER BY p.termid) AS score
    FROM search_postings p WHERE p.termid IN (SELECT termid FROM qterms)
    GROUP BY p.docid
)
SELECT {cols}, s.score
FROM scores s JOIN {fts}.docs d ON d.docid = s.docid JOIN neurons n ON n.unit_id = d.name
WHERE coalesce(n.score_detection, -1) >= ?
ORDER BY s.score DESC, s.docid
LIMIT ?
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryLimits:
    """Guards applied to every query."""

    #: Most rows one answer may hold (per direction for edges).
    max_results: int = 1000
    #: Seconds before a running query is interrupted.
    query_timeout_s: float = 5.0
    #: Longest accepted search text (characters).
    max_query_chars: int = 1000


class QueryWatchdog:
    """One daemon thread that interrupts cursors whose query outlives its deadline.

    Cheaper than a timer thread per query (a request may run several queries).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[int, tuple[float, Any]] = {}
        self._next_token = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, cursor: Any, seconds: float) -> int:
        with self._cond:
            self._next_token += 1
            token = self._next_token
            self._deadlines[token] = (time.monotonic() + seconds, cursor)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="atlas-query-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def done(self, token: int) -> bool:
        """Stop watching; False when the query was already interrupted."""
        with self._cond:
            return self._deadlines.pop(token, None) is not None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._deadlines.clear()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                expired = [t for t, (deadline, _) in self._deadlines.items() if deadline <= now]
                for token in expired:
                    _, cursor = self._deadlines.pop(token)
                    try:
                        cursor.interrupt()
                    except Exception:  # noqa: BLE001 - a closed cursor needs no interrupt
                        pass
                wait = min((d for d, _ in self._deadlines.values()), default=now + 60) - now
                self._cond.wait(max(wait, 0.001))


def _clean_text(text: Any, limits: QueryLimits) -> str:
    if not isinstance(text, str):
        raise InvalidArgument("search text must be a string")
    if len(text) > limits.max_query_chars:
        raise InvalidArgument(f"search text is longer than {limits.max_query_chars} characters ({len(text)})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("search text is not valid UTF-8") from None
    text = text.replace("\x00", " ").strip()
    # Seed-compatible: "%enzyme%" means the same as "enzyme".
    stripped = text.strip("%").strip()
    text = stripped or text
    if not text:
        raise InvalidArgument("search text is empty")
    return text


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _check_int32(value: Any, name: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {echo(value)}")
    if not minimum <= value <= _INT32_MAX:
        raise InvalidArgument(f"{name} must be in [{minimum}, {_INT32_MAX}], got {value}")
    return value


class CircuitDatabase:
    """An atlas file opened for queries; ``with CircuitDatabase("atlas.duckdb") as db: ...``.

    The in-process :class:`~circuits_core.capabilities.AtlasQueries` (``AtlasClient`` is the gRPC one:
    same method names and results). A ``limit`` of 0 or None means 100 rows.

    ``read_only=True`` (default) opens the file without writing to it; several processes may
    hold it open at once. The connection has external access off and its configuration locked,
    and the file must hold exactly the schema ``circuits build-db`` writes (tables, views, macros,
    indexes and their definitions); anything else is refused with FailedPrecondition.
    """

    def __init__(self, path: str | Path, read_only: bool = True, *, limits: QueryLimits = QueryLimits(),
                 neighbour_index: bool = True, preload: bool = False) -> None:
        self.path = Path(path)
        try:
            found = self.path.is_file()
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte
            raise InvalidArgument(f"{echo(str(path), quote=False)}: not a usable atlas path ({exc.__class__.__name__})") from None
        if not found:
            raise NotFound(f"{echo(str(self.path), quote=False)}: atlas file not found")
        self.read_only = read_only
        self.limits = limits
        self._con = connect(self.path, read_only=read_only)
        self._local = threading.local()
        self._cursors: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._watchdog = QueryWatchdog()
        try:
            verify_atlas(self._con, self.path)
        except BaseException:
            self._con.close()
            raise
        self._upstream_table = "edges_by_target"
        self.has_fts = True
        # build-db always writes the labels table (verify_atlas checked the schema).
        self.has_labels = True
        # Parts of a connectivity folder the build put into projections / weight_edges (empty:
        # built without one; those tables are then empty).
        parts = self._con.execute("SELECT value FROM metadata WHERE key = 'connectivity_parts'").fetchall()
        self.connectivity_parts = frozenset(p for p in (parts[0][0] if parts else "").split(",") if p)
        #: The memory-mapped neighbour index GetEdgesForUnit reads (None: answered by DuckDB) and
        #: why it is or is not used.
        self.neighbours: Any = None
        self.neighbour_index_note = "off"
        if neighbour_index:
            self._open_neighbour_index()
        #: Search postings, neuron label columns and labels in memory (``preload``; the server's
        #: choice): search and label lookups without SQL (circuits_atlas.memory).
        self.memory: Any = None
        if preload:
            from circuits_atlas.memory import MemoryIndex

            try:
                self.memory = MemoryIndex.load(self._con, unit_columns=UNIT_COLUMNS, fts_schema=FTS_SCHEMA)
            except FailedPrecondition as exc:
                log.warning("search and labels are answered by SQL: %s", exc)
            except BaseException:
                self.close()
                raise

    def _open_neighbour_index(self) -> None:
        from circuits_atlas.neighbours import NeighbourIndex, NeighbourIndexUnusable, index_path

        rows = self._con.execute("SELECT value FROM metadata WHERE key = 'build_id'").fetchall()
        build_id = rows[0][0] if rows else None
        edges = self._con.execute("SELECT count(*) FROM edges").fetchone()[0]
        try:
            self.neighbours = NeighbourIndex.open(index_path(self.path), build_id=build_id, edges=edges)
            self.neighbour_index_note = f"using {self.neighbours.path}"
        except NeighbourIndexUnusable as exc:
            self.neighbour_index_note = f"not used: {exc}"
            log.warning("neighbour lookups fall back to DuckDB: %s", exc)

    def _drop_neighbour_index(self, reason: Exception) -> None:
        with self._lock:
            index, self.neighbours = self.neighbours, None
        if index is not None:
            self.neighbour_index_note = f"not used: {reason}"
            # Not closed: a lookup in another thread may still read it; unmapped when unreferenced.
            log.error("neighbour index dropped, lookups fall back to DuckDB: %s", reason)

    # -- plumbing ---------------------------------------------------------------------------
    def __enter__(self) -> CircuitDatabase:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._watchdog.close()
            if self.neighbours is not None:
                self.neighbours.close()
                self.neighbours = None
            for cur in self._cursors:
                try:
                    cur.close()
                except Exception:  # noqa: BLE001
                    pass
            self._con.close()

    def _cursor(self) -> Any:
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            with self._lock:
                if self._closed:
                    raise FailedPrecondition("the atlas database is closed")
                cur = self._con.cursor()
                self._cursors.append(cur)
            self._local.cursor = cur
        return cur

    def _rows(self, sql: str, params: Sequence[Any] = (), *, timeout: float | None = None) -> list[tuple]:
        """Run one parameterised query under the time limit; interrupted queries raise DeadlineExceeded."""
        import duckdb

        limit = self.limits.query_timeout_s if timeout is None else min(timeout, self.limits.query_timeout_s)
        if limit <= 0:
            raise DeadlineExceeded("no time left for the query")
        cur = self._cursor()
        token = self._watchdog.watch(cur, limit)
        try:
            rows = cur.execute(sql, list(params)).fetchall()
        except duckdb.InterruptException:
            self._watchdog.done(token)
            raise DeadlineExceeded(f"query took longer than {limit:g} s and was stopped") from None
        except BaseException:
            self._watchdog.done(token)
            raise
        if not self._watchdog.done(token):
            # Interrupted right after it finished: the answer is complete, but make sure the
            # pending interrupt cannot hit this cursor's next query.
            try:
                cur.execute("SELECT 1").fetchall()
            except duckdb.InterruptException:
                pass
        return rows

    def _limit(self, limit: Any, default: int = 100) -> int:
        if limit is None or limit == 0:
            return min(default, self.limits.max_results)
        limit = _check_int32(limit, "limit", minimum=1)
        return min(limit, self.limits.max_results)

    @staticmethod
    def _unit(row: Sequence[Any], labels: tuple[UnitLabel, ...] | None = None) -> Unit:
        """A unit from its UNIT_COLUMNS row; ``labels`` (from the labels table) replace the ones
        the row's label columns give."""
        layer, neuron, label, input_label, output_label, description, source, appearance, cluster = row
        if labels is None:
            found = []
            if output_label or label:
                found.append(UnitLabel(text=output_label or label, source=source or "progressive_output", description=description or ""))
            if input_label:
                found.append(UnitLabel(text=input_label, source="progressive_input"))
            labels = tuple(found)
        return Unit(
            layer=layer,
            index=neuron,
            label=label or "",
            input_label=input_label or "",
            appearance_count=int(appearance or 0),
            labels=labels,
            cluster=cluster or "",
        )

    def _units(self, rows: Sequence[Sequence[Any]], *, timeout: float | None = None) -> list[Unit]:
        """Units of UNIT_COLUMNS rows, each built once, with its labels from the ``labels`` table
        (one per pass, with scores) when the atlas has them for it."""
        if not self.has_labels or not rows:
            return [self._unit(r) for r in rows]
        by_key = self._labels_by_key([(r[0], r[1]) for r in rows], timeout=timeout)
        return [self._unit(r, by_key.get((r[0], r[1]))) for r in rows]

    def _labels_by_key(self, keys: list[tuple[int, int]], *, timeout: float | None = None) -> dict[tuple[int, int], tuple[UnitLabel, ...]]:
        """(layer, neuron) -> its labels from the ``labels`` table, output pass first; units
        without labels there are left out."""
        if self.memory is not None:
            rows = [(k[0], k[1], *r) for k, rs in self.memory.labels_of(keys).items() for r in rs]
        else:
            # A join on the integer keys (a string key built per labels row costs ~8x more).
            rows = self._rows(
                """
                SELECT l.layer, l.neuron, l.label_pass, l.text, l.description, l.source, l.score_detection,
                       l.score_simulation, l.score_contexts, l.score_positives
                FROM labels l JOIN (SELECT DISTINCT unnest(?::INTEGER[]) AS layer, unnest(?::INTEGER[]) AS neuron) k
                     ON l.layer = k.layer AND l.neuron = k.neuron
                ORDER BY l.layer, l.neuron, CASE l.label_pass WHEN 'output' THEN 0 ELSE 1 END, l.label_pass
                """,
                [[k[0] for k in keys], [k[1] for k in keys]],
                timeout=timeout,
            )
        by_key: dict[tuple[int, int], list[UnitLabel]] = {}
        for layer, neuron, _pass, text, description, source, det, sim, contexts, positives in rows:
            by_key.setdefault((layer, neuron), []).append(UnitLabel(
                text=text, source=source or "", description=description or "", score_detection=det,
                score_simulation=sim, score_contexts=int(contexts or 0), score_positives=int(positives or 0),
            ))
        return {key: tuple(labels) for key, labels in by_key.items()}

    @staticmethod
    def _edge(row: Sequence[Any]) -> Edge:
        sl, sn, tl, tn, count, ws, was, wss, wmin, wmax, mean = row
        return Edge(
            src_layer=sl, src_index=sn, tgt_layer=tl, tgt_index=tn, weight=float(mean), count=int(count),
            weight_sum=float(ws), weight_abs_sum=float(was), weight_sq_sum=float(wss),
            weight_min=float(wmin), weight_max=float(wmax), method="relp",
        )  # fmt: skip

    # -- queries ----------------------------------------------------------------------------
    def search(self, text: str, limit: int | None = 0, *, min_score: float = 0.0,
               timeout: float | None = None) -> list[SearchHit]:
        """Units whose labels match ``text``, best first (``limit`` 0/None: 100).

        BM25 over label, input_label, output_label and description (stemmed words) ranks first;
        if that finds fewer than ``limit`` units, case-insensitive substring matches follow with
        score 0 (ties by appearance count). ``%``/``_`` are literal characters. ``min_score`` > 0
        keeps only units with a label whose detection score is at least that.
        """
        text = _clean_text(text, self.limits)
        limit = self._limit(limit)
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0.0 <= min_score <= 1.0:
            raise InvalidArgument(f"min_score must be a number in [0, 1], got {min_score!r}")
        if min_score > 0 and not self.has_labels:
            raise FailedPrecondition(f"{self.path}: this atlas has no label scores (rebuild it with scored labels)")
        score_filter = "AND coalesce(n.score_detection, -1) >= ?" if min_score > 0 else ""
        score_args = [float(min_score)] if min_score > 0 else []
        cols = ", ".join(f"n.{c}" for c in UNIT_COLUMNS)
        scored: list[tuple[Sequence[Any], float]] = []  # (UNIT_COLUMNS row, score), best first
        if self.has_fts and self.memory is not None:
            if timeout is not None and timeout <= 0:
                raise DeadlineExceeded("no time left for the query")
            docs, scores = self.memory.top_docs(self.memory.term_ids(self._cursor(), text), limit, float(min_score))
            rows = self.memory.unit_rows_of_docs(docs)
            scored = [(r, float(sc)) for r, sc in zip(rows, scores.tolist()) if r is not None]
        elif self.has_fts:
            sql = BM25_SQL if not score_filter else BM25_FILTERED_SQL
            params = [text, limit] if not score_filter else [text, *score_args, limit]
            rows = self._rows(sql.format(cols=cols, fts=FTS_SCHEMA), params, timeout=timeout)
            scored = [(r[:-1], float(r[-1])) for r in rows]
        if len(scored) < limit:
            found = [f"L{r[0]}/N{r[1]}" for r, _score in scored]
            pattern = _like_pattern(text)
            rows = self._rows(
                f"""
                SELECT {cols} FROM neurons n
                WHERE (n.label ILIKE ? ESCAPE '\\' OR n.input_label ILIKE ? ESCAPE '\\'
                       OR n.output_label ILIKE ? ESCAPE '\\' OR n.description ILIKE ? ESCAPE '\\')
                  AND NOT list_contains(?::VARCHAR[], n.unit_id) {score_filter}
                ORDER BY n.appearance_count DESC, n.layer, n.neuron
                LIMIT ?
                """,
                [pattern, pattern, pattern, pattern, found, *score_args, limit - len(scored)],
                timeout=timeout,
            )
            scored.extend((r, 0.0) for r in rows)
        units = self._units([r for r, _score in scored], timeout=timeout)
        return [SearchHit(unit=u, score=score) for u, (_row, score) in zip(units, scored)]

    def search_units(self, text: str, limit: int | None = 100) -> list[Unit]:
        """Seed-compatible: the units of :meth:`search`, best first."""
        return [hit.unit for hit in self.search(text, limit)]

    def get_unit(self, layer: int, index: int, *, timeout: float | None = None) -> Unit | None:
        """The unit ``(layer, index)`` or None."""
        layer = _check_int32(layer, "layer")
        index = _check_int32(index, "index")
        rows = self._rows(
            f"SELECT {', '.join(UNIT_COLUMNS)} FROM neurons WHERE layer = ? AND neuron = ?", [layer, index], timeout=timeout
        )
        return self._units(rows[:1], timeout=timeout)[0] if rows else None

    def get_unit_card(self, layer: int, index: int, *, timeout: float | None = None) -> UnitCard | None:
        """The unit ``(layer, index)`` with its activation statistics, innermost cluster and edge
        counts (downstream = edges leaving it, upstream = edges entering it), or None."""
        layer = _check_int32(layer, "layer")
        index = _check_int32(index, "index")
        rows = self._rows(
            f"""
            SELECT {', '.join('n.' + c for c in UNIT_COLUMNS)},
                   n.observation_count, n.mean_activation, n.max_activation, n.mean_attribution,
                   n.output_norm, n.num_exemplars,
                   c.cluster_path, c.level, c.size, c.layer_min, c.layer_max, c.median_layer,
                   (SELECT count(*) FROM edges WHERE src_layer = ? AND src_neuron = ?),
                   (SELECT count(*) FROM {self._upstream_table} WHERE tgt_layer = ? AND tgt_neuron = ?)
            FROM neurons n LEFT JOIN clusters c ON c.cluster_path = n.cluster_path
            WHERE n.layer = ? AND n.neuron = ?
            """,
            [layer, index, layer, index, layer, index],
            timeout=timeout,
        )
        if not rows:
            return None
        row = rows[0]
        k = len(UNIT_COLUMNS)
        obs, mean_act, max_act, mean_attr, norm, exemplars = row[k : k + 6]
        path, level, size, lmin, lmax, median = row[k + 6 : k + 12]
        cluster = None
        if path is not None:
            cluster = ClusterInfo(
                cluster_path=path, level=int(level), size=int(size), layer_min=int(lmin), layer_max=int(lmax),
                median_layer=float(median),
            )  # fmt: skip
        stats = UnitActivationStats(
            observation_count=int(obs or 0),
            mean_activation=None if mean_act is None else float(mean_act),
            max_activation=None if max_act is None else float(max_act),
            mean_attribution=None if mean_attr is None else float(mean_attr),
            output_norm=None if norm is None else float(norm),
            num_exemplars=None if exemplars is None else int(exemplars),
        )
        return UnitCard(
            unit=self._unit(row[:k]), stats=stats, cluster=cluster,
            downstream_edges=int(row[k + 12]), upstream_edges=int(row[k + 13]),
        )  # fmt: skip

    def get_edges_for_unit(
        self,
        layer: int,
        index: int,
        direction: str = "both",
        limit: int | None = 0,
        min_count: int = 0,
        *,
        timeout: float | None = None,
    ) -> list[Edge]:
        """Edges leaving (downstream) and/or entering (upstream) a unit; ``both`` = downstream then
        upstream. Each direction holds at most ``limit`` edges with ``count >= min_count``, the most
        frequent first (then largest mean |w|, then endpoint keys)."""
        layer = _check_int32(layer, "layer")
        index = _check_int32(index, "index")
        if direction not in EDGE_DIRECTIONS:
            raise InvalidArgument(f"direction must be one of {', '.join(EDGE_DIRECTIONS)}, got {echo(direction)}")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
            raise InvalidArgument(f"min_count must be a non-negative integer, got {echo(min_count)}")
        limit = self._limit(limit)
        sides = {"downstream": (0,), "upstream": (1,), "both": (0, 1)}[direction]
        neighbours = self.neighbours
        if neighbours is not None:
            from circuits_atlas.neighbours import NeighbourIndexUnusable

            if timeout is not None and timeout <= 0:
                raise DeadlineExceeded("no time left for the query")
            try:
                return [self._edge(r) for side in sides for r in neighbours.edges_of(layer, index, side, limit, min_count)]
            except (NeighbourIndexUnusable, IndexError, ValueError) as exc:
                self._drop_neighbour_index(exc)
        parts = []
        params: list[Any] = []
        for side in sides:
            key, other = ("src", "tgt") if side == 0 else ("tgt", "src")
            table = "edges" if side == 0 else self._upstream_table
            parts.append(
                f"""(SELECT {EDGE_SELECT}, {side} AS side, mean_abs_weight FROM {table}
                    WHERE {key}_layer = ? AND {key}_neuron = ? AND count >= ?
                    ORDER BY count DESC, mean_abs_weight DESC, {other}_layer, {other}_neuron LIMIT ?)"""
            )
            params += [layer, index, min_count, limit]
        sql = " UNION ALL ".join(parts)
        if len(parts) > 1:
            sql = f"SELECT * FROM ({sql}) ORDER BY side, count DESC, mean_abs_weight DESC, src_layer, src_neuron, tgt_layer, tgt_neuron"
        rows = self._rows(sql, params, timeout=timeout)
        return [self._edge(r[:11]) for r in rows]

    def get_unit_projections(self, layer: int, index: int, *, timeout: float | None = None) -> UnitProjections:
        """A neuron's output and input projections (``projections`` table); NotFound when the atlas
        has no row for it, FailedPrecondition when it was built without a connectivity folder."""
        from circuits_atlas.connectivity import projections_query, unit_projections_from_row

        layer = _check_int32(layer, "layer")
        index = _check_int32(index, "index")
        self._require_connectivity("projections", ("output", "input"))
        rows = self._rows(projections_query(), [layer, index], timeout=timeout)
        if not rows:
            raise NotFound(f"unit L{layer}/N{index} has no projections in the atlas")
        return unit_projections_from_row(rows[0])

    def get_weight_edges(
        self,
        layer: int,
        index: int,
        direction: str = "upstream",
        limit: int | None = 0,
        polarity: int = 0,
        *,
        timeout: float | None = None,
    ) -> list[WeightEdge]:
        """Weight-graph edges entering (upstream) and/or leaving (downstream) a unit, at most
        ``limit`` per direction and polarity, strongest |strength| first; ``both`` = upstream then
        downstream. ``polarity``: +1 excitatory only, -1 inhibitory only, 0 both (excitatory first)."""
        from circuits_atlas.connectivity import weight_edges_query, weight_edge_from_row

        layer = _check_int32(layer, "layer")
        index = _check_int32(index, "index")
        if direction not in EDGE_DIRECTIONS:
            raise InvalidArgument(f"direction must be one of {', '.join(EDGE_DIRECTIONS)}, got {direction!r}")
        if polarity not in (-1, 0, 1) or isinstance(polarity, bool):
            raise InvalidArgument(f"polarity must be 1 (excitatory), -1 (inhibitory) or 0 (both), got {polarity!r}")
        self._require_connectivity("weight_edges", ("weights",))
        limit = self._limit(limit)
        sql, params = weight_edges_query(layer, index, direction, limit, polarity)
        return [weight_edge_from_row(r) for r in self._rows(sql, params, timeout=timeout)]

    def _require_connectivity(self, table: str, parts: tuple[str, ...]) -> None:
        if not self.connectivity_parts & set(parts):
            raise FailedPrecondition(
                f"{echo(str(self.path), quote=False)}: the atlas's {table} table is empty (built without connectivity {'/'.join(parts)}); "
                "build it with `circuits build-db --connectivity DIR`"
            )

    def get_cluster(self, cluster: str | int, limit: int | None = 0, *, timeout: float | None = None) -> ClusterMembers:
        """A cluster by top-level id (``3``/``"3"``) or hierarchy path (``"3.1"``) and its members
        (every unit whose path starts with it) ordered by layer, neuron; NotFound if absent."""
        path = str(cluster).strip()
        if not _CLUSTER_PATH.match(path):
            raise InvalidArgument(f"cluster must be a number or a dotted path like '3.1', got {echo(str(cluster), 60)}")
        limit = self._limit(limit)
        info_rows = self._rows(
            "SELECT cluster_path, level, size, layer_min, layer_max, median_layer FROM clusters WHERE cluster_path = ?",
            [path],
            timeout=timeout,
        )
        if not info_rows:
            raise NotFound(f"cluster {path} not found")
        p, level, size, lmin, lmax, median = info_rows[0]
        rows = self._rows(
            f"""
            SELECT {', '.join(UNIT_COLUMNS)} FROM neurons
            WHERE top_cluster = ? AND (cluster_path = ? OR starts_with(cluster_path, ?))
            ORDER BY layer, neuron LIMIT ?
            """,
            [int(path.split(".")[0]), path, path + ".", limit],
            timeout=timeout,
        )
        info = ClusterInfo(
            cluster_path=p, level=int(level), size=int(size), layer_min=int(lmin), layer_max=int(lmax),
            median_layer=float(median),
        )  # fmt: skip
        return ClusterMembers(cluster=info, units=tuple(self._units(rows, timeout=timeout)))

    def get_units_by_cluster(self, top_cluster: int | str, limit: int | None = None) -> list[Unit]:
        """Seed-compatible: member units of a cluster ordered by layer, neuron ([] if absent)."""
        try:
            return list(self.get_cluster(top_cluster, limit).units)
        except NotFound:
            return []

    def stats(self, *, timeout: float | None = None) -> AtlasStats:
        """Row counts and the metadata table."""
        counts = {
            name: self._rows(f"SELECT count(*) FROM {name}", timeout=timeout)[0][0] for name in ("neurons", "edges", "clusters")
        }
        metadata = dict(self._rows("SELECT key, value FROM metadata ORDER BY key", timeout=timeout))
        return AtlasStats(neurons=counts["neurons"], edges=counts["edges"], clusters=counts["clusters"], metadata=metadata)

    def get_stats(self) -> dict[str, Any]:
        """Seed-compatible: ``{"neurons": n, "edges": n, "clusters": n, "metadata": {...}}``."""
        s = self.stats()
        return {"neurons": s.neurons, "edges": s.edges, "clusters": s.clusters, "metadata": dict(s.metadata)}
