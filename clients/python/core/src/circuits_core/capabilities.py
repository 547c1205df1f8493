"""The small interfaces through which the app reaches an engine, in process or over gRPC.

Each capability has two implementations with the same method names and results: the service
package's in-process object and the SDK client. The app picks one in one place
(``circuits.backends``); everything after that point is the same code for both.

=============  =========================================  ==========================================
capability     in process                                 gRPC
=============  =========================================  ==========================================
Tracer         ``circuits_attribution.RelPAttributor``    ``circuits_sdk.AttributionClient``
Intervener     ``circuits_attribution.RelPAttributor``    ``circuits_sdk.AttributionClient``
Patcher        ``circuits_attribution.RelPAttributor``    ``circuits_sdk.AttributionClient``
AtlasQueries   ``circuits_atlas.CircuitDatabase``         ``circuits_sdk.AtlasClient``
=============  =========================================  ==========================================

Protocols only: no implementation imports, so core and the SDK can name them without layers
breaking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from circuits_core.atlas_types import AtlasStats, ClusterMembers, SearchHit, UnitCard
    from circuits_core.connectivity import UnitProjections, WeightEdge
    from circuits_core.patching import PatchRequest, PatchResult
    from circuits_core.interventions import InterventionRequest, InterventionResult
    from circuits_core.schemas import Edge, Graph, Unit
    from circuits_core.tracing import ModelInfo, TraceRequest


@runtime_checkable
class Tracer(Protocol):
    """Traces prompts into RelP graphs."""

    def trace(self, request: TraceRequest, /) -> Graph:
        """The graph of one request; InvalidArgument for input the model cannot trace."""
        ...

    def model_info(self) -> ModelInfo:
        """The model the tracer runs."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Intervener(Protocol):
    """Runs the real model with neurons set, scaled, zeroed or mean-ablated."""

    def intervene(self, request: InterventionRequest, /) -> InterventionResult: ...

    def close(self) -> None: ...


@runtime_checkable
class Patcher(Protocol):
    """Activation patching between a clean and a corrupt prompt, with RelP's predictions."""

    def patch(self, request: PatchRequest, /) -> PatchResult: ...

    def close(self) -> None: ...


@runtime_checkable
class AtlasQueries(Protocol):
    """Read-only queries over a built atlas. ``limit`` 0 means the implementation's default;
    ``timeout`` bounds one call in seconds (None: the implementation's default)."""

    def search(self, text: str, limit: int = 0, *, min_score: float = 0.0, timeout: float | None = None) -> list[SearchHit]:
        """Units whose labels match ``text``, best first (``min_score`` > 0: only units with a label
        whose detection score is at least that)."""
        ...

    def get_unit(self, layer: int, index: int, *, timeout: float | None = None) -> Unit | None:
        """One unit, or None when the atlas does not hold it."""
        ...

    def get_unit_card(self, layer: int, index: int, *, timeout: float | None = None) -> UnitCard | None:
        """A unit with its activation statistics, innermost cluster and edge counts, or None."""
        ...

    def get_edges_for_unit(
        self, layer: int, index: int, direction: str = "both", limit: int = 0, min_count: int = 0,
        *, timeout: float | None = None,
    ) -> list[Edge]:
        """Aggregated edges leaving (downstream) and/or entering (upstream) a unit."""
        ...

    def get_cluster(self, cluster: str | int, limit: int = 0, *, timeout: float | None = None) -> ClusterMembers:
        """A cluster (top id or dotted path) and its member units; NotFound when absent."""
        ...

    def get_unit_projections(self, layer: int, index: int, *, timeout: float | None = None) -> UnitProjections:
        """A unit's output / input projections; FailedPrecondition when the atlas was built without
        a connectivity folder, NotFound when it has no row for the unit."""
        ...

    def get_weight_edges(
        self, layer: int, index: int, direction: str = "upstream", limit: int = 0, polarity: int = 0,
        *, timeout: float | None = None,
    ) -> list[WeightEdge]:
        """Weight-graph edges entering (upstream) and/or leaving (downstream) a unit."""
        ...

    def stats(self, *, timeout: float | None = None) -> AtlasStats: ...

    def close(self) -> None: ...
