"""Circuit analysis of one prompt: graph -> labels -> clusters -> top paths -> LLM write-up -> report.

Transport-neutral: the CLI (`circuits analyze`) and any service can call these functions. Heavy
imports (torch, the attribution engine, infomap, duckdb, LLM SDKs) happen inside the functions
that need them.

* :class:`GraphSource` traces prompts in-process (``circuits_attribution``) or on a remote
  attribution service, loading the model once.
* :func:`label_graph` fills neuron labels from an atlas, the configured label source or the
  labeler; neurons without one are marked ``unlabelled`` (a ``UnitLabel`` with that source).
* :func:`cluster_graph` runs the atlas' single-graph Infomap clustering (relp-spec §G).
* :func:`top_paths` finds the k best input-token -> predicted-token paths through the DAG.
* :func:`llm_analysis` asks the configured LLM (Anthropic or OpenAI-compatible) to explain the
  circuit; without a key it returns a "skipped" result instead of failing.
* :func:`write_report` writes report.md, report.html (with the viewer), graph.json, summary.json.
"""

from __future__ import annotations

import dataclasses
import heapq
import html
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from circuits_core.config import Config, LabelingSection, env_setting
from circuits_core.errors import CircuitsError, FailedPrecondition, InvalidArgument
from circuits_core.schemas import Graph, Unit, UnitLabel

UNLABELLED = "unlabelled"
PathMode = Literal["product", "sum"]

Warn = Callable[[str], None]


def _no_warn(_message: str) -> None:
    return None


# ------------------------------------------------------------------------------------------
# Graph generation
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSettings:
    """How prompts are traced (the ``model`` and ``graphs`` config sections, flattened)."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    k: int = 5
    tau: float = 0.005
    max_nodes: int = 500
    raw: bool = False
    answer_prefix: str = ""
    target_tokens: tuple[str, ...] = ()
    #: host:port of an attribution service; empty = in-process.
    remote: str = ""
    #: Bearer token and TLS CA file for ``remote`` (empty = none / plaintext).
    token: str = field(default="", repr=False)
    tls_ca_file: str = ""

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> TraceSettings:
        """Settings from a Config; ``overrides`` with value None are ignored."""
        values = {
            "model": config.model.name,
            "dtype": config.model.dtype,
            "device": config.model.device,
            "k": config.graphs.k,
            "tau": config.graphs.tau,
            "max_nodes": config.graphs.max_nodes,
            "raw": config.graphs.raw,
            "answer_prefix": config.graphs.answer_prefix,
            "target_tokens": tuple(config.graphs.target_tokens),
            "remote": config.graphs.remote,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class GraphSource:
    """Traces prompts into graphs; the model (or the remote channel) is opened once, lazily."""

    def __init__(self, settings: TraceSettings) -> None:
        self.settings = settings
        self._attributor: Any = None
        self._client: Any = None

    def trace(self, prompt: str, *, target_tokens: Sequence[str] = ()) -> Graph:
        if not prompt or not prompt.strip():
            raise InvalidArgument("prompt is empty")
        s = self.settings
        targets = tuple(target_tokens) or s.target_tokens
        if s.remote:
            return self._trace_remote(prompt, targets)
        if self._attributor is None:
            from circuits_attribution import RelPAttributor, RelPConfig, load_model

            loaded = load_model(s.model, dtype=s.dtype, device=s.device)
            config = RelPConfig(
                k=s.k, tau=s.tau, max_nodes=s.max_nodes, raw=s.raw, answer_prefix=s.answer_prefix,
                model_name=s.model,
            )
            self._attributor = RelPAttributor(loaded.model, loaded.tokenizer, config)
        return self._attributor.trace(prompt, target_tokens=targets or None)

    def _trace_remote(self, prompt: str, targets: tuple[str, ...]) -> Graph:
        s = self.settings
        try:
            from circuits_sdk.attribution import AttributionClient
            from circuits_core.tracing import TraceSpec
        except ImportError:
            raise FailedPrecondition("--remote needs circuits_sdk.attribution, which is not installed") from None
        if self._client is None:
            self._client = AttributionClient(s.remote, token=s.token, tls_ca_file=s.tls_ca_file)
        spec = TraceSpec(
            prompt=prompt, k=s.k, target_tokens=targets, raw=s.raw, answer_prefix=s.answer_prefix,
            tau=s.tau, max_nodes=s.max_nodes,
        )
        return self._client.trace(spec)

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if callable(close):
            close()
        self._client = None
        self._attributor = None


# ------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class LabelSettings:
    """Where neuron labels come from, in order: atlas, the labeling section's source, labeler."""

    atlas_path: str = ""
    labeling: LabelingSection = field(default_factory=LabelingSection)
    #: Folder relative paths in ``labeling`` resolve against (the config file's folder).
    base_dir: str = "."
    #: Ask circuits_labeler (when it offers ``label_graph``) for the neurons still unlabelled.
    use_labeler: bool = True


