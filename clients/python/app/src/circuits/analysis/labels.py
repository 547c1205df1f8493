"""Neuron labels of one graph from injected label sources; neurons without one are marked ``unlabelled``.

A label source is anything with ``labels_for(keys) -> {(layer, index): record}`` (a label file, the
neuron database, an atlas through :class:`AtlasLabels`); a record is a ``LabelRecord``, an atlas
``Unit``, a mapping or a string. :func:`configured_label_sources` builds the sources a command
asks for: the atlas first, then the ``labeling`` section's source (the labeler's output file for
``method: progressive``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from circuits_core.errors import CircuitsError
from circuits_core.schemas import Graph, Unit, UnitLabel

if TYPE_CHECKING:
    from circuits_core.capabilities import AtlasQueries
    from circuits_core.config import LabelingSection

UNLABELLED = "unlabelled"

UnitKey = tuple[int, int]


def _no_warn(_message: str) -> None:
    return None


class LabelSource(Protocol):
    """Labels for neurons, by ``(layer, index)``; neurons it knows nothing about are left out."""

    def labels_for(self, keys: Iterable[UnitKey]) -> Mapping[UnitKey, Any]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class NamedLabelSource:
    """A label source and the name its labels are recorded with (``atlas``, ``file``, ``neurondb``, ...)."""

    name: str
    source: LabelSource


class AtlasLabels:
    """The labels an atlas holds (in process or over gRPC: any :class:`AtlasQueries`)."""

    def __init__(self, atlas: AtlasQueries) -> None:
        self.atlas = atlas

    def labels_for(self, keys: Iterable[UnitKey]) -> dict[UnitKey, Unit]:
        found: dict[UnitKey, Unit] = {}
        for layer, index in sorted(keys):
            unit = self.atlas.get_unit(layer, index)
            if unit is not None:
                found[(layer, index)] = unit
        return found


def configured_label_sources(
    labeling: LabelingSection,
    *,
    stack: ExitStack,
    base_dir: str = ".",
    atlas: AtlasQueries | None = None,
    warn: Callable[[str], None] = _no_warn,
) -> list[NamedLabelSource]:
    """The atlas (when given), then the labeling section's source (when it has one that opens).

    A source that cannot be opened (missing file, unreachable database) is skipped with a
    warning; one holding a connection is closed by ``stack``.
    """
    from circuits_core.labels import label_source_from_config

    sources = [NamedLabelSource(name="atlas", source=AtlasLabels(atlas))] if atlas is not None else []
    try:
        configured = label_source_from_config(labeling, base_dir=base_dir)
    except CircuitsError as exc:
        warn(f"label source skipped: {exc}")
        configured = None
    if configured is not None:
        close = getattr(configured, "close", None)  # the neuron database holds a connection
        if callable(close):
            stack.callback(close)
        sources.append(NamedLabelSource(name=labeling.method, source=configured))
    return sources


def _label_text(found: Any) -> tuple[str, str, str]:
    """(label, input_label, description) from an atlas unit, a LabelRecord, a mapping or a string."""
    if found is None:
        return "", "", ""
    if isinstance(found, str):
        return found.strip(), "", ""
    get = found.get if isinstance(found, Mapping) else (lambda k, d=None: getattr(found, k, d))
    label = ""
    for key in ("label", "function_label", "output_label", "description"):
        value = get(key, None)
        if isinstance(value, str) and value.strip():
            label = value.strip()
            break
    input_label = ""
    for key in ("input_label", "input_description"):
        value = get(key, None)
        if isinstance(value, str) and value.strip():
            input_label = value.strip()
            break
    description = get("description", "") or get("output_description", "") or ""
    return label, input_label, description if isinstance(description, str) else ""


def label_graph(
    graph: Graph, sources: Sequence[NamedLabelSource], *, warn: Callable[[str], None] = _no_warn
) -> tuple[Graph, dict[str, str]]:
    """Fill neuron labels; return the labelled graph and ``{node_id: label source}``.

    A neuron keeps a label it already carries (source ``graph``). Otherwise the first source
    with a non-empty label wins, in the order given (a source failing with a CircuitsError is
    skipped with a warning). Every other neuron gets source ``unlabelled`` and a
    ``UnitLabel(text="unlabelled", source="unlabelled")`` so consumers can tell it apart.
    """
    keys = {u.key for u in graph.neurons if not u.label}
    found: dict[UnitKey, tuple[str, Any]] = {}
    for named in sources:
        remaining = keys - set(found)
        if not remaining:
            break
        try:
            rows = named.source.labels_for(remaining)
        except CircuitsError as exc:
            warn(f"label source {named.name} skipped: {exc}")
            continue
        for key, row in rows.items():
            if key in remaining and _label_text(row)[0]:
                found[key] = (named.name, row)

    label_sources: dict[str, str] = {}
    units = []
    for unit in graph.units:
        if unit.kind != "neuron":
            units.append(unit)
            continue
        if unit.label:
            label_sources[unit.node_id] = "graph"
            units.append(unit)
        elif unit.key in found:
            name, row = found[unit.key]
            label, input_label, description = _label_text(row)
            extra = UnitLabel(text=label, source=name, description=description)
            units.append(replace(
                unit, label=label, input_label=unit.input_label or input_label,
                labels=tuple(lab for lab in unit.labels if lab.source != UNLABELLED) + (extra,),
            ))
            label_sources[unit.node_id] = name
        else:
            marker = UnitLabel(text=UNLABELLED, source=UNLABELLED)
            labels = unit.labels if any(lab.source == UNLABELLED for lab in unit.labels) else unit.labels + (marker,)
            units.append(replace(unit, labels=labels))
            label_sources[unit.node_id] = UNLABELLED
    return replace(graph, units=tuple(units)), label_sources


def display_unit(unit: Unit) -> str:
    """A unit as the report and the LLM prompt show it: ``L3/N17@4 (label)``, ``token 'x'@0``, ``logit 'y'``."""
    if unit.kind == "embedding":
        return f"token {unit.token!r}@{unit.position}"
    if unit.kind == "logit":
        return f"logit {unit.token!r}"
    label = unit.label or UNLABELLED
    return f"L{unit.layer}/N{unit.index}@{unit.position} ({label})"
