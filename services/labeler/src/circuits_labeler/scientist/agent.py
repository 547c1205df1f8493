"""The neuron scientist's agent loop: one LLM conversation with tools, bounded and resumable.

Each step sends the conversation to the LLM (the labeler's backends: Anthropic tool use or
OpenAI-compatible function calling, through :class:`~circuits_labeler.llm.RetryingLLM`, so the
same retries and :class:`~circuits_labeler.llm.Budget` apply), then runs every tool call the
answer holds: unknown tools and arguments that fail validation are answered with the reason and
nothing runs. Each call and its outcome become an :class:`Experiment`; the transcript is saved
after every step, so a stopped run resumes from it (:meth:`Scientist.run` with a loaded
transcript). The loop ends when the agent calls ``finish``, or cleanly with ``status: stopped``
and the reason: step limit, spend limit, an LLM that stops calling tools, or an LLM failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from circuits_core.errors import CircuitsError
from circuits_core.investigation import InvestigationEvent as ProgressEvent

from circuits_labeler.llm import (
    AgentMessage,
    Budget,
    FatalLLMError,
    LLMRequestError,
    RetryingLLM,
    ToolDefinition,
    ToolResult,
    parse_tool_arguments,
)
from circuits_labeler.scientist.params import ArgumentErrors, validate_arguments
from circuits_labeler.scientist.tools import (
    Investigation,
    Sources,
    Tool,
    ToolLimits,
    ToolOutcome,
    ToolRefused,
    build_registry,
    result_text,
)
from circuits_labeler.scientist.transcript import Experiment, Transcript, Usage, save_transcript

log = logging.getLogger(__name__)

SYSTEM_PROMPT = """You are a neuron scientist. You investigate one MLP neuron of a language model and find out \
what makes it fire and what it does, using the tools.