def _label_text(found: Any) -> tuple[str, str, str]:
    """(label, input_label, description) from an atlas row, a LabelRecord, a dict or a string."""
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


def _atlas_labels(path: str, keys: set[tuple[int, int]], warn: Warn) -> dict[tuple[int, int], Any]:
    try:
        from circuits_atlas import CircuitDatabase  # type: ignore[attr-defined]
    except ImportError:
        warn("atlas labels skipped: circuits_atlas.CircuitDatabase is not available")
        return {}
    if not Path(path).exists():
        raise InvalidArgument(f"--atlas {path}: no such file")
    found: dict[tuple[int, int], Any] = {}
    db = CircuitDatabase(path)
    try:
        for layer, index in sorted(keys):
            try:
                row = db.get_unit(layer, index)
            except LookupError:
                row = None
            if row is not None:
                found[(layer, index)] = row
    finally:
        close = getattr(db, "close", None)
        if callable(close):
            close()
    return found


def _source_labels(settings: LabelSettings, keys: set[tuple[int, int]], warn: Warn) -> tuple[str, dict]:
    from circuits_core.labels import label_source_from_config

    try:
        source = label_source_from_config(settings.labeling, base_dir=settings.base_dir)
    except CircuitsError as exc:
        warn(f"label source skipped: {exc}")
        return "", {}
    if source is None:
        return "", {}
    try:
        return settings.labeling.method, dict(source.labels_for(keys))
    except CircuitsError as exc:
        warn(f"label source {settings.labeling.method} skipped: {exc}")
        return "", {}
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()


def _labeler_labels(graph: Graph, settings: LabelSettings, keys: set[tuple[int, int]], warn: Warn) -> dict:
    """Labels from ``circuits_labeler.label_graph(graph, settings=LabelingSection)`` when it exists."""
    try:
        import circuits_labeler
    except ImportError:
        return {}
    label_fn = getattr(circuits_labeler, "label_graph", None)
    if not callable(label_fn):
        return {}
    try:
        result = label_fn(graph, settings=settings.labeling)
    except CircuitsError as exc:
        warn(f"labeler skipped: {exc}")
        return {}
    return {k: v for k, v in dict(result).items() if k in keys}


def label_graph(graph: Graph, settings: LabelSettings, *, warn: Warn = _no_warn) -> tuple[Graph, dict[str, str]]:
    """Fill neuron labels; return the labelled graph and ``{node_id: label source}``.

    A neuron keeps a label it already carries (source ``graph``). Otherwise the first source
    with a non-empty label wins: the atlas (``atlas``), the labeling section's source (its
    method name), the labeler (``labeler``). Every other neuron gets source ``unlabelled`` and a
    ``UnitLabel(text="unlabelled", source="unlabelled")`` so consumers can tell it apart.
    """
    keys = {u.key for u in graph.neurons if not u.label}
    found: dict[tuple[int, int], tuple[str, Any]] = {}
    if keys and settings.atlas_path:
        for key, row in _atlas_labels(settings.atlas_path, keys, warn).items():
            if _label_text(row)[0]:
                found[key] = ("atlas", row)
    remaining = keys - set(found)
    if remaining:
        name, rows = _source_labels(settings, remaining, warn)
        for key, row in rows.items():
            if _label_text(row)[0]:
                found[key] = (name or "file", row)
    remaining = keys - set(found)
    if remaining and settings.use_labeler:
        for key, row in _labeler_labels(graph, settings, remaining, warn).items():
            if _label_text(row)[0]:
                found[key] = ("labeler", row)

    sources: dict[str, str] = {}
    units = []
    for unit in graph.units:
        if unit.kind != "neuron":
            units.append(unit)
            continue
        if unit.label:
            sources[unit.node_id] = "graph"
            units.append(unit)
        elif unit.key in found:
            source, row = found[unit.key]
            label, input_label, description = _label_text(row)
            extra = UnitLabel(text=label, source=source, description=description)
            units.append(replace(
                unit, label=label, input_label=unit.input_label or input_label,
                labels=tuple(lab for lab in unit.labels if lab.source != UNLABELLED) + (extra,),
            ))
            sources[unit.node_id] = source
        else:
            marker = UnitLabel(text=UNLABELLED, source=UNLABELLED)
            labels = unit.labels if any(lab.source == UNLABELLED for lab in unit.labels) else unit.labels + (marker,)
            units.append(replace(unit, labels=labels))
            sources[unit.node_id] = UNLABELLED
    return replace(graph, units=tuple(units)), sources


