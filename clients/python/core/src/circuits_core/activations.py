"""Per-token neuron activations of prompts: the request and result of one activation read.

A neuron's activation is a coordinate of the input of an MLP's ``down_proj`` (relp-spec §B.1),
the same value interventions change and exemplar files rank. :class:`ActivationRequest` asks for
some neurons on some prompts; the attribution engine runs one plain forward per prompt (no
interventions) and returns every prompt token's value for every neuron
(:class:`ActivationResult`). In process: ``RelPAttributor.activations``; over gRPC:
``AttributionClient.activations`` (``AttributionService.GetActivations``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from circuits_core.errors import InvalidArgument


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationRequest:
    """Neurons ``(layer, index)`` to read on each prompt (encoded like traces unless ``raw``)."""

    prompts: tuple[str, ...]
    neurons: tuple[tuple[int, int], ...]
    #: Tokenize each prompt as is (True, the default here: text snippets) or through the chat template.
    raw: bool = True
    answer_prefix: str = ""

    def __post_init__(self) -> None:
        prompts = tuple(self.prompts) if not isinstance(self.prompts, str) else (self.prompts,)
        object.__setattr__(self, "prompts", prompts)
        if not prompts:
            raise InvalidArgument("no prompts given")
        for n, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidArgument(f"prompt {n} is empty")
        neurons = []
        for item in self.neurons:
            try:
                layer, index = item
            except (TypeError, ValueError):
                raise InvalidArgument(f"a neuron is a (layer, index) pair, got {item!r}") from None
            for name, value in (("layer", layer), ("index", index)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InvalidArgument(f"neuron {name} must be an integer >= 0, got {value!r}")
            neurons.append((layer, index))
        if not neurons:
            raise InvalidArgument("no neurons given")
        object.__setattr__(self, "neurons", tuple(neurons))


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptActivations:
    """One prompt: its tokens and ``values[k][p]`` = activation of neuron ``k`` at token ``p``."""

    prompt: str
    tokens: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    #: Positions of special tokens (BOS, chat-template markers): not text the prompt's author wrote.
    special_positions: tuple[int, ...] = ()

    def text_positions(self) -> tuple[int, ...]:
        """Positions of the prompt's own tokens (special tokens left out)."""
        special = set(self.special_positions)
        return tuple(p for p in range(len(self.tokens)) if p not in special)

    def max_over_text(self, k: int = 0) -> tuple[float, int]:
        """(largest activation of neuron ``k`` over the text positions, its position); (-inf, -1) if none."""
        best, where = -math.inf, -1
        row = self.values[k]
        for p in self.text_positions():
            if row[p] > best:
                best, where = row[p], p
        return best, where


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationResult:
    neurons: tuple[tuple[int, int], ...]
    prompts: tuple[PromptActivations, ...]
