"""Prompts of the two passes and validation of the LLM's structured answers (relp-spec §H).

Layer bands scale with the model: the last ``late_fraction`` of layers are *late* (described by
their direct token effects), the first ``early_fraction`` *early* (described by the downstream
functions they trigger), the rest *mid* (bridges / gates). For 32 layers with the defaults:
early 0-9, mid 10-25, late 26-31.

Every prompt carries a machine-readable header (``Task: output|input`` and ``Neuron: L{l}/N{i}``)
so logs and stand-in servers can tell requests apart. Answers must be one JSON object
``{"label", "description", "type", "confidence"}``; :func:`parse_answer` extracts it (also from a
fenced block or surrounding prose), validates every field and returns a :class:`ParsedAnswer` or
raises :class:`MalformedAnswer` with the reason, which the engine feeds back when it re-asks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

OUTPUT_TYPES = ("semantic", "lexical", "routing", "formatting", "structural")
INPUT_TYPES = ("token-pattern", "context", "position", "upstream-gated", "combination")
CONFIDENCES = ("low", "medium", "high")
MAX_LABEL_CHARS = 120
MAX_DESCRIPTION_CHARS = 2000


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerBands:
    """Which band each layer of a ``num_layers``-layer model belongs to."""

    num_layers: int
    late_start: int
    mid_start: int

    @classmethod
    def for_model(cls, num_layers: int, *, late_fraction: float = 0.2, early_fraction: float = 0.3) -> LayerBands:
        num_layers = max(1, num_layers)
        late = max(1, round(num_layers * late_fraction))
        late_start = max(0, num_layers - late)
        mid_start = min(late_start, max(0, round(num_layers * early_fraction)))
        return cls(num_layers=num_layers, late_start=late_start, mid_start=mid_start)

    def band(self, layer: int) -> str:
        if layer >= self.late_start:
            return "late"
        if layer >= self.mid_start:
            return "mid"
        return "early"


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenEffect:
    token: str
    weight: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkedNeuron:
    """A neighbour shown in a prompt: its id, the mean edge weight, and its labels (may be empty)."""

    layer: int
    neuron: int
    weight: float
    count: int
    label: str = ""
    input_label: str = ""

    @property
    def unit_id(self) -> str:
        return f"L{self.layer}/N{self.neuron}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LogitLink:
    """An aggregated neuron -> logit edge: the token, how often it was seen, its mean weight."""

    token: str
    count: int
    mean_weight: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ExemplarLine:
    """A top-activating context shown in pass 2: its text (activating token marked) and activation."""

    text: str
    activation: float


@dataclass(frozen=True, slots=True, kw_only=True)
class NeuronContext:
    """Everything a prompt says about one neuron."""

    layer: int
    neuron: int
    num_layers: int
    band: str
    appearance_count: int = 0
    prior_description: str = ""
    promotes: tuple[TokenEffect, ...] = ()
    suppresses: tuple[TokenEffect, ...] = ()
    #: Pass 1: labelled downstream neurons by |weight|.
    downstream: tuple[LinkedNeuron, ...] = ()
    #: Pass 2: the neuron's own output label and its labelled / unlabelled upstream neurons.
    output_label: str = ""
    output_description: str = ""
    upstream: tuple[LinkedNeuron, ...] = ()
    unlabeled_upstream: tuple[str, ...] = ()
    #: Pass 1, late layers: aggregated neuron -> logit links (strongest first).
    logit_links: tuple[LogitLink, ...] = ()
    #: Pass 2: top-activating corpus contexts (highest first) and the neuron's activation scale.
    exemplars: tuple[ExemplarLine, ...] = ()
    activation_note: str = ""
    #: Pass 2: tokens whose embeddings, fed straight into the MLP, drive the neuron most (relp-spec §F).
    input_tokens: tuple[TokenEffect, ...] = ()

    @property
    def unit_id(self) -> str:
        return f"L{self.layer}/N{self.neuron}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Prompt:
    system: str
    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedAnswer:
    label: str
    description: str
    type: str
    confidence: str


class MalformedAnswer(ValueError):
    """The LLM answer is not a valid structured answer; the message says why."""


def _fmt_tokens(tokens: Sequence[TokenEffect]) -> str:
    return ", ".join(f"{json.dumps(t.token, ensure_ascii=False)} ({t.weight:+.3f})" for t in tokens) or "(none)"


SYSTEM_PROMPT = (
    "You are an expert in mechanistic interpretability. You label MLP neurons of a transformer "
    "language model from aggregated attribution-graph evidence and weight-based token projections. "
    "Answer with exactly one JSON object and nothing else."
)

_BAND_GUIDANCE_OUTPUT = {
    "late": (
        "This is a late layer: its output acts mostly directly on the next-token logits. Describe the "
        "direct token effects (which tokens or token families it promotes and suppresses). "
        'Example labels: "promotes capital-city names", "suppresses closing quote".'
    ),
    "mid": (
        "This is a middle layer: it usually acts as a bridge or gate between earlier features and "
        "late output neurons. Your label must reference the downstream functions it activates or "
        'inhibits. Example labels: "routes country -> capital lookup", "gates list continuation".'
    ),
    "early": (
        "This is an early layer: describe which downstream functions it triggers (and, secondarily, "
        'its token effects). Example labels: "triggers geography features", "feeds number formatting".'
    ),
}


def _answer_spec(types: Sequence[str], label_words: str) -> str:
    return (
        "Answer with one JSON object with exactly these keys:\n"
        f'  "label": a short label ({label_words} words),\n'
        '  "description": 2-3 sentences explaining the evidence,\n'
        f'  "type": one of {", ".join(json.dumps(t) for t in types)},\n'
        '  "confidence": one of "low", "medium", "high".'
    )


def output_prompt(ctx: NeuronContext) -> Prompt:
    """Pass 1 ("what does it DO"): token effects for late layers, labelled downstream otherwise."""
    lines = [
        "Task: output",
        f"Neuron: {ctx.unit_id}",
        f"Position: layer {ctx.layer} of {ctx.num_layers} (0-based; {ctx.band} band)",
        f"Appearances in attribution graphs: {ctx.appearance_count}",
    ]
    if ctx.prior_description:
        lines.append(f"Prior max-activation description: {ctx.prior_description}")
    lines.append("")
    if ctx.band == "late" or not ctx.downstream:
        lines.append(f"Top promoted tokens (direct logit effect): {_fmt_tokens(ctx.promotes[:10])}")
        lines.append(f"Top suppressed tokens (direct logit effect): {_fmt_tokens(ctx.suppresses[:10])}")
    if ctx.logit_links:
        lines.append("Logit links in attribution graphs (output token, mean edge weight, times seen):")
        for link in ctx.logit_links:
            verb = "PROMOTES" if link.mean_weight >= 0 else "SUPPRESSES"
            lines.append(f"  {verb} {json.dumps(link.token, ensure_ascii=False)} (w={link.mean_weight:+.4f}, seen {link.count}x)")
    if ctx.downstream:
        lines.append("Labelled downstream neurons (strongest mean edge weight first):")
        for n in ctx.downstream:
            verb = "ACTIVATES" if n.weight >= 0 else "INHIBITS"
            lines.append(f"  {verb} {n.unit_id} {json.dumps(n.label, ensure_ascii=False)} (w={n.weight:+.4f}, seen {n.count}x)")
        if ctx.band != "late":
            lines.append(f"Top promoted tokens (secondary): {_fmt_tokens(ctx.promotes[:5])}")
    lines += ["", _BAND_GUIDANCE_OUTPUT[ctx.band], "", "What does this neuron DO?", _answer_spec(OUTPUT_TYPES, "3-8")]
    return Prompt(system=SYSTEM_PROMPT, user="\n".join(lines))


def input_prompt(ctx: NeuronContext) -> Prompt:
    """Pass 2 ("what TRIGGERS it"): labelled upstream neurons, the neuron's own output label."""
    lines = [
        "Task: input",
        f"Neuron: {ctx.unit_id}",
        f"Position: layer {ctx.layer} of {ctx.num_layers} (0-based; {ctx.band} band)",
        f"Appearances in attribution graphs: {ctx.appearance_count}",
    ]
    if ctx.prior_description:
        lines.append(f"Prior max-activation description: {ctx.prior_description}")
    if ctx.output_label:
        lines.append(f"Its output function: {ctx.output_label}")
    lines.append("")
    if ctx.exemplars:
        lines.append(f"Top-activating corpus contexts (activating token marked [[like this]]; {ctx.activation_note}):")
        for ex in ctx.exemplars:
            lines.append(f"  {ex.activation:+.3f}: {json.dumps(ex.text, ensure_ascii=False)}")
    if ctx.input_tokens:
        lines.append(f"Tokens whose embeddings drive it most directly (input projection): {_fmt_tokens(ctx.input_tokens)}")
    if ctx.upstream or not ctx.exemplars:
        lines.append("Labelled upstream neurons (strongest mean edge weight first):")
    for n in ctx.upstream:
        verb = "EXCITED by" if n.weight >= 0 else "INHIBITED by"
        extra = f"; fires on: {n.input_label}" if n.input_label else ""
        lines.append(f"  {verb} {n.unit_id} {json.dumps(n.label, ensure_ascii=False)}{extra} (w={n.weight:+.4f}, seen {n.count}x)")
    if ctx.unlabeled_upstream:
        lines.append(f"Unlabelled upstream neurons: {', '.join(ctx.unlabeled_upstream)}")
    lines.append(f"Top promoted tokens (for reference): {_fmt_tokens(ctx.promotes[:5])}")
    lines += [
        "",
        "What input condition TRIGGERS this neuron? Base the label on the contexts where it fires."
        if ctx.exemplars else "What input condition TRIGGERS this neuron? Base the label on the upstream evidence.",
        _answer_spec(INPUT_TYPES, "3-7"),
    ]
    return Prompt(system=SYSTEM_PROMPT, user="\n".join(lines))


