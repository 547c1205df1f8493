"""The attribution service's domain object, independent of any transport.

:class:`AttributionRunner` owns a small pool of attribution engines (replicas of one
:class:`AttributionEngine`, e.g. ``RelPAttributor`` copies that share one copy of the model
weights), each served by its own engine thread, and runs requests on them:

* requests wait in one first-come-first-served queue; an engine takes the request at the head and,
  with ``max_batch > 1``, the trace requests that follow it (up to ``max_batch``, waiting at most
  ``batch_window_s`` after the first one arrived) and traces them as one batch
  (:meth:`AttributionEngine.trace_many`; each graph equals the request's single trace);
* at most ``max_concurrent`` batches run at once (one per engine replica);
* at most ``max_queue`` requests wait beyond what the engines can take at once; one more is
  refused at once with :class:`~circuits_core.errors.ResourceExhausted`;
* a request whose ``should_stop()`` turns true (client cancelled, deadline passed) leaves the
  queue, or leaves its running batch at once; a batch whose requests all stopped stops at the
  engine's next checkpoint (RelPAttributor: the next decoder layer forward or attention layer
  backward, edge chunk or block of graph edges) and frees its engine;
* :meth:`AttributionRunner.close` refuses new work, fails queued requests, lets running batches
  finish for a grace period, then stops the rest.

Per-request settings travel in the :class:`~circuits_core.tracing.TraceRequest`; an engine is never
reconfigured between requests. Tests inject fakes that subclass :class:`AttributionEngine`,
``__main__`` picks the real ``RelPAttributor``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from circuits_core.activations import ActivationRequest, ActivationResult
from circuits_core.errors import Cancelled, CircuitsError, InvalidArgument, ResourceExhausted, Unavailable
from circuits_core.interventions import InterventionRequest, InterventionResult
from circuits_core.limits import DEFAULT_LIMITS
from circuits_core.limits import flag as limit_flag
from circuits_core.patching import PatchRequest, PatchResult
from circuits_core.schemas import Graph
from circuits_core.tracing import ModelInfo, TraceRequest

log = logging.getLogger("circuits_attribution.service")

StopCheck = Callable[[], bool]

#: Seconds the last request of a batch to be cancelled waits for the engine to stop, so that a
#: cancelled call returns with its engine free again (engines stop within one layer).
_ENGINE_STOP_WAIT_S = 10.0
#: Seconds close() waits for aborted batches to hand their engines back.
_ABORT_WAIT_S = 5.0


#: Prompts one GetActivations request may carry (each bounded by max_prompt_chars at the edge).
MAX_ACTIVATION_PROMPTS = 256


class AttributionEngine(Protocol):
    """What :class:`AttributionRunner` needs from an engine (``RelPAttributor`` is the real one).

    ``trace``, ``trace_many``, ``intervene`` and ``patch`` run on one replica held exclusively by the caller;
    they give up (raising any error) soon after ``should_stop()`` turns true.
    """

    #: Whether replicas made by :meth:`replicate` may run at the same time in one process (False:
    #: the runner serializes their calls, e.g. when they patch process-global state).
    replicas_trace_concurrently: bool

    def trace(self, request: TraceRequest, *, should_stop: StopCheck) -> Graph: ...

    def trace_many(self, requests: Sequence[TraceRequest], *, should_stop: StopCheck) -> list[Graph | CircuitsError]:
        """Trace ``requests`` as one batch; the result is aligned with them: each request's Graph
        or the InvalidArgument it alone raised (other errors fail the whole batch).

        Optional: for an engine without it (or subclasses keeping this default) the runner traces
        a batch's requests one after another with :meth:`trace`.
        """
        return trace_one_by_one(self, requests, should_stop=should_stop)

    def intervene(self, request: InterventionRequest, *, should_stop: StopCheck) -> InterventionResult: ...

    def activations(self, request: ActivationRequest, *, should_stop: StopCheck) -> ActivationResult: ...

    def patch(self, request: PatchRequest, *, should_stop: StopCheck) -> PatchResult: ...

    def model_info(self) -> ModelInfo: ...

    def replicate(self) -> AttributionEngine:
        """Another engine over the same model (sharing its weights), safe to use from another thread."""
        ...


class RunnerObserver(Protocol):
    """Receives the runner's load and results (the server turns them into Prometheus metrics)."""

    def on_load(self, *, waiting: int, running: int) -> None: ...

    def on_graph(self, graph: Graph, *, seconds: float) -> None: ...

    def on_batch(self, size: int) -> None: ...


