"""What one attribution request asks for, and what the attribution service says about its model.

:class:`TraceRequest` is the one shape of "what to trace": the CLI (`circuits graph`, `circuits
analyze`), the SDK client, the attribution service (servicer -> runner -> engine), the batch
worker and the config's ``graphs:`` section all use it, and ``circuits_core.wire`` maps it to and
from ``circuits.v1.TraceRequest`` (an unset proto field takes the default written here). Its
per-request settings live in :class:`TraceSettings`, the base class, so their defaults are written
once; the field comments are the CLI help (:mod:`circuits_core.fieldargs`).

Light: no torch, no grpc.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from circuits_core.errors import InvalidArgument

#: Longest prompt (characters) a request may carry; longer prompts are refused before tokenizing.
MAX_PROMPT_CHARS = 200_000

#: Fields that choose the metric's target; giving one replaces the other's inherited value.
_TARGET_MODES = ("target_tokens", "contrastive")

#: What a trace does when more than max_nodes neurons pass the threshold (TraceSettings.over_max_nodes).
OVER_MAX_NODES = ("prune", "skip_edges")


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSettings:
    """How one prompt is traced: the per-request settings and their defaults (the only place they are written).

    Construction validates the values and raises InvalidArgument with one line naming the field.
    """

    #: Number of top logits combined into the metric (ignored with target_tokens or contrastive).
    k: int = 5
    #: Trace the sum of these tokens' logits instead of the top k; a target that splits into several
    #: tokens is traced by its first token (the summary and the graph metadata say so).
    target_tokens: tuple[str, ...] = field(default=(), metadata={"metavar": "TOKEN"})
    #: Trace logit(POS) - logit(NEG) instead of the top k (excludes target_tokens; multi-token: first tokens).
    contrastive: tuple[str, str] | None = field(default=None, metadata={"metavar": ("POS", "NEG")})
    #: Token position whose logits are traced (default: the last; negative counts from the end).
    target_position: int | None = None
    #: Tokenize the prompt as is (completion form); --chat: the model's chat template. Default: the
    #: model's own form (SmolLM2-135M-Instruct: raw; other instruct models: chat).
    raw: bool | None = field(default=None, metadata={"negative_flag": "--chat"})
    #: Partial assistant answer appended after the generation prompt (with raw: appended to the prompt).
    answer_prefix: str = ""
    #: Node threshold: keep neurons with |RelP| >= tau * |m|.
    tau: float = 0.005
    #: Most neurons in a graph (see over_max_nodes for what happens above it).
    max_nodes: int = 500
    #: Above max_nodes: prune (keep the max_nodes neurons with the largest |RelP| and compute their
    #: edges) or skip_edges (keep every selected neuron, edges into the logits only).
    over_max_nodes: str = field(default="prune", metadata={"choices": OVER_MAX_NODES})

    def __post_init__(self) -> None:
        _check_settings(self)

    def updated(self, **fields: Any) -> TraceSettings:
        """These settings (as a plain TraceSettings) with ``fields`` replaced.

        A target mode in ``fields`` (target_tokens or contrastive) replaces both inherited ones.
        """
        return TraceSettings(**_merged(self, fields))

    def request(self, prompt: str, **fields: Any) -> TraceRequest:
        """A TraceRequest for ``prompt`` with these settings, overridden by ``fields`` (as :meth:`updated`)."""
        return TraceRequest(prompt=prompt, **_merged(self, fields))


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceRequest(TraceSettings):
    """One prompt to trace with its settings (see :class:`TraceSettings` for those)."""

    #: The user prompt to trace.
    prompt: str
    #: Caller's corpus index, echoed in the graph metadata (-1: none).
    corpus_index: int = -1
    #: Graph slug (file name stem); derived from the prompt when empty.
    slug: str = ""

    def __post_init__(self) -> None:
        # dataclass(slots=True) rebuilds the class, so zero-argument super() is not available here.
        _check_settings(self)
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidArgument("prompt is empty")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"prompt is {len(self.prompt)} characters, more than the limit of {MAX_PROMPT_CHARS}")
        if not _is_int(self.corpus_index):
            raise InvalidArgument(f"corpus_index must be an integer, got {self.corpus_index!r}")
        if not isinstance(self.slug, str):
            raise InvalidArgument(f"slug must be a string, got {self.slug!r}")

    @property
    def settings(self) -> TraceSettings:
        """The per-request settings alone."""
        return TraceSettings(**trace_settings_of(self))

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, where: str = "request", defaults: TraceSettings | None = None
    ) -> TraceRequest:
        """Build from a JSON-like mapping (prompts files, ``trace_batch`` dicts); unknown keys are errors.

        Settings the mapping does not give come from ``defaults`` (default: TraceSettings()).
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"{where}: expected a JSON object, got {type(data).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed, key=str)
        if unknown:
            shown = ", ".join(str(k) if str(k).isprintable() else repr(k) for k in unknown)  # one-line message
            raise InvalidArgument(f"{where}: unknown key(s) {shown} (allowed: {', '.join(sorted(allowed))})")
        if "prompt" not in data:
            raise InvalidArgument(f"{where}: missing 'prompt'")
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
        prompt = values.pop("prompt")
        try:
            return (defaults or TraceSettings()).request(prompt, **values)
        except (InvalidArgument, TypeError) as exc:
            raise InvalidArgument(f"{where}: {exc}") from None


