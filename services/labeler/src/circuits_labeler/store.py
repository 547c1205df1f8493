"""Labels per neuron (output and input pass), kept while the labeler runs.

The labels file is the core label format (:mod:`circuits_core.labels`, its one reader and
writer); one line per labelled neuron::

    {"layer": 3, "neuron": 17, "label": "<output label>", "input_label": "<input label>",
     "description": "<output description>", "output_label": "...", "output_type": "semantic",
     "input_type": "context", "confidence": "high", "source": "progressive_output",
     "input_description": "...", "input_confidence": "medium", "passes": ["output", "input"],
     "appearance_count": 12, "model": "<LLM model>"}

``label``/``description``/``confidence`` are the output pass's (the function label; an
input-pass-only neuron has an empty ``label`` and its input confidence); ``source`` is
``progressive_output`` when an output label exists, else ``progressive_input``. Empty fields are
left out.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from circuits_core.labels import LabelRecord, iter_label_file, write_label_file
from circuits_core.schemas import Unit, UnitLabel

from circuits_labeler.prompts import ParsedAnswer
from circuits_labeler.scoring import LabelScore


@dataclass(frozen=True, slots=True, kw_only=True)
class NeuronLabels:
    layer: int
    neuron: int
    appearance_count: int = 0
    output: ParsedAnswer | None = None
    input: ParsedAnswer | None = None
    output_score: LabelScore | None = None
    input_score: LabelScore | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.neuron)

    def to_record(self, *, model: str = "") -> LabelRecord:
        out, inp = self.output, self.input
        return LabelRecord(
            layer=self.layer,
            neuron=self.neuron,
            label=out.label if out else "",
            input_label=inp.label if inp else "",
            description=out.description if out else "",
            output_label=out.label if out else "",
            output_type=out.type if out else "",
            input_type=inp.type if inp else "",
            confidence=out.confidence if out else (inp.confidence if inp else ""),
            source="progressive_output" if out else "progressive_input",
            input_description=inp.description if inp else "",
            input_confidence=inp.confidence if inp else "",
            passes=tuple(p for p, a in (("output", out), ("input", inp)) if a),
            appearance_count=self.appearance_count,
            model=model,
            **_score_fields("output", self.output_score),
            **_score_fields("input", self.input_score),
        )

    @classmethod
    def from_record(cls, rec: LabelRecord) -> NeuronLabels:
        out = inp = None
        if rec.label:
            out = ParsedAnswer(label=rec.label, description=rec.description, type=rec.output_type, confidence=rec.confidence)
        if rec.input_label:
            inp = ParsedAnswer(
                label=rec.input_label, description=rec.input_description, type=rec.input_type,
                confidence=rec.input_confidence,
            )  # fmt: skip
        return cls(layer=rec.layer, neuron=rec.neuron, appearance_count=rec.appearance_count, output=out, input=inp,
                   output_score=_score_from(rec, "output"), input_score=_score_from(rec, "input"))

    def to_unit(self) -> Unit:
        labels = []
        if self.output:
            labels.append(UnitLabel(text=self.output.label, source="progressive_output",
                                    confidence=self.output.confidence, description=self.output.description,
                                    **_label_score_kwargs(self.output_score)))
        if self.input:
            labels.append(UnitLabel(text=self.input.label, source="progressive_input",
                                    confidence=self.input.confidence, description=self.input.description,
                                    **_label_score_kwargs(self.input_score)))
        return Unit(
            layer=self.layer, index=self.neuron, kind="neuron",
            label=self.output.label if self.output else "",
            input_label=self.input.label if self.input else "",
            appearance_count=self.appearance_count, labels=tuple(labels),
        )


def _score_fields(label_pass: str, score: LabelScore | None) -> dict:
    if score is None:
        return {}
    return {
        f"{label_pass}_score_detection": score.detection, f"{label_pass}_score_simulation": score.simulation,
        f"{label_pass}_score_contexts": score.contexts, f"{label_pass}_score_positives": score.positives,
    }  # fmt: skip


def _score_from(rec: LabelRecord, label_pass: str) -> LabelScore | None:
    contexts = getattr(rec, f"{label_pass}_score_contexts")
    if contexts is None:
        return None
    return LabelScore(detection=getattr(rec, f"{label_pass}_score_detection"),
                      simulation=getattr(rec, f"{label_pass}_score_simulation"),
                      contexts=contexts, positives=getattr(rec, f"{label_pass}_score_positives") or 0)


def _label_score_kwargs(score: LabelScore | None) -> dict:
    if score is None:
        return {}
    return {"score_detection": score.detection, "score_simulation": score.simulation,
            "score_contexts": score.contexts, "score_positives": score.positives}


class LabelStore:
    """In-memory labels of one run (thread-safe), written out as JSONL atomically."""

    def __init__(self, labels: Iterable[NeuronLabels] = ()) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[int, int], NeuronLabels] = {l.key: l for l in labels}

    def get(self, key: tuple[int, int]) -> NeuronLabels | None:
        with self._lock:
            return self._by_key.get(key)

    def output_label(self, key: tuple[int, int]) -> str:
        entry = self.get(key)
        return entry.output.label if entry and entry.output else ""

    def input_label(self, key: tuple[int, int]) -> str:
        entry = self.get(key)
        return entry.input.label if entry and entry.input else ""

    def set(self, key: tuple[int, int], *, label_pass: str, answer: ParsedAnswer, appearance_count: int = 0) -> None:
        with self._lock:
            entry = self._by_key.get(key) or NeuronLabels(layer=key[0], neuron=key[1], appearance_count=appearance_count)
            # A changed label keeps no score: it was the old label's.
            if label_pass == "output":
                entry = replace(entry, output=answer, output_score=entry.output_score if entry.output == answer else None)
            else:
                entry = replace(entry, input=answer, input_score=entry.input_score if entry.input == answer else None)
            self._by_key[key] = entry

    def set_score(self, key: tuple[int, int], *, label_pass: str, score: LabelScore) -> None:
        with self._lock:
            entry = self._by_key.get(key)
            if entry is None:
                return
            self._by_key[key] = replace(entry, **{f"{label_pass}_score": score})

    def all(self) -> list[NeuronLabels]:
        with self._lock:
            return [self._by_key[k] for k in sorted(self._by_key)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)

    def write_jsonl(self, path: str | Path, *, model: str = "") -> Path:
        """Write every label (sorted by layer, neuron) to ``path`` atomically (core label writer)."""
        return write_label_file((entry.to_record(model=model) for entry in self.all()), path)

    @classmethod
    def read_jsonl(cls, path: str | Path) -> LabelStore:
        """The labels of a label file (the core reader: malformed lines raise CorruptInput)."""
        return cls(NeuronLabels.from_record(r) for r in iter_label_file(path, default_source=""))
