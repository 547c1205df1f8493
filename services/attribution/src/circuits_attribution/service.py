"""The attribution service's domain object, independent of any transport.

:class:`AttributionRunner` owns a small pool of attribution engines (``RelPAttributor`` replicas
that share one copy of the model weights) and runs requests on them:

* at most ``max_concurrent`` traces run at once (one per engine replica);
* at most ``max_queue`` further requests wait, first come first served; one more is refused at
  once with :class:`~circuits_core.errors.ResourceExhausted`;
* a request whose ``should_stop()`` turns true (client cancelled, deadline passed) leaves the
  queue, or stops its running trace at the next decoder layer (or at the engine's own
  ``should_stop`` checkpoints when the engine accepts that argument), and frees its slot;
* :meth:`AttributionRunner.close` refuses new work, lets running traces finish for a grace
  period, then stops the rest.

An engine is any object with ``trace(prompt, **options) -> circuits_core.schemas.Graph`` (see
:class:`Attributor`); tests inject fakes, ``__main__`` picks the real ``RelPAttributor``.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from circuits_core.errors import Cancelled, CircuitsError, InvalidArgument, ResourceExhausted, Unavailable
from circuits_core.limits import DEFAULT_LIMITS
from circuits_core.limits import flag as limit_flag
from circuits_core.schemas import Graph
from circuits_core.tracing import ModelInfo, TraceSpec

log = logging.getLogger("circuits_attribution.service")

StopCheck = Callable[[], bool]


class Attributor(Protocol):
    """What the runner needs from an attribution engine."""

    def trace(self, prompt: str, **options: Any) -> Graph: ...


class RunnerObserver(Protocol):
    """Receives the runner's load and results (the server turns them into Prometheus metrics)."""

    def on_load(self, *, waiting: int, running: int) -> None: ...

    def on_graph(self, graph: Graph, *, seconds: float) -> None: ...


class _StopRequested(Exception):
    """Raised inside a running trace (from a forward hook) to abandon it."""


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
        self._free: list[Any] = []
        self._tickets: collections.deque[object] = collections.deque()
        self._running = 0
        self._closing = False
        self._abort_running = False
        self._model_info: ModelInfo | None = None
        self._one_at_a_time: threading.Lock | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def attach(self, engines: Sequence[Attributor], model_info: ModelInfo, *, one_at_a_time: bool = False) -> None:
        """Make the runner ready: ``engines`` are the replicas (len = max_concurrent).

        ``one_at_a_time``: the replicas share process-global state while tracing, so their
        engine calls are serialized (requests still queue, hold their replica and cancel as usual).
        """
        if not engines:
            raise ValueError("attach needs at least one engine")
        self._one_at_a_time = threading.Lock() if one_at_a_time and len(engines) > 1 else None
        with self._cond:
            self._free = list(engines)[: self.max_concurrent]
            self.max_concurrent = len(self._free)
            self._model_info = model_info
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
    def trace(self, spec: TraceSpec, *, should_stop: StopCheck | None = None) -> Graph:
        """Trace ``spec`` on a free engine; blocks while queued.

        Raises ResourceExhausted (queue full), Unavailable (loading / shutting down),
        Cancelled (``should_stop()`` became true), or whatever the engine raises for bad input
        (InvalidArgument).
        """
        check_max_nodes(spec, self.max_nodes_per_graph)
        started = time.perf_counter()
        graph = self._run_exclusive(
            lambda engine, stop: run_engine(engine, spec, should_stop=stop), should_stop or _never, label=spec.prompt
        )
        if self.observer is not None:
            self.observer.on_graph(graph, seconds=time.perf_counter() - started)
        return graph

    def run_on_engine(self, fn: Callable[[Any], Any], *, should_stop: StopCheck | None = None) -> Any:
        """Run ``fn(engine)`` on an exclusively held engine, with the same queueing, limits and
        stop semantics as :meth:`trace` (a torch engine's forward passes check ``should_stop``)."""

        def call(engine: Any, stop: StopCheck) -> Any:
            with _stop_hooks(engine, stop):
                return fn(engine)

        return self._run_exclusive(call, should_stop or _never, label="")

    def _run_exclusive(self, fn: Callable[[Any, StopCheck], Any], should_stop: StopCheck, *, label: str) -> Any:
        engine = self._acquire(should_stop)
        try:
            return self._run(engine, fn, should_stop, label=label)
        finally:
            with self._cond:
                self._free.append(engine)
                self._running -= 1
                self._cond.notify_all()
            self._report_load()

    def _report_load(self) -> None:
        if self.observer is not None:
            self.observer.on_load(waiting=len(self._tickets), running=self._running)

    def _acquire(self, should_stop: StopCheck) -> Any:
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

    def _run(self, engine: Any, fn: Callable[[Any, StopCheck], Any], should_stop: StopCheck, *, label: str) -> Any:
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
        except _StopRequested:
            raise stopped_error() from None
        except CircuitsError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                what = f"tracing a prompt of {len(label)} characters" if label else "running the request"
                raise ResourceExhausted(f"out of accelerator memory {what}") from None
            if stop():  # the engine gave up because it was told to stop (or failed meanwhile)
                raise stopped_error() from None
            raise
        if stop():
            raise stopped_error()
        return result


