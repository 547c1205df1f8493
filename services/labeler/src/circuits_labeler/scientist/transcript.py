"""The investigation transcript: everything one neuron investigation did, and its file format.

:class:`Transcript` is the working record of the agent loop and the JSON file
(``transcript.json``) it is saved to after every step; the HTML report is rendered from it and a
stopped investigation resumes from it (``circuits investigate --resume``). This module owns the
format (``format: circuits-investigation``, ``version: 1``): :func:`save_transcript` writes it
atomically, :func:`load_transcript` reads and validates it (a damaged file is refused with one
line naming the field, never half-read).

Records (hypotheses, pre-registered predictions, experiments, the final answer) are frozen
values; the transcript replaces them as they change.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from circuits_core.errors import CorruptInput, InvalidArgument

from circuits_labeler.llm import AgentMessage, ToolCall, ToolResult

FORMAT = "circuits-investigation"
VERSION = 1
#: Confidence levels, weakest first.
CONFIDENCES = ("low", "medium", "high")
#: Why an investigation ended (``stop_reason`` holds the sentence, ``status`` one of these).
STATUSES = ("running", "finished", "stopped")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class Hypothesis:
    id: str
    statement: str
    #: open | supported | refuted
    status: str = "open"
    step: int = 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PredictionItem:
    """One pre-registered prediction: does the neuron fire on this prompt? Filled in by the test."""

    prompt: str
    fires: bool
    #: Largest activation over the prompt's own tokens, the token and its position (after the test).
    measured: float | None = None
    token: str = ""
    position: int = -1
    came_true: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """A set of predictions registered before the test that scores them."""

    id: str
    hypothesis_id: str
    #: "Fires" means: largest activation over the prompt's own tokens >= threshold (fixed at registration).
    threshold: float
    threshold_source: str
    items: tuple[PredictionItem, ...]
    registered_step: int
    tested_step: int | None = None

    @property
    def tested(self) -> bool:
        return self.tested_step is not None

    @property
    def correct(self) -> int:
        return sum(1 for item in self.items if item.came_true)


@dataclass(frozen=True, slots=True, kw_only=True)
class Experiment:
    """One tool call and its outcome (every call is kept, including refused ones)."""

    id: str
    step: int
    tool: str
    arguments: Any
    ok: bool
    summary: str
    #: The structured result (what the report draws from); {} when the call failed.
    result: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""
    #: Seconds the tool took.
    seconds: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FinalAnswer:
    label: str
    description: str
    #: What the agent said, and what the prediction score allows (the lower of the two).
    confidence_stated: str
    confidence: str
    hypothesis_id: str = ""
    predictions_correct: int = 0
    predictions_total: int = 0
    step: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    spend_usd: float = 0.0
    requests: int = 0
    retries: int = 0


@dataclass(slots=True, kw_only=True)
class Transcript:
    """The live record of one investigation (mutable: the loop appends to it)."""

    layer: int
    neuron: int
    model: str
    llm: Mapping[str, str]
    settings: Mapping[str, Any]
    sources: Mapping[str, str]
    started: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    status: str = "running"
    stop_reason: str = ""
    steps: int = 0
    usage: Usage = field(default_factory=Usage)
    messages: list[AgentMessage] = field(default_factory=list)
    experiments: list[Experiment] = field(default_factory=list)
    hypotheses: list[Hypothesis] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    final: FinalAnswer | None = None

    @property
    def unit_id(self) -> str:
        return f"L{self.layer}/N{self.neuron}"

    # -- records ---------------------------------------------------------------------------
    def hypothesis(self, hypothesis_id: str) -> Hypothesis | None:
        return next((h for h in self.hypotheses if h.id == hypothesis_id), None)

    def prediction(self, prediction_id: str) -> Prediction | None:
        return next((p for p in self.predictions if p.id == prediction_id), None)

    def put_hypothesis(self, hypothesis: Hypothesis) -> None:
        self.hypotheses = [hypothesis if h.id == hypothesis.id else h for h in self.hypotheses]
        if all(h.id != hypothesis.id for h in self.hypotheses):
            self.hypotheses.append(hypothesis)

    def put_prediction(self, prediction: Prediction) -> None:
        self.predictions = [prediction if p.id == prediction.id else p for p in self.predictions]
        if all(p.id != prediction.id for p in self.predictions):
            self.predictions.append(prediction)

    def prediction_score(self) -> tuple[int, int]:
        """(predictions that came true, predictions tested) over every test run."""
        tested = [p for p in self.predictions if p.tested]
        return sum(p.correct for p in tested), sum(len(p.items) for p in tested)

    def reference_activation(self) -> float | None:
        """The largest activation the investigation has measured (prompt runs and tests)."""
        best = None
        for experiment in self.experiments:
            value = experiment.result.get("max_activation") if experiment.ok else None
            if isinstance(value, (int, float)) and (best is None or value > best):
                best = float(value)
        return best

    def touch(self) -> None:
        self.updated = now()


# -- confidence -------------------------------------------------------------------------------
def measured_confidence(correct: int, total: int) -> str:
    """The confidence the pre-registered predictions support: high needs at least 8 tested
    predictions with >= 90% come true, medium at least 4 with >= 75%; anything less is low."""
    if total >= 8 and correct >= 0.9 * total:
        return "high"
    if total >= 4 and correct >= 0.75 * total:
        return "medium"
    return "low"


def grounded_confidence(stated: str, correct: int, total: int) -> str:
    """The lower of the agent's stated confidence and :func:`measured_confidence`."""
    measured = measured_confidence(correct, total)
    stated = stated if stated in CONFIDENCES else "low"
    return min(stated, measured, key=CONFIDENCES.index)


