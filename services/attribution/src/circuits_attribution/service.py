"""The attribution service's domain object, independent of any transport.

:class:`AttributionRunner` owns a small pool of attribution engines (replicas of one
:class:`AttributionEngine`, e.g. ``RelPAttributor`` copies that share one copy of the model
weights) and runs requests on them:

* at most ``max_concurrent`` traces run at once (one per engine replica);
* at most ``max_queue`` further requests wait, first come first served; one more is refused at
  once with :class:`~circuits_core.errors.ResourceExhausted`;
* a request whose ``should_stop()`` turns true (client cancelled, deadline passed) leaves the
  queue, or its running trace stops at the engine's next checkpoint (RelPAttributor: the next
  decoder layer), and frees its slot;
* :meth:`AttributionRunner.close` refuses new work, lets running traces finish for a grace
  period, then stops the rest.

Per-request settings travel in the :class:`~circuits_core.tracing.TraceRequest`; an engine is never
reconfigured between requests. Tests inject fakes that subclass :class:`AttributionEngine`,
``__main__`` picks the real ``RelPAttributor``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from circuits_core.errors import Cancelled, CircuitsError, InvalidArgument, ResourceExhausted, Unavailable
from circuits_core.interventions import InterventionRequest, InterventionResult
from circuits_core.limits import DEFAULT_LIMITS
from circuits_core.limits import flag as limit_flag
from circuits_core.patching import PatchRequest, PatchResult
from circuits_core.schemas import Graph
from circuits_core.tracing import ModelInfo, TraceRequest

log = logging.getLogger("circuits_attribution.service")

StopCheck = Callable[[], bool]
_Result = TypeVar("_Result")


class AttributionEngine(Protocol):
    """What :class:`AttributionRunner` needs from an engine (``RelPAttributor`` is the real one).

    ``trace`` and ``intervene`` run on one replica held exclusively by the caller; they give up
    (raising any error) soon after ``should_stop()`` turns true.
    """

    #: Whether replicas made by :meth:`replicate` may run at the same time in one process (False:
    #: the runner serializes their calls, e.g. when they patch process-global state).
    replicas_trace_concurrently: bool

    def trace(self, request: TraceRequest, *, should_stop: StopCheck) -> Graph: ...

    def intervene(self, request: InterventionRequest, *, should_stop: StopCheck) -> InterventionResult: ...

    def patch(self, request: PatchRequest, *, should_stop: StopCheck) -> PatchResult: ...

    def model_info(self) -> ModelInfo: ...

    def replicate(self) -> AttributionEngine:
        """Another engine over the same model (sharing its weights), safe to use from another thread."""
        ...


class RunnerObserver(Protocol):
    """Receives the runner's load and results (the server turns them into Prometheus metrics)."""

    def on_load(self, *, waiting: int, running: int) -> None: ...

    def on_graph(self, graph: Graph, *, seconds: float) -> None: ...


def _never() -> bool:
    return False