# ------------------------------------------------------------------------------------------
# Clusters
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterInfo:
    """One leaf cluster of a graph's neurons."""

    cluster_id: str
    node_ids: tuple[str, ...]
    mean_layer: float
    layers: tuple[int, int]
    #: Token positions the members sit at, most members first: ((position, token, count), ...).
    positions: tuple[tuple[int, str, int], ...]
    total_abs_attribution: float

    @property
    def name(self) -> str:
        """The supernode label: ``C{id} L{lo}-L{hi}``."""
        lo, hi = self.layers
        return f"C{self.cluster_id} L{lo}" + (f"-L{hi}" if hi != lo else "")


def cluster_graph(graph: Graph, *, warn: Warn = _no_warn) -> list[ClusterInfo]:
    """Infomap clusters of the graph's neurons (the atlas' ``cluster_graph``, relp-spec §G).

    Falls back to one local two-level directed Infomap run on |w| when circuits_atlas is not
    installed. Clusters come back sorted by mean layer.
    """
    try:
        from circuits_atlas.clustering import cluster_graph as atlas_cluster_graph
    except ImportError:
        atlas_cluster_graph = None
    if atlas_cluster_graph is not None:
        raw = atlas_cluster_graph(graph)
        groups = [(c.cluster_id, [m.node_id for m in c.members]) for c in raw.clusters]
    else:
        warn("circuits_atlas is not installed: clustering with a local two-level Infomap run")
        groups = _local_clusters(graph)
    by_id = {u.node_id: u for u in graph.units}
    tokens = graph.prompt_tokens
    out = []
    for cluster_id, node_ids in groups:
        members = [by_id[n] for n in node_ids if n in by_id]
        if not members:
            continue
        layers = [u.layer for u in members]
        counts = Counter(u.position for u in members if u.position is not None)
        positions = tuple(
            (p, tokens[p] if 0 <= p < len(tokens) else "", c)
            for p, c in sorted(counts.items(), key=lambda pc: (-pc[1], pc[0]))
        )
        out.append(ClusterInfo(
            cluster_id=str(cluster_id),
            node_ids=tuple(u.node_id for u in members),
            mean_layer=sum(layers) / len(layers),
            layers=(min(layers), max(layers)),
            positions=positions,
            total_abs_attribution=sum(abs(u.attribution or 0.0) for u in members),
        ))
    out.sort(key=lambda c: (c.mean_layer, _natural(c.cluster_id)))
    return out


def _natural(cluster_id: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in cluster_id.split("."))


def _local_clusters(graph: Graph) -> list[tuple[str, list[str]]]:
    from infomap import Infomap

    neurons = [u for u in graph.units if u.kind == "neuron"]
    index = {u.node_key: i for i, u in enumerate(neurons)}
    im = Infomap("--two-level --directed --num-trials 10 --seed 42 --silent")
    n_links = 0
    for e in sorted(graph.edges, key=lambda e: (e.src_layer, e.src_index, e.src_position or 0, e.tgt_layer, e.tgt_index, e.tgt_position or 0)):
        s, t = index.get(e.src_key), index.get(e.tgt_key)
        if s is not None and t is not None and s != t and e.weight and math.isfinite(e.weight):
            im.add_link(s, t, abs(e.weight))
            n_links += 1
    if not n_links:
        return []
    result = im.run()
    groups: dict[int, list[str]] = defaultdict(list)
    nodes = result.nodes() if result is not None and hasattr(result, "nodes") else im.nodes
    for node in nodes:
        groups[node.module_id].append(neurons[node.node_id].node_id)
    return [(str(m), ids) for m, ids in sorted(groups.items())]


