"""AggregatorClient: the Python client of the exactly-once aggregation service.

``with AggregatorClient("localhost:50052") as agg: agg.ingest(graphs); agg.stats()``.

:meth:`AggregatorClient.ingest` streams graphs with back-pressure: at most ``max_in_flight``
graphs are sent and not yet acknowledged. The client keeps every graph until the server
acknowledges it (an ack means durably committed). When the stream breaks (server killed,
restarted, network gone: UNAVAILABLE), it reconnects with backoff and re-sends every
unacknowledged graph first; graphs that were committed but whose ack was lost come back as
duplicates and are counted once by the server's ledger. Other errors (INVALID_ARGUMENT for a
malformed graph) are raised as the same :class:`~circuits_core.errors.CircuitsError` classes.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc

from circuits_core import wire
from circuits_core.aggregator_types import AggregatorStats, EdgeColumns, IngestAck, IngestReport, content_graph_id
from circuits_sdk._channel import DEFAULT_TIMEOUT, call_unary, iterate_stream, open_channel, translate
from circuits_core.errors import Unavailable
from circuits_core.schemas import Edge, Graph

_RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


class AggregatorClient:
    """Client of ``circuits.v1.AggregatorService`` at ``target`` (``host:port``)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_in_flight: int = 512,
        reconnect_timeout: float = 60.0,
        token: str = "",
        tls_ca_file: str = "",
        tls_cert_file: str = "",
        tls_key_file: str = "",
    ) -> None:
        from circuits_core._proto.circuits.v1 import aggregator_pb2, aggregator_pb2_grpc, graph_pb2

        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._pb = aggregator_pb2
        self._graph_pb = graph_pb2
        self.target = target
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.reconnect_timeout = reconnect_timeout
        self._channel = open_channel(target, token=token, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file)
        self._stub = aggregator_pb2_grpc.AggregatorServiceStub(self._channel)

    def __enter__(self) -> AggregatorClient:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # ------------------------------------------------------------------ ingest
    def _to_message(self, graph: Any) -> Any:
        """A Graph message with a graph_id (the content id of its encoding when it has none)."""
        if isinstance(graph, Graph):
            msg = wire.graph_to_proto(graph)
        elif isinstance(graph, self._graph_pb.Graph):
            msg = graph
        else:
            raise TypeError(f"ingest takes circuits_core.schemas.Graph or circuits.v1.Graph, got {type(graph).__name__}")
        if not msg.graph_id:
            copy = self._graph_pb.Graph()
            copy.CopyFrom(msg)
            copy.graph_id = content_graph_id(msg.SerializeToString(deterministic=True))
            msg = copy
        return msg

    def ingest(
        self,
        graphs: Iterable[Any],
        *,
        max_in_flight: int | None = None,
        on_ack: Callable[[IngestAck], None] | None = None,
    ) -> IngestReport:
        """Send every graph until the server acknowledged it as committed; return a summary.

        ``graphs`` yields :class:`circuits_core.schemas.Graph` or ``circuits.v1.Graph`` messages; it is
        consumed lazily (at most ``max_in_flight`` unacknowledged graphs are held). Reconnects on
        UNAVAILABLE for up to ``reconnect_timeout`` seconds without progress, then raises
        Unavailable; other errors raise at once (graphs acknowledged before stay counted).
        """
        window = max_in_flight or self.max_in_flight
        source = iter(graphs)
        cond = threading.Condition()
        source_lock = threading.Lock()
        in_flight: OrderedDict[str, Any] = OrderedDict()
        to_send: deque[Any] = deque()
        state = {"exhausted": False, "error": None, "acked": 0, "duplicates": 0, "total": 0, "resent": 0}
        rejected: list[str] = []
        conflicts: list[str] = []

        def requests(closed: threading.Event) -> Iterator[Any]:
            # Never yield while holding `cond`: grpc resumes this generator from its own thread.
            while True:
                resend = None
                with cond:
                    while not closed.is_set() and not to_send and len(in_flight) >= window:
                        cond.wait(0.05)
                    if closed.is_set():
                        return
                    if to_send:
                        resend = to_send.popleft()
                        if resend.graph_id not in in_flight:
                            continue
                    elif state["exhausted"]:
                        return
                if resend is not None:
                    yield resend
                    continue
                with source_lock:
                    try:
                        msg = self._to_message(next(source))
                    except StopIteration:
                        with cond:
                            state["exhausted"] = True
                        return
                    except BaseException as exc:  # noqa: BLE001 - re-raised by ingest()
                        with cond:
                            state["error"] = exc
                            state["exhausted"] = True
                        return
                with cond:
                    in_flight[msg.graph_id] = msg
                    if closed.is_set():  # this attempt died while we read; the next one sends it
                        to_send.append(msg)
                        return
                yield msg

        reconnects = 0
        last_progress = time.monotonic()
        delay = 0.05
        while True:
            closed = threading.Event()
            with cond:
                to_send.clear()
                to_send.extend(in_flight.values())
                if reconnects:
                    state["resent"] += len(in_flight)
            call = self._stub.Ingest(requests(closed))
            failure: grpc.RpcError | None = None
            try:
                for msg in call:
                    ack = wire.ingest_ack_from_proto(msg)
                    with cond:
                        for gid in (*ack.graph_ids, *ack.rejected_graph_ids):
                            in_flight.pop(gid, None)
                        state["acked"] += len(ack.graph_ids)
                        state["duplicates"] += ack.duplicates
                        state["total"] = ack.graphs_total
                        rejected.extend(ack.rejected_graph_ids)
                        conflicts.extend(ack.conflict_graph_ids)
                        cond.notify_all()
                    last_progress = time.monotonic()
                    delay = 0.05
                    if on_ack is not None:
                        on_ack(ack)
            except grpc.RpcError as exc:
                failure = exc
            finally:
                closed.set()
                call.cancel()
                with cond:
                    cond.notify_all()
            if failure is not None and failure.code() not in _RECONNECT_CODES:
                raise translate(failure) from None
            with cond:
                finished = state["exhausted"] and not in_flight
            if finished:
                break
            if time.monotonic() - last_progress > self.reconnect_timeout:
                detail = translate(failure) if failure is not None else "stream ended with graphs unacknowledged"
                raise Unavailable(f"aggregator at {self.target}: no progress for {self.reconnect_timeout:.0f}s ({detail})")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
            reconnects += 1
        if state["error"] is not None:
            raise state["error"]
        return IngestReport(
            acked=state["acked"],
            duplicates=state["duplicates"],
            rejected_graph_ids=tuple(rejected),
            conflict_graph_ids=tuple(conflicts),
            reconnects=reconnects,
            resent=state["resent"],
            graphs_total=state["total"],
        )

    # ------------------------------------------------------------------ queries
    def iter_edge_columns(
        self, *, min_count: int = 1, limit: int = 0, batch_size: int = 0, timeout: float | None = None
    ) -> Iterator[EdgeColumns]:
        """Aggregated edges (count >= min_count, most observed first) as column batches."""
        request = self._pb.GetEdgesRequest(min_count=min_count, limit=limit, batch_size=batch_size)
        stream = self._stub.GetEdges(request, timeout=self.timeout if timeout is None else timeout)
        for msg in iterate_stream(stream):
            yield wire.edge_columns_from_proto(msg)

    def get_edges(self, min_count: int = 1, limit: int = 0, *, timeout: float | None = None) -> list[Edge]:
        """Aggregated edges as :class:`~circuits_core.schemas.Edge` (weight = mean weight)."""
        edges: list[Edge] = []
        for cols in self.iter_edge_columns(min_count=min_count, limit=limit, timeout=timeout):
            edges.extend(cols.to_edges())
        return edges

    def stats(self, *, timeout: float | None = None) -> AggregatorStats:
        msg = call_unary(
            self._stub.Stats, self._pb.StatsRequest(), timeout=self.timeout if timeout is None else timeout, idempotent=True
        )
        return wire.aggregator_stats_from_proto(msg)

    def export(self, directory: str | Path, *, min_count: int = 1, timeout: float | None = None) -> list[str]:
        """Ask the server to write a Parquet snapshot into ``directory`` (on the server's filesystem)."""
        msg = call_unary(
            self._stub.Export,
            self._pb.ExportRequest(directory=str(directory), min_count=min_count),
            timeout=self.timeout if timeout is None else timeout,
            idempotent=True,
        )
        return list(msg.files)
