"""Faithfulness of an attribution graph by ablation (keep-top-N curves, removal, random baselines).

For a graph with metric ``m`` (sum of its logit targets' logits, or the contrastive difference,
relp-spec §B.2) at its target position:

* **keep top-N**: keep only the graph's N nodes with the largest ``|attribution|`` and ablate
  (zero or mean) every other MLP neuron at the traced positions (``0..target_position``); the
  faithfulness is ``(m_N - m_empty) / (m_full - m_empty)`` where ``m_empty`` ablates every neuron
  there (Transluce-style curve);
* **removal**: ablate the graph's top-N nodes only: how much of ``m`` goes and how far the
  probability of the model's top token drops;
* **random baselines**: the same with N neurons drawn uniformly from all neurons at the traced
  positions, over several seeds (mean and standard deviation).

Two evaluation modes. ``real``: the true model with hooked neurons (batched, one mask per row).
``linearized``: the RelP replacement model with all nonlinear factors frozen at their clean values
(:class:`~circuits_attribution.linearize.Linearization`). Being linear and bias-free, its metric
with a set ``S`` of neurons clamped to values ``a_v`` is ``sum e * d~m/de + sum_{v in S} a_v g_v``,
where the backward blocks the gradient at every clamped neuron and ``g_v`` is the gradient arriving
at ``v``; one forward and one backward evaluate a whole batch of masks exactly. In that model
removing one node changes ``m`` by exactly ``-RelP_v`` (relp-spec §J.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from circuits_core.errors import FailedPrecondition, InvalidArgument
from circuits_core.schemas import Graph

from circuits_attribution.interventions import neuron_masks, neuron_means, neuron_shape
from circuits_attribution.linearize import Linearization

ABLATIONS: tuple[str, ...] = ("zero", "mean")
EVAL_MODES: tuple[str, ...] = ("real", "linearized")


@dataclass(frozen=True, slots=True, kw_only=True)
class FaithfulnessConfig:
    """Settings of a faithfulness run. Field comments are the CLI help."""

    #: How ablated neurons are replaced: zero, or mean (per-neuron mean over a reference prompt set).
    ablation: str = "zero"
    #: Numbers of top graph nodes to keep / remove (capped at the graph's node count, which is added).
    sizes: tuple[int, ...] = (10, 20, 50, 100)
    #: Number of random node sets per size (seeds 0..n-1).
    random_seeds: int = 5
    #: real (the true model) or linearized (the frozen-constant RelP replacement model).
    mode: str = "real"
    #: Masks evaluated per forward pass.
    batch_size: int = 8
    #: MLP backward rule of the linearized mode (must match the graph's for exactness).
    mlp_rule: str = "relp"
    #: Token positions never ablated (e.g. 0, the attention-sink first token); graph nodes there are skipped.
    protect_positions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        object.__setattr__(self, "protect_positions", tuple(sorted({int(p) for p in self.protect_positions})))
        if any(p < 0 for p in self.protect_positions):
            raise InvalidArgument(f"protected positions must be >= 0, got {list(self.protect_positions)}")
        if self.ablation not in ABLATIONS:
            raise InvalidArgument(f"ablation must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        if self.mode not in EVAL_MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(EVAL_MODES)}, got {self.mode!r}")
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise InvalidArgument(f"sizes must be positive integers, got {list(self.sizes)}")
        if self.random_seeds < 0:
            raise InvalidArgument(f"random_seeds must be >= 0, got {self.random_seeds}")
        if self.batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphTarget:
    """What a graph explains: m = sum_j coefficients[j] * logit[token_ids[j]] at target_position."""

    input_ids: tuple[int, ...]
    target_position: int
    token_ids: tuple[int, ...]
    coefficients: tuple[float, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CurvePoint:
    """Results for one node-set size N. ``random_*``: mean and std over the random seeds."""

    size: int
    m_keep: float
    faithfulness: float
    random_m_keep_mean: float
    random_m_keep_std: float
    random_faithfulness_mean: float
    random_faithfulness_std: float
    m_removed: float
    removal_effect: float
    random_removal_effect_mean: float
    random_removal_effect_std: float
    p_top_keep: float | None = None
    random_p_top_keep_mean: float | None = None
    random_p_top_keep_std: float | None = None
    p_top_removed: float | None = None
    random_p_top_removed_mean: float | None = None
    random_p_top_removed_std: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FaithfulnessReport:
    """Faithfulness curve of one graph (see module docstring)."""

    graph_id: str
    prompt: str
    model: str
    ablation: str
    mode: str
    target_position: int
    metric_tokens: tuple[str, ...]
    metric_coefficients: tuple[float, ...]
    n_graph_nodes: int
    m_full: float
    m_empty: float
    graph_metric_value: float | None
    top_token: str
    top_token_id: int
    p_top_full: float | None
    p_top_empty: float | None
    random_seeds: int
    protect_positions: tuple[int, ...] = ()
    points: tuple[CurvePoint, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["points"] = [asdict(p) for p in self.points]
        return data


# --------------------------------------------------------------------------------------------
# Graph -> target and ranked nodes
# --------------------------------------------------------------------------------------------
def graph_target(graph: Graph, encoder: Any) -> GraphTarget:
    """The graph's metric and tokenized prompt, re-encoded as the graph was traced.

    `encoder` is a RelPAttributor (for ``encode_prompt``). Raises FailedPrecondition when the
    tokenization does not reproduce the graph's prompt tokens (wrong model) or the metric cannot
    be rebuilt (direction metrics).
    """
    settings = dict(graph.metadata.extra.get("generation_settings") or {})
    if settings.get("direction_sha"):
        raise FailedPrecondition("graph was traced with a dense direction metric; faithfulness needs token targets")
    if not graph.prompt:
        raise FailedPrecondition("graph has no prompt; cannot re-run it")
    ids = encoder.encode_prompt(graph.prompt, raw=bool(settings.get("raw", False)),
                                answer_prefix=str(settings.get("answer_prefix") or ""))
    if graph.prompt_tokens:
        tokens = tuple(encoder.tokenizer.decode([i]) for i in ids)
        if tokens != tuple(graph.prompt_tokens):
            raise FailedPrecondition(
                f"the model's tokenization of the prompt ({len(tokens)} tokens) does not match the graph's "
                f"{len(graph.prompt_tokens)} prompt tokens; was the graph traced with another model or settings?"
            )
    logits = graph.logits
    token_ids = [int(t) for t in settings.get("metric_tokens") or [u.index for u in logits]]
    if not token_ids:
        raise FailedPrecondition("graph has no logit targets")
    coefficients = settings.get("metric_coefficients")
    if not coefficients:
        contrastive = settings.get("contrastive")
        coefficients = [1.0, -1.0] if contrastive and len(token_ids) == 2 else [1.0] * len(token_ids)
    if len(coefficients) != len(token_ids):
        raise FailedPrecondition("graph metric tokens and coefficients differ in length")
    t_pos = graph.metadata.target_position
    if t_pos is None:
        t_pos = logits[0].position if logits and logits[0].position is not None else len(ids) - 1
    if not 0 <= int(t_pos) < len(ids):
        raise FailedPrecondition(f"graph target position {t_pos} is outside its prompt ({len(ids)} tokens)")
    return GraphTarget(input_ids=tuple(ids), target_position=int(t_pos), token_ids=tuple(token_ids),
                       coefficients=tuple(float(c) for c in coefficients))


def ranked_nodes(graph: Graph, *, n_layers: int, n_neurons: int, n_positions: int) -> list[tuple[int, int, int]]:
    """The graph's neuron nodes ``(layer, position, index)`` by |attribution| descending (ties by key)."""
    nodes = []
    for unit in graph.neurons:
        if unit.position is None:
            raise FailedPrecondition(f"graph node {unit.node_id} has no token position")
        if not (0 <= unit.layer < n_layers and 0 <= unit.index < n_neurons and 0 <= unit.position < n_positions):
            raise FailedPrecondition(
                f"graph node {unit.node_id} does not exist in this model ({n_layers} layers x {n_neurons} neurons, "
                f"{n_positions} positions); was the graph traced with another model?"
            )
        nodes.append((-abs(unit.attribution or 0.0), unit.layer, unit.position, unit.index))
    nodes.sort()
    return [(layer, pos, index) for _, layer, pos, index in nodes]