def with_clusters(graph: Graph, clusters: Sequence[ClusterInfo]) -> Graph:
    """A copy whose neurons carry ``cluster`` ids and whose ``qParams.supernodes`` list the clusters."""
    cluster_of = {n: c.cluster_id for c in clusters for n in c.node_ids}
    units = tuple(replace(u, cluster=cluster_of.get(u.node_id, u.cluster)) for u in graph.units)
    extra = dict(graph.metadata.extra)
    q_params = dict(extra.get("qParams") or {})
    q_params["supernodes"] = [[c.name, *c.node_ids] for c in clusters]
    extra["qParams"] = q_params
    return replace(graph, units=units, metadata=replace(graph.metadata, extra=extra))


# ------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitPath:
    """An input-token -> predicted-token path. ``score``: product of edge input fractions
    (mode ``product``) or sum of |weights| (mode ``sum``); ``sign`` = product of edge signs."""

    node_ids: tuple[str, ...]
    weights: tuple[float, ...]
    score: float
    sign: int


def predicted_logit(graph: Graph) -> Unit | None:
    """The logit node with the highest probability (the first logit when none has one)."""
    logits = list(graph.logits)
    if not logits:
        return None
    return max(logits, key=lambda u: (u.probability if u.probability is not None and math.isfinite(u.probability) else -1.0))


def top_paths(
    graph: Graph,
    *,
    k: int = 5,
    mode: PathMode = "product",
    target: str | None = None,
) -> list[CircuitPath]:
    """The ``k`` best paths from an embedding node to ``target`` (default: the predicted logit).

    ``product``: an edge's score is its share of the target node's input, ``|w| / Σ|w_in|``, and
    a path's score the product of its edges' shares (exact k-best by dynamic programming over a
    topological order, in log space). ``sum``: a path's score is the sum of its ``|w|``.
    Edges that would close a cycle are ignored. Paths come back best first.
    """
    if k < 1:
        raise InvalidArgument(f"k must be >= 1, got {k}")
    if mode not in ("product", "sum"):
        raise InvalidArgument(f"path mode must be product or sum, got {mode!r}")
    units = graph.units
    pos = {u.node_key: i for i, u in enumerate(units)}
    if target is None:
        logit = predicted_logit(graph)
        if logit is None:
            return []
        target_i = pos[logit.node_key]
    else:
        ids = {u.node_id: i for i, u in enumerate(units)}
        if target not in ids:
            raise InvalidArgument(f"path target {target!r} is not a node of the graph")
        target_i = ids[target]

    out_edges: dict[int, list[tuple[int, float]]] = defaultdict(list)
    in_abs = [0.0] * len(units)
    indegree = [0] * len(units)
    for e in graph.edges:
        s, t = pos.get(e.src_key), pos.get(e.tgt_key)
        if s is None or t is None or s == t or not e.weight or not math.isfinite(e.weight):
            continue
        out_edges[s].append((t, e.weight))
        in_abs[t] += abs(e.weight)
        indegree[t] += 1
    # Kahn's algorithm; ties broken by (layer, position) so the order is deterministic.
    order_key = [(u.layer, -1 if u.position is None else u.position, i) for i, u in enumerate(units)]
    ready = [order_key[i] for i in range(len(units)) if indegree[i] == 0]
    heapq.heapify(ready)
    topo: list[int] = []
    remaining = list(indegree)
    while ready:
        _, _, i = heapq.heappop(ready)
        topo.append(i)
        for t, _ in out_edges[i]:
            remaining[t] -= 1
            if remaining[t] == 0:
                heapq.heappush(ready, order_key[t])
    rank = {i: r for r, i in enumerate(topo)}  # nodes on cycles are left out

    starts = [i for i, u in enumerate(units) if u.kind == "embedding"] or [i for i in topo if indegree[i] == 0]
    # best[i]: up to k (score, path, weights) partial paths ending at i, best first.
    best: dict[int, list[tuple[float, tuple[int, ...], tuple[float, ...]]]] = {i: [(0.0, (i,), ())] for i in starts}
    for i in topo:
        partial = best.get(i)
        if not partial or i == target_i:
            continue
        for t, w in out_edges[i]:
            if rank.get(t, -1) <= rank[i]:
                continue
            if mode == "product":
                share = abs(w) / in_abs[t]
                step = math.log(share) if share > 0 else -math.inf
            else:
                step = abs(w)
            bucket = best.setdefault(t, [])
            for score, path, weights in partial:
                cand = (score + step, path + (t,), weights + (w,))
                if len(bucket) < k:
                    bucket.append(cand)
                    bucket.sort(key=lambda c: -c[0])
                elif cand[0] > bucket[-1][0]:
                    bucket[-1] = cand
                    bucket.sort(key=lambda c: -c[0])
    paths = []
    for score, path, weights in best.get(target_i, []):
        if len(path) < 2:
            continue
        sign = 1
        for w in weights:
            sign *= 1 if w > 0 else -1
        paths.append(CircuitPath(
            node_ids=tuple(units[i].node_id for i in path),
            weights=weights,
            score=math.exp(score) if mode == "product" else score,
            sign=sign,
        ))
    return paths