def estimate_tokens(prompt: Prompt) -> int:
    """Rough token count of a prompt (characters / 4), the unit of the per-pass budgets."""
    return (len(prompt.system) + len(prompt.user)) // 4 + 1


#: Evidence dropped first when a prompt is over its budget (last items of each list first).
_TRIM_ORDER = {
    "output": ("downstream", "logit_links"),
    "input": ("unlabeled_upstream", "upstream", "input_tokens", "exemplars"),
}


def fit_prompt(label_pass: str, ctx: NeuronContext, *, budget: int) -> Prompt:
    """The pass's prompt for ``ctx`` with evidence lists cut from the end until it fits ``budget``
    estimated tokens (0 = no budget). What remains (headers, token effects) is always sent."""
    from dataclasses import replace

    build = output_prompt if label_pass == "output" else input_prompt
    prompt = build(ctx)
    if budget <= 0:
        return prompt
    for name in _TRIM_ORDER[label_pass]:
        while estimate_tokens(prompt) > budget and getattr(ctx, name):
            ctx = replace(ctx, **{name: getattr(ctx, name)[:-1]})
            prompt = build(ctx)
    return prompt


def correction_message(reason: str, allowed_types: Sequence[str]) -> str:
    """The follow-up user turn after a malformed answer."""
    return (
        f"Your answer could not be used: {reason}. Reply again with only one JSON object with the keys "
        f'"label", "description", "type" (one of {", ".join(allowed_types)}) and "confidence" (low, medium, high).'
    )