# --------------------------------------------------------------------------------------------
# Evaluation of masks
# --------------------------------------------------------------------------------------------
class AblationEvaluator:
    """Evaluates the graph metric under neuron masks (``keep[l, p, i]`` False = ablated)."""

    def __init__(
        self,
        model: nn.Module,
        target: GraphTarget,
        *,
        ablation: str = "zero",
        means: torch.Tensor | None = None,
        mode: str = "real",
        batch_size: int = 8,
        mlp_rule: str = "relp",
        protect_positions: Sequence[int] = (),
    ) -> None:
        if ablation not in ABLATIONS:
            raise InvalidArgument(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
        if mode not in EVAL_MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
        if ablation == "mean" and means is None:
            raise InvalidArgument("mean ablation needs neuron means")
        self.model = model
        self.target = target
        self.ablation = ablation
        self.mode = mode
        self.batch_size = batch_size
        self.mlp_rule = mlp_rule
        self.n_layers, self.n_neurons = neuron_shape(model)
        self.T = len(target.input_ids)
        self.protect_positions = tuple(sorted({int(p) for p in protect_positions}))
        if any(not 0 <= p < self.T for p in self.protect_positions):
            raise InvalidArgument(f"protected positions {list(self.protect_positions)} are outside the prompt (0..{self.T - 1})")
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.acc = torch.promote_types(self.dtype, torch.float32)
        self.replacement = None if ablation == "zero" else means.to(self.device)
        if mode == "linearized" and (getattr(model.config, "attention_bias", False) or getattr(model.config, "mlp_bias", False)):
            raise FailedPrecondition("linearized evaluation needs a bias-free model (attention_bias/mlp_bias set)")

    # -- masks ---------------------------------------------------------------------------------
    def _full(self) -> torch.Tensor:
        return torch.ones((self.n_layers, self.T, self.n_neurons), dtype=torch.bool)

    def keep_only(self, nodes: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Mask ablating every neuron at positions 0..target_position except `nodes` (l, p, i)
        and the protected positions."""
        keep = self._full()
        keep[:, : self.target.target_position + 1, :] = False
        if self.protect_positions:
            keep[:, list(self.protect_positions), :] = True
        if len(nodes):
            idx = torch.as_tensor(np.asarray(nodes, dtype=np.int64))
            keep[idx[:, 0], idx[:, 1], idx[:, 2]] = True
        return keep

    def remove(self, nodes: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Mask ablating exactly `nodes` (l, p, i)."""
        keep = self._full()
        if len(nodes):
            idx = torch.as_tensor(np.asarray(nodes, dtype=np.int64))
            keep[idx[:, 0], idx[:, 1], idx[:, 2]] = False
        return keep

    def full(self) -> torch.Tensor:
        return self._full()

    def empty(self) -> torch.Tensor:
        return self.keep_only(())

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, masks: Sequence[torch.Tensor], *, top_token: int | None = None,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(m per mask, probability of `top_token` per mask or None in linearized mode)."""
        ms: list[float] = []
        ps: list[float] = []
        starts = range(0, len(masks), self.batch_size)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(masks), desc="ablations", unit="mask", leave=False)
        for start in starts:
            batch = torch.stack(list(masks[start:start + self.batch_size])).to(self.device)
            if self.mode == "real":
                m, p = self._evaluate_real(batch, top_token)
                ps.extend(p)
            else:
                m = self._evaluate_linearized(batch)
            ms.extend(m)
            if bar is not None:
                bar.update(batch.shape[0])
        if bar is not None:
            bar.close()
        return np.asarray(ms, dtype=np.float64), (np.asarray(ps, dtype=np.float64) if self.mode == "real" else None)

    def _metric(self, rows: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.target.token_ids, device=rows.device)
        coefs = torch.tensor(self.target.coefficients, dtype=self.acc, device=rows.device)
        return (rows[:, ids].to(self.acc) * coefs).sum(-1)

    def _evaluate_real(self, keep: torch.Tensor, top_token: int | None) -> tuple[list[float], list[float]]:
        B = keep.shape[0]
        ids = torch.tensor([list(self.target.input_ids)], device=self.device).expand(B, -1)
        t_pos = self.target.target_position
        with torch.no_grad(), neuron_masks(self.model, keep, replacement=self.replacement):
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=self.T - t_pos).logits
        rows = logits[:, 0].to(self.acc)  # [B, V] at t_pos
        m = self._metric(rows)
        if top_token is None:
            p = [float("nan")] * B
        else:
            p = torch.softmax(rows.to(torch.float64), -1)[:, top_token].tolist()
        return m.tolist(), p

    def _evaluate_linearized(self, keep: torch.Tensor) -> list[float]:
        B = keep.shape[0]
        ids = torch.tensor([list(self.target.input_ids)], device=self.device)
        t_pos = self.target.target_position
        with torch.no_grad():
            base = self.model.get_input_embeddings()(ids)
        embeds = base.expand(B, -1, -1).clone().requires_grad_(True)
        arriving: dict[int, torch.Tensor] = {}

        def make_hook(layer_index: int):
            def hook(grad: torch.Tensor) -> torch.Tensor:
                arriving[layer_index] = grad.detach()
                return torch.where(keep[:, layer_index], grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

            return hook

        with torch.enable_grad(), Linearization(self.model, mlp_rule=self.mlp_rule) as lin:
            out = self.model(inputs_embeds=embeds, use_cache=False, logits_to_keep=self.T - t_pos)
            m = self._metric(out.logits[:, 0])
            for layer_index, h in enumerate(lin.neurons):
                if h is None or not h.requires_grad:
                    raise RuntimeError("linearization did not capture the neurons")
                h.register_hook(make_hook(layer_index))
            (g_embed,) = torch.autograd.grad(m.sum(), [embeds])
            lin.release()
        with torch.no_grad():
            value = (embeds.detach().to(self.acc) * g_embed.to(self.acc)).sum((1, 2))
            if self.replacement is not None:
                for layer_index in range(self.n_layers):
                    g = arriving.get(layer_index)
                    if g is None:
                        continue
                    ablated = (~keep[:, layer_index]).to(self.acc)
                    value += (g.to(self.acc) * ablated * self.replacement[layer_index].to(self.acc)).sum((1, 2))
        return value.tolist()


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not len(values):
        return float("nan"), float("nan")
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def random_nodes(
    n: int, *, seed: int, n_layers: int, n_positions: int, n_neurons: int, positions: Sequence[int] | None = None
) -> list[tuple[int, int, int]]:
    """N distinct neurons (l, p, i) drawn uniformly from layers x positions x neurons.

    Positions are 0..n_positions-1, or the given `positions` list (then n_positions is its length).
    """
    if positions is not None:
        positions = list(positions)
        n_positions = len(positions)
    total = n_layers * n_positions * n_neurons
    if n > total:
        raise InvalidArgument(f"cannot draw {n} distinct neurons out of {total}")
    rng = np.random.default_rng(seed)
    flat = rng.choice(total, size=n, replace=False)
    layer, rest = np.divmod(flat, n_positions * n_neurons)
    pos, index = np.divmod(rest, n_neurons)
    if positions is not None:
        pos = np.asarray(positions, dtype=np.int64)[pos]
    return [(int(a), int(b), int(c)) for a, b, c in zip(layer, pos, index)]


def faithfulness_report(
    model: nn.Module,
    tokenizer: Any,
    graph: Graph,
    config: FaithfulnessConfig | None = None,
    *,
    means: torch.Tensor | None = None,
    model_name: str | None = None,
    progress: bool = False,
) -> FaithfulnessReport:
    """Keep-top-N faithfulness, removal effect and random baselines of `graph` (module docstring).

    Raises FailedPrecondition when the graph does not fit the model (tokenization, node ids).
    """
    from circuits_attribution.attributor import RelPAttributor

    cfg = config or FaithfulnessConfig()
    encoder = RelPAttributor(model, tokenizer)
    target = graph_target(graph, encoder)
    n_layers, n_neurons = neuron_shape(model)
    T = len(target.input_ids)
    protected = set(cfg.protect_positions)
    nodes = [n for n in ranked_nodes(graph, n_layers=n_layers, n_neurons=n_neurons, n_positions=T) if n[1] not in protected]
    if not nodes:
        raise FailedPrecondition("graph has no neuron nodes" + (" outside the protected positions" if protected else ""))
    if cfg.ablation == "mean" and means is None:
        means = neuron_means(model, tokenizer, name=model_name or graph.model or None, progress=progress)
    evaluator = AblationEvaluator(model, target, ablation=cfg.ablation, means=means, mode=cfg.mode,
                                  batch_size=cfg.batch_size, mlp_rule=cfg.mlp_rule,
                                  protect_positions=cfg.protect_positions)
    sizes = sorted({min(s, len(nodes)) for s in cfg.sizes} | {len(nodes)})
    traced = [p for p in range(target.target_position + 1) if p not in protected]
    if not traced:
        raise InvalidArgument("every traced position is protected; nothing to ablate")

    with torch.no_grad():
        clean = model(input_ids=torch.tensor([list(target.input_ids)], device=evaluator.device), use_cache=False).logits
    clean_row = clean[0, target.target_position].to(torch.float64)
    top_token = int(clean_row.argmax())

    masks = [evaluator.full(), evaluator.empty()]
    plan: list[tuple[str, int, int]] = []  # (kind, size, seed)
    for size in sizes:
        masks.append(evaluator.keep_only(nodes[:size]))
        plan.append(("keep", size, -1))
        masks.append(evaluator.remove(nodes[:size]))
        plan.append(("remove", size, -1))
        for seed in range(cfg.random_seeds):
            rnd = random_nodes(size, seed=seed, n_layers=n_layers, n_positions=len(traced), n_neurons=n_neurons,
                               positions=traced)
            masks.append(evaluator.keep_only(rnd))
            plan.append(("random_keep", size, seed))
            masks.append(evaluator.remove(rnd))
            plan.append(("random_remove", size, seed))
    m_values, p_values = evaluator.evaluate(masks, top_token=top_token, progress=progress)
    m_full, m_empty = float(m_values[0]), float(m_values[1])
    span = m_full - m_empty
    p_at = (lambda i: float(p_values[i])) if p_values is not None else (lambda i: None)

    results: dict[tuple[str, int], list[tuple[float, float | None]]] = {}
    for offset, (kind, size, _seed) in enumerate(plan, start=2):
        results.setdefault((kind, size), []).append((float(m_values[offset]), p_at(offset)))
    points = []
    for size in sizes:
        (m_keep, p_keep), = results[("keep", size)]
        (m_removed, p_removed), = results[("remove", size)]
        rk = [m for m, _ in results.get(("random_keep", size), [])]
        rr = [m for m, _ in results.get(("random_remove", size), [])]
        rp = [p for _, p in results.get(("random_remove", size), []) if p is not None]
        rkp = [p for _, p in results.get(("random_keep", size), []) if p is not None]
        rk_mean, rk_std = _mean_std(rk)
        rf_mean, rf_std = _mean_std([_ratio(m - m_empty, span) for m in rk])
        re_mean, re_std = _mean_std([_ratio(m_full - m, span) for m in rr])
        rp_mean, rp_std = _mean_std(rp) if rp else (None, None)
        rkp_mean, rkp_std = _mean_std(rkp) if rkp else (None, None)
        points.append(
            CurvePoint(
                size=size, m_keep=m_keep, faithfulness=_ratio(m_keep - m_empty, span),
                random_m_keep_mean=rk_mean, random_m_keep_std=rk_std,
                random_faithfulness_mean=rf_mean, random_faithfulness_std=rf_std,
                m_removed=m_removed, removal_effect=_ratio(m_full - m_removed, span),
                random_removal_effect_mean=re_mean, random_removal_effect_std=re_std,
                p_top_keep=p_keep, random_p_top_keep_mean=rkp_mean, random_p_top_keep_std=rkp_std,
                p_top_removed=p_removed, random_p_top_removed_mean=rp_mean, random_p_top_removed_std=rp_std,
            )
        )
    return FaithfulnessReport(
        graph_id=graph.graph_id, prompt=graph.prompt, model=model_name or graph.model,
        ablation=cfg.ablation, mode=cfg.mode, target_position=target.target_position,
        metric_tokens=tuple(tokenizer.decode([t]) for t in target.token_ids),
        metric_coefficients=target.coefficients, n_graph_nodes=len(nodes),
        m_full=m_full, m_empty=m_empty, graph_metric_value=graph.metadata.metric_value,
        top_token=tokenizer.decode([top_token]), top_token_id=top_token,
        p_top_full=p_at(0), p_top_empty=p_at(1), random_seeds=cfg.random_seeds,
        protect_positions=cfg.protect_positions, points=tuple(points),
    )


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_table(report: FaithfulnessReport) -> str:
    """Plain-text table of the curve (one row per size)."""
    head = (
        f"graph {report.graph_id or '-'}  model {report.model}  ablation={report.ablation}  mode={report.mode}"
        f"{'  protected positions ' + ','.join(map(str, report.protect_positions)) if report.protect_positions else ''}\n"
        f"prompt: {report.prompt!r}  target position {report.target_position}  "
        f"metric: {' '.join(f'{c:+g}*{t!r}' for c, t in zip(report.metric_coefficients, report.metric_tokens))}\n"
        f"m_full={report.m_full:.4f}  m_empty={report.m_empty:.4f}  graph nodes={report.n_graph_nodes}  "
        f"top token {report.top_token!r} p_full={_fmt(report.p_top_full, '.4f')} p_empty={_fmt(report.p_top_empty, '.4f')}\n"
    )
    columns = ["N", "m_keep", "faith", f"rand faith (n={report.random_seeds})", "p_top kept", "rand p_top kept",
               "removal", "rand removal", "p_top removed", "rand p_top removed"]
    rows = [
        [
            str(p.size), _fmt(p.m_keep), _fmt(p.faithfulness),
            f"{_fmt(p.random_faithfulness_mean)}±{_fmt(p.random_faithfulness_std)}",
            _fmt(p.p_top_keep, ".4f"),
            f"{_fmt(p.random_p_top_keep_mean, '.4f')}±{_fmt(p.random_p_top_keep_std, '.4f')}",
            _fmt(p.removal_effect),
            f"{_fmt(p.random_removal_effect_mean)}±{_fmt(p.random_removal_effect_std)}",
            _fmt(p.p_top_removed, ".4f"),
            f"{_fmt(p.random_p_top_removed_mean, '.4f')}±{_fmt(p.random_p_top_removed_std, '.4f')}",
        ]
        for p in report.points
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    legend = (
        "faith = (m_keep - m_empty)/(m_full - m_empty) keeping only the top-N nodes; "
        "removal = (m_full - m_removed)/(m_full - m_empty) ablating the top-N nodes; "
        "p_top = probability of the clean top token"
    )
    return head + "\n".join(lines) + "\n" + legend


def report_warnings(report: FaithfulnessReport) -> list[str]:
    """What a reader of the curve must know when its baseline does not mean "the behaviour removed".

    faith = (m_keep - m_empty) / (m_full - m_empty) reads as "the share of the model's metric the
    kept nodes recover" only when ablating everything (m_empty) lowers the metric. One line each for:
    m_empty >= m_full (the ablation itself does not remove the behaviour, so the ratios change
    meaning or sign) and a negative faithfulness with all graph nodes kept.
    """
    lines: list[str] = []
    how = (f"--ablation {'mean' if report.ablation == 'zero' else 'zero'} or --protect-positions 0 "
           "(the first token carries the largest activations)")
    gap = report.m_full - report.m_empty
    if gap <= 1e-6 * max(1.0, abs(report.m_full)):
        lines.append(
            f"m_empty={report.m_empty:.4f} >= m_full={report.m_full:.4f}: {report.ablation}-ablating every neuron outside "
            "the kept set does not remove the traced behaviour (it "
            + ("raises the metric" if gap < 0 else "leaves the metric unchanged")
            + "), so faith and removal are not shares of the behaviour here (the denominator m_full - m_empty is "
            + ("negative: their signs flip" if gap < 0 else "about zero") + f"); the ablation baseline is off; try {how}")
    full = next((p for p in report.points if p.size >= report.n_graph_nodes), None)
    if full is not None and full.faithfulness is not None and full.faithfulness < 0 and gap > 0:
        lines.append(
            f"keeping all {report.n_graph_nodes} graph nodes gives faith={full.faithfulness:.3f} < 0: with everything "
            f"else {report.ablation}-ablated the metric ends further from m_full than with nothing kept, so the graph's "
            f"nodes do not carry the behaviour under this ablation (interactions with the ablated neurons dominate); try {how}")
    return lines


def plot_report(report: FaithfulnessReport, path: Any) -> None:
    """Write a PNG: faithfulness (keep) and removal effect vs N, graph vs random (mean ± std)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FailedPrecondition("matplotlib is not installed (pip install matplotlib), or skip the plot (--no-plot)") from None

    sizes = [p.size for p in report.points]
    panels = [
        ("faithfulness", "random_faithfulness", "keep top-N: faithfulness", True),
        ("removal_effect", "random_removal_effect", "remove top-N: share of m removed", True),
    ]
    if report.p_top_full is not None:
        panels += [("p_top_keep", "random_p_top_keep", f"keep top-N: p({report.top_token!r})", False),
                   ("p_top_removed", "random_p_top_removed", f"remove top-N: p({report.top_token!r})", False)]
    # Object-oriented Agg figure: no global backend switch, no pyplot state (thread-safe).
    fig = Figure(figsize=(5 * len(panels), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, rkey, title, unit_lines) in zip(axes, panels):
        ax.plot(sizes, [getattr(p, key) for p in report.points], "o-", label="graph top-N")
        mean = np.array([getattr(p, rkey + "_mean") for p in report.points], dtype=float)
        std = np.array([getattr(p, rkey + "_std") for p in report.points], dtype=float)
        ax.plot(sizes, mean, "s--", color="gray", label=f"random (n={report.random_seeds})")
        ax.fill_between(sizes, mean - std, mean + std, color="gray", alpha=0.2)
        if unit_lines:
            ax.axhline(1.0, color="k", lw=0.5)
            ax.axhline(0.0, color="k", lw=0.5)
        else:
            ax.axhline(report.p_top_full, color="k", lw=0.5, ls=":", label="clean")
        ax.set_xscale("log")
        ax.set_xlabel("N nodes")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{report.prompt[:60]!r} ({report.ablation} ablation, {report.mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
