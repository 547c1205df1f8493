"""What one attribution request asks for, and what the attribution service says about its model.

These domain values travel between the client, the attribution server and the batch worker
(``circuits_core.wire`` converts them to and from ``circuits.v1.TraceRequest`` / ``ModelInfo``).
They are light: no torch, no grpc.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from circuits_core.errors import InvalidArgument

#: Longest prompt (characters) a request may carry; longer prompts are refused before tokenizing.
MAX_PROMPT_CHARS = 200_000


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSpec:
    """One prompt to trace and the per-request settings (None/empty = the server's default).

    Construction validates the values and raises InvalidArgument with one line naming the field.
    """

    prompt: str
    #: Number of top logits in the metric; 0 = the server default.
    k: int = 0
    #: Explicit target tokens (each one token for the model); override k.
    target_tokens: tuple[str, ...] = ()
    #: (POS, NEG): metric = logit(POS) - logit(NEG); overrides k and target_tokens.
    contrastive: tuple[str, str] | None = None
    #: Tokenize the prompt as is, without the chat template.
    raw: bool = False
    #: Partial assistant answer appended after the generation prompt.
    answer_prefix: str = ""
    #: Position whose logits are traced; None = last.
    target_position: int | None = None
    #: Node threshold tau; None = server default.
    tau: float | None = None
    #: Cap on selected nodes; None = server default.
    max_nodes: int | None = None
    #: Caller's corpus index, echoed in the graph metadata; -1 for none.
    corpus_index: int = -1
    #: Graph slug; derived from the prompt when empty.
    slug: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidArgument("prompt is empty")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"prompt is {len(self.prompt)} characters, more than the limit of {MAX_PROMPT_CHARS}")
        if isinstance(self.target_tokens, str) or not all(isinstance(t, str) for t in self.target_tokens):
            raise InvalidArgument("target_tokens must be a list of strings")
        object.__setattr__(self, "target_tokens", tuple(self.target_tokens))
        if any(t == "" for t in self.target_tokens):
            raise InvalidArgument("target_tokens contains an empty token")
        if self.contrastive is not None:
            pair = tuple(self.contrastive)
            if len(pair) != 2 or not all(isinstance(t, str) and t for t in pair):
                raise InvalidArgument("contrastive needs two non-empty tokens: POS NEG")
            object.__setattr__(self, "contrastive", pair)
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            raise InvalidArgument(f"k must be an integer >= 0, got {self.k!r}")
        if self.tau is not None and not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and self.tau >= 0):
            raise InvalidArgument(f"tau must be a finite number >= 0, got {self.tau!r}")
        if self.max_nodes is not None and (not isinstance(self.max_nodes, int) or self.max_nodes < 0):
            raise InvalidArgument(f"max_nodes must be an integer >= 0, got {self.max_nodes!r}")
        if self.target_position is not None and not isinstance(self.target_position, int):
            raise InvalidArgument(f"target_position must be an integer, got {self.target_position!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "request") -> TraceSpec:
        """Build from a JSON-like mapping (prompts files, ``trace_batch`` dicts); unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"{where}: expected a JSON object, got {type(data).__name__}")
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            shown = ", ".join(k if k.isprintable() else repr(k) for k in unknown)  # one-line message
            raise InvalidArgument(f"{where}: unknown key(s) {shown} (allowed: {', '.join(sorted(allowed))})")
        if "prompt" not in data:
            raise InvalidArgument(f"{where}: missing 'prompt'")
        values = dict(data)
        for key in ("target_tokens",):
            if key in values and isinstance(values[key], list):
                values[key] = tuple(values[key])
        if isinstance(values.get("contrastive"), list):
            values["contrastive"] = tuple(values["contrastive"])
        try:
            return cls(**values)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
        except TypeError as exc:
            raise InvalidArgument(f"{where}: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """The model an attribution server has loaded."""

    model: str
    num_layers: int = 0
    d_model: int = 0
    d_mlp: int = 0
    vocab_size: int = 0
    max_context: int = 0
    dtype: str = ""
    device: str = ""
    architecture: str = ""