class _Ticket:
    """One request inside the runner: queued, then taken into a batch by an engine, then done."""

    __slots__ = ("kind", "request", "should_stop", "enqueued", "batch", "done", "result", "error", "abandoned")

    def __init__(self, kind: str, request: Any, should_stop: StopCheck) -> None:
        self.kind = kind  # "trace" | "intervene" | "patch" | "activations"
        self.request = request
        self.should_stop = should_stop
        self.enqueued = time.monotonic()
        self.batch: list[_Ticket] | None = None  # set when an engine takes it
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False  # its caller gave up (cancelled, deadline)

    def stopped(self) -> bool:
        return self.abandoned or bool(self.should_stop())


class _EngineSlot:
    """One engine replica and the batch it is forming or running."""

    __slots__ = ("engine", "state", "batch")

    def __init__(self, engine: AttributionEngine) -> None:
        self.engine = engine
        self.state = "idle"  # idle | forming | running
        self.batch: list[_Ticket] = []


def _never() -> bool:
    return False


class AttributionRunner:
    """Bounded-queue, batching execution of traces on a pool of engines (one thread each)."""

    def __init__(
        self,
        *,
        max_concurrent: int = 1,
        max_queue: int = 8,
        max_batch: int = 1,
        batch_window_s: float = 0.0,
        observer: RunnerObserver | None = None,
        poll_seconds: float = 0.05,
        max_nodes_per_graph: int = DEFAULT_LIMITS.max_nodes_per_graph,
        max_k: int = DEFAULT_LIMITS.max_k,
    ) -> None:
        """``max_batch`` requests at most per engine call (1: no batching); ``batch_window_s``: how
        long a batch waits for more requests after its first one arrived. ``max_nodes_per_graph``
        and ``max_k`` cap a request's ``max_nodes`` and ``k`` (0 = no cap)."""
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not batch_window_s >= 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.observer = observer
        self.poll_seconds = poll_seconds
        self.max_nodes_per_graph = max_nodes_per_graph
        self.max_k = max_k
        self._cond = threading.Condition()
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._slots: list[_EngineSlot] = []
        self._threads: list[threading.Thread] = []
        self._running = 0
        self._closing = False
        self._abort_running = False
        self._model_info: ModelInfo | None = None
        self._one_at_a_time: threading.Lock | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def attach(self, engine: AttributionEngine) -> None:
        """Make the runner ready: ``engine`` and ``max_concurrent - 1`` replicas of it form the
        pool, each served by an engine thread.

        Replicas that may not run concurrently (``replicas_trace_concurrently`` false) have their
        engine calls serialized; requests still queue, batch and cancel as usual.
        """
        engines = [engine, *(engine.replicate() for _ in range(self.max_concurrent - 1))]
        info = engine.model_info()
        one_at_a_time = len(engines) > 1 and not engine.replicas_trace_concurrently
        if one_at_a_time:
            log.warning("%s replicas share process-global state: traces compute one at a time", type(engine).__name__)
        self._one_at_a_time = threading.Lock() if one_at_a_time else None
        slots = [_EngineSlot(e) for e in engines]
        with self._cond:
            if self._closing:
                raise Unavailable("attribution server is shutting down")
            self._slots = slots
            self._model_info = info
            self._cond.notify_all()
        for number, slot in enumerate(slots):
            thread = threading.Thread(target=self._serve, args=(slot,), name=f"attribution-engine-{number}", daemon=True)
            self._threads.append(thread)
            thread.start()

    @property
    def ready(self) -> bool:
        return self._model_info is not None and not self._closing

    @property
    def model_info(self) -> ModelInfo:
        if self._model_info is None:
            raise Unavailable("the model is still loading; retry when the server reports SERVING")
        return self._model_info

    @property
    def waiting(self) -> int:
        """Requests in the queue (not yet taken by an engine)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests taken by engines (in a batch being formed or traced)."""
        return self._running

    def close(self, *, grace: float = 10.0) -> None:
        """Refuse new work, fail queued requests, wait up to ``grace`` seconds for running batches,
        then stop them (they stop at the engine's next checkpoint)."""
        with self._cond:
            self._closing = True
            while self._queue:
                ticket = self._queue.popleft()
                ticket.error = Unavailable("attribution server is shutting down")
                ticket.done.set()
            self._cond.notify_all()
            deadline = time.monotonic() + grace
            while self._running and time.monotonic() < deadline:
                self._cond.wait(min(self.poll_seconds, max(0.0, deadline - time.monotonic())))
            if self._running:
                log.warning("stopping %d running trace(s) after %.1fs grace", self._running, grace)
                self._abort_running = True
                self._cond.notify_all()
                # The batches stop at their next checkpoint; give them a moment to hand back.
                stop_by = time.monotonic() + _ABORT_WAIT_S
                while self._running and time.monotonic() < stop_by:
                    self._cond.wait(self.poll_seconds)
                if self._running:
                    log.error("%d trace(s) did not stop within %.0fs of the abort", self._running, _ABORT_WAIT_S)
        self._report_load()

    # -- work -------------------------------------------------------------------------------
    def trace(self, request: TraceRequest, *, should_stop: StopCheck | None = None) -> Graph:
        """Trace ``request`` on an engine (possibly batched with other requests); blocks while queued.

        Raises ResourceExhausted (queue full), Unavailable (loading / shutting down),
        Cancelled (``should_stop()`` became true), or whatever the engine raises for bad input
        (InvalidArgument).
        """
        return self.wait(self.submit(request, should_stop=should_stop), should_stop=should_stop)

    def submit(self, request: TraceRequest, *, should_stop: StopCheck | None = None) -> _Ticket:
        """Queue ``request`` and return its ticket at once (for :meth:`wait`); ResourceExhausted
        when the queue is full. Lets one caller keep several requests in flight (TraceBatch)."""
        check_trace_limits(request, max_nodes_per_graph=self.max_nodes_per_graph, max_k=self.max_k)
        return self._enqueue(_Ticket("trace", request, should_stop or _never))

    def trace_stream(
        self, requests: Iterable[TraceRequest], *, should_stop: StopCheck | None = None, depth: int | None = None
    ) -> Iterator[Graph]:
        """Trace a stream of requests, yielding graphs in request order, with up to ``depth``
        (default ``max_batch``) of them queued or running at once so that one stream fills batches.

        ``requests`` is read on a helper thread as the graphs are consumed (a client that sends its
        next request only after reading a graph works too). When the queue is full, the stream
        waits for one of its own requests instead of failing (it fails only with none in flight).
        An error of request ``n`` (bad request, iteration error, cancellation) is raised as
        ``request n: ...`` with its class kept, after the graphs before it; the stream stops there.
        """
        should_stop = should_stop or _never
        depth = max(1, depth or self.max_batch)
        feed = _StreamFeed(depth)
        reader = threading.Thread(
            target=self._feed_stream, args=(iter(requests), feed, should_stop), name="attribution-stream", daemon=True
        )
        reader.start()
        try:
            while True:
                entry = feed.next(should_stop, self.poll_seconds)
                if entry is None:
                    return
                number, item = entry
                try:
                    if isinstance(item, BaseException):
                        raise item
                    graph = self.wait(item, should_stop=should_stop)
                except CircuitsError as exc:
                    raise type(exc)(f"request {number}: {exc}") from None
                finally:
                    feed.finished_one()
                yield graph
        finally:
            feed.close()
            for ticket in feed.pending():
                self.abandon(ticket)

    def _feed_stream(self, requests: Iterator[TraceRequest], feed: _StreamFeed, should_stop: StopCheck) -> None:
        number = 0
        try:
            while feed.wait_for_room(should_stop, self.poll_seconds):
                try:
                    request = next(requests)
                except StopIteration:
                    break
                while True:
                    try:
                        ticket = self.submit(request, should_stop=should_stop)
                        break
                    except ResourceExhausted:
                        if not feed.wait_for_one_done(should_stop, self.poll_seconds):
                            raise
                if not feed.put(number, ticket):
                    self.abandon(ticket)
                    return
                number += 1
        except Exception as exc:  # noqa: BLE001 - handed to the consumer in request order
            error = exc if isinstance(exc, CircuitsError) else InvalidArgument(f"cannot read the request: {exc}")
            feed.put(number, error)
        feed.end()

    def intervene(self, request: InterventionRequest, *, should_stop: StopCheck | None = None) -> InterventionResult:
        """Run an intervention on an engine, with the same queueing, limits and stop semantics as :meth:`trace`."""
        return self.wait(self._enqueue(_Ticket("intervene", request, should_stop or _never)), should_stop=should_stop)

    def activations(self, request: ActivationRequest, *, should_stop: StopCheck | None = None) -> ActivationResult:
        """Read per-token neuron activations on a free engine (same queueing, limits and stop
        semantics as :meth:`trace`); at most MAX_ACTIVATION_PROMPTS prompts and
        ``max_units_per_request`` neurons per request."""
        if len(request.prompts) > MAX_ACTIVATION_PROMPTS:
            raise InvalidArgument(f"{len(request.prompts)} prompts, over the limit of {MAX_ACTIVATION_PROMPTS} per request")
        DEFAULT_LIMITS.check("max_units_per_request", len(request.neurons), "GetActivations request has", unit="neurons")
        return self.wait(self._enqueue(_Ticket("activations", request, should_stop or _never)), should_stop=should_stop)

    def patch(self, request: PatchRequest, *, should_stop: StopCheck | None = None) -> PatchResult:
        """Activation patching on an engine, with the same queueing, limits and stop semantics as :meth:`trace`."""
        return self.wait(self._enqueue(_Ticket("patch", request, should_stop or _never)), should_stop=should_stop)

    def wait(self, ticket: _Ticket, *, should_stop: StopCheck | None = None) -> Any:
        """The result of a submitted request; Cancelled once ``should_stop()`` (default: the
        ticket's own) turns true."""
        should_stop = should_stop or ticket.should_stop
        while not ticket.done.wait(self.poll_seconds):
            if should_stop():
                self.abandon(ticket)
                raise Cancelled(
                    "request cancelled while waiting in the queue" if ticket.batch is None
                    else "request cancelled or past its deadline"
                )
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def abandon(self, ticket: _Ticket) -> None:
        """Give up on a submitted request: it leaves the queue, or its batch (a batch whose
        requests were all abandoned stops; the last one waits for its engine to stop)."""
        with self._cond:
            if ticket.done.is_set():
                return
            if ticket.batch is None:
                try:
                    self._queue.remove(ticket)
                except ValueError:
                    pass
                ticket.abandoned = True
                ticket.error = Cancelled("request cancelled while waiting in the queue")
                ticket.done.set()
                self._cond.notify_all()
                last = False
            else:
                ticket.abandoned = True
                last = all(t.abandoned for t in ticket.batch)
        self._report_load()
        if last:
            ticket.done.wait(_ENGINE_STOP_WAIT_S)

    # -- queue --------------------------------------------------------------------------------
    def _enqueue(self, ticket: _Ticket) -> _Ticket:
        with self._cond:
            self._check_open()
            if len(self._queue) >= self.max_queue + self._open_places():
                raise ResourceExhausted(
                    f"attribution server is busy: {self._running} trace(s) running and "
                    f"{len(self._queue)} waiting (max_queue={self.max_queue}); retry later"
                )
            self._queue.append(ticket)
            self._cond.notify_all()
        self._report_load()
        return ticket

    def _open_places(self) -> int:
        """Requests the engines would take now without queueing (idle engines, forming batches)."""
        places = 0
        for slot in self._slots:
            if slot.state == "idle":
                places += self.max_batch
            elif slot.state == "forming":
                places += self.max_batch - len(slot.batch)
        return places

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("attribution server is shutting down")
        if self._model_info is None:
            raise Unavailable("the model is still loading; retry when the server reports SERVING")

    def _report_load(self) -> None:
        if self.observer is not None:
            self.observer.on_load(waiting=len(self._queue), running=self._running)

    # -- engine threads -----------------------------------------------------------------------
    def _serve(self, slot: _EngineSlot) -> None:
        while True:
            batch = self._next_batch(slot)
            if batch is None:
                return
            try:
                self._run_batch(slot, batch)
            finally:
                with self._cond:
                    slot.state = "idle"
                    slot.batch = []
                    self._running -= len(batch)
                    self._cond.notify_all()
                self._report_load()

    def _next_batch(self, slot: _EngineSlot) -> list[_Ticket] | None:
        """Take the request at the head of the queue and, for traces, the trace requests behind it
        (up to max_batch, until batch_window_s after the first one arrived); None once closing."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            batch: list[_Ticket] = []
            slot.state = "forming"
            slot.batch = batch
            self._take(batch)
            if batch[0].kind == "trace":
                deadline = batch[0].enqueued + self.batch_window_s
                while len(batch) < self.max_batch and not self._closing:
                    if self._queue and self._queue[0].kind == "trace":
                        self._take(batch)
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._queue:  # window over, or an intervention is next
                        break
                    self._cond.wait(remaining)
            slot.state = "running"
        self._report_load()
        return batch

    def _take(self, batch: list[_Ticket]) -> None:
        """Move the head of the queue into ``batch`` (called with the lock held)."""
        ticket = self._queue.popleft()
        ticket.batch = batch
        batch.append(ticket)
        self._running += 1

    def _run_batch(self, slot: _EngineSlot, batch: list[_Ticket]) -> None:
        def stop() -> bool:
            return self._abort_running or all(ticket.stopped() for ticket in batch)

        def stopped_error() -> CircuitsError:
            if self._abort_running:
                return Unavailable("attribution server shut down before the work finished")
            return Cancelled("request cancelled or past its deadline")

        kind = batch[0].kind
        what = {"trace": f"tracing a batch of {len(batch)} prompt(s)", "patch": "patching activations",
                "activations": "reading activations"}.get(
            kind, "running the intervention"
        )
        started = time.perf_counter()
        outcomes: list[Any]
        try:
            if stop():
                raise stopped_error()
            with self._exclusive(stop, stopped_error):
                if kind == "trace":
                    requests = [t.request for t in batch]
                    trace_many = getattr(slot.engine, "trace_many", None)
                    if trace_many is None:
                        outcomes = trace_one_by_one(slot.engine, requests, should_stop=stop)
                    else:
                        outcomes = list(trace_many(requests, should_stop=stop))
                    if len(outcomes) != len(batch):
                        raise RuntimeError(f"engine returned {len(outcomes)} results for {len(batch)} requests")
                elif kind == "patch":
                    outcomes = [slot.engine.patch(batch[0].request, should_stop=stop)]
                elif kind == "activations":
                    outcomes = [slot.engine.activations(batch[0].request, should_stop=stop)]
                else:
                    outcomes = [slot.engine.intervene(batch[0].request, should_stop=stop)]
        except Exception as exc:  # noqa: BLE001 - every ticket gets an error, the thread lives on
            if stop():  # the engine gave up because it was told to stop (or failed meanwhile)
                error: BaseException = stopped_error()
            elif isinstance(exc, CircuitsError):
                error = exc
            elif type(exc).__name__ == "OutOfMemoryError":
                error = ResourceExhausted(f"out of accelerator memory {what}")
            else:
                log.error("engine failed %s: %s", what, exc, exc_info=exc)
                error = exc
            outcomes = [_copy_error(error) for _ in batch]
        seconds = time.perf_counter() - started
        if kind == "trace" and self.observer is not None:
            self.observer.on_batch(len(batch))
        for ticket, outcome in zip(batch, outcomes):
            if ticket.abandoned:
                ticket.error = Cancelled("request cancelled or past its deadline")
            elif isinstance(outcome, BaseException):
                ticket.error = outcome
            else:
                ticket.result = outcome
                if kind == "trace" and self.observer is not None:
                    self.observer.on_graph(outcome, seconds=seconds)
            ticket.done.set()

    @contextmanager
    def _exclusive(self, stop: StopCheck, stopped_error: Callable[[], CircuitsError]) -> Iterator[None]:
        """Hold the one-at-a-time lock (engines that may not run concurrently) while polling ``stop``."""
        lock = self._one_at_a_time
        if lock is None:
            yield
            return
        while not lock.acquire(timeout=self.poll_seconds):
            if stop():
                raise stopped_error()
        try:
            if stop():
                raise stopped_error()
            yield
        finally:
            lock.release()


class _StreamFeed:
    """Hand-over between :meth:`AttributionRunner.trace_stream`'s reader thread and its consumer:
    submitted tickets (or an error) in request order, at most ``depth`` unfinished at once."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._cond = threading.Condition()
        self._entries: collections.deque[tuple[int, Any]] = collections.deque()
        self._unfinished = 0  # handed to the consumer or waiting in _entries, not yet finished
        self._ended = False
        self._closed = False

    def wait_for_room(self, should_stop: StopCheck, poll: float) -> bool:
        with self._cond:
            while self._unfinished >= self.depth and not self._closed:
                if should_stop():
                    return False
                self._cond.wait(poll)
            return not self._closed

    def wait_for_one_done(self, should_stop: StopCheck, poll: float) -> bool:
        """With requests of this stream in flight, wait until one finishes (True); False when none are."""
        with self._cond:
            if self._unfinished == 0:
                return False
            before = self._unfinished
            while self._unfinished >= before:
                if self._closed or should_stop():
                    return False
                self._cond.wait(poll)
            return True

    def put(self, number: int, item: Any) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._entries.append((number, item))
            self._unfinished += 1
            self._cond.notify_all()
            return True

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def next(self, should_stop: StopCheck, poll: float) -> tuple[int, Any] | None:
        """The next entry; None at the end of the requests. Cancelled once ``should_stop()``."""
        with self._cond:
            while not self._entries:
                if self._ended:
                    return None
                if should_stop():
                    raise Cancelled("request stream cancelled")
                self._cond.wait(poll)
            return self._entries.popleft()

    def finished_one(self) -> None:
        with self._cond:
            self._unfinished -= 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def pending(self) -> list[_Ticket]:
        with self._cond:
            tickets = [item for _, item in self._entries if isinstance(item, _Ticket)]
            self._entries.clear()
            return tickets