# ------------------------------------------------------------------------------------------
# LLM write-up
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class LLMAnalysis:
    """``status``: ok | skipped | failed; ``text`` is the analysis when ok, ``reason`` otherwise."""

    status: Literal["ok", "skipped", "failed"]
    text: str = ""
    reason: str = ""
    backend: str = ""
    model: str = ""
    prompt_chars: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


SYSTEM_PROMPT = (
    "You are an interpretability researcher. You explain neuron-level attribution graphs "
    "(RelP) of language models: which groups of MLP neurons carry information from the input "
    "tokens to the predicted token. Be concrete and brief, cite clusters (C…) and neurons "
    "(L{layer}/N{index}), and say plainly when labels are missing or evidence is weak."
)


def _display(unit: Unit) -> str:
    if unit.kind == "embedding":
        return f"token {unit.token!r}@{unit.position}"
    if unit.kind == "logit":
        return f"logit {unit.token!r}"
    label = unit.label or UNLABELLED
    return f"L{unit.layer}/N{unit.index}@{unit.position} ({label})"


def analysis_prompt(graph: Graph, clusters: Sequence[ClusterInfo], paths: Sequence[CircuitPath], *, members_per_cluster: int = 6) -> str:
    """The user message sent to the LLM: tokens, logits, clusters with their top members, paths."""
    by_id = {u.node_id: u for u in graph.units}
    lines = [f"Model: {graph.model or graph.metadata.scan}", f"Prompt: {graph.prompt!r}", "", "Tokens (position: token):"]
    lines += [f"  {p}: {t!r}" for p, t in enumerate(graph.prompt_tokens)]
    lines += ["", "Traced output logits:"]
    lines += [f"  {u.token!r} p={u.probability if u.probability is not None else float('nan'):.4f}" for u in graph.logits]
    n_unlabelled = sum(1 for u in graph.neurons if not u.label)
    lines += ["", f"{len(graph.neurons)} neurons in the graph ({n_unlabelled} unlabelled), {len(graph.edges)} edges.",
              "", "Clusters (Infomap on |edge weight|, sorted by mean layer):"]
    for c in clusters:
        members = sorted((by_id[n] for n in c.node_ids), key=lambda u: -abs(u.attribution or 0.0))
        where = ", ".join(f"{t!r}@{p}×{n}" for p, t, n in c.positions[:4])
        lines.append(f"- {c.name}: {len(c.node_ids)} neurons, mean layer {c.mean_layer:.1f}, "
                     f"Σ|attribution| {c.total_abs_attribution:.3g}, positions {where}")
        for u in members[:members_per_cluster]:
            lines.append(f"    {_display(u)} attribution={u.attribution or 0.0:+.3g}")
    if not clusters:
        lines.append("  (no clusters: the graph has no neuron-to-neuron edges)")
    lines += ["", "Strongest paths from input tokens to the predicted token (score = product of each edge's share of its target's input):"]
    for n, p in enumerate(paths, 1):
        chain = " -> ".join(_display(by_id[i]) for i in p.node_ids)
        lines.append(f"  {n}. score={p.score:.3g} sign={'+' if p.sign > 0 else '-'}: {chain}")
    if not paths:
        lines.append("  (none found)")
    lines += [
        "",
        "Write a short analysis in Markdown with these sections:",
        "1. Summary — what the circuit computes, in 2-4 sentences.",
        "2. Clusters — one bullet per cluster: its apparent role.",
        "3. Main paths — how information flows from the input tokens to the prediction.",
        "4. Caveats — missing labels, weak evidence.",
    ]
    return "\n".join(lines)


