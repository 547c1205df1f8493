"""Domain types: Unit, Edge, Graph (edges held as columns), GraphMetadata, LabelProgress.

Plain frozen dataclasses with no protobuf, torch or database imports. Conversion to protobuf
lives in :mod:`circuits_core.wire`; every graph file format (legacy viewer JSON, relp-spec §E,
and the compact protobuf files) in :mod:`circuits_core.graphio`.

Unit keys inside one graph are ``(layer, index, position)``: neurons use their decoder layer,
embeddings use ``EMBEDDING_LAYER`` (-1) with the token id as index, logits use the graph's logit
layer (largest neuron layer + 1, as the viewer expects) with the vocabulary id as index.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from circuits_core.errors import InvalidArgument

if TYPE_CHECKING:  # pragma: no cover
    from circuits_core.edge_table import EdgeTable

EMBEDDING_LAYER = -1
#: Largest neuron layer and index a graph may hold (the aggregator packs keys into 10 + 21 bits).
MAX_NEURON_LAYER = (1 << 10) - 1
MAX_NEURON_INDEX = (1 << 21) - 1
UnitKind = Literal["neuron", "embedding", "logit"]
UNIT_KINDS: tuple[str, ...] = ("neuron", "embedding", "logit")
GENERATOR_NAME = "circuits RelP"
GENERATOR_VERSION = "0.1.0"


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitLabel:
    """One label of a unit and where it came from."""

    text: str
    source: str = ""
    confidence: str = ""
    description: str = ""
    #: How well the label predicts the neuron's activations (circuits_labeler.scoring): balanced
    #: accuracy of "fires" and correlation of predicted with true activations; None = not scored.
    score_detection: float | None = None
    score_simulation: float | None = None
    #: Contexts the scorer judged, and how many of them truly fire.
    score_contexts: int = 0
    score_positives: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Unit:
    """A neuron (optionally at one token position), an embedding or a logit.

    ``Unit(layer=24, index=5326, label="capital cities")`` is a position-collapsed neuron as the
    atlas stores it; graph nodes also carry ``position``, ``activation`` and ``attribution``.
    """

    layer: int
    index: int
    position: int | None = None
    kind: UnitKind = "neuron"
    label: str = ""
    input_label: str = ""
    activation: float | None = None
    attribution: float | None = None
    token: str = ""
    probability: float | None = None
    appearance_count: int = 0
    labels: tuple[UnitLabel, ...] = ()
    cluster: str = ""

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS:
            raise InvalidArgument(f"unit kind must be one of {UNIT_KINDS}, got {self.kind!r}")
        if not isinstance(self.labels, tuple):
            object.__setattr__(self, "labels", tuple(self.labels))

    @property
    def key(self) -> tuple[int, int]:
        """Position-collapsed identity ``(layer, index)``."""
        return (self.layer, self.index)

    @property
    def node_key(self) -> tuple[int, int, int | None]:
        """Identity of the unit inside one graph."""
        return (self.layer, self.index, self.position)

    @property
    def unit_id(self) -> str:
        """Canonical string id of the position-collapsed unit, ``"L{layer}/N{index}"``."""
        return f"L{self.layer}/N{self.index}"

    @property
    def node_id(self) -> str:
        """The legacy viewer node id (relp-spec §E.2)."""
        pos = -1 if self.position is None else self.position
        if self.kind == "embedding":
            return f"E_{self.index}_{pos}"
        if self.kind == "logit":
            return f"L_{self.index}_{pos}"
        return f"{self.layer}_{self.index}_{pos}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Edge:
    """A directed edge between two units.

    In a graph, ``weight`` is the attribution flow and ``raw_weight`` the raw direct-effect
    attribution; positions identify the endpoints. In aggregates, ``weight`` is the mean weight
    and ``count``/``weight_*`` are the running statistics (relp-spec §F).
    """

    src_layer: int
    src_index: int
    tgt_layer: int
    tgt_index: int
    weight: float
    src_position: int | None = None
    tgt_position: int | None = None
    raw_weight: float | None = None
    count: int = 1
    weight_sum: float = 0.0
    weight_abs_sum: float = 0.0
    weight_sq_sum: float = 0.0
    weight_min: float = 0.0
    weight_max: float = 0.0
    method: str = "relp"

    @property
    def src_key(self) -> tuple[int, int, int | None]:
        return (self.src_layer, self.src_index, self.src_position)

    @property
    def tgt_key(self) -> tuple[int, int, int | None]:
        return (self.tgt_layer, self.tgt_index, self.tgt_position)

    @property
    def mean_abs_weight(self) -> float:
        return self.weight_abs_sum / self.count if self.count else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphMetadata:
    """How a graph was made. ``extra`` holds further JSON-compatible settings and viewer fields."""

    slug: str = ""
    scan: str = ""
    target_position: int | None = None
    node_threshold: float | None = None
    metric_value: float | None = None
    nodes_exceeded: bool = False
    max_n_logits: int = 0
    create_time_ms: int = 0
    generator: str = GENERATOR_NAME
    generator_version: str = GENERATOR_VERSION
    corpus_index: int = -1
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True, kw_only=True, init=False, repr=False)
class Graph:
    """An attribution graph for one prompt: units (nodes) and edges between them.

    Edges are held as columns (:class:`~circuits_core.edge_table.EdgeTable`); ``graph.edges``
    builds :class:`Edge` rows on demand (each call builds them anew: loops over many edges
    should read ``graph.edge_table``). ``Graph(edges=...)`` takes either an EdgeTable or Edge
    rows; ``edges`` wins over ``edge_table`` so that ``dataclasses.replace(graph, edges=...)``
    works.
    """

    units: tuple[Unit, ...]
    edge_table: EdgeTable
    prompt: str
    prompt_tokens: tuple[str, ...]
    model: str
    graph_id: str
    metadata: GraphMetadata

    def __init__(
        self,
        *,
        units: Iterable[Unit] = (),
        edges: EdgeTable | Iterable[Edge] | None = None,
        prompt: str = "",
        prompt_tokens: Iterable[str] = (),
        model: str = "",
        graph_id: str = "",
        metadata: GraphMetadata | None = None,
        edge_table: EdgeTable | Iterable[Edge] | None = None,
    ) -> None:
        from circuits_core.edge_table import EdgeTable

        table = edges if edges is not None else edge_table
        if table is None:
            table = EdgeTable.empty()
        elif not isinstance(table, EdgeTable):
            table = EdgeTable.from_edges(table)
        setattr_ = object.__setattr__
        setattr_(self, "units", units if isinstance(units, tuple) else tuple(units))
        setattr_(self, "edge_table", table)
        setattr_(self, "prompt", prompt)
        setattr_(self, "prompt_tokens", prompt_tokens if isinstance(prompt_tokens, tuple) else tuple(prompt_tokens))
        setattr_(self, "model", model)
        setattr_(self, "graph_id", graph_id)
        setattr_(self, "metadata", GraphMetadata() if metadata is None else metadata)

    def __repr__(self) -> str:
        kinds = {kind: 0 for kind in UNIT_KINDS}
        for unit in self.units:
            kinds[unit.kind] += 1
        prompt = self.prompt if len(self.prompt) <= 40 else self.prompt[:39] + "…"
        return (
            f"Graph(graph_id={self.graph_id!r}, model={self.model!r}, units={len(self.units)} "
            f"({kinds['neuron']} neurons, {kinds['embedding']} embeddings, {kinds['logit']} logits), "
            f"edges={len(self.edge_table)}, prompt={prompt!r})"
        )

    # -- views -------------------------------------------------------------------------------
    @property
    def edges(self) -> tuple[Edge, ...]:
        """The edges as :class:`Edge` rows, built from ``edge_table`` on every call."""
        return self.edge_table.rows()

    @property
    def neurons(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.kind == "neuron")

    @property
    def logits(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.kind == "logit")

    def unit_index(self) -> dict[tuple[int, int, int | None], int]:
        """Map from unit node key to its index in ``units``; raises on duplicate keys."""
        index: dict[tuple[int, int, int | None], int] = {}
        for i, unit in enumerate(self.units):
            if unit.node_key in index:
                raise InvalidArgument(f"duplicate unit {unit.node_id} in graph")
            index[unit.node_key] = i
        return index

    def with_labels(
        self, labels: Mapping[tuple[int, int], str], *, input_labels: Mapping[tuple[int, int], str] | None = None
    ) -> Graph:
        """A copy whose neurons carry ``labels[(layer, index)]`` (and ``input_labels[...]``) where given."""
        inputs = input_labels or {}

        def relabel(u: Unit) -> Unit:
            if u.kind != "neuron" or (u.key not in labels and u.key not in inputs):
                return u
            return replace(u, label=labels.get(u.key, u.label), input_label=inputs.get(u.key, u.input_label))

        return replace(self, units=tuple(relabel(u) for u in self.units))

    # -- legacy viewer JSON (circuits_core.graphio owns the format) -----------------------------
    def to_legacy(self) -> dict[str, Any]:
        """The Neuronpedia/Anthropic viewer JSON (validates against the Neuronpedia schema)."""
        from circuits_core.graphio import graph_to_legacy

        return graph_to_legacy(self)

    @classmethod
    def from_legacy(cls, data: Any, *, source: str = "graph") -> Graph:
        """Parse viewer JSON; malformed input raises CorruptInput naming ``source`` and the field."""
        from circuits_core.graphio import graph_from_legacy

        return graph_from_legacy(data, source=source)

    def save(self, path: str | Path) -> Path:
        """Write the graph in the format its file name asks for (see graphio.write_graph)."""
        from circuits_core.graphio import write_graph

        return write_graph(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        """Read a graph file of any format (see graphio.read_graph)."""
        from circuits_core.graphio import read_graph

        return read_graph(path)


# ------------------------------------------------------------------------------------------
# Identity
# ------------------------------------------------------------------------------------------
def graph_content_id(*, model: str, prompt: str, settings: Mapping[str, Any], revision: str = "") -> str:
    """Content hash identifying a graph: same model, revision, prompt and settings -> same id."""
    payload = json.dumps(
        {"model": model, "revision": revision, "prompt": prompt, "settings": dict(settings)},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def slugify(text: str, *, max_chars: int = 50) -> str:
    """Lowercase ASCII slug: accents dropped ("Région" -> "region"), other characters except
    letters, digits, space, '_' and '-' removed, runs of space/'_'/'-' collapsed to '-'.
    ASCII because Neuronpedia accepts only [a-zA-Z0-9_.-] in a slug."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^a-z0-9_\s-]", "", text.lower())
    text = re.sub(r"[\s_-]+", "-", text).strip("-")
    return text[:max_chars].strip("-") or "graph"


def iter_units(graphs: Iterable[Graph]) -> Iterable[Unit]:
    """Every neuron unit of several graphs, in order."""
    for graph in graphs:
        yield from graph.neurons


# ------------------------------------------------------------------------------------------
# Labelling progress (LabelerService.RunProgressive)
# ------------------------------------------------------------------------------------------
LABEL_PASSES: tuple[str, ...] = ("output", "input")


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelProgress:
    """One progress report of a progressive labelling run (relp-spec §H).

    ``done`` counts neurons finished in ``label_pass`` (``labelled`` newly paid + ``cached`` +
    ``failed`` + skipped); token counts and ``spend_usd`` are for the whole run so far.
    ``state``: running | layer_done | pass_done | done | budget_exhausted | stopped | failed.
    """

    label_pass: str = ""
    layer: int = -1
    done: int = 0
    total: int = 0
    labelled: int = 0
    cached: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    spend_usd: float = 0.0
    requests: int = 0
    retries: int = 0
    state: str = "running"
    message: str = ""
