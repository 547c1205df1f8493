"""Every request-size and time limit of the circuits services, in one place.

:class:`Limits` holds the defaults (documented in ``docs/limits.md``, generated from this class by
:func:`markdown_table`); servers take overrides from their command line with
:func:`add_limit_arguments` / :func:`limits_from_args` and refuse over-limit requests with
:meth:`Limits.check`, whose error names the limit and its flag:

    limits.check("max_nodes_per_graph", len(graph.units), "graph g1 has")
    # ResourceExhausted: graph g1 has 250000 units, over the limit max_nodes_per_graph=200000 (--max-nodes-per-graph)

No heavy imports: safe to import from ``circuits`` at any time.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from circuits_core.errors import InvalidArgument, ResourceExhausted

#: Default largest gRPC message in bytes (servers and clients agree on it).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Limits applied by the servers. 0 means "no limit" where the field comment says so."""

    #: Largest gRPC message (request or response) in bytes; gRPC refuses larger ones with RESOURCE_EXHAUSTED.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Longest prompt in characters (Trace, TraceBatch, worker lines); INVALID_ARGUMENT beyond.
    max_prompt_chars: int = 200_000
    #: Longest prompt in tokens after the chat template; 0 = the model's context length.
    max_prompt_tokens: int = 0
    #: Most units in one graph message (Ingest; also the cap on a Trace request's max_nodes).
    max_nodes_per_graph: int = 200_000
    #: Most top logits (k) one Trace request may combine into its metric (each becomes an edge target); INVALID_ARGUMENT beyond.
    max_k: int = 256
    #: Most edges in one graph message (Ingest).
    max_edges_per_graph: int = 5_000_000
    #: Most messages in one request stream (graphs in Ingest, requests in TraceBatch); 0 = unlimited.
    max_stream_messages: int = 0
    #: Most rows in one answer (atlas queries per direction, labeler GetLabels); larger limits are clamped.
    max_results: int = 1000
    #: Seconds one atlas query may run before it is interrupted (DEADLINE_EXCEEDED).
    query_timeout_s: float = 5.0
    #: Longest atlas search text in characters.
    max_query_chars: int = 1000
    #: Most unit references in one labeler request (LabelUnits, GetLabels).
    max_units_per_request: int = 10_000
    #: Attribution requests waiting for an engine; more get RESOURCE_EXHAUSTED at once.
    max_queue: int = 8
    #: Most edges in one aggregator GetEdges message; larger batch_size requests are clamped.
    max_edges_per_batch: int = 65_536
    #: Concurrent streaming calls per server (Ingest, GetEdges, TraceBatch, RunProgressive, health Watch, reflection). They run on a thread pool of their own, so unary calls and health checks keep their workers; more are refused with RESOURCE_EXHAUSTED at once.
    max_streams: int = 32
    #: Concurrent streaming calls of one method; more are refused with RESOURCE_EXHAUSTED.
    max_streams_per_method: int = 16
    #: Concurrent streaming calls from one client address (IP, port ignored); more are refused with RESOURCE_EXHAUSTED.
    max_streams_per_peer: int = 16
    #: Concurrent health Watch streams, and server reflection streams, each (both need no token); more are refused with RESOURCE_EXHAUSTED.
    max_open_streams: int = 4
    #: Seconds a stream may wait for the client's next message, or for the client to read a reply, before the server cancels it.
    stream_idle_timeout_s: float = 300.0
    #: Most units one LabelUnits request may ask to label (each can cost an LLM call); RESOURCE_EXHAUSTED beyond.
    max_label_units_per_request: int = 256
    #: Most units LabelUnits requests may ask to label within label_window_s seconds (all clients together); RESOURCE_EXHAUSTED beyond.
    max_labels_per_window: int = 2000
    #: Length of the LabelUnits window in seconds (see max_labels_per_window).
    label_window_s: float = 3600.0
    #: Longest identifier-like string in a request (graph_id, slug, model, cluster, label_pass, ...); no control characters allowed in these. INVALID_ARGUMENT beyond.
    max_name_chars: int = 512
    #: Longest path in a request (aggregator Export directory); no control characters. INVALID_ARGUMENT beyond.
    max_path_chars: int = 4096
    #: Longest other string in a request (target and contrastive tokens, search text, ...); NUL refused in every string. INVALID_ARGUMENT beyond.
    max_text_chars: int = 65_536

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidArgument(f"limit {f.name} must be a number >= 0, got {value!r}")
        if self.max_message_bytes < 1024:
            raise InvalidArgument(f"limit max_message_bytes must be >= 1024, got {self.max_message_bytes}")

    def check(self, name: str, value: float, what: str, *, unit: str = "") -> None:
        """Raise ResourceExhausted naming the limit when ``value`` exceeds limit ``name`` (0 = none).

        ``what`` starts the message (``"graph g1 has"``); ``unit`` follows the value (``"units"``).
        """
        limit = getattr(self, name)
        if limit and value > limit:
            amount = f"{value} {unit}".rstrip()
            raise ResourceExhausted(f"{what} {amount}, over the limit {name}={limit:g} ({flag(name)})")

    def clamp(self, name: str, requested: int) -> int:
        """``requested`` capped at limit ``name`` (0 or less asks for the limit itself)."""
        limit = int(getattr(self, name))
        if requested <= 0:
            return limit
        return min(requested, limit) if limit else requested


DEFAULT_LIMITS = Limits()


def flag(name: str) -> str:
    """The command-line flag of limit ``name`` (``max_queue`` -> ``--max-queue``)."""
    return "--" + name.removesuffix("_s").replace("_", "-")


def _field_docs() -> dict[str, str]:
    import inspect

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(Limits).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
        elif ":" in text and pending and not text.startswith(("def ", "@", '"""')):
            docs[text.split(":", 1)[0].strip()] = " ".join(pending)
            pending = []
        else:
            pending = []
    return docs


def add_limit_arguments(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add ``--max-...`` flags for the limits ``names`` (defaults from :data:`DEFAULT_LIMITS`)."""
    docs = _field_docs()
    group = parser.add_argument_group("limits")
    for name in names:
        default = getattr(DEFAULT_LIMITS, name)
        group.add_argument(flag(name), dest=f"limit_{name}", type=type(default), default=default,
                           help=f"{docs.get(name, name)} (default: {default:g})")  # fmt: skip


def limits_from_args(args: argparse.Namespace, base: Limits = DEFAULT_LIMITS) -> Limits:
    """``base`` with every limit flag present on ``args`` applied."""
    values = {f.name: getattr(args, f"limit_{f.name}") for f in dataclasses.fields(Limits) if hasattr(args, f"limit_{f.name}")}
    return dataclasses.replace(base, **values)


def markdown_table() -> str:
    """The limits table of docs/limits.md (one row per limit: name, flag, default, meaning)."""
    docs = _field_docs()
    rows = ["| limit | flag | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Limits):
        default = getattr(DEFAULT_LIMITS, f.name)
        shown = f"{default:,}" if isinstance(default, int) else f"{default:g}"
        rows.append(f"| `{f.name}` | `{flag(f.name)}` | {shown} | {docs.get(f.name, '')} |")
    return "\n".join(rows)
