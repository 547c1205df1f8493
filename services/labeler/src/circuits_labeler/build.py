"""Wire a :class:`ProgressiveLabeler` from the YAML config (used by the CLI and the server)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from circuits_core.config import Config
from circuits_core.errors import InvalidArgument

from circuits_labeler.cache import AnswerCache
from circuits_labeler.engine import ProgressiveLabeler
from circuits_labeler.evidence import DuckDBEvidence, EmptyEvidence, NeuronEvidence
from circuits_labeler.llm import LLMBackend, create_backend
from circuits_labeler.projection import LazyOutputProjections, OutputProjections, load_model_for_projections

log = logging.getLogger("circuits_labeler.build")


def open_evidence(config: Config) -> NeuronEvidence:
    """The atlas (labeling.atlas_path) or the aggregator export (labeling.evidence_path), else none.

    With ``labeling.neurondb_evidence`` the neurons' NeuronDB (PostgreSQL) descriptions are added
    as prior descriptions, shown to the LLM as extra evidence.
    """
    s = config.labeling
    evidence: NeuronEvidence
    if s.atlas_path:
        evidence = DuckDBEvidence(config.resolve(s.atlas_path), min_edge_count=s.min_edge_count)
    elif s.evidence_path:
        evidence = DuckDBEvidence(config.resolve(s.evidence_path), min_edge_count=s.min_edge_count)
    else:
        evidence = EmptyEvidence()
    if s.neurondb_evidence:
        from circuits_core.labels import NeuronDB, PgSettings

        with NeuronDB(PgSettings.from_config(s)) as db:
            evidence = with_prior_descriptions(evidence, db)
    return evidence


class _PriorDescriptions:
    """Evidence whose units carry descriptions from an external label source."""

    def __init__(self, inner: NeuronEvidence, units: list) -> None:
        self._inner = inner
        self._units = units

    def units(self) -> list:
        return self._units

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def with_prior_descriptions(evidence: NeuronEvidence, source) -> NeuronEvidence:
    """Fill every unit's prior_description from ``source.labels_for(keys)`` (NeuronDB or a label file)."""
    from dataclasses import replace

    units = evidence.units()
    labels = source.labels_for([(u.layer, u.neuron) for u in units])
    filled = [
        replace(u, prior_description=labels[(u.layer, u.neuron)].description or labels[(u.layer, u.neuron)].label)
        if (u.layer, u.neuron) in labels else u
        for u in units
    ]
    return _PriorDescriptions(evidence, filled)


def ensure_projections(
    config: Config, *, progress: Callable[[int, int], None] | None = None
) -> OutputProjections | LazyOutputProjections | None:
    """Load labeling.projections_path; when it is missing and computing is allowed, projections of
    model.name computed layer by layer as the run needs them (:class:`LazyOutputProjections`: a
    run over a few units computes only their layers; the file is written once every layer is
    computed). ``progress`` is kept for callers; layers computed on demand report none."""
    s = config.labeling
    if not s.projections_path:
        return None
    path = config.resolve(s.projections_path)
    if path.is_file():
        return OutputProjections.load(path)
    if not s.compute_projections:
        log.warning("no output projections at %s (compute_projections is off)", path)
        return None
    model, tokenizer = load_model_for_projections(config.model.name, device=config.model.device)
    return LazyOutputProjections(
        model, tokenizer=tokenizer, model_name=config.model.name, top_k=s.projection_top_k,
        include_final_norm=s.projection_final_norm, device=config.model.device, save_to=path,
    )


def build_labeler(
    config: Config,
    *,
    backend_factory: Callable[[], LLMBackend] | None = None,
    projection_progress: Callable[[int, int], None] | None = None,
) -> ProgressiveLabeler:
    """A labeler with evidence, projections, cache and backend chosen by ``config.labeling``.

    The API key is checked here (fail fast, one line) but only handed to the SDK."""
    s = config.labeling
    if s.method != "progressive":
        raise InvalidArgument(f"labeling.method is {s.method!r}; `circuits label` runs method: progressive")
    if s.concurrency < 1:
        raise InvalidArgument("labeling.concurrency must be >= 1")
    if backend_factory is None:
        base_dir = Path(config.base_dir)
        create_backend(s, base_dir=base_dir)  # validates backend and key now

        def backend_factory() -> LLMBackend:
            return create_backend(s, base_dir=base_dir)

    evidence = open_evidence(config)
    projections = ensure_projections(config, progress=projection_progress)
    exemplars, input_projection = open_exemplars(config)
    cache = AnswerCache(config.resolve(s.cache_path), fsync=s.cache_fsync)
    return ProgressiveLabeler(
        settings=s,
        evidence=evidence,
        projections=projections,
        cache=cache,
        backend_factory=backend_factory,
        labels_path=config.resolve(s.labels_path) if s.labels_path else None,
        exemplars=exemplars,
        input_projection=input_projection,
    )


def open_exemplars(config: Config) -> tuple[object | None, object | None]:
    """The exemplar file (labeling.exemplars_path) and, with labeling.input_projection, the input
    projection of model.name; (None, None) without an exemplar file."""
    s = config.labeling
    if not s.exemplars_path:
        return None, None
    from circuits_server.exemplar_files import ExemplarFile

    exemplars = ExemplarFile(config.resolve(s.exemplars_path))
    if not exemplars.complete:
        log.warning("%s is an unfinished exemplar run (resume it for the whole corpus)", exemplars.path)
    input_projection = None
    if s.input_projection:
        from circuits_labeler.projection import InputProjection

        model, tokenizer = load_model_for_projections(config.model.name, device=config.model.device)
        input_projection = InputProjection(model, tokenizer)
    return exemplars, input_projection