# -- calling one engine ---------------------------------------------------------------------
def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_max_nodes(spec: TraceSpec, max_nodes_per_graph: int = DEFAULT_LIMITS.max_nodes_per_graph) -> None:
    """InvalidArgument naming the limit when ``spec.max_nodes`` exceeds ``max_nodes_per_graph`` (0 = no cap)."""
    if max_nodes_per_graph and spec.max_nodes is not None and spec.max_nodes > max_nodes_per_graph:
        raise InvalidArgument(
            f"max_nodes={spec.max_nodes} is over the limit max_nodes_per_graph={max_nodes_per_graph} "
            f"({limit_flag('max_nodes_per_graph')})"
        )


def trace_options(spec: TraceSpec) -> dict[str, Any]:
    """The ``RelPAttributor.trace`` keyword arguments for a spec (server defaults left out)."""
    options: dict[str, Any] = {"raw": spec.raw, "answer_prefix": spec.answer_prefix}
    if spec.contrastive is not None:
        options["contrastive"] = spec.contrastive
    elif spec.target_tokens:
        options["target_tokens"] = spec.target_tokens
    if spec.k:
        options["k"] = spec.k
    if spec.target_position is not None:
        options["target_position"] = spec.target_position
    if spec.slug:
        options["slug"] = spec.slug
    return options


def run_engine(engine: Any, spec: TraceSpec, *, should_stop: StopCheck = _never) -> Graph:
    """Trace one spec on one engine (which the caller holds exclusively).

    Per-request ``tau``/``max_nodes`` go to ``trace`` when it accepts them, otherwise into a
    temporary copy of the engine's ``config``. ``should_stop`` goes to ``trace`` when it accepts
    it; otherwise it is checked before every decoder layer's forward (torch engines).
    """
    options = trace_options(spec)
    overrides = {name: value for name, value in (("tau", spec.tau), ("max_nodes", spec.max_nodes)) if value is not None}
    with _config_overrides(engine, overrides, options):
        if _accepts(engine.trace, "should_stop"):
            graph = engine.trace(spec.prompt, should_stop=should_stop, **options)
        else:
            with _stop_hooks(engine, should_stop):
                graph = engine.trace(spec.prompt, **options)
    if spec.corpus_index >= 0:
        graph = dataclasses.replace(graph, metadata=dataclasses.replace(graph.metadata, corpus_index=spec.corpus_index))
    return graph


