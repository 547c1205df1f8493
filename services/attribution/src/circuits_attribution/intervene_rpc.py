"""The Intervene RPC handler: decode -> run on an exclusively held engine -> encode.

`AttributionServicer.Intervene` should delegate here::

    def Intervene(self, request, context):
        return handle_intervene(self.runner, request, context)

The engine must be held exclusively because interventions install hooks on its model's modules
(each engine replica has its own module objects). The runner's public ``run_on_engine(fn,
should_stop=...)`` is used when it has one; otherwise the runner's queue is used directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from circuits_core import wire

from circuits_attribution.interventions import run_intervention


def _run_exclusive(runner: Any, fn: Callable[[Any], Any], should_stop: Callable[[], bool]) -> Any:
    run_on_engine = getattr(runner, "run_on_engine", None)
    if run_on_engine is not None:
        return run_on_engine(fn, should_stop=should_stop)
    # Fallback for runners without run_on_engine: the same acquire/release as AttributionRunner.trace.
    engine = runner._acquire(should_stop)  # noqa: SLF001
    try:
        return fn(engine)
    finally:
        with runner._cond:  # noqa: SLF001
            runner._free.append(engine)  # noqa: SLF001
            runner._running -= 1  # noqa: SLF001
            runner._cond.notify_all()  # noqa: SLF001
        runner._report_load()  # noqa: SLF001


def handle_intervene(runner: Any, request: Any, context: Any) -> Any:
    """Serve ``circuits.v1.InterveneRequest`` -> ``circuits.v1.InterveneResponse``.

    Domain errors (InvalidArgument for bad neuron ids, Unavailable while loading, ...) propagate
    to the shared error interceptor.
    """
    spec = wire.intervene_request_from_proto(request)
    result = _run_exclusive(runner, lambda engine: run_intervention(engine, spec), lambda: not context.is_active())
    return wire.intervention_result_to_proto(result)