def trace_one_by_one(
    engine: AttributionEngine, requests: Sequence[TraceRequest], *, should_stop: StopCheck
) -> list[Graph | CircuitsError]:
    """``engine.trace`` of each request in turn: its Graph, or the InvalidArgument it alone raised."""
    results: list[Graph | CircuitsError] = []
    for request in requests:
        try:
            results.append(engine.trace(request, should_stop=should_stop))
        except InvalidArgument as exc:
            results.append(exc)
    return results


def _copy_error(error: BaseException) -> BaseException:
    """One exception object per waiting caller (an instance raised in several threads would share
    its traceback)."""
    try:
        return type(error)(*error.args)
    except Exception:  # noqa: BLE001 - exotic constructors
        return RuntimeError(str(error))


def check_trace_limits(
    request: TraceRequest,
    *,
    max_nodes_per_graph: int = DEFAULT_LIMITS.max_nodes_per_graph,
    max_k: int = DEFAULT_LIMITS.max_k,
) -> None:
    """InvalidArgument naming the limit when ``request.max_nodes`` exceeds ``max_nodes_per_graph``
    or ``request.k`` exceeds ``max_k`` (0 = no cap)."""
    check_max_nodes(request, max_nodes_per_graph)
    if max_k and request.k > max_k:
        raise InvalidArgument(f"k={request.k} is over the limit max_k={max_k} ({limit_flag('max_k')})")


def check_max_nodes(request: TraceRequest, max_nodes_per_graph: int = DEFAULT_LIMITS.max_nodes_per_graph) -> None:
    """InvalidArgument naming the limit when ``request.max_nodes`` exceeds ``max_nodes_per_graph`` (0 = no cap)."""
    if max_nodes_per_graph and request.max_nodes > max_nodes_per_graph:
        raise InvalidArgument(
            f"max_nodes={request.max_nodes} is over the limit max_nodes_per_graph={max_nodes_per_graph} "
            f"({limit_flag('max_nodes_per_graph')})"
        )