Method:
1. Start from what is known: atlas_info, exemplars, projections (a tool says when its source is missing).
2. Form hypotheses (hypothesis tool) and test them: run_prompts shows the activation at every token; \
intervene ablates or steers the neuron; patch swaps its value between two prompts; attribute shows its role \
in a RelP attribution graph.
3. Before each decisive test, pre-register predictions with `predict` (prompts where it will fire and where \
it will stay silent), then run `test_prediction`. Your final confidence is capped by how many came true.
4. End with `finish`: a short label, a description, your confidence.
Call tools; do not answer in plain text."""

#: Nudges sent when the LLM answers without calling a tool, before the run stops.
MAX_IDLE_TURNS = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    """Bounds of one investigation."""

    max_steps: int = 30
    max_spend_usd: float = 0.0
    max_tokens_total: int = 0
    input_price_per_mtok: float = 0.0
    output_price_per_mtok: float = 0.0
    #: Output tokens per LLM turn.
    max_tokens: int = 2048
    limits: ToolLimits = ToolLimits()


def new_transcript(*, layer: int, neuron: int, model: str, llm: dict[str, str], settings: AgentSettings,
                   sources: Sources) -> Transcript:
    return Transcript(
        layer=layer, neuron=neuron, model=model, llm=llm,
        settings={"max_steps": settings.max_steps, "max_spend_usd": settings.max_spend_usd,
                  "max_tokens_total": settings.max_tokens_total,
                  "limits": {k: getattr(settings.limits, k) for k in settings.limits.__dataclass_fields__}},
        sources=sources.describe(),
    )


def opening_message(transcript: Transcript) -> str:
    lines = [f"Investigate neuron {transcript.unit_id} (layer {transcript.layer}, neuron {transcript.neuron}) "
             f"of {transcript.model or 'the model'}.", "Sources:"]
    lines += [f"- {name}: {state}" for name, state in transcript.sources.items()]
    return "\n".join(lines)


class Scientist:
    """Runs one investigation (see module docstring)."""

    def __init__(
        self,
        *,
        llm: RetryingLLM,
        sources: Sources,
        settings: AgentSettings,
        transcript_path: str | Path,
        on_event: Callable[[ProgressEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.llm = llm
        self.sources = sources
        self.settings = settings
        self.tools: dict[str, Tool] = build_registry(settings.limits)
        self.definitions = tuple(ToolDefinition(name=t.name, description=t.description, parameters=t.schema())
                                 for t in self.tools.values())
        self.transcript_path = Path(transcript_path)
        self.on_event = on_event or (lambda _e: None)
        self.should_stop = should_stop or (lambda: False)
        #: Requests / retries of earlier sessions of a resumed transcript.
        self._prior = (0, 0)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _emit(self, transcript: Transcript, kind: str, message: str, **extra: Any) -> None:
        if kind in ("finished", "stopped"):
            correct, total = transcript.prediction_score()
            final = transcript.final
            extra.update(status=transcript.status, label=final.label if final else "",
                         confidence=final.confidence if final else "", predictions_correct=correct,
                         predictions_total=total, spend_usd=transcript.usage.spend_usd)
        self.on_event(ProgressEvent(kind=kind, step=transcript.steps, message=message, **extra))

    def _save(self, transcript: Transcript) -> None:
        budget = self.llm.budget
        transcript.usage = Usage(input_tokens=budget.input_tokens, output_tokens=budget.output_tokens,
                                 spend_usd=round(budget.spend_usd, 6), requests=self._prior[0] + self.llm.requests,
                                 retries=self._prior[1] + self.llm.retries)
        transcript.touch()
        save_transcript(transcript, self.transcript_path)

    def _stop(self, transcript: Transcript, reason: str) -> Transcript:
        transcript.status = "stopped"
        transcript.stop_reason = reason
        self._save(transcript)
        self._emit(transcript, "stopped", reason, ok=False)
        return transcript

    # -- tools ---------------------------------------------------------------------------------
    def _call(self, transcript: Transcript, call: Any) -> tuple[ToolResult, bool]:
        """Run one tool call; record it as an experiment; (result for the LLM, finished?)."""
        inv = Investigation(layer=transcript.layer, neuron=transcript.neuron, sources=self.sources,
                            limits=self.settings.limits, transcript=transcript, step=transcript.steps)
        number = len(transcript.experiments) + 1
        started = time.perf_counter()
        tool = self.tools.get(call.name)
        outcome: ToolOutcome | None = None
        error = ""
        if tool is None:
            error = f"unknown tool {call.name!r} (tools: {', '.join(self.tools)})"
        else:
            try:
                arguments = validate_arguments(tool.params, call.arguments)
                outcome = tool.run(inv, arguments)
            except ArgumentErrors as exc:
                error = "invalid arguments: " + "; ".join(exc.problems)
            except ToolRefused as exc:
                error = str(exc)
            except CircuitsError as exc:
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            except Exception as exc:  # noqa: BLE001 - a tool failing on the LLM's input is answered, not fatal
                log.warning("tool %s failed", call.name, exc_info=True)
                first = str(exc).splitlines()[0][:300] if str(exc) else ""
                error = f"the tool failed: {type(exc).__name__}: {first}"
        seconds = round(time.perf_counter() - started, 3)
        transcript.experiments.append(Experiment(
            id=f"E{number}", step=transcript.steps, tool=call.name, arguments=call.arguments, ok=outcome is not None,
            summary=outcome.summary if outcome else error, result=dict(outcome.result) if outcome else {},
            error=error, seconds=seconds,
        ))
        self._emit(transcript, "tool", f"E{number} {call.name}: {outcome.summary if outcome else 'ERROR ' + error}",
                   tool=call.name, ok=outcome is not None)
        if outcome is None:
            return ToolResult(call_id=call.id, content=error, is_error=True), False
        return ToolResult(call_id=call.id, content=result_text(outcome)), outcome.finish

    def _answer_pending(self, transcript: Transcript) -> bool:
        """Run the tool calls of a last assistant turn that has no results yet (resume); finished?"""
        if not transcript.messages or transcript.messages[-1].role != "assistant":
            return False
        calls = transcript.messages[-1].tool_calls
        if not calls:
            return False
        results, finished = [], False
        for call in calls:
            result, done = self._call(transcript, call)
            results.append(result)
            finished = finished or done
        transcript.messages.append(AgentMessage(role="user", tool_results=tuple(results)))
        return finished

    # -- the loop ------------------------------------------------------------------------------
    async def run(self, transcript: Transcript) -> Transcript:
        """Run (or resume) ``transcript`` until it finishes or a bound stops it; the returned
        transcript is saved and has status finished or stopped."""
        if transcript.status != "running":
            return transcript
        self._prior = (transcript.usage.requests - self.llm.requests, transcript.usage.retries - self.llm.retries)
        if not transcript.messages:
            transcript.messages.append(AgentMessage(role="user", text=opening_message(transcript)))
            self._save(transcript)
        if self._answer_pending(transcript):
            return self._finish(transcript)
        idle = 0
        while True:
            if self.should_stop():
                return self._stop(transcript, "stopped on request (resume with --resume)")
            if transcript.steps >= self.settings.max_steps:
                return self._stop(transcript, f"step limit reached ({self.settings.max_steps} LLM turns) before the "
                                              "agent called finish")
            if self.llm.budget.exhausted:
                return self._stop(transcript, f"budget exhausted: {self.llm.budget.describe()} (limit "
                                              f"${self.settings.max_spend_usd:g} / {self.settings.max_tokens_total} tokens)")
            transcript.steps += 1
            self._emit(transcript, "step", f"step {transcript.steps}: asking the LLM")
            try:
                answer = await self.llm.complete_with_tools(system=SYSTEM_PROMPT, messages=transcript.messages,
                                                            tools=self.definitions, max_tokens=self.settings.max_tokens)
            except (FatalLLMError, LLMRequestError) as exc:
                transcript.steps -= 1
                return self._stop(transcript, f"LLM failure: {exc}")
            calls = tuple(replace(c, arguments=parse_tool_arguments(c.arguments)) for c in answer.tool_calls)
            transcript.messages.append(AgentMessage(role="assistant", text=answer.text, tool_calls=calls))
            if not calls:
                idle += 1
                if idle > MAX_IDLE_TURNS:
                    return self._stop(transcript, f"the LLM answered {idle} times without calling a tool "
                                                  "(it never called finish)")
                transcript.messages.append(AgentMessage(
                    role="user", text="Please continue by calling a tool; call finish when you are done."))
                self._save(transcript)
                continue
            idle = 0
            finished = self._answer_pending(transcript)
            self._save(transcript)
            if finished:
                return self._finish(transcript)

    def _finish(self, transcript: Transcript) -> Transcript:
        transcript.status = "finished"
        final = transcript.final
        transcript.stop_reason = "the agent called finish"
        self._save(transcript)
        self._emit(transcript, "finished", f"finished: {final.label!r} ({final.confidence})" if final else "finished")
        return transcript


def budget_for(settings: AgentSettings, transcript: Transcript | None = None) -> Budget:
    """A budget with the settings' limits, already charged with a resumed transcript's usage."""
    budget = Budget(max_tokens_total=settings.max_tokens_total, max_spend_usd=settings.max_spend_usd,
                    input_price_per_mtok=settings.input_price_per_mtok,
                    output_price_per_mtok=settings.output_price_per_mtok)
    if transcript is not None:
        budget.charge(transcript.usage.input_tokens, transcript.usage.output_tokens)
    return budget