def _api_key(labeling: LabelingSection, base_dir: str) -> str:
    if labeling.api_key_file:
        path = Path(labeling.api_key_file).expanduser()
        if not path.is_absolute():
            path = Path(base_dir) / path
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""
    return env_setting(labeling.api_key_env).strip() if labeling.api_key_env else ""


def llm_analysis(
    graph: Graph,
    clusters: Sequence[ClusterInfo],
    paths: Sequence[CircuitPath],
    labeling: LabelingSection,
    *,
    base_dir: str = ".",
    enabled: bool = True,
) -> LLMAnalysis:
    """Ask the configured LLM for a write-up; never raises for missing keys or LLM errors.

    Skipped (with the reason) when disabled or when neither an API key nor a base_url is set; a
    base_url without a key (a local vLLM server) is called with a placeholder key.
    """
    prompt = analysis_prompt(graph, clusters, paths)
    common = {"backend": labeling.backend, "model": labeling.model, "prompt_chars": len(prompt)}
    if not enabled:
        return LLMAnalysis(status="skipped", reason="LLM analysis disabled (--no-llm)", **common)
    key = _api_key(labeling, base_dir)
    if not key and not labeling.base_url:
        where = f"file {labeling.api_key_file}" if labeling.api_key_file else f"${labeling.api_key_env}"
        return LLMAnalysis(status="skipped", reason=f"no LLM API key ({where} is not set)", **common)
    key = key or "EMPTY"
    try:
        if labeling.backend == "anthropic":
            import anthropic

            client = anthropic.Anthropic(
                api_key=key, base_url=labeling.base_url or None,
                max_retries=labeling.max_retries, timeout=labeling.request_timeout,
            )
            msg = client.messages.create(
                model=labeling.model, max_tokens=labeling.max_answer_tokens, system=SYSTEM_PROMPT,
                messages=[{"role": "user", "content": prompt}],
            )
            text = "".join(getattr(block, "text", "") for block in msg.content).strip()
            usage = getattr(msg, "usage", None)
            tokens_in = int(getattr(usage, "input_tokens", 0) or 0)
            tokens_out = int(getattr(usage, "output_tokens", 0) or 0)
        else:
            import openai

            client = openai.OpenAI(
                api_key=key, base_url=labeling.base_url or None,
                max_retries=labeling.max_retries, timeout=labeling.request_timeout,
            )
            resp = client.chat.completions.create(
                model=labeling.model, max_tokens=labeling.max_answer_tokens,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            )
            text = (resp.choices[0].message.content or "").strip() if resp.choices else ""
            usage = getattr(resp, "usage", None)
            tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0)
            tokens_out = int(getattr(usage, "completion_tokens", 0) or 0)
    except Exception as exc:  # noqa: BLE001 - any SDK/network error becomes a "failed" section
        first = (str(exc).splitlines() or [""])[0][:300]
        return LLMAnalysis(status="failed", reason=f"{type(exc).__name__}: {first}", **common)
    if not text:
        return LLMAnalysis(status="failed", reason="the LLM returned an empty answer", **common)
    return LLMAnalysis(status="ok", text=text, input_tokens=tokens_in, output_tokens=tokens_out, **common)


# ------------------------------------------------------------------------------------------
# Whole analysis and report
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class AnalysisResult:
    graph: Graph
    label_sources: Mapping[str, str]
    clusters: tuple[ClusterInfo, ...]
    paths: tuple[CircuitPath, ...]
    path_mode: str
    analysis: LLMAnalysis
    warnings: tuple[str, ...] = ()


