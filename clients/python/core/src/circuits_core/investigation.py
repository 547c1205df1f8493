"""Progress of a neuron investigation (``circuits investigate``, ``LabelerService.Investigate``).

The neuron scientist emits one :class:`InvestigationEvent` per LLM turn (``step``), per tool call
(``tool``) and one at the end (``finished`` or ``stopped``, with the verdict fields filled in);
``circuits_core.wire`` maps it to and from ``circuits.v1.InvestigationEvent``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Event kinds; the last two end an investigation.
EVENT_KINDS = ("step", "tool", "finished", "stopped")


@dataclass(frozen=True, slots=True, kw_only=True)
class InvestigationEvent:
    kind: str
    step: int
    message: str
    tool: str = ""
    ok: bool = True
    #: Set on the last event.
    status: str = ""
    label: str = ""
    confidence: str = ""
    predictions_correct: int = 0
    predictions_total: int = 0
    report_path: str = ""
    spend_usd: float = 0.0

    @property
    def final(self) -> bool:
        return self.kind in ("finished", "stopped")