_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


def _extract_object(text: str) -> dict:
    text = text.strip()
    candidates = [text]
    candidates += _FENCE.findall(text)
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    raise MalformedAnswer("no JSON object found in the answer")


def _normalise_confidence(value: object) -> str:
    if isinstance(value, str) and value.strip().lower() in CONFIDENCES:
        return value.strip().lower()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1:
        return "low" if value < 0.4 else "medium" if value < 0.75 else "high"
    raise MalformedAnswer(f"confidence must be one of {', '.join(CONFIDENCES)}, got {value!r}")


def parse_answer(text: str, *, allowed_types: Sequence[str]) -> ParsedAnswer:
    """Validate an answer: non-empty one-line label (<=120 chars), string description, known
    type (case and spaces/underscores normalised), confidence low/medium/high (or a 0-1 number)."""
    obj = _extract_object(text or "")
    label = obj.get("label")
    if not isinstance(label, str) or not label.strip():
        raise MalformedAnswer('"label" must be a non-empty string')
    label = " ".join(label.split()).strip("\"'` ")
    if not label:
        raise MalformedAnswer('"label" must be a non-empty string')
    if len(label) > MAX_LABEL_CHARS:
        raise MalformedAnswer(f'"label" is longer than {MAX_LABEL_CHARS} characters')
    description = obj.get("description", "")
    if not isinstance(description, str):
        raise MalformedAnswer('"description" must be a string')
    description = description.strip()[:MAX_DESCRIPTION_CHARS]
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise MalformedAnswer(f'"type" must be one of {", ".join(allowed_types)}')
    kind = kind.strip().lower().replace("_", "-").replace(" ", "-")
    if kind not in allowed_types:
        raise MalformedAnswer(f'"type" must be one of {", ".join(allowed_types)}, got {obj.get("type")!r}')
    confidence = _normalise_confidence(obj.get("confidence"))
    return ParsedAnswer(label=label, description=description, type=kind, confidence=confidence)