class AttributionRunner:
    """Bounded-concurrency, bounded-queue execution of traces on a pool of engines."""

    def __init__(
        self,
        *,
        max_concurrent: int = 1,
        max_queue: int = 8,
        observer: RunnerObserver | None = None,
        poll_seconds: float = 0.05,
        max_nodes_per_graph: int = DEFAULT_LIMITS.max_nodes_per_graph,
    ) -> None:
        """``max_nodes_per_graph`` caps a request's ``max_nodes`` (0 = no cap)."""
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.observer = observer
        self.poll_seconds = poll_seconds
        self.max_nodes_per_graph = max_nodes_per_graph
        self._cond = threading.Condition()
        self._free: list[AttributionEngine] = []
        self._tickets: collections.deque[object] = collections.deque()
        self._running = 0
        self._closing = False
        self._abort_running = False
        self._model_info: ModelInfo | None = None
        self._one_at_a_time: threading.Lock | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def attach(self, engine: AttributionEngine) -> None:
        """Make the runner ready: ``engine`` and ``max_concurrent - 1`` replicas of it form the pool.

        Replicas that may not run concurrently (``replicas_trace_concurrently`` false) have their
        engine calls serialized; requests still queue, hold their replica and cancel as usual.
        """
        engines = [engine, *(engine.replicate() for _ in range(self.max_concurrent - 1))]
        info = engine.model_info()
        one_at_a_time = len(engines) > 1 and not engine.replicas_trace_concurrently
        if one_at_a_time:
            log.warning("%s replicas share process-global state: traces compute one at a time", type(engine).__name__)
        self._one_at_a_time = threading.Lock() if one_at_a_time else None
        with self._cond:
            self._free = engines
            self._model_info = info
            self._cond.notify_all()

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
        return len(self._tickets)

    @property
    def running(self) -> int:
        return self._running

    def close(self, *, grace: float = 10.0) -> None:
        """Refuse new work, wait up to ``grace`` seconds for running traces, then stop them."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            deadline = time.monotonic() + grace
            while self._running and time.monotonic() < deadline:
                self._cond.wait(min(self.poll_seconds, max(0.0, deadline - time.monotonic())))
            if self._running:
                log.warning("stopping %d running trace(s) after %.1fs grace", self._running, grace)
                self._abort_running = True
                self._cond.notify_all()
                # The traces stop at their next checkpoint; give them a moment to hand back.
                stop_by = time.monotonic() + 5.0
                while self._running and time.monotonic() < stop_by:
                    self._cond.wait(self.poll_seconds)

    # -- work -------------------------------------------------------------------------------
    def trace(self, request: TraceRequest, *, should_stop: StopCheck | None = None) -> Graph:
        """Trace ``request`` on a free engine; blocks while queued.

        Raises ResourceExhausted (queue full), Unavailable (loading / shutting down),
        Cancelled (``should_stop()`` became true), or whatever the engine raises for bad input
        (InvalidArgument).
        """
        check_max_nodes(request, self.max_nodes_per_graph)
        started = time.perf_counter()
        graph = self._run_exclusive(
            lambda engine, stop: engine.trace(request, should_stop=stop), should_stop or _never,
            what=f"tracing a prompt of {len(request.prompt)} characters",
        )
        if self.observer is not None:
            self.observer.on_graph(graph, seconds=time.perf_counter() - started)
        return graph

    def intervene(self, request: InterventionRequest, *, should_stop: StopCheck | None = None) -> InterventionResult:
        """Run an intervention on a free engine, with the same queueing, limits and stop semantics as :meth:`trace`."""
        return self._run_exclusive(
            lambda engine, stop: engine.intervene(request, should_stop=stop), should_stop or _never,
            what="running the intervention",
        )

    def patch(self, request: PatchRequest, *, should_stop: StopCheck | None = None) -> PatchResult:
        """Activation patching on a free engine, with the same queueing, limits and stop semantics as :meth:`trace`."""
        return self._run_exclusive(
            lambda engine, stop: engine.patch(request, should_stop=stop), should_stop or _never,
            what="patching activations",
        )

    def _run_exclusive(
        self, fn: Callable[[AttributionEngine, StopCheck], _Result], should_stop: StopCheck, *, what: str
    ) -> _Result:
        engine = self._acquire(should_stop)
        try:
            return self._run(engine, fn, should_stop, what=what)
        finally:
            with self._cond:
                self._free.append(engine)
                self._running -= 1
                self._cond.notify_all()
            self._report_load()

    def _report_load(self) -> None:
        if self.observer is not None:
            self.observer.on_load(waiting=len(self._tickets), running=self._running)

    def _acquire(self, should_stop: StopCheck) -> AttributionEngine:
        with self._cond:
            self._check_open()
            if self._free and not self._tickets:
                self._running += 1
                engine = self._free.pop()
            else:
                if len(self._tickets) >= self.max_queue:
                    raise ResourceExhausted(
                        f"attribution server is busy: {self._running} trace(s) running and "
                        f"{len(self._tickets)} waiting (max_queue={self.max_queue}); retry later"
                    )
                ticket = object()
                self._tickets.append(ticket)
                self._report_load()
                try:
                    while not (self._free and self._tickets[0] is ticket):
                        self._cond.wait(self.poll_seconds)
                        self._check_open()
                        if should_stop():
                            raise Cancelled("request cancelled while waiting in the queue")
                finally:
                    self._tickets.remove(ticket)
                    self._cond.notify_all()
                self._running += 1
                engine = self._free.pop()
        self._report_load()
        return engine

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("attribution server is shutting down")
        if self._model_info is None:
            raise Unavailable("the model is still loading; retry when the server reports SERVING")

    def _run(
        self,
        engine: AttributionEngine,
        fn: Callable[[AttributionEngine, StopCheck], _Result],
        should_stop: StopCheck,
        *,
        what: str,
    ) -> _Result:
        def stop() -> bool:
            return self._abort_running or bool(should_stop())

        def stopped_error() -> CircuitsError:
            if self._abort_running:
                return Unavailable("attribution server shut down before the work finished")
            return Cancelled("request cancelled or past its deadline")

        if stop():
            raise stopped_error()
        try:
            if self._one_at_a_time is None:
                result = fn(engine, stop)
            else:
                while not self._one_at_a_time.acquire(timeout=self.poll_seconds):
                    if stop():
                        raise stopped_error()
                try:
                    if stop():
                        raise stopped_error()
                    result = fn(engine, stop)
                finally:
                    self._one_at_a_time.release()
        except Exception as exc:
            if stop():  # the engine gave up because it was told to stop (or failed meanwhile)
                raise stopped_error() from None
            if isinstance(exc, CircuitsError):
                raise
            if type(exc).__name__ == "OutOfMemoryError":
                raise ResourceExhausted(f"out of accelerator memory {what}") from None
            raise
        if stop():
            raise stopped_error()
        return result


def check_max_nodes(request: TraceRequest, max_nodes_per_graph: int = DEFAULT_LIMITS.max_nodes_per_graph) -> None:
    """InvalidArgument naming the limit when ``request.max_nodes`` exceeds ``max_nodes_per_graph`` (0 = no cap)."""
    if max_nodes_per_graph and request.max_nodes > max_nodes_per_graph:
        raise InvalidArgument(
            f"max_nodes={request.max_nodes} is over the limit max_nodes_per_graph={max_nodes_per_graph} "
            f"({limit_flag('max_nodes_per_graph')})"
        )
