"""LabelerService: the transport-neutral object behind the gRPC servicer.

One progressive run or LabelUnits call at a time (a second one gets FailedPrecondition, since
both write the same label store and cache). ``run_progressive`` streams progress while the run
works in a background thread; closing the stream (client cancel) stops dispatching new requests.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from circuits_core.errors import CircuitsError, FailedPrecondition, InvalidArgument, ResourceExhausted
from circuits_core.limits import DEFAULT_LIMITS, Limits, flag
from circuits_core.schemas import LabelProgress, Unit

from circuits_labeler.engine import ProgressiveLabeler, _check_passes

_END = object()


class LabelerService:
    """``limits``: ``max_label_units_per_request`` and ``max_labels_per_window`` per
    ``label_window_s`` bound what LabelUnits may spend; ``clock`` (seconds) is injectable for tests."""

    def __init__(self, labeler: ProgressiveLabeler, *, limits: Limits = DEFAULT_LIMITS,
                 clock: Callable[[], float] = time.monotonic, investigations: Any = None) -> None:  # fmt: skip
        self.labeler = labeler
        #: :class:`circuits_labeler.scientist.service.Investigations`, or None (no attribution server).
        self.investigations = investigations
        self.limits = limits
        self._clock = clock
        self._busy = threading.Lock()
        self._window: deque[tuple[float, int]] = deque()
        self._window_lock = threading.Lock()

    def _reserve_window(self, n: int) -> None:
        """Count ``n`` units against the sliding window or raise ResourceExhausted."""
        limit, span = self.limits.max_labels_per_window, self.limits.label_window_s
        if not limit:
            return
        with self._window_lock:
            now = self._clock()
            while self._window and self._window[0][0] <= now - span:
                self._window.popleft()
            used = sum(count for _t, count in self._window)
            if used + n > limit:
                wait = (self._window[0][0] + span - now) if self._window else span
                raise ResourceExhausted(
                    f"LabelUnits: {n} more units would exceed the limit max_labels_per_window={limit} per "
                    f"{span:g} s ({flag('max_labels_per_window')}, {flag('label_window_s')}; {used} used); "
                    f"retry in {max(wait, 0):.0f} s"
                )
            self._window.append((now, n))

    def _acquire(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise FailedPrecondition("a labelling run is already in progress")

    def run_progressive(
        self, *, passes: Sequence[str] = (), max_units: int = 0, retry_failed: bool = False
    ) -> Iterator[LabelProgress]:
        """Progress reports of a full run, ending with the final one (state done / budget_exhausted
        / stopped / failed)."""
        if max_units < 0:
            raise InvalidArgument("max_units must be >= 0")
        self._acquire()
        events: queue.Queue = queue.Queue()
        error: list[BaseException] = []

        def work() -> None:
            try:
                self.labeler.run(passes=list(passes), max_units=max_units, retry_failed=retry_failed or None,
                                 on_progress=events.put)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                error.append(exc)
            finally:
                events.put(_END)

        self.labeler.cancel_event.clear()
        thread = threading.Thread(target=work, name="labeler-run", daemon=True)
        try:
            thread.start()
            while True:
                item = events.get()
                if item is _END:
                    break
                yield item
            if error:
                exc = error[0]
                if isinstance(exc, CircuitsError):
                    raise exc
                raise RuntimeError(f"labelling run failed: {exc.__class__.__name__}") from exc
        finally:
            self.labeler.cancel_event.set()
            thread.join()
            self.labeler.cancel_event.clear()
            self._busy.release()

    def label_units(
        self, keys: Sequence[tuple[int, int]], *, label_pass: str, allow_without_evidence: bool = False
    ) -> tuple[list[Unit], list[str]]:
        """Label ``keys`` in one pass now; return the units with their labels and the failures.

        Before anything is paid for: at most ``max_label_units_per_request`` units (repeats
        counted once), all inside the model, all listed by the evidence unless
        ``allow_without_evidence``, and within ``max_labels_per_window``."""
        if not keys:
            raise InvalidArgument("no units given")
        _check_passes([label_pass])
        keys = list(dict.fromkeys(tuple(k) for k in keys))
        self.limits.check("max_label_units_per_request", len(keys), "LabelUnits request has", unit="units")
        self.labeler.check_units(keys, allow_without_evidence=allow_without_evidence)
        self._acquire()
        try:
            self._reserve_window(len(keys))
            outcomes, _progress = self.labeler.label_units(list(keys), label_pass=label_pass)
        finally:
            self._busy.release()
        failures = [f"L{o.key[0]}/N{o.key[1]}: {o.error or o.status}" for o in outcomes if o.status in ("failed", "skipped")]
        return self.get_labels(keys), failures

    def investigate(self, layer: int, neuron: int, *, max_steps: int = 0, budget_usd: float = 0.0,
                    resume: bool = False, should_stop: Callable[[], bool] = lambda: False) -> Iterator[Any]:
        """Events of a neuron-scientist investigation (FailedPrecondition without an attribution server)."""
        if self.investigations is None:
            raise FailedPrecondition("this labeler has no attribution server for investigations "
                                     "(start it with --attribution HOST:PORT)")
        return self.investigations.investigate(layer, neuron, max_steps=max_steps, budget_usd=budget_usd,
                                               resume=resume, should_stop=should_stop)

    def get_labels(self, keys: Sequence[tuple[int, int]] = (), *, limit: int = 0) -> list[Unit]:
        """Stored labels of ``keys`` (all labelled units when empty), as Units."""
        if limit < 0:
            raise InvalidArgument("limit must be >= 0")
        store = self.labeler.store
        if keys:
            entries = [e for e in (store.get(tuple(k)) for k in keys) if e is not None]
        else:
            entries = store.all()
        if limit:
            entries = entries[:limit]
        return [e.to_unit() for e in entries]
