"""Micro-batched ingestion of a stream of graphs, transport-neutral (the Ingest RPC uses it).

Graphs arrive one by one; committing each alone would cost a transaction per graph. The stream
groups them into micro-batches - at most ``max_graphs`` graphs; fewer once no graph arrived for
``max_delay_s`` (the sender paused or waits for acks) or ``max_wait_s`` after the batch's first
graph - commits each batch in one transaction and only then yields its
:class:`~circuits_core.aggregator_types.IngestAck`. A reader thread keeps pulling graphs while a
batch commits, and lets the time limits fire while the sender is idle (a client with a bounded
window waits for acks before it sends more).

Why an idle gap rather than a fixed window: a steady stream then fills whole batches, and a
batch costs about the same to commit whatever its size while grouping more graphs at once
leaves fewer rows to write. With a fixed 50 ms window, a stream arriving at ~1,000 graphs/s
made batches of ~50 graphs: 3.3 ms of CPU per 10k-link graph in the store, against 1.6 ms with
batches of 250.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from circuits_core.aggregator_types import GraphArrays, IngestAck

from circuits_aggregator.store import AggregateStore

_END = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchPolicy:
    """When a micro-batch is committed."""

    #: Commit after this many graphs ...
    max_graphs: int = 256
    #: ... or once no graph arrived for this long ...
    max_delay_s: float = 0.05
    #: ... or this long after the batch's first graph arrived.
    max_wait_s: float = 1.0


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def ingest_stream(
    store: AggregateStore, graphs: Iterable[GraphArrays], *, policy: BatchPolicy | None = None
) -> Iterator[IngestAck]:
    """Commit ``graphs`` in micro-batches; yield one ack per committed batch, after its commit.

    An exception raised while producing graphs (a malformed message) is re-raised here after the
    graphs before it were committed and acknowledged; graphs after it are not counted.
    """
    policy = policy or BatchPolicy()
    inbox: queue.Queue = queue.Queue(maxsize=max(2 * policy.max_graphs, 16))
    stop = threading.Event()

    def pump() -> None:
        try:
            for graph in graphs:
                while not stop.is_set():
                    try:
                        inbox.put(graph, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            inbox.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            inbox.put(_Failure(exc))

    reader = threading.Thread(target=pump, name="ingest-reader", daemon=True)
    reader.start()
    try:
        done = False
        while not done:
            item = inbox.get()
            if item is _END:
                break
            batch: list[GraphArrays] = []
            failure: _Failure | None = None
            if isinstance(item, _Failure):
                failure = item
            else:
                batch.append(item)
                deadline = time.monotonic() + policy.max_wait_s
                while len(batch) < policy.max_graphs:
                    remaining = min(deadline - time.monotonic(), policy.max_delay_s)
                    try:
                        item = inbox.get(timeout=remaining) if remaining > 0 else inbox.get_nowait()
                    except queue.Empty:
                        break
                    if item is _END:
                        done = True
                        break
                    if isinstance(item, _Failure):
                        failure = item
                        break
                    batch.append(item)
            if batch:
                yield store.ingest(batch)
            if failure is not None:
                raise failure.exc
    finally:
        stop.set()
