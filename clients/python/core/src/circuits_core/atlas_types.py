"""Answer types of the atlas query API, shared by the atlas service and its client.

Units and edges are the ordinary :class:`circuits_core.schemas.Unit` / :class:`~circuits_core.schemas.Edge`;
these add what only the atlas answers with: ranked search hits, cluster summaries and table
counts. Plain frozen dataclasses, no database or protobuf imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from circuits_core.schemas import Unit

EdgeDirection = Literal["both", "downstream", "upstream"]
EDGE_DIRECTIONS: tuple[str, ...] = ("both", "downstream", "upstream")


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchHit:
    """One search result: the unit and its relevance (larger is better)."""

    unit: Unit
    score: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterInfo:
    """One node of the Infomap hierarchy (a ``clusters`` row): ``"1.5"`` is sub-module 5 of top module 1."""

    cluster_path: str
    level: int
    size: int
    layer_min: int
    layer_max: int
    median_layer: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterMembers:
    """A cluster and (up to a limit) its member units ordered by layer, neuron."""

    cluster: ClusterInfo
    units: tuple[Unit, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AtlasStats:
    """Row counts of the atlas tables and its ``metadata`` key/values."""

    neurons: int
    edges: int
    clusters: int
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitActivationStats:
    """How a unit behaved over the aggregated graphs; None = not recorded in this atlas."""

    #: Times the neuron was a node of a graph (all positions).
    observation_count: int = 0
    mean_activation: float | None = None
    max_activation: float | None = None
    mean_attribution: float | None = None
    #: ``||W_down[:, i]||`` when the labels recorded it.
    output_norm: float | None = None
    #: Exemplars the label was written from, when recorded.
    num_exemplars: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitCard:
    """Everything the atlas knows about one unit: labels (on ``unit``), statistics, cluster, degree."""

    unit: Unit
    stats: UnitActivationStats = field(default_factory=UnitActivationStats)
    #: The unit's innermost cluster; None when the unit is not clustered.
    cluster: ClusterInfo | None = None
    downstream_edges: int = 0
    upstream_edges: int = 0
