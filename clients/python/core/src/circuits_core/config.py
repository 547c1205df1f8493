"""The YAML configuration (model, graphs, aggregation, clustering, labeling, output sections).

``load_config(path)`` returns a frozen, typed :class:`Config`. Unknown keys, wrong types and
missing files raise :class:`circuits_core.errors.ConfigError` with one line naming the file and key
(``config.yaml: labeling.concurrency: expected int, got str``). Each section is a dataclass whose
field comments are the documentation of the key; adding a setting means adding a field.

This is the one module that reads environment variables for settings (``env_setting``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from circuits_core.errors import ConfigError, InvalidArgument
from circuits_core.tracing import TraceSettings

SMALL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

#: The standard port of each service (gRPC; the gateway's is HTTP), the same in the Helm chart,
#: `circuits serve <service>` and `circuits up`.
DEFAULT_PORTS: Mapping[str, int] = MappingProxyType(
    {"attribution": 50051, "aggregator": 50052, "labeler": 50053, "atlas": 50054, "gateway": 8080}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSection:
    #: Hub id or local directory of the model.
    name: str = SMALL_MODEL
    #: float32 | float64 | bfloat16 | float16
    dtype: str = "float32"
    #: cpu | cuda | cuda:N | auto
    device: str = "cpu"
    #: Model revision recorded in graph ids.
    revision: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphsSection(TraceSettings):
    """Which prompts to trace and how: every per-request setting of
    :class:`~circuits_core.tracing.TraceSettings` (k, tau, max_nodes, raw, answer_prefix,
    target_tokens, contrastive, target_position) is a key of this section, with its defaults."""

    #: Prompts to trace (inline).
    prompts: tuple[str, ...] = ()
    #: JSONL file: per line a prompt string, or {"prompt": ..., "id": ..., and any trace setting}.
    prompts_file: str = ""
    #: Directory graph files are written to.
    output_dir: str = "graphs"
    #: Remote attribution service host:port; empty = in-process.
    remote: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregationSection:
    #: Where the atlas edges come from: relp (aggregated RelP graphs, the export), weight_graph
    #: (weight-graph edges of connectivity_dir) or output_projection (output-projection similarity
    #: edges of connectivity_dir); the weight-based methods need no traced prompts.
    method: Literal["relp", "output_projection", "weight_graph"] = "relp"
    #: `circuits connectivity` output folder added to the atlas (projections, weight_edges tables);
    #: required by the weight-based methods; empty = none.
    connectivity_dir: str = ""
    #: Directory of graph files to aggregate.
    graphs_dir: str = "graphs"
    #: Aggregator state (DuckDB) path.
    state_path: str = "aggregate.duckdb"
    #: Directory of the aggregator's Parquet export (edges/units/ledger.parquet) that build-db reads.
    export_dir: str = "export"
    #: Edges need at least this many observations to enter the atlas.
    min_edge_count: int = 3
    #: Commit every N graphs.
    checkpoint_interval: int = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusteringSection:
    enabled: bool = True
    #: Edges need at least this many observations to enter clustering.
    min_edge_count: int = 5
    #: abs_weight_sq | abs_weight | weight
    weight_transform: Literal["abs_weight_sq", "abs_weight", "weight"] = "abs_weight_sq"
    num_trials: int = 20
    multi_level: bool = True
    seed: int = 42


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelingSection:
    #: progressive (LLM autointerp) | neurondb (PostgreSQL) | goodfire (label file) | file | none
    method: Literal["progressive", "neurondb", "goodfire", "file", "none"] = "progressive"
    #: anthropic | openai (any OpenAI-compatible server such as vLLM)
    backend: Literal["anthropic", "openai"] = "anthropic"
    #: LLM model name.
    model: str = "claude-sonnet-4-5"
    #: Base URL of the LLM API; empty = the SDK default.
    base_url: str = ""
    #: Environment variable holding the API key.
    api_key_env: str = "ANTHROPIC_API_KEY"
    #: File holding the API key (a mounted secret); wins over api_key_env.
    api_key_file: str = ""
    #: Requests in flight at once.
    concurrency: int = 8
    #: Retries on 429/5xx/timeouts.
    max_retries: int = 5
    #: Seconds per LLM request.
    request_timeout: float = 120.0
    #: Stop cleanly when this many tokens (input+output) were spent; 0 = no limit.
    max_tokens_total: int = 0
    #: Stop cleanly when this many US dollars were spent; 0 = no limit.
    max_spend_usd: float = 0.0
    #: Token prices (USD per million) used for the spend estimate.
    input_price_per_mtok: float = 3.0
    output_price_per_mtok: float = 15.0
    #: Max output tokens per answer.
    max_answer_tokens: int = 800
    #: Persistent answer cache (SQLite/DuckDB/JSONL path chosen by the labeler).
    cache_path: str = "labels_cache.jsonl"
    #: Labels output file (JSONL).
    labels_path: str = "labels.jsonl"
    #: Label file for method=file/goodfire.
    labels_file: str = ""
    #: Minimum appearances for a neuron to be labelled.
    min_appearances: int = 1
    #: Atlas used as evidence (edges, neighbours).
    atlas_path: str = ""
    #: Passes to run: output, input.
    passes: tuple[str, ...] = ("output", "input")
    #: Use neurondb descriptions as extra evidence in progressive prompts.
    neurondb_evidence: bool = False
    #: PostgreSQL settings for method=neurondb (PG_* environment variables fill the gaps).
    pg_host: str = ""
    pg_port: int = 0
    pg_user: str = ""
    pg_password: str = ""
    pg_database: str = ""
    pg_table: str = "neuron_descriptions"
    #: Aggregator export used as evidence: an export folder (edges/units/ledger.parquet) or a
    #: folder of shard export folders; used when atlas_path is empty.
    evidence_path: str = ""
    #: Output projections of every neuron (Parquet), computed from model.name when missing.
    projections_path: str = "output_projections.parquet"
    #: Compute the output projections from model.name when projections_path does not exist.
    compute_projections: bool = True
    #: Promoted / suppressed tokens kept per neuron in the projections file.
    projection_top_k: int = 20
    #: Fold the final norm weight into the projection (W_U diag(w_norm) W_down[:, i]).
    projection_final_norm: bool = True
    #: Pass 1 labels a neuron only if max(logit effect, downstream effect) >= this.
    min_effect: float = 0.05
    #: Pass 2 labels a neuron only if at least this many upstream neurons carry labels.
    min_labeled_upstream: int = 2
    #: Edges with fewer observations are ignored as evidence.
    min_edge_count: int = 1
    #: Fraction of layers (the last ones) prompted with direct token effects.
    late_band_fraction: float = 0.2
    #: Fraction of layers (the first ones) treated as the early band.
    early_band_fraction: float = 0.3
    #: Decoder layers of the model; 0 = from the projections file or the evidence.
    num_layers: int = 0
    #: MLP neurons per layer (the model's intermediate size); 0 = from the projections file (unknown without one).
    neurons_per_layer: int = 0
    #: Re-asks after a malformed (unparseable / invalid) answer before the neuron is marked failed.
    malformed_retries: int = 2
    #: First retry delay in seconds (doubles per retry, with jitter), and its cap.
    retry_base_delay: float = 0.5
    retry_max_delay: float = 30.0
    #: Ask OpenAI-compatible servers for a JSON object (response_format=json_object).
    json_mode: bool = False
    #: Ask again for neurons whose cached answer was malformed.
    retry_failed: bool = False
    #: fsync the answer cache after every answer (crash-safe; slower on slow disks).
    cache_fsync: bool = True
    #: Exemplar file (`circuits exemplars`): pass-2 evidence and the contexts labels are scored on.
    exemplars_path: str = ""
    #: Score every label against held-out exemplars and random contexts (only where exemplars exist).
    score: bool = True
    #: Held-out top exemplars (odd ranks) per scored label.
    score_held_out: int = 10
    #: Random-sample contexts per scored label.
    score_random: int = 10
    #: A context truly fires when its activation >= this fraction of the neuron's lowest kept top activation.
    score_fire_fraction: float = 0.5
    #: Max output tokens of one scorer answer.
    score_max_answer_tokens: int = 200
    #: With exemplars: show pass 2 the tokens whose embeddings drive the neuron (loads model.name).
    input_projection: bool = True
    #: Top exemplars (even ranks) shown in a pass-2 prompt.
    exemplars_in_prompt: int = 8
    #: Neuron -> logit links shown in a late-layer pass-1 prompt.
    logit_links_in_prompt: int = 8
    #: Token budgets of the prompts (estimated as characters / 4); evidence lists are cut to fit.
    output_prompt_budget: int = 1200
    input_prompt_budget: int = 2000


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSection:
    #: Output directory for reports and intermediate files.
    dir: str = "output"
    #: Atlas file written by build-db.
    duckdb: str = "atlas.duckdb"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    graphs: GraphsSection = field(default_factory=GraphsSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    clustering: ClusteringSection = field(default_factory=ClusteringSection)
    labeling: LabelingSection = field(default_factory=LabelingSection)
    output: OutputSection = field(default_factory=OutputSection)
    #: Directory of the config file (relative paths in it resolve against this).
    base_dir: str = "."

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:  # Optional[X]: X's own message, "or null"
            if value is None:
                return None
            try:
                return _coerce(value, args[0], where)
            except ConfigError as exc:
                raise ConfigError(str(exc).replace(", got ", " or null, got ", 1)) from None
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__}")
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {type(value).__name__}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected int, got {type(value).__name__}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected number, got {type(value).__name__}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected string, got {type(value).__name__}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "base_dir"}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{path}: unknown key (allowed: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except InvalidArgument as exc:  # a section's own validation (e.g. graphs.k >= 1)
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


def config_from_mapping(data: Any, *, source: str = "config", base_dir: str = ".") -> Config:
    """Build a Config from parsed YAML; errors name ``source`` and the key."""
    try:
        cfg = _build(Config, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return dataclasses.replace(cfg, base_dir=base_dir)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{at}") from None
    return config_from_mapping(data, source=str(path), base_dir=str(path.parent))


def env_setting(name: str, default: str = "") -> str:
    """Read a setting from the environment (the one place library code does so)."""
    return os.environ.get(name, default)


def circuits_home() -> Path:
    """Root of local caches (models, mean activations): $CIRCUITS_HOME or ~/.cache/circuits."""
    return Path(env_setting("CIRCUITS_HOME") or Path.home() / ".cache" / "circuits")