def trace_settings_of(settings: TraceSettings) -> dict[str, Any]:
    """The :class:`TraceSettings` fields of ``settings`` (or of any subclass, e.g. RelPConfig) as a dict."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(TraceSettings)}


def _merged(settings: TraceSettings, fields: Mapping[str, Any]) -> dict[str, Any]:
    values = trace_settings_of(settings)
    if any(name in fields for name in _TARGET_MODES):
        values.update(target_tokens=(), contrastive=None)
    values.update(fields)
    return values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_settings(s: TraceSettings) -> None:
    if not _is_int(s.k) or s.k < 1:
        raise InvalidArgument(f"k must be an integer >= 1, got {s.k!r}")
    if isinstance(s.target_tokens, str) or not isinstance(s.target_tokens, (tuple, list)):
        raise InvalidArgument("target_tokens must be a list of strings")
    if not all(isinstance(t, str) for t in s.target_tokens):
        raise InvalidArgument("target_tokens must be a list of strings")
    object.__setattr__(s, "target_tokens", tuple(s.target_tokens))
    if any(t == "" for t in s.target_tokens):
        raise InvalidArgument("target_tokens contains an empty token")
    if s.contrastive is not None:
        pair = tuple(s.contrastive) if isinstance(s.contrastive, (tuple, list)) else ()
        if len(pair) != 2 or not all(isinstance(t, str) and t for t in pair):
            raise InvalidArgument("contrastive needs two non-empty tokens: POS NEG")
        object.__setattr__(s, "contrastive", pair)
        if s.target_tokens:
            raise InvalidArgument("contrastive and target_tokens cannot be combined; pick one target mode")
    if s.target_position is not None and not _is_int(s.target_position):
        raise InvalidArgument(f"target_position must be an integer, got {s.target_position!r}")
    if s.raw is not None and not isinstance(s.raw, bool):
        raise InvalidArgument(f"raw must be true, false or unset (the model's default), got {s.raw!r}")
    if not isinstance(s.answer_prefix, str):
        raise InvalidArgument(f"answer_prefix must be a string, got {s.answer_prefix!r}")
    if isinstance(s.tau, bool) or not isinstance(s.tau, (int, float)) or not (math.isfinite(s.tau) and s.tau >= 0):
        raise InvalidArgument(f"tau must be a finite number >= 0, got {s.tau!r}")
    object.__setattr__(s, "tau", float(s.tau))
    if not _is_int(s.max_nodes) or s.max_nodes < 0:
        raise InvalidArgument(f"max_nodes must be an integer >= 0, got {s.max_nodes!r}")
    if s.over_max_nodes not in OVER_MAX_NODES:
        raise InvalidArgument(f"over_max_nodes must be one of {', '.join(OVER_MAX_NODES)}, got {s.over_max_nodes!r}")


# -- prompts files (JSON lines) --------------------------------------------------------------
#: Keys a prompts-file line may have besides the TraceRequest fields.
PROMPT_LINE_EXTRA_KEYS = ("id",)


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptLine:
    """One usable line of a prompts file: the request and the caller's optional id."""

    request: TraceRequest
    prompt_id: str | int | None = None


def parse_prompt_line(
    text: str, *, where: str, defaults: TraceSettings | None = None, corpus_index: int = -1
) -> PromptLine:
    """Parse one prompts-file line: a JSON string (the prompt) or an object with a ``prompt``,
    an optional ``id`` (string or integer) and any TraceRequest fields.

    Settings the line does not give come from ``defaults``; ``corpus_index`` unless the line sets
    it. Raises InvalidArgument(``"{where}: reason"``).
    """
    try:
        text.encode("utf-8")  # readers keep undecodable bytes as lone surrogates
    except UnicodeEncodeError:
        raise InvalidArgument(f"{where}: not valid UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, str):
        data = {"prompt": data}
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where}: expected a JSON object with a 'prompt', got {type(data).__name__}")
    prompt_id = data.pop("id", None)
    if prompt_id is not None and (isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int))):
        raise InvalidArgument(f"{where}: 'id' must be a string or an integer")
    data.setdefault("corpus_index", corpus_index)
    return PromptLine(request=TraceRequest.from_mapping(data, where=where, defaults=defaults), prompt_id=prompt_id)


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
