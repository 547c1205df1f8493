"""Activation patching between a clean and a corrupt prompt: the request, the answer, rank correlation.

``circuits patch --clean "The capital of France is" --corrupt "The capital of Germany is"`` runs
both prompts and, for each chosen neuron (and for the whole set at once), replaces its activation
in one run with its value from the other run:

* **noising**: the clean run with the neuron taken from the corrupt run; effect
  ``m(clean, patched) - m(clean)``;
* **denoising**: the corrupt run with the neuron taken from the clean run; effect
  ``m(corrupt, patched) - m(corrupt)``.

The metric ``m`` is the logit difference of the two prompts' top answers at the last position
(``logit(clean answer) - logit(corrupt answer)``), or ``logit(A) - logit(B)`` / ``logit(A)`` for
``target_tokens``. Beside each effect stands the RelP prediction of the noising effect, the
first-order estimate ``d~m/dh · (h_corrupt - h_clean)`` from the clean prompt's RelP gradient
(``RelP_v / h_v`` is that gradient, relp-spec §B.3), and :func:`rank_correlation` measures how
well the predictions order the real effects.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from circuits_core.errors import InvalidArgument
from circuits_core.tracing import MAX_PROMPT_CHARS

#: Neurons patched when none are named: the top this-many by |RelP| of the clean prompt.
DEFAULT_TOP = 50
#: Most neurons one request may patch (each costs two forwards); more is INVALID_ARGUMENT.
MAX_PATCH_NEURONS = 2000
_NEURON = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*(?::\s*(-?\d+)\s*)?$")


@dataclass(frozen=True, slots=True, kw_only=True)
class PatchNeuron:
    """Neuron ``index`` of layer ``layer`` at one prompt ``position`` (None: every prompt position;
    negative positions count from the end)."""

    layer: int
    index: int
    position: int | None = None

    def __post_init__(self) -> None:
        for name in ("layer", "index"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"neuron {name} must be an integer >= 0, got {value!r}")
        if self.position is not None and (isinstance(self.position, bool) or not isinstance(self.position, int)):
            raise InvalidArgument(f"neuron position must be an integer, got {self.position!r}")

    def describe(self) -> str:
        """``L:N`` or ``L:N:POS`` (parses back with :func:`parse_patch_neuron`)."""
        return f"{self.layer}:{self.index}" + ("" if self.position is None else f":{self.position}")


def parse_patch_neuron(spec: str) -> PatchNeuron:
    """Parse ``LAYER:INDEX[:POSITION]``; InvalidArgument naming the spec otherwise."""
    match = _NEURON.match(spec or "")
    if not match:
        raise InvalidArgument(f"bad neuron {spec!r}: expected LAYER:INDEX[:POSITION], e.g. 12:345 or 12:345:-1")
    layer, index, position = match.groups()
    return PatchNeuron(layer=int(layer), index=int(index), position=None if position is None else int(position))


@dataclass(frozen=True, slots=True, kw_only=True)
class PatchRequest:
    """One patching experiment. Field comments are the CLI help."""

    #: The clean prompt (its top answer is the metric's positive token).
    clean: str
    #: The corrupt prompt (same number of tokens; its top answer is the negative token).
    corrupt: str
    #: Neurons to patch (L:N[:POS]); empty = the top neurons by |RelP| of the clean prompt at the
    #: positions where the prompts differ and after.
    neurons: tuple[PatchNeuron, ...] = ()
    #: How many top neurons to patch when none are named.
    top: int = DEFAULT_TOP
    #: Metric tokens: A B gives logit(A) - logit(B), A alone logit(A); empty = the two top answers.
    target_tokens: tuple[str, ...] = ()
    #: Tokenize the prompts as they are (no chat template).
    raw: bool = False
    #: Partial assistant answer appended after the generation prompt of both prompts.
    answer_prefix: str = ""

    def __post_init__(self) -> None:
        for name in ("clean", "corrupt"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidArgument(f"{name} prompt is empty")
            if len(value) > MAX_PROMPT_CHARS:
                raise InvalidArgument(f"{name} prompt is {len(value)} characters, more than the limit of {MAX_PROMPT_CHARS}")
        object.__setattr__(self, "neurons", tuple(self.neurons))
        for item in self.neurons:
            if not isinstance(item, PatchNeuron):
                raise InvalidArgument(f"expected PatchNeuron items, got {type(item).__name__}")
        if len(set(self.neurons)) != len(self.neurons):
            raise InvalidArgument("a neuron is named twice")
        if isinstance(self.top, bool) or not isinstance(self.top, int) or not 1 <= self.top <= MAX_PATCH_NEURONS:
            raise InvalidArgument(f"top must be an integer in [1, {MAX_PATCH_NEURONS}], got {self.top!r}")
        if len(self.neurons) > MAX_PATCH_NEURONS:
            raise InvalidArgument(f"{len(self.neurons)} neurons named, more than the limit of {MAX_PATCH_NEURONS} per request")
        tokens = (self.target_tokens,) if isinstance(self.target_tokens, str) else tuple(self.target_tokens)
        if len(tokens) > 2 or any(not isinstance(t, str) or not t for t in tokens):
            raise InvalidArgument("target_tokens takes one or two non-empty tokens: A [B]")
        object.__setattr__(self, "target_tokens", tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class NeuronPatchEffect:
    """Patching one neuron: its activations, RelP and prediction, and the measured effects.

    For ``position=None`` activations are NaN and ``relp`` / ``predicted`` are sums over positions.
    ``relp`` and ``predicted`` are NaN when no prediction was made.
    """

    layer: int
    index: int
    position: int | None
    clean_activation: float
    corrupt_activation: float
    relp: float
    predicted: float
    noising: float
    denoising: float

    def describe(self) -> str:
        return f"{self.layer}:{self.index}" + ("" if self.position is None else f":{self.position}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PatchResult:
    """Every neuron's effects, the whole set's, and how well RelP predicted them."""

    clean_tokens: tuple[str, ...]
    corrupt_tokens: tuple[str, ...]
    #: e.g. "logit(' Paris') - logit(' Berlin')"
    metric: str
    positive_token: str
    positive_token_id: int
    negative_token: str
    #: -1 when the metric has no negative token
    negative_token_id: int
    clean_metric: float
    corrupt_metric: float
    neurons: tuple[NeuronPatchEffect, ...]
    set_noising: float
    set_denoising: float
    set_predicted: float
    #: Spearman correlation of predicted and real noising effects over the compared neurons.
    rank_correlation: float
    #: Spearman correlation of |predicted| and |real| noising effects over the compared neurons.
    magnitude_rank_correlation: float
    #: Neurons in the correlations: those whose activation differs between the two prompts (a
    #: neuron before the first differing token has the same value in both runs; patching it
    #: changes nothing and predicts nothing).
    compared: int = 0
    #: First token position where the two prompts differ.
    first_difference: int = 0


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        average = (i + j) / 2.0 + 1.0  # ties share their average rank
        for k in range(i, j + 1):
            ranks[order[k]] = average
        i = j + 1
    return ranks


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rho (Pearson correlation of average ranks) over the pairs where both are finite;
    NaN with fewer than 3 such pairs or when either side is constant."""
    if len(xs) != len(ys):
        raise InvalidArgument(f"rank_correlation needs equal lengths, got {len(xs)} and {len(ys)}")
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    rx = _ranks([p[0] for p in pairs])
    ry = _ranks([p[1] for p in pairs])
    n = len(pairs)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return math.nan
    return cov / math.sqrt(vx * vy)
