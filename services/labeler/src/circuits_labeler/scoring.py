"""Scores of labels: how well a label predicts where its neuron fires (detection and simulation).

For one label of one neuron the scorer LLM sees, in one batched prompt, held-out contexts of
the neuron without their activations -- the top-activating exemplars the labeler did NOT see
(odd ranks; the labeler is shown the even ranks) and random-sample contexts -- each with one
token marked, and answers per context how strongly (0-10) the neuron fires on the marked token.
In the spirit of OpenAI's automated-interpretability simulation scoring and EleutherAI delphi's
detection scoring:

* **detection** = balanced accuracy of "fires" (answer >= 5) against the truth "activation >=
  ``fire_fraction`` x the neuron's K-th (last kept) top activation"; None when the contexts hold
  only one class;
* **simulation** = Pearson correlation between the answers and the true activations; 0 when the
  scorer gives every context the same answer, None when the activations are all equal.

Contexts are shuffled per neuron with a fixed seed, so a prompt (and its cached answer) is a
deterministic function of the exemplar file and the label. Every prompt carries ``Task: score``,
``Neuron: L{l}/N{i}`` and ``Label pass: output|input`` headers for logs and stand-in servers.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from circuits_labeler.prompts import MalformedAnswer, Prompt

#: Answers at or above this count as "fires" for detection.
FIRE_ANSWER = 5
MAX_ANSWER = 10
MARK = ("[[", "]]")

SCORER_SYSTEM = (
    "You predict where a neuron of a language model fires from a description of the neuron. "
    "Answer with exactly one JSON object and nothing else."
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoringContext:
    """One context shown to the scorer: its text with the marked token, and the truth."""

    text: str
    activation: float
    kind: str  # "top" | "random"


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelScore:
    """Detection (balanced accuracy) and simulation (correlation) of one label, and what they rest on."""

    detection: float | None
    simulation: float | None
    #: Contexts the scorer judged, and how many of them truly fire.
    contexts: int
    positives: int

    def to_json(self) -> dict:
        return {"detection": self.detection, "simulation": self.simulation, "contexts": self.contexts,
                "positives": self.positives}


def split_exemplars(top: Sequence) -> tuple[list, list]:
    """(shown to the labeler, held out for scoring): even ranks and odd ranks of the top list."""
    return [c for i, c in enumerate(top) if i % 2 == 0], [c for i, c in enumerate(top) if i % 2 == 1]


def fire_threshold(top: Sequence, *, fire_fraction: float) -> float:
    """Truth threshold: ``fire_fraction`` x the lowest kept top activation (inf without exemplars)."""
    if not top:
        return math.inf
    return fire_fraction * min(c.activation for c in top)


def scoring_contexts(
    exemplars: object, layer: int, neuron: int, *, held_out: int, random_contexts: int, fire_fraction: float,
    seed: int = 0,
) -> tuple[list[ScoringContext], float]:
    """The shuffled contexts scored for one neuron and the truth threshold.

    ``exemplars`` is a :class:`circuits_server.exemplar_files.ExemplarFile` (``top``/``random``);
    the random contexts are a per-neuron choice among the file's shared random sample.
    """
    top = exemplars.top(layer, neuron)  # type: ignore[attr-defined]
    _, held = split_exemplars(top)
    rng = random.Random(f"{seed}:{layer}:{neuron}")
    pool = exemplars.random(layer, neuron)  # type: ignore[attr-defined]
    randoms = rng.sample(pool, min(random_contexts, len(pool)))
    chosen = [*held[:held_out], *randoms]
    rng.shuffle(chosen)
    contexts = [ScoringContext(text=c.text(mark=MARK), activation=c.activation, kind=c.kind) for c in chosen]
    return contexts, fire_threshold(top, fire_fraction=fire_fraction)


def _clip(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def score_prompt(*, layer: int, neuron: int, label_pass: str, label: str, description: str,
                 contexts: Sequence[ScoringContext]) -> Prompt:
    """One batched scorer prompt: the label, then every context numbered, asking for 0-10 each."""
    lines = [
        "Task: score",
        f"Neuron: L{layer}/N{neuron}",
        f"Label pass: {label_pass}",
        f"Explanation: {json.dumps(label, ensure_ascii=False)}",
    ]
    if description:
        lines.append(f"Details: {json.dumps(_clip(description), ensure_ascii=False)}")
    lines += [
        "",
        f"Below are {len(contexts)} text snippets. In each, one token is marked like {MARK[0]}this{MARK[1]}. "
        f"For each snippet, predict how strongly the neuron fires on the marked token, from 0 (not at all) "
        f"to {MAX_ANSWER} (as strongly as it ever does), using only the explanation.",
        "",
    ]
    for i, ctx in enumerate(contexts, 1):
        lines.append(f"{i}. {json.dumps(ctx.text, ensure_ascii=False)}")
    lines += [
        "",
        f'Answer with one JSON object {{"predictions": [...]}} holding exactly {len(contexts)} integers '
        f"from 0 to {MAX_ANSWER}, one per snippet in order.",
    ]
    return Prompt(system=SCORER_SYSTEM, user="\n".join(lines))


def predictions_schema(n: int) -> dict:
    """JSON schema of a scorer answer with ``n`` predictions (for schema-constrained servers)."""
    return {
        "type": "object",
        "properties": {
            "predictions": {
                "type": "array", "minItems": n, "maxItems": n,
                "items": {"type": "integer", "minimum": 0, "maximum": MAX_ANSWER},
            },
        },
        "required": ["predictions"],
        "additionalProperties": False,
    }  # fmt: skip


_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


def parse_predictions(text: str, n: int) -> list[int]:
    """The ``n`` integer predictions of a scorer answer; MalformedAnswer says what is wrong."""
    text = (text or "").strip()
    candidates = [text, *_FENCE.findall(text)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    values = None
    for candidate in candidates:
        try:
            obj = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("predictions"), list):
            values = obj["predictions"]
            break
        if isinstance(obj, list):
            values = obj
            break
    if values is None:
        raise MalformedAnswer('no JSON object with a "predictions" list found')
    if len(values) != n:
        raise MalformedAnswer(f'"predictions" must hold exactly {n} numbers, got {len(values)}')
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MalformedAnswer(f'"predictions" must be numbers from 0 to {MAX_ANSWER}, got {v!r}')
        out.append(int(round(min(max(float(v), 0.0), float(MAX_ANSWER)))))
    return out


def score_predictions(predictions: Sequence[float], activations: Sequence[float], *, threshold: float) -> LabelScore:
    """Detection and simulation of one label from the scorer's answers and the true activations."""
    if len(predictions) != len(activations):
        raise ValueError("predictions and activations differ in length")
    truth = [a >= threshold for a in activations]
    guess = [p >= FIRE_ANSWER for p in predictions]
    positives = sum(truth)
    negatives = len(truth) - positives
    detection = None
    if positives and negatives:
        tpr = sum(1 for t, g in zip(truth, guess) if t and g) / positives
        tnr = sum(1 for t, g in zip(truth, guess) if not t and not g) / negatives
        detection = (tpr + tnr) / 2
    return LabelScore(detection=detection, simulation=pearson(predictions, activations),
                      contexts=len(activations), positives=positives)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Correlation of x and y; 0.0 when x is constant (no information), None when y is constant."""
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if syy <= 0:
        return None
    if sxx <= 0:
        return 0.0
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
