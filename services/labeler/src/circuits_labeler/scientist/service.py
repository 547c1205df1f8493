"""Neuron investigations inside the labeler service (``LabelerService.Investigate``).

:class:`Investigations` runs one neuron scientist per call in a background thread and yields its
:class:`~circuits_core.investigation.InvestigationEvent` stream. The model is reached through an
attribution server (the SDK client, ``circuits serve labeler --attribution HOST:PORT``) or any
engine object given; the LLM backend, key and prices are the labeler's ``labeling`` section.
Transcripts and reports go to ``reports_dir/L{l}_N{n}/``. One investigation per neuron at a
time; a client that cancels the stream stops the run after the current step (resumable).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from circuits_core.config import LabelingSection
from circuits_core.errors import CircuitsError, FailedPrecondition, InvalidArgument
from circuits_core.investigation import InvestigationEvent

from circuits_labeler.llm import LLMBackend, RetryingLLM, RetryPolicy, create_backend
from circuits_labeler.scientist.agent import AgentSettings, Scientist, budget_for, new_transcript
from circuits_labeler.scientist.report import write_report
from circuits_labeler.scientist.tools import Sources
from circuits_labeler.scientist.transcript import load_transcript

_END = object()
#: Most LLM turns one RPC may ask for.
MAX_STEPS_LIMIT = 200


class Investigations:
    def __init__(
        self,
        *,
        engine: Any,
        labeling: LabelingSection,
        reports_dir: str | Path,
        model_name: str = "",
        exemplars: Any = None,
        atlas: Any = None,
        default_max_steps: int = 30,
        backend_factory: Callable[[], LLMBackend] | None = None,
        base_dir: Path | None = None,
    ) -> None:
        self.engine = engine
        self.labeling = labeling
        self.reports_dir = Path(reports_dir)
        self.model_name = model_name
        self.exemplars = exemplars
        self.atlas = atlas
        self.default_max_steps = default_max_steps
        self.backend_factory = backend_factory or (lambda: create_backend(labeling, base_dir=base_dir))
        self._running: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def _sources(self) -> Sources:
        return Sources(engine=self.engine, atlas=self.atlas, exemplars=self.exemplars,
                       missing={"atlas": "missing: the labeler service has no atlas connection"})

    def investigate(self, layer: int, neuron: int, *, max_steps: int = 0, budget_usd: float = 0.0, resume: bool = False,
                    should_stop: Callable[[], bool] = lambda: False) -> Iterator[InvestigationEvent]:
        """Events of one investigation, ending with a finished / stopped event."""
        if layer < 0 or neuron < 0:
            raise InvalidArgument(f"bad unit L{layer}/N{neuron}")
        if not 0 <= max_steps <= MAX_STEPS_LIMIT:
            raise InvalidArgument(f"max_steps must be in 0..{MAX_STEPS_LIMIT}, got {max_steps}")
        if budget_usd < 0:
            raise InvalidArgument(f"budget_usd must be >= 0, got {budget_usd}")
        key = (layer, neuron)
        folder = self.reports_dir / f"L{layer}_N{neuron}"
        transcript_path, report_path = folder / "transcript.json", folder / "report.html"
        settings = AgentSettings(
            max_steps=max_steps or self.default_max_steps, max_spend_usd=budget_usd or self.labeling.max_spend_usd,
            max_tokens_total=self.labeling.max_tokens_total, input_price_per_mtok=self.labeling.input_price_per_mtok,
            output_price_per_mtok=self.labeling.output_price_per_mtok,
        )
        sources = self._sources()
        previous = None
        if transcript_path.exists():
            if not resume:
                raise FailedPrecondition(f"L{layer}/N{neuron} was investigated before: set resume to continue it")
            previous = load_transcript(transcript_path)
            if previous.status == "stopped":
                previous.status, previous.stop_reason = "running", ""
        elif resume:
            raise FailedPrecondition(f"no saved investigation of L{layer}/N{neuron} to resume")
        with self._lock:
            if key in self._running:
                raise FailedPrecondition(f"L{layer}/N{neuron} is being investigated already")
            self._running.add(key)
        events: queue.Queue = queue.Queue()
        error: list[BaseException] = []
        stop = threading.Event()

        def work() -> None:
            try:
                transcript = previous or new_transcript(
                    layer=layer, neuron=neuron, model=self.model_name,
                    llm={"backend": self.labeling.backend, "model": self.labeling.model}, settings=settings,
                    sources=sources)
                llm = RetryingLLM(self.backend_factory(), policy=RetryPolicy(max_retries=self.labeling.max_retries),
                                  budget=budget_for(settings, previous))
                last: list[InvestigationEvent] = []

                def emit(event: InvestigationEvent) -> None:
                    if event.final:
                        last.append(event)
                    else:
                        events.put(event)

                scientist = Scientist(llm=llm, sources=sources, settings=settings, transcript_path=transcript_path,
                                      on_event=emit, should_stop=stop.is_set)

                async def go() -> Any:
                    try:
                        return await scientist.run(transcript)
                    finally:
                        await llm.aclose()

                done = asyncio.run(go())
                write_report(done, report_path)
                if last:
                    from dataclasses import replace

                    events.put(replace(last[-1], report_path=str(report_path)))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                error.append(exc)
            finally:
                events.put(_END)

        thread = threading.Thread(target=work, name=f"scientist-L{layer}-N{neuron}", daemon=True)
        try:
            thread.start()
            while True:
                try:
                    item = events.get(timeout=0.5)
                except queue.Empty:
                    if should_stop():
                        stop.set()
                    continue
                if item is _END:
                    break
                yield item
            if error:
                exc = error[0]
                if isinstance(exc, CircuitsError):
                    raise exc
                raise RuntimeError(f"investigation failed: {exc.__class__.__name__}") from exc
        finally:
            stop.set()
            thread.join()
            with self._lock:
                self._running.discard(key)