# -- file format ------------------------------------------------------------------------------
def _message_to_json(message: AgentMessage) -> dict[str, Any]:
    return {
        "role": message.role,
        "text": message.text,
        "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls],
        "tool_results": [{"call_id": r.call_id, "content": r.content, "is_error": r.is_error} for r in message.tool_results],
    }


def transcript_to_json(transcript: Transcript) -> dict[str, Any]:
    """The transcript as the JSON object of ``transcript.json``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "unit": {"layer": transcript.layer, "neuron": transcript.neuron},
        "model": transcript.model,
        "llm": dict(transcript.llm),
        "settings": dict(transcript.settings),
        "sources": dict(transcript.sources),
        "started": transcript.started,
        "updated": transcript.updated,
        "status": transcript.status,
        "stop_reason": transcript.stop_reason,
        "steps": transcript.steps,
        "usage": asdict(transcript.usage),
        "hypotheses": [asdict(h) for h in transcript.hypotheses],
        "predictions": [asdict(p) for p in transcript.predictions],
        "experiments": [asdict(e) for e in transcript.experiments],
        "final": asdict(transcript.final) if transcript.final else None,
        "messages": [_message_to_json(m) for m in transcript.messages],
    }


def save_transcript(transcript: Transcript, path: str | Path) -> Path:
    """Write ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(transcript_to_json(transcript), indent=1, allow_nan=False, default=_json_default)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class _Reader:
    """Typed access to a parsed transcript; every failure names the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, what: str) -> CorruptInput:
        return CorruptInput(f"{self.source}: {where}: {what}")

    def obj(self, value: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, "expected an object")
        return value

    def lst(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, "expected a list")
        return value

    def get(self, data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
        if key not in data:
            if default is ...:
                raise self.fail(f"{where}.{key}" if where else key, "missing")
            return default
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.fail(f"{where}.{key}" if where else key, f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
        return value

    def record(self, cls: type, data: Any, where: str, **convert: Any) -> Any:
        data = dict(self.obj(data, where))
        names = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        unknown = set(data) - names
        if unknown:
            raise self.fail(where, f"unknown field(s) {', '.join(sorted(unknown))}")
        for key, fn in convert.items():
            if key in data:
                data[key] = fn(data[key], f"{where}.{key}")
        try:
            return cls(**data)
        except (TypeError, InvalidArgument) as exc:
            raise self.fail(where, str(exc).splitlines()[0]) from None


def transcript_from_json(data: Any, *, source: str = "transcript") -> Transcript:
    """Parse the JSON object of a transcript file; CorruptInput names the bad field."""
    r = _Reader(source)
    data = r.obj(data, "transcript")
    if data.get("format") != FORMAT:
        raise r.fail("format", f"expected {FORMAT!r} (is this an investigation transcript?)")
    if data.get("version") != VERSION:
        raise r.fail("version", f"unsupported version {data.get('version')!r} (this reader knows {VERSION})")
    unit = r.obj(data.get("unit"), "unit")
    status = r.get(data, "status", str, "")
    if status not in STATUSES:
        raise r.fail("status", f"must be one of {', '.join(STATUSES)}")

    def strings(value: Any, where: str) -> tuple[str, ...]:
        items = r.lst(value, where)
        if not all(isinstance(v, str) for v in items):
            raise r.fail(where, "expected a list of strings")
        return tuple(items)

    def items(value: Any, where: str) -> tuple[PredictionItem, ...]:
        return tuple(r.record(PredictionItem, v, f"{where}[{i}]") for i, v in enumerate(r.lst(value, where)))

    messages = []
    for i, m in enumerate(r.lst(data.get("messages", []), "messages")):
        where = f"messages[{i}]"
        m = r.obj(m, where)
        role = r.get(m, "role", str, where)
        if role not in ("user", "assistant"):
            raise r.fail(f"{where}.role", "must be user or assistant")
        calls = tuple(
            ToolCall(id=r.get(c, "id", str, f"{where}.tool_calls[{j}]"), name=r.get(c, "name", str, f"{where}.tool_calls[{j}]"),
                     arguments=r.obj(c, f"{where}.tool_calls[{j}]").get("arguments"))
            for j, c in enumerate(r.lst(m.get("tool_calls", []), f"{where}.tool_calls"))
        )
        results = tuple(
            ToolResult(call_id=r.get(c, "call_id", str, f"{where}.tool_results[{j}]"),
                       content=r.get(c, "content", str, f"{where}.tool_results[{j}]"),
                       is_error=r.get(c, "is_error", bool, f"{where}.tool_results[{j}]", False))
            for j, c in enumerate(r.lst(m.get("tool_results", []), f"{where}.tool_results"))
        )
        messages.append(AgentMessage(role=role, text=r.get(m, "text", str, where, ""), tool_calls=calls, tool_results=results))

    final = data.get("final")
    transcript = Transcript(
        layer=r.get(unit, "layer", int, "unit"),
        neuron=r.get(unit, "neuron", int, "unit"),
        model=r.get(data, "model", str, ""),
        llm=dict(r.obj(data.get("llm", {}), "llm")),
        settings=dict(r.obj(data.get("settings", {}), "settings")),
        sources=dict(r.obj(data.get("sources", {}), "sources")),
        started=r.get(data, "started", str, "", now()),
        updated=r.get(data, "updated", str, "", now()),
        status=status,
        stop_reason=r.get(data, "stop_reason", str, "", ""),
        steps=r.get(data, "steps", int, "", 0),
        usage=r.record(Usage, data.get("usage", {}), "usage"),
        messages=messages,
        experiments=[r.record(Experiment, e, f"experiments[{i}]")
                     for i, e in enumerate(r.lst(data.get("experiments", []), "experiments"))],
        hypotheses=[r.record(Hypothesis, h, f"hypotheses[{i}]", notes=strings)
                    for i, h in enumerate(r.lst(data.get("hypotheses", []), "hypotheses"))],
        predictions=[r.record(Prediction, p, f"predictions[{i}]", items=items)
                     for i, p in enumerate(r.lst(data.get("predictions", []), "predictions"))],
        final=None if final is None else r.record(FinalAnswer, final, "final"),
    )
    return transcript


def load_transcript(path: str | Path) -> Transcript:
    """Read and validate a transcript file (InvalidArgument when absent, CorruptInput when damaged)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: transcript not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptInput(f"{path}: cannot read transcript ({exc.__class__.__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptInput(f"{path}: not JSON (line {exc.lineno})") from None
    return transcript_from_json(data, source=str(path))