def analyze_graph(
    graph: Graph,
    *,
    labels: LabelSettings,
    n_paths: int = 5,
    path_mode: PathMode = "product",
    use_llm: bool = True,
) -> AnalysisResult:
    """Label, cluster, find paths in and explain one graph (no files written)."""
    warnings: list[str] = []
    labelled, sources = label_graph(graph, labels, warn=warnings.append)
    clusters = cluster_graph(labelled, warn=warnings.append)
    clustered = with_clusters(labelled, clusters)
    paths = top_paths(clustered, k=n_paths, mode=path_mode) if n_paths > 0 else []
    analysis = llm_analysis(clustered, clusters, paths, labels.labeling, base_dir=labels.base_dir, enabled=use_llm)
    return AnalysisResult(
        graph=clustered, label_sources=sources, clusters=tuple(clusters), paths=tuple(paths),
        path_mode=path_mode, analysis=analysis, warnings=tuple(warnings),
    )


def _num(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summary_dict(result: AnalysisResult) -> dict[str, Any]:
    """The machine-readable summary written to summary.json."""
    g = result.graph
    by_id = {u.node_id: u for u in g.units}
    source_counts = Counter(result.label_sources.values())
    predicted = predicted_logit(g)
    return {
        "schema": "circuits.analysis/1",
        "prompt": g.prompt,
        "model": g.model or g.metadata.scan,
        "graph_id": g.graph_id,
        "prompt_tokens": list(g.prompt_tokens),
        "metric_value": _num(g.metadata.metric_value),
        "nodes_exceeded": g.metadata.nodes_exceeded,
        "logits": [{"node_id": u.node_id, "token": u.token, "token_id": u.index, "probability": _num(u.probability)} for u in g.logits],
        "predicted": predicted.node_id if predicted else None,
        "counts": {
            "neurons": len(g.neurons),
            "embeddings": sum(1 for u in g.units if u.kind == "embedding"),
            "logits": len(g.logits),
            "edges": len(g.edges),
            "clusters": len(result.clusters),
            "clustered_neurons": sum(len(c.node_ids) for c in result.clusters),
        },
        "labels": {"by_source": dict(sorted(source_counts.items())), "unlabelled": source_counts.get(UNLABELLED, 0)},
        "neurons": [
            {
                "node_id": u.node_id, "layer": u.layer, "neuron": u.index, "position": u.position, "token": u.token,
                "label": u.label, "input_label": u.input_label, "label_source": result.label_sources.get(u.node_id, UNLABELLED),
                "cluster": u.cluster or None, "attribution": _num(u.attribution), "activation": _num(u.activation),
            }
            for u in g.neurons
        ],
        "clusters": [
            {
                "cluster_id": c.cluster_id, "name": c.name, "size": len(c.node_ids), "mean_layer": c.mean_layer,
                "layers": list(c.layers), "total_abs_attribution": c.total_abs_attribution,
                "positions": [{"position": p, "token": t, "count": n} for p, t, n in c.positions],
                "node_ids": list(c.node_ids),
            }
            for c in result.clusters
        ],
        "paths": {
            "mode": result.path_mode,
            "target": predicted.node_id if predicted else None,
            "paths": [
                {
                    "score": p.score, "sign": p.sign, "node_ids": list(p.node_ids), "weights": list(p.weights),
                    "clusters": [by_id[n].cluster or None for n in p.node_ids],
                }
                for p in result.paths
            ],
        },
        "analysis": dataclasses.asdict(result.analysis),
        "warnings": list(result.warnings),
        "files": {"graph": "graph.json", "report_md": "report.md", "report_html": "report.html", "summary": "summary.json"},
    }


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "↵")


