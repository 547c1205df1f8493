"""Neuron interventions: what to change (domain types, no torch) and the CLI spec syntax.

A neuron is one coordinate of the input of an MLP's ``down_proj`` (relp-spec §B.1). An
intervention sets, scales, zeroes or mean-ablates it at chosen token positions of the *real*
model; the attribution service (`circuits_attribution.interventions`) applies it with hooks.

Spec syntax (``circuits intervene --neuron``)::

    LAYER:INDEX[:POSITIONS]=MODE
    POSITIONS  comma-separated prompt positions (negative counts from the prompt end),
               'prompt' (every prompt position, the default) or 'all' (prompt and generated tokens)
    MODE       zero | mean | scale:FACTOR | set:VALUE

e.g. ``12:345=zero``, ``3:17:4,5=set:1.5``, ``20:9:-1=scale:2``, ``7:100:all=mean``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from circuits_core.errors import InvalidArgument

INTERVENTION_MODES: tuple[str, ...] = ("set", "scale", "zero", "mean")

_SPEC = re.compile(r"^\s*(?P<layer>-?\d+)\s*:\s*(?P<index>-?\d+)\s*(?::\s*(?P<pos>[^=]*))?=\s*(?P<mode>.+?)\s*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class NeuronIntervention:
    """Change neuron ``index`` of decoder layer ``layer`` at some token positions.

    ``mode``: ``set`` (to ``value``), ``scale`` (multiply by ``value``), ``zero`` or ``mean`` (the
    neuron's mean activation over a reference prompt set). ``positions=None`` means every prompt
    position; explicit positions are prompt positions (negative ones count from the prompt end).
    ``include_generated`` also applies the change at every generated token.
    """

    layer: int
    index: int
    mode: str = "zero"
    value: float = 0.0
    positions: tuple[int, ...] | None = None
    include_generated: bool = False

    def __post_init__(self) -> None:
        if self.mode not in INTERVENTION_MODES:
            raise InvalidArgument(f"intervention mode must be one of {', '.join(INTERVENTION_MODES)}, got {self.mode!r}")
        for name in ("layer", "index"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"neuron {name} must be an integer, got {value!r}")
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool) or not math.isfinite(self.value):
            raise InvalidArgument(f"intervention value must be a finite number, got {self.value!r}")
        if self.positions is not None:
            positions = tuple(self.positions)
            for p in positions:
                if isinstance(p, bool) or not isinstance(p, int):
                    raise InvalidArgument(f"token positions must be integers, got {p!r}")
            if not positions:
                raise InvalidArgument("an explicit position list must not be empty (use None for every position)")
            object.__setattr__(self, "positions", positions)

    def describe(self) -> str:
        """The spec string of this intervention (parses back to an equal object)."""
        if self.positions is not None:
            where = ":" + ",".join(str(p) for p in self.positions)
            if self.include_generated:
                where += ",generated"
        else:
            where = ":all" if self.include_generated else ""
        mode = f"{self.mode}:{self.value:g}" if self.mode in ("set", "scale") else self.mode
        return f"{self.layer}:{self.index}{where}={mode}"


def parse_neuron_spec(spec: str) -> NeuronIntervention:
    """Parse ``LAYER:INDEX[:POSITIONS]=MODE`` (module docstring); raises InvalidArgument with the spec."""
    match = _SPEC.match(spec or "")
    if not match:
        raise InvalidArgument(
            f"bad neuron spec {spec!r}: expected LAYER:INDEX[:POS,...]=zero|mean|scale:F|set:V, e.g. 12:345:-1=set:2.5"
        )
    layer, index = int(match["layer"]), int(match["index"])
    positions: tuple[int, ...] | None = None
    include_generated = False
    raw_pos = (match["pos"] or "").strip()
    if raw_pos and raw_pos != "prompt":
        if raw_pos == "all":
            include_generated = True
        else:
            items = [item.strip() for item in raw_pos.split(",") if item.strip()]
            if "generated" in items:
                include_generated = True
                items.remove("generated")
            try:
                positions = tuple(int(item) for item in items)
            except ValueError:
                raise InvalidArgument(
                    f"bad positions {raw_pos!r} in neuron spec {spec!r}: use integers, 'prompt' or 'all'"
                ) from None
            if not positions:
                raise InvalidArgument(f"no positions in neuron spec {spec!r}")
    mode_text = match["mode"]
    mode, _, arg = mode_text.partition(":")
    mode = mode.strip().lower()
    value = 0.0
    if mode in ("set", "scale"):
        try:
            value = float(arg)
        except ValueError:
            raise InvalidArgument(f"bad {mode} value {arg!r} in neuron spec {spec!r}: expected a number") from None
    elif mode in ("zero", "mean"):
        if arg:
            raise InvalidArgument(f"mode {mode} takes no value (neuron spec {spec!r})")
    else:
        raise InvalidArgument(f"bad mode {mode_text!r} in neuron spec {spec!r}: use zero, mean, scale:F or set:V")
    return NeuronIntervention(
        layer=layer, index=index, mode=mode, value=value, positions=positions, include_generated=include_generated
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenProbability:
    """One vocabulary entry at the predicted position: its logit and softmax probability."""

    token: str
    token_id: int
    logit: float
    probability: float


@dataclass(frozen=True, slots=True, kw_only=True)
class InterventionResult:
    """Next-token prediction of the clean and the intervened model at ``position`` (last prompt token).

    ``tracked`` holds the baseline's top tokens as scored by the intervened model (same order as
    ``baseline``), so changes of the original prediction are visible even when it leaves the top-k.
    ``baseline_text``/``generated_text`` are greedy continuations (empty when none were asked for).
    """

    prompt_tokens: tuple[str, ...]
    position: int
    baseline: tuple[TokenProbability, ...]
    intervened: tuple[TokenProbability, ...]
    tracked: tuple[TokenProbability, ...] = ()
    baseline_text: str = ""
    generated_text: str = ""
    interventions: tuple[NeuronIntervention, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class InterventionRequest:
    """One Intervene call: a prompt (encoded like traces), the changes, and what to report."""

    prompt: str
    #: The changes; empty: only the baseline prediction is reported.
    interventions: tuple[NeuronIntervention, ...] = ()
    #: True: the prompt as is; False: the chat template; None: the model's own prompt form.
    raw: bool | None = None
    answer_prefix: str = ""
    top_k: int = 10
    generate_tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "interventions", tuple(self.interventions))
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidArgument("prompt is empty")
        if self.top_k < 1:
            raise InvalidArgument(f"top_k must be >= 1, got {self.top_k}")
        if self.generate_tokens < 0:
            raise InvalidArgument(f"generate_tokens must be >= 0, got {self.generate_tokens}")