@contextmanager
def _config_overrides(engine: Any, overrides: dict[str, Any], options: dict[str, Any]) -> Iterator[None]:
    if not overrides:
        yield
        return
    if all(_accepts(engine.trace, name) for name in overrides):
        options.update(overrides)
        yield
        return
    config = getattr(engine, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        from circuits_core.errors import InvalidArgument

        raise InvalidArgument(f"this server cannot override {', '.join(sorted(overrides))} per request")
    engine.config = dataclasses.replace(config, **overrides)
    try:
        yield
    finally:
        engine.config = config


def _decoder_layers(engine: Any) -> list[Any]:
    model = getattr(engine, "model", None)
    if model is None or not hasattr(model, "modules"):
        return []
    try:
        from circuits_attribution.linearize import decoder_layers

        return list(decoder_layers(model))
    except Exception:  # noqa: BLE001 - unknown layout: no hooks, checks before/after only
        return []


@contextmanager
def _stop_hooks(engine: Any, should_stop: StopCheck) -> Iterator[None]:
    if should_stop is _never:
        yield
        return

    def check(_module: Any, _args: Any) -> None:
        if should_stop():
            raise _StopRequested()

    handles = [layer.register_forward_pre_hook(check) for layer in _decoder_layers(engine)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- building engines -----------------------------------------------------------------------
def share_weights_copy(model: Any) -> Any:
    """A structural copy of a torch module whose parameters and buffers are the originals.

    Each copy has its own module objects (so per-trace patches and hooks don't collide) but no
    second copy of the weights.
    """
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)


def replicate_engines(engine: Any, count: int) -> list[Any]:
    """``count`` engines that may trace concurrently; the first is ``engine`` itself.

    Engines declaring ``thread_safe = True`` are reused; engines with ``replicate()`` make their
    own copies; torch engines (``model``, ``tokenizer``, ``config``) are rebuilt around a
    weight-sharing copy of the model.
    """
    if count <= 1 or getattr(engine, "thread_safe", False):
        return [engine] * max(1, count)
    if hasattr(engine, "replicate"):
        return [engine, *(engine.replicate() for _ in range(count - 1))]
    if all(hasattr(engine, name) for name in ("model", "tokenizer", "config")):
        copies = [engine]
        for _ in range(count - 1):
            copies.append(type(engine)(share_weights_copy(engine.model), copy.deepcopy(engine.tokenizer), engine.config))
        return copies
    log.warning("engine %s cannot be replicated; running one trace at a time", type(engine).__name__)
    return [engine]


def replicas_trace_concurrently(engine: Any) -> bool:
    """Whether replicas of this engine may trace at the same time in one process.

    Engines opt in with ``thread_safe = True``, ``replicas_trace_concurrently = True`` or their own
    ``replicate()``. Unmarked torch engines are traced one at a time: RelPAttributor's
    Linearization currently patches transformers' process-global attention registry.
    """
    return bool(
        getattr(engine, "thread_safe", False)
        or getattr(engine, "replicas_trace_concurrently", False)
        or hasattr(engine, "replicate")
    )


def describe_model(engine: Any, *, name: str = "") -> ModelInfo:
    """ModelInfo for an engine: its own ``model_info()`` or read from a transformers model."""
    if hasattr(engine, "model_info"):
        return engine.model_info()
    model = engine.model
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    first = next(model.parameters())
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelInfo(
        model=name or getattr(engine, "model_name", "") or str(getattr(config, "_name_or_path", "")),
        num_layers=int(getattr(text_config, "num_hidden_layers", 0) or 0),
        d_model=int(getattr(text_config, "hidden_size", 0) or 0),
        d_mlp=int(getattr(text_config, "intermediate_size", 0) or 0),
        vocab_size=int(getattr(text_config, "vocab_size", 0) or 0),
        max_context=int(getattr(text_config, "max_position_embeddings", 0) or 0),
        dtype=str(first.dtype).removeprefix("torch."),
        device=str(first.device),
        architecture=str(architectures[0]),
    )