def report_markdown(result: AnalysisResult) -> str:
    g = result.graph
    s = summary_dict(result)
    by_id = {u.node_id: u for u in g.units}
    out = [f"# Circuit analysis: {g.prompt!r}", ""]
    out.append(f"- model: `{s['model']}`")
    out.append(f"- graph: {s['counts']['neurons']} neurons, {s['counts']['edges']} edges, "
               f"{s['counts']['clusters']} clusters ({s['counts']['clustered_neurons']} neurons clustered)")
    out.append("- traced logits: " + ", ".join(f"`{u.token!r}` p={u.probability or 0:.3f}" for u in g.logits))
    out.append("- labels: " + ", ".join(f"{k}: {v}" for k, v in s["labels"]["by_source"].items()))
    if g.metadata.nodes_exceeded:
        out.append("- note: more nodes than max_nodes were selected, so only edges into logits were computed")
    out += ["", "## Analysis", ""]
    a = result.analysis
    if a.status == "ok":
        out += [a.text, "", f"_written by {a.backend} `{a.model}`_"]
    else:
        out.append(f"_LLM analysis {a.status}: {a.reason}_")
    out += ["", "## Clusters", "", "| cluster | neurons | layers | main positions | top members |", "|---|---|---|---|---|"]
    for c in result.clusters:
        members = sorted((by_id[n] for n in c.node_ids), key=lambda u: -abs(u.attribution or 0.0))[:4]
        tops = "; ".join(f"L{u.layer}/N{u.index} {u.label or UNLABELLED}" for u in members)
        where = ", ".join(f"{t!r}@{p}" for p, t, _ in c.positions[:3])
        out.append(f"| {c.name} | {len(c.node_ids)} | L{c.layers[0]}–L{c.layers[1]} | {_md_cell(where)} | {_md_cell(tops)} |")
    if not result.clusters:
        out.append("| – | 0 | – | – | no neuron-to-neuron edges |")
    out += ["", f"## Top paths to the predicted token ({result.path_mode})", ""]
    for n, p in enumerate(result.paths, 1):
        chain = " → ".join(_display(by_id[i]) for i in p.node_ids)
        out.append(f"{n}. score {p.score:.3g} ({'excitatory' if p.sign > 0 else 'inhibitory'}): {_md_cell(chain)}")
    if not result.paths:
        out.append("_no path from an input token to the predicted token_")
    if result.warnings:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in result.warnings]
    out += ["", "Files: `graph.json` (labels, clusters, qParams.supernodes), `summary.json`, `report.html` (interactive viewer).", ""]
    return "\n".join(out)


def report_html_section(result: AnalysisResult) -> str:
    """The report body placed under the viewer in report.html (all text escaped)."""
    g = result.graph
    by_id = {u.node_id: u for u in g.units}
    e = html.escape
    a = result.analysis
    parts = ['<section class="cv-report" id="report">', "<h2>Analysis</h2>"]
    if a.status == "ok":
        parts.append(f'<div class="cv-analysis" id="analysis-text">{e(a.text)}</div>')
        parts.append(f"<p><em>written by {e(a.backend)} <code>{e(a.model)}</code></em></p>")
    else:
        parts.append(f'<p id="analysis-status"><em>LLM analysis {e(a.status)}: {e(a.reason)}</em></p>')
    parts.append("<h2>Clusters</h2><table><tr><th>cluster</th><th>neurons</th><th>layers</th><th>main positions</th><th>top members</th></tr>")
    for c in result.clusters:
        members = sorted((by_id[n] for n in c.node_ids), key=lambda u: -abs(u.attribution or 0.0))[:4]
        tops = "<br>".join(e(f"L{u.layer}/N{u.index} {u.label or UNLABELLED}") for u in members)
        where = e(", ".join(f"{t!r}@{p}" for p, t, _ in c.positions[:3]))
        parts.append(f"<tr><td>{e(c.name)}</td><td>{len(c.node_ids)}</td><td>L{c.layers[0]}–L{c.layers[1]}</td><td>{where}</td><td>{tops}</td></tr>")
    parts.append("</table>")
    parts.append(f"<h2>Top paths to the predicted token ({e(result.path_mode)})</h2><ol>")
    for p in result.paths:
        chain = " → ".join(_display(by_id[i]) for i in p.node_ids)
        parts.append(f"<li>score {p.score:.3g} ({'excitatory' if p.sign > 0 else 'inhibitory'}): {e(chain)}</li>")
    parts.append("</ol>")
    if result.warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{e(w)}</li>" for w in result.warnings) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def write_report(result: AnalysisResult, out_dir: str | Path) -> dict[str, Path]:
    """Write graph.json, summary.json, report.md and report.html into ``out_dir``; return the paths."""
    from circuits.viewer import write_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "graph": result.graph.save(out / "graph.json"),
        "summary": out / "summary.json",
        "report_md": out / "report.md",
        "report_html": out / "report.html",
    }
    _write_text(paths["summary"], json.dumps(summary_dict(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    _write_text(paths["report_md"], report_markdown(result))
    write_page(result.graph, paths["report_html"], title=f"circuits analysis · {result.graph.prompt}",
               extra_html=report_html_section(result))
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
