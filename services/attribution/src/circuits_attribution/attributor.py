"""RelP attribution graphs over MLP neurons (relp-spec §B-§D).

`RelPAttributor(model, tokenizer, config).trace(prompt)` returns a `circuits_core.schemas.Graph`:

* nodes: one linearized forward + one backward of the metric ``m = sum_j c_j logit_j`` gives
  ``S^l_{p,i} = h^l_{p,i} * d~m/dh^l_{p,i}`` for every neuron (total effect, §B.3); the selection
  rules of §D.1 pick the graph's neurons;
* edges: one linearized forward in which every MLP output enters the residual stream as a
  detached leaf (the §C.4 "detached-leaf" design, one step after ``down_proj``), then batched
  vector-Jacobian products (``autograd.grad(..., is_grads_batched=True)``) over chunks of targets.
  A gradient at a leaf is the *direct* effect (no path crosses an MLP); a source neuron's
  derivative is ``W_down[:, i] . grad_leaf[p]``, gathered only for the selected sources. Targets
  are logits and selected neurons (read out linearly from the MLP input, same RelP gradient);
  sources are selected neurons and embedding positions. ``raw = h_s * d~h_t/dh_s``; the stored
  weight is the attribution flow ``raw / h_t * RelP_t`` (logit targets: ``c_j * raw``).

Cost per graph: 2 forwards, 1 backward, ``ceil((N_nodes + k) / K)`` batched backwards that only
traverse attention/norm layers below each target. One device->host transfer per chunk.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from circuits_core.edge_table import EdgeTable as GraphEdgeTable
from circuits_core.errors import InvalidArgument
from circuits_core.schemas import EMBEDDING_LAYER, Graph, GraphMetadata, Unit, graph_content_id, slugify

from circuits_attribution.linearize import MLP_RULES, Linearization
from circuits_attribution.linearize import decoder_layers as _decoder_layers

#: Neurons that are active on (nearly) every token, dropped from graphs (relp-spec §D.1).
ALWAYS_ON_NEURONS: dict[str, tuple[tuple[int, int], ...]] = {
    "llama-3.1-8b": (
        (23, 306), (20, 3972), (18, 7417), (16, 1241), (13, 4208), (11, 11321),
        (10, 11570), (9, 4255), (7, 6673), (6, 5866), (5, 7012), (2, 4786),
    ),
}

_MIN_SCORE = 1e-10  # §D.1 step 1: scores below this are numerically zero


def always_on_neurons_for(model_name: str) -> tuple[tuple[int, int], ...]:
    """The always-on neuron list for a model name (case-insensitive substring match), else ()."""
    lowered = model_name.lower()
    for key, neurons in ALWAYS_ON_NEURONS.items():
        if key in lowered:
            return neurons
    return ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RelPConfig:
    """Settings of one RelP trace. Field comments are the CLI help."""

    #: Number of top logits combined into the metric (ignored with target_tokens/contrastive).
    k: int = 5
    #: Explicit target tokens; the metric is the sum of their logits (overrides k).
    target_tokens: tuple[str, ...] = ()
    #: (POS, NEG): the metric is logit(POS) - logit(NEG) (overrides k; excludes target_tokens).
    contrastive: tuple[str, str] | None = None
    #: Position whose logits are traced (default: last token; negative counts from the end).
    target_position: int | None = None
    #: Tokenize the prompt as is, without the chat template.
    raw: bool = False
    #: Partial assistant answer appended after the generation prompt (raw: appended to the prompt).
    answer_prefix: str = ""
    #: Node threshold: keep neurons with |RelP_v| >= tau * |m|.
    tau: float = 0.005
    #: Per-layer pre-filter: only the top this-many |RelP| entries of each layer compete.
    top_k_per_layer: int = 500
    #: Drop the model's known always-on neurons (list keyed by model name; empty for most).
    filter_always_on: bool = True
    #: Explicit always-on list overriding the built-in one (None = by model name).
    always_on_neurons: tuple[tuple[int, int], ...] | None = None
    #: Above this many selected neurons the graph keeps its nodes and logit edges only.
    max_nodes: int = 500
    #: MLP backward rule: relp (half rule), stop_grad_gate, none (plain gradient).
    mlp_rule: str = "relp"
    #: Targets per batched vector-Jacobian product (lowered automatically to fit memory).
    edge_chunk_size: int = 16
    #: Upper bound on the gradient memory one edge chunk may take (bytes; GPU: also free memory).
    edge_memory_budget: int = 2 << 30
    #: Edge semantics: direct (MLPs between source and target blocked; default) or total.
    edge_effect: str = "direct"
    #: Emit direct embedding -> logit edges (token path through attention only).
    embedding_logit_edges: bool = True
    #: Edges with |flow| <= this are dropped.
    edge_threshold: float = 1e-10
    #: Model dtype to trace in (None: keep the model's); e.g. float32, bfloat16, float64.
    dtype: str | None = None
    #: Device to trace on (None: keep the model's); e.g. cpu, cuda.
    device: str | None = None
    #: Model name recorded in graphs and used for the always-on list (None: from the model).
    model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target_tokens, tuple):
            object.__setattr__(self, "target_tokens", tuple(self.target_tokens))
        if self.contrastive is not None:
            object.__setattr__(self, "contrastive", tuple(self.contrastive))
            if len(self.contrastive) != 2:
                raise InvalidArgument("contrastive needs exactly two tokens: POS NEG")
            if self.target_tokens:
                raise InvalidArgument("contrastive and target_tokens cannot be combined; pick one target mode")
        if self.k < 1:
            raise InvalidArgument(f"k must be >= 1, got {self.k}")
        if not (self.tau >= 0 and math.isfinite(self.tau)):
            raise InvalidArgument(f"tau must be a finite number >= 0, got {self.tau}")
        if self.top_k_per_layer < 1:
            raise InvalidArgument(f"top_k_per_layer must be >= 1, got {self.top_k_per_layer}")
        if self.max_nodes < 0:
            raise InvalidArgument(f"max_nodes must be >= 0, got {self.max_nodes}")
        if self.mlp_rule not in MLP_RULES:
            raise InvalidArgument(f"mlp_rule must be one of {', '.join(MLP_RULES)}, got {self.mlp_rule!r}")
        if self.edge_effect not in ("direct", "total"):
            raise InvalidArgument(f"edge_effect must be direct or total, got {self.edge_effect!r}")
        if self.edge_chunk_size < 1:
            raise InvalidArgument(f"edge_chunk_size must be >= 1, got {self.edge_chunk_size}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Metric:
    """m = sum_j coefficients[j] * logit[token_ids[j]] (or logit . direction when given)."""

    token_ids: tuple[int, ...]
    coefficients: tuple[float, ...]
    direction: Any = None  # optional dense [V] tensor; token_ids then name the logit nodes


@dataclass(slots=True, kw_only=True)
class NodeScores:
    """Result of the node pass. Tensors stay on the model's device."""

    input_ids: list[int]
    target_position: int
    metric: Metric
    metric_value: float
    logits: torch.Tensor  # [V] at the target position (accumulation dtype)
    scores: torch.Tensor  # [L, T, F] RelP_v = h * d~m/dh (accumulation dtype)
    activations: torch.Tensor  # [L, T, F] h (model dtype)
    embedding_scores: torch.Tensor  # [T] sum_d e * d~m/de


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """Selected neurons, sorted by |RelP| descending (numpy int64 / float64 arrays)."""

    layers: np.ndarray
    positions: np.ndarray
    indices: np.ndarray
    scores: np.ndarray
    activations: np.ndarray
    nodes_exceeded: bool

    def __len__(self) -> int:
        return int(self.layers.shape[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeTable:
    """Edges as columns. Layers: neurons their layer, embeddings -1, logits ``n_layers`` (sentinel)."""

    src_layer: np.ndarray
    src_index: np.ndarray
    src_position: np.ndarray
    tgt_layer: np.ndarray
    tgt_index: np.ndarray
    tgt_position: np.ndarray
    raw: np.ndarray
    flow: np.ndarray

    def __len__(self) -> int:
        return int(self.raw.shape[0])


@dataclass(slots=True)
class TraceTimings:
    """Wall-clock seconds of the phases of the last trace."""

    nodes_s: float = 0.0
    edges_s: float = 0.0
    total_s: float = 0.0
    edge_chunks: int = 0
    edge_chunk_size: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class RelPAttributor:
    """Builds RelP graphs for a transformers causal LM (Llama 3.x, Qwen3, OLMo-2/3 layouts)."""

    def __init__(self, model: Any, tokenizer: Any, config: RelPConfig | None = None) -> None:
        self.config = config or RelPConfig()
        self.model = model
        self.tokenizer = tokenizer
        if self.config.dtype is not None or self.config.device is not None:
            from circuits_attribution.models import resolve_dtype

            kwargs: dict[str, Any] = {}
            if self.config.dtype is not None:
                kwargs["dtype"] = resolve_dtype(self.config.dtype)
            if self.config.device is not None:
                kwargs["device"] = torch.device(self.config.device)
            self.model.to(**kwargs)
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model_name = self.config.model_name or str(
            getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "model"
        )
        self.n_layers = int(model.config.num_hidden_layers)
        self.last_timings = TraceTimings()
        self._vocab: dict[str, int] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.promote_types(self.dtype, torch.float32)

    def _embed(self, input_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
        return self.model.get_input_embeddings()(ids).detach().requires_grad_(True)  # [1, T, D]

    # ------------------------------------------------------------------ inputs
    def encode_prompt(self, prompt: str, *, raw: bool | None = None, answer_prefix: str | None = None) -> list[int]:
        """Token ids for a prompt: chat template (single user turn + generation prompt) unless raw."""
        raw = self.config.raw if raw is None else raw
        answer_prefix = self.config.answer_prefix if answer_prefix is None else answer_prefix
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgument("prompt is empty")
        tok = self.tokenizer
        if raw:
            text = prompt + (answer_prefix or "")
            ids = list(tok(text, add_special_tokens=True)["input_ids"])
        else:
            if not getattr(tok, "chat_template", None):
                raise InvalidArgument(f"model {self.model_name} has no chat template; trace with raw=True (--raw)")
            messages = [{"role": "user", "content": prompt}]
            if answer_prefix:
                messages.append({"role": "assistant", "content": answer_prefix})
                text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
            else:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            bos = getattr(tok, "bos_token", None)
            add_special = not (bos and text.startswith(bos))
            ids = list(tok(text, add_special_tokens=add_special)["input_ids"])
        if not ids:
            raise InvalidArgument("prompt tokenizes to nothing")
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is not None and len(ids) > int(context):
            raise InvalidArgument(
                f"prompt is {len(ids)} tokens, longer than the model's context of {int(context)} tokens"
            )
        return ids

    def resolve_token(self, text: str) -> int:
        """Vocabulary id of a single-token string (exact vocab entry, one-token encoding, or 'Ġ' + text)."""
        if not isinstance(text, str) or text == "":
            raise InvalidArgument("target token is empty")
        if self._vocab is None:
            self._vocab = dict(self.tokenizer.get_vocab())
        if text in self._vocab:
            return int(self._vocab[text])
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if len(ids) == 1:
            return int(ids[0])
        marked = "Ġ" + text.strip()
        if marked in self._vocab:
            return int(self._vocab[marked])
        pieces = [self.tokenizer.decode([i]) for i in ids]
        raise InvalidArgument(
            f"target token {text!r} is not a single token for {self.model_name}: it splits into {pieces}"
        )

    def build_metric(
        self,
        logits_row: torch.Tensor,
        *,
        k: int,
        target_tokens: Sequence[str] = (),
        contrastive: Sequence[str] | None = None,
        direction: Any = None,
    ) -> Metric:
        """The metric for a target mode (relp-spec §B.2); logits_row: [V]."""
        if direction is not None:
            d = torch.as_tensor(direction, dtype=self.acc_dtype, device=logits_row.device).reshape(-1)
            if d.shape[0] != logits_row.shape[0]:
                raise InvalidArgument(f"direction has {d.shape[0]} entries, the vocabulary has {logits_row.shape[0]}")
            top = torch.topk(d.abs(), min(k, d.shape[0])).indices.tolist()
            return Metric(token_ids=tuple(top), coefficients=tuple(float(d[i]) for i in top), direction=d)
        if contrastive is not None:
            pos, neg = (self.resolve_token(t) for t in contrastive)
            if pos == neg:
                raise InvalidArgument(f"contrastive tokens {contrastive[0]!r} and {contrastive[1]!r} are the same token")
            return Metric(token_ids=(pos, neg), coefficients=(1.0, -1.0))
        if target_tokens:
            ids: list[int] = []
            for text in target_tokens:
                token_id = self.resolve_token(text)
                if token_id not in ids:
                    ids.append(token_id)
            return Metric(token_ids=tuple(ids), coefficients=(1.0,) * len(ids))
        top = torch.topk(logits_row, min(k, logits_row.shape[0])).indices.tolist()
        return Metric(token_ids=tuple(top), coefficients=(1.0,) * len(top))

    def _metric_value(self, logits_row: torch.Tensor, metric: Metric) -> torch.Tensor:
        if metric.direction is not None:
            return (logits_row.to(self.acc_dtype) * metric.direction).sum()
        ids = torch.tensor(metric.token_ids, device=logits_row.device)
        coefs = torch.tensor(metric.coefficients, dtype=self.acc_dtype, device=logits_row.device)
        return (logits_row[ids].to(self.acc_dtype) * coefs).sum()

    # ------------------------------------------------------------------ node pass
    def node_scores(
        self, input_ids: Sequence[int], config: RelPConfig | None = None, *, direction: Any = None
    ) -> NodeScores:
        """One linearized forward + backward: RelP of every neuron and embedding position (§B.3).

        The target mode and position come from `config` (default: the attributor's config);
        `direction` (a dense [V] vector) makes the metric ``logits . direction``.
        """
        cfg = self.config if config is None else config
        T = len(input_ids)
        t_pos = T - 1 if cfg.target_position is None else int(cfg.target_position)
        if t_pos < 0:
            t_pos += T
        if not 0 <= t_pos < T:
            raise InvalidArgument(f"target position {cfg.target_position} is outside the prompt (0..{T - 1})")
        acc = self.acc_dtype
        embeds = self._embed(input_ids)
        with Linearization(self.model, mlp_rule=cfg.mlp_rule) as lin:
            out = self.model(
                inputs_embeds=embeds,
                use_cache=False,
                logits_to_keep=torch.tensor([t_pos], device=self.device),
            )
            logits_row = out.logits[0, -1]  # [V]
            metric = self.build_metric(
                logits_row.detach().to(acc),
                k=cfg.k,
                target_tokens=cfg.target_tokens,
                contrastive=cfg.contrastive,
                direction=direction,
            )
            m = self._metric_value(logits_row, metric)
            neurons = [h for h in lin.neurons]
            if any(h is None for h in neurons):
                raise RuntimeError("linearization did not capture every layer's neurons")
            grads = torch.autograd.grad(m, [*neurons, embeds], allow_unused=True)
            lin.release()
        with torch.no_grad():
            scores = torch.stack(
                [
                    (h[0].to(acc) * g[0].to(acc)) if g is not None else torch.zeros_like(h[0], dtype=acc)
                    for h, g in zip(neurons, grads[:-1])
                ]
            )  # [L, T, F]
            activations = torch.stack([h[0].detach() for h in neurons])  # [L, T, F]
            g_embed = grads[-1]
            embedding_scores = (embeds[0].detach().to(acc) * g_embed[0].to(acc)).sum(-1)  # [T]
        return NodeScores(
            input_ids=list(input_ids),
            target_position=t_pos,
            metric=metric,
            metric_value=float(m.detach()),
            logits=logits_row.detach().to(acc),
            scores=scores,
            activations=activations,
            embedding_scores=embedding_scores,
        )

    # ------------------------------------------------------------------ selection
    def always_on(self) -> tuple[tuple[int, int], ...]:
        if not self.config.filter_always_on:
            return ()
        if self.config.always_on_neurons is not None:
            return tuple(self.config.always_on_neurons)
        return always_on_neurons_for(self.model_name)

    def select_nodes(self, node_scores: NodeScores) -> Selection:
        """relp-spec §D.1: per-layer top-k pre-filter, |S| >= tau|m|, always-on filter, sort, cap."""
        cfg = self.config
        scores = node_scores.scores
        L, T, F = scores.shape
        with torch.no_grad():
            flat = scores.reshape(L, T * F)
            kk = min(cfg.top_k_per_layer, T * F)
            top_abs, top_idx = flat.abs().topk(kk, dim=1)  # [L, kk]
            threshold = cfg.tau * abs(node_scores.metric_value)
            keep = (top_abs >= _MIN_SCORE) & (top_abs >= threshold)
            layer_grid = torch.arange(L, device=scores.device)[:, None].expand(L, kk)
            layers = layer_grid[keep]
            flat_idx = top_idx[keep]
            values = flat.gather(1, top_idx)[keep]
            acts = node_scores.activations.reshape(L, T * F)[layers, flat_idx]
            packed = torch.stack([layers.to(torch.float64), flat_idx.to(torch.float64)], dim=1)
            layers_np, flat_np = packed.cpu().numpy().astype(np.int64).T
            values_np = values.to(torch.float64).cpu().numpy()
            acts_np = acts.to(torch.float64).cpu().numpy()
        positions_np = flat_np // F
        indices_np = flat_np % F
        blocked = self.always_on()
        if blocked and len(layers_np):
            blocked_keys = {int(layer) * (F + 1) + int(neuron) for layer, neuron in blocked if neuron < F}
            keys = layers_np * (F + 1) + indices_np
            ok = ~np.isin(keys, np.fromiter(blocked_keys, dtype=np.int64, count=len(blocked_keys)))
            layers_np, positions_np, indices_np = layers_np[ok], positions_np[ok], indices_np[ok]
            values_np, acts_np = values_np[ok], acts_np[ok]
        order = np.lexsort((indices_np, positions_np, layers_np, -np.abs(values_np)))
        return Selection(
            layers=layers_np[order],
            positions=positions_np[order],
            indices=indices_np[order],
            scores=values_np[order],
            activations=acts_np[order],
            nodes_exceeded=len(order) > cfg.max_nodes,
        )

    # ------------------------------------------------------------------ edge pass
    def _chunk_size(self, T: int, source_layers: int, F: int, D: int) -> int:
        element = torch.finfo(self.dtype).bits // 8
        # A VJP row holds the cotangent of every source layer's MLP output and of the embeddings
        # ([T, D] each), plus transient buffers of one layer's backward (~[T, F] + attention).
        per_target = max(1, T * ((source_layers + 1) * D + 4 * F) * element)
        budget = int(self.config.edge_memory_budget)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = min(budget, int(0.6 * free)) if budget > 0 else int(0.6 * free)
        return max(1, min(self.config.edge_chunk_size, budget // per_target if budget > 0 else self.config.edge_chunk_size))

    def compute_edges(
        self,
        node_scores: NodeScores,
        selection: Selection,
        *,
        neuron_targets: bool = True,
        chunk_size: int | None = None,
        batched: bool = True,
        progress: bool = False,
        sources: Selection | None = None,
    ) -> EdgeTable:
        """Direct-effect edges into every target (logits, then selected neurons) from every source
        (selected neurons, or `sources` when given, plus embedding positions); §C.3-C.4.

        `batched=False` runs one plain `autograd.grad` per target (the reference loop).
        Rows with no valid source contribute nothing; structural zeros are never emitted.
        """
        cfg = self.config
        acc = self.acc_dtype
        device = self.device
        sources = selection if sources is None else sources
        T = len(node_scores.input_ids)
        L = self.n_layers
        t_pos = node_scores.target_position
        metric = node_scores.metric

        # ---- sources: neurons grouped by layer, then embedding positions
        src_layer_np = sources.layers
        src_pos_np = sources.positions
        src_idx_np = sources.indices
        order = np.lexsort((src_idx_np, src_pos_np, src_layer_np))
        src_layer_np, src_pos_np, src_idx_np = src_layer_np[order], src_pos_np[order], src_idx_np[order]
        src_layers_present = sorted(set(int(x) for x in src_layer_np))
        layer_slices: dict[int, slice] = {}
        for layer in src_layers_present:
            lo = int(np.searchsorted(src_layer_np, layer, side="left"))
            hi = int(np.searchsorted(src_layer_np, layer, side="right"))
            layer_slices[layer] = slice(lo, hi)
        n_src = len(src_layer_np)
        src_pos_t = torch.as_tensor(src_pos_np, device=device)
        src_idx_t = torch.as_tensor(src_idx_np, device=device)
        src_act = node_scores.activations[
            torch.as_tensor(src_layer_np, device=device), src_pos_t, src_idx_t
        ].to(acc)  # [N]
        all_src_layer = torch.as_tensor(
            np.concatenate([src_layer_np, np.full(T, EMBEDDING_LAYER)]), device=device
        )  # [N + T]
        all_src_pos = torch.as_tensor(np.concatenate([src_pos_np, np.arange(T)]), device=device)
        input_ids_np = np.asarray(node_scores.input_ids, dtype=np.int64)
        all_src_index_np = np.concatenate([src_idx_np, input_ids_np])
        all_src_layer_np = np.concatenate([src_layer_np, np.full(T, EMBEDDING_LAYER)])
        all_src_pos_np = np.concatenate([src_pos_np, np.arange(T)])

        # ---- targets: logits (layer sentinel L), then selected neurons ordered by layer
        tgt_kind: list[str] = []
        tgt_layer_list: list[int] = []
        tgt_pos_list: list[int] = []
        tgt_idx_list: list[int] = []
        tgt_scale_list: list[float] = []  # flow = raw * scale
        for token_id, coef in zip(metric.token_ids, metric.coefficients):
            tgt_kind.append("logit")
            tgt_layer_list.append(L)
            tgt_pos_list.append(t_pos)
            tgt_idx_list.append(int(token_id))
            tgt_scale_list.append(float(coef))
        if neuron_targets and len(selection):
            t_order = np.lexsort((selection.indices, selection.positions, -selection.layers))
            for j in t_order:
                layer, pos, idx = int(selection.layers[j]), int(selection.positions[j]), int(selection.indices[j])
                act = float(selection.activations[j])
                tgt_kind.append("neuron")
                tgt_layer_list.append(layer)
                tgt_pos_list.append(pos)
                tgt_idx_list.append(idx)
                tgt_scale_list.append(float(selection.scores[j]) / act if act != 0 else 0.0)
        n_tgt = len(tgt_kind)
        if n_tgt == 0:
            return _empty_edge_table()

        embeds = self._embed(node_scores.input_ids)
        D = embeds.shape[-1]
        F = node_scores.activations.shape[-1]
        K = chunk_size or self._chunk_size(T, len(src_layers_present), F, D)
        self.last_timings.edge_chunk_size = K

        cols: list[list[np.ndarray]] = [[] for _ in range(8)]
        direct = cfg.edge_effect == "direct"
        # Sources are read at the MLP outputs: raw_{s->t} = h_s * W_down[:, i_s] . g_t[p_s], where
        # g_t = d~target/d(mlp output). Per layer: down_proj columns of the selected sources [D, n_l].
        mlp_layers = [layer.mlp for layer in _decoder_layers(self.model)]
        down_columns = {
            layer: mlp_layers[layer].down_proj.weight[:, src_idx_t[cols]].to(acc)
            for layer, cols in layer_slices.items()
        }
        with Linearization(self.model, mlp_rule=cfg.mlp_rule, detach_mlp_outputs=direct) as lin:
            out = self.model(
                inputs_embeds=embeds,
                use_cache=False,
                logits_to_keep=torch.tensor([t_pos], device=device),
            )
            logits_row = out.logits[0, -1]  # [V]
            readouts = self._neuron_readouts(lin)
            # Direct effects differentiate w.r.t. the detached MLP-output leaves (no path crosses
            # an MLP), total effects w.r.t. the connected MLP outputs.
            leaves = list(lin.mlp_output_leaves) if direct else list(lin.mlp_outputs)
            tgt_layer_np = np.asarray(tgt_layer_list, dtype=np.int64)
            tgt_idx_np = np.asarray(tgt_idx_list, dtype=np.int64)
            tgt_pos_np = np.asarray(tgt_pos_list, dtype=np.int64)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=n_tgt, desc="edges", unit="target", leave=False)
            start = 0
            while start < n_tgt:
                stop = min(start + K, n_tgt)
                try:
                    raw_chunk = self._edge_chunk(
                        logits_row, readouts, leaves, embeds, src_act, layer_slices, src_pos_t, down_columns, n_src,
                        tgt_kind[start:stop], tgt_layer_list[start:stop], tgt_pos_list[start:stop],
                        tgt_idx_list[start:stop], batched=batched,
                    )  # [k, N + T] (acc dtype, device)
                except torch.OutOfMemoryError:
                    if K == 1:
                        raise
                    K = max(1, K // 2)  # adapt: retry this chunk with half the targets
                    self.last_timings.edge_chunk_size = K
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                tgt_layer_t = torch.as_tensor(tgt_layer_list[start:stop], device=device)
                tgt_pos_t = torch.as_tensor(tgt_pos_list[start:stop], device=device)
                valid = (all_src_layer[None, :] < tgt_layer_t[:, None]) & (all_src_pos[None, :] <= tgt_pos_t[:, None])
                if not cfg.embedding_logit_edges:
                    is_logit = tgt_layer_t == L
                    valid &= ~(is_logit[:, None] & (all_src_layer[None, :] == EMBEDDING_LAYER))
                scale = torch.tensor(tgt_scale_list[start:stop], dtype=acc, device=device)
                flow = raw_chunk * scale[:, None]
                valid &= (raw_chunk != 0) & (flow.abs() > cfg.edge_threshold)
                rows, srcs = valid.nonzero(as_tuple=True)
                # one device->host transfer per chunk
                packed = torch.stack(
                    [rows.to(torch.float64), srcs.to(torch.float64),
                     raw_chunk[rows, srcs].to(torch.float64), flow[rows, srcs].to(torch.float64)]
                ).cpu().numpy()
                r = packed[0].astype(np.int64) + start
                s = packed[1].astype(np.int64)
                cols[0].append(all_src_layer_np[s])
                cols[1].append(all_src_index_np[s])
                cols[2].append(all_src_pos_np[s])
                cols[3].append(tgt_layer_np[r])
                cols[4].append(tgt_idx_np[r])
                cols[5].append(tgt_pos_np[r])
                cols[6].append(packed[2])
                cols[7].append(packed[3])
                self.last_timings.edge_chunks += 1
                if bar is not None:
                    bar.update(stop - start)
                start = stop
            if bar is not None:
                bar.close()
            lin.release()
        del out, logits_row, leaves, readouts
        return EdgeTable(
            src_layer=np.concatenate(cols[0]), src_index=np.concatenate(cols[1]), src_position=np.concatenate(cols[2]),
            tgt_layer=np.concatenate(cols[3]), tgt_index=np.concatenate(cols[4]), tgt_position=np.concatenate(cols[5]),
            raw=np.concatenate(cols[6]), flow=np.concatenate(cols[7]),
        )

    def _edge_chunk(
        self,
        logits_row: torch.Tensor,
        readouts: list[Any],
        leaves: list[torch.Tensor],
        embeds: torch.Tensor,
        src_act: torch.Tensor,
        layer_slices: dict[int, slice],
        src_pos_t: torch.Tensor,
        down_columns: dict[int, torch.Tensor],
        n_src: int,
        kinds: list[str],
        layers: list[int],
        positions: list[int],
        indices: list[int],
        *,
        batched: bool,
    ) -> torch.Tensor:
        """Raw direct edges [k, N + T] for k targets: h_s * d~target/dh_s, then e_p . d~target/de_p."""
        acc = self.acc_dtype
        device = embeds.device
        k = len(kinds)
        # Target scalars, gathered per layer in one indexing op each.
        pieces: list[torch.Tensor] = []
        run_start = 0
        while run_start < k:
            run_end = run_start
            while run_end < k and kinds[run_end] == kinds[run_start] and layers[run_end] == layers[run_start]:
                run_end += 1
            idx = torch.as_tensor(indices[run_start:run_end], device=device)
            if kinds[run_start] == "logit":
                pieces.append(logits_row[idx])
            else:
                pos = torch.as_tensor(positions[run_start:run_end], device=device)
                pieces.append(readouts[layers[run_start]](pos, idx))
            run_start = run_end
        targets = torch.cat([piece.to(acc) for piece in pieces])  # [k]
        max_layer = max(layers)
        used_layers = [layer for layer in layer_slices if layer < max_layer]
        inputs = [leaves[layer] for layer in used_layers] + [embeds]
        raw = torch.zeros((k, n_src + embeds.shape[1]), dtype=acc, device=device)
        if batched:
            eye = torch.eye(k, dtype=targets.dtype, device=device)
            grads = torch.autograd.grad(
                targets, inputs, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
            )  # each [k, 1, T, D]
            self._gather_into(raw, grads, used_layers, layer_slices, src_act, src_pos_t, down_columns, embeds, n_src, rows=None)
            del grads
        else:
            for row in range(k):
                grads = torch.autograd.grad(targets[row], inputs, retain_graph=True, allow_unused=True)
                grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
                self._gather_into(raw, grads, used_layers, layer_slices, src_act, src_pos_t, down_columns, embeds, n_src, rows=row)
                del grads
        return raw

    def _neuron_readouts(self, lin: Linearization) -> list[Any]:
        """Per layer, a function (pos, idx) -> target scalars [n] with the neurons' RelP gradient.

        With a linear rule, h~_{p,i} = coef_g[p,i] * (W_gate[i] . v_p) + coef_z[p,i] * (W_up[i] . v_p)
        is linear in the MLP input v with the same gradient as h, so the backward of a target skips
        the dense [F, D] gate/up products (it only touches row i). `mlp_rule="none"` reads h itself.
        """
        acc = self.acc_dtype
        readouts: list[Any] = []
        for layer_index, layer in enumerate(lin.layers):
            coefficients = lin.neuron_coefficients[layer_index]
            v = lin.mlp_inputs[layer_index]
            if coefficients is None or v is None:
                h = lin.neurons[layer_index]
                readouts.append(lambda pos, idx, h=h: h[0, pos, idx])
                continue
            coef_g, coef_z = coefficients
            mlp = layer.mlp

            def readout(pos, idx, v=v, coef_g=coef_g, coef_z=coef_z, mlp=mlp):
                rows = v[0, pos, :].to(acc)  # [n, D]
                value = coef_z[0, pos, idx].to(acc) * (rows * mlp.up_proj.weight[idx].to(acc)).sum(-1)
                if coef_g is not None:
                    value = value + coef_g[0, pos, idx].to(acc) * (rows * mlp.gate_proj.weight[idx].to(acc)).sum(-1)
                return value

            readouts.append(readout)
        return readouts

    @staticmethod
    def _gather_into(
        raw: torch.Tensor,
        grads: Sequence[torch.Tensor | None],
        used_layers: list[int],
        layer_slices: dict[int, slice],
        src_act: torch.Tensor,
        src_pos_t: torch.Tensor,
        down_columns: dict[int, torch.Tensor],
        embeds: torch.Tensor,
        n_src: int,
        rows: int | None,
    ) -> None:
        acc = raw.dtype
        target_rows = slice(None) if rows is None else slice(rows, rows + 1)
        for grad, layer in zip(grads[:-1], used_layers):
            if grad is None:
                continue
            cols = layer_slices[layer]
            picked = grad[:, 0, src_pos_t[cols], :].to(acc)  # [k, n_l, D]: cotangent at each source's position
            through_down = torch.einsum("knd,dn->kn", picked, down_columns[layer])  # d~target/dh_s
            raw[target_rows, cols] = through_down * src_act[cols]
        g_embed = grads[-1]
        if g_embed is not None:
            raw[target_rows, n_src:] = (g_embed[:, 0].to(acc) * embeds[0].detach().to(acc)).sum(-1)  # [k, T]

    # ------------------------------------------------------------------ trace
    def trace(
        self,
        prompt: str,
        *,
        target_tokens: Sequence[str] | None = None,
        contrastive: Sequence[str] | None = None,
        target_position: int | None = None,
        k: int | None = None,
        raw: bool | None = None,
        answer_prefix: str | None = None,
        direction: Any = None,
        compute_edges: bool = True,
        progress: bool = False,
        slug: str | None = None,
    ) -> Graph:
        """Trace one prompt into a Graph (nodes, embeddings, logits and direct-effect edges).

        Per-call arguments override the config's target settings. Raises InvalidArgument for bad
        input (empty prompt, multi-token targets, conflicting modes, too-long prompt).
        """
        cfg = self.config
        if target_tokens is not None or contrastive is not None:
            # A target mode given per call replaces the config's mode (RelPConfig validates it).
            modes = {
                "target_tokens": tuple(target_tokens or ()),
                "contrastive": tuple(contrastive) if contrastive is not None else None,
            }
        else:
            modes = {"target_tokens": cfg.target_tokens, "contrastive": cfg.contrastive}
        effective = dataclasses.replace(
            cfg,
            **modes,
            target_position=cfg.target_position if target_position is None else target_position,
            k=cfg.k if k is None else k,
            raw=cfg.raw if raw is None else raw,
            answer_prefix=cfg.answer_prefix if answer_prefix is None else answer_prefix,
        )
        self.last_timings = TraceTimings()
        started = time.perf_counter()
        input_ids = self.encode_prompt(prompt, raw=effective.raw, answer_prefix=effective.answer_prefix)
        node_scores = self.node_scores(input_ids, effective, direction=direction)
        selection = self.select_nodes(node_scores)
        nodes_done = time.perf_counter()
        self.last_timings.nodes_s = nodes_done - started
        if compute_edges:
            edges = self.compute_edges(
                node_scores, selection, neuron_targets=not selection.nodes_exceeded, progress=progress
            )
        else:
            edges = _empty_edge_table()
        self.last_timings.edges_s = time.perf_counter() - nodes_done
        graph = self._build_graph(prompt, effective, node_scores, selection, edges, slug=slug, direction=direction)
        self.last_timings.total_s = time.perf_counter() - started
        return graph

    def settings_record(self, cfg: RelPConfig) -> dict[str, Any]:
        """The settings that determine a graph's content (hashed into graph_id)."""
        return {
            "method": "relp",
            "edges": cfg.edge_effect,
            "k": cfg.k,
            "target_tokens": list(cfg.target_tokens),
            "contrastive": list(cfg.contrastive) if cfg.contrastive else None,
            "target_position": cfg.target_position,
            "raw": cfg.raw,
            "answer_prefix": cfg.answer_prefix,
            "tau": cfg.tau,
            "top_k_per_layer": cfg.top_k_per_layer,
            "filter_always_on": cfg.filter_always_on,
            "max_nodes": cfg.max_nodes,
            "mlp_rule": cfg.mlp_rule,
            "embedding_logit_edges": cfg.embedding_logit_edges,
            "edge_threshold": cfg.edge_threshold,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def _build_graph(
        self,
        prompt: str,
        cfg: RelPConfig,
        node_scores: NodeScores,
        selection: Selection,
        edges: EdgeTable,
        *,
        slug: str | None,
        direction: Any,
    ) -> Graph:
        tok = self.tokenizer
        ids = node_scores.input_ids
        prompt_tokens = tuple(tok.decode([i]) for i in ids)
        t_pos = node_scores.target_position
        logit_layer = int(selection.layers.max()) + 1 if len(selection) else self.n_layers
        probs = torch.softmax(node_scores.logits.to(torch.float64), dim=-1)
        metric = node_scores.metric
        logit_ids = torch.tensor(metric.token_ids, device=probs.device)
        logit_vals = node_scores.logits[logit_ids].to(torch.float64).cpu().tolist()
        logit_probs = probs[logit_ids].cpu().tolist()
        embedding_scores = node_scores.embedding_scores.to(torch.float64).cpu().tolist()

        units: list[Unit] = [
            Unit(
                layer=int(layer), index=int(index), position=int(pos), kind="neuron",
                activation=float(act), attribution=float(score), token=prompt_tokens[int(pos)],
            )
            for layer, index, pos, act, score in zip(
                selection.layers, selection.indices, selection.positions, selection.activations, selection.scores
            )
        ]
        units += [
            Unit(layer=EMBEDDING_LAYER, index=int(token_id), position=p, kind="embedding",
                 activation=1.0, attribution=float(embedding_scores[p]), token=prompt_tokens[p])
            for p, token_id in enumerate(ids)
        ]
        units += [
            Unit(layer=logit_layer, index=int(token_id), position=t_pos, kind="logit",
                 attribution=float(coef) * float(value), probability=float(prob), token=tok.decode([int(token_id)]))
            for token_id, coef, value, prob in zip(metric.token_ids, metric.coefficients, logit_vals, logit_probs)
        ]
        # The engine's columns go into the graph as they are; only the logit sentinel layer changes.
        edge_table = GraphEdgeTable(
            src_layer=edges.src_layer, src_index=edges.src_index, src_position=edges.src_position,
            tgt_layer=np.where(edges.tgt_layer == self.n_layers, logit_layer, edges.tgt_layer),
            tgt_index=edges.tgt_index, tgt_position=edges.tgt_position, weight=edges.flow, raw_weight=edges.raw,
        )  # fmt: skip
        settings = self.settings_record(cfg)
        if direction is not None:
            settings["direction_sha"] = _tensor_digest(metric.direction)
        graph_id = graph_content_id(model=self.model_name, prompt=prompt, settings=settings)
        generation_settings = {
            **{k: v for k, v in settings.items() if v is not None},
            "n_selected_nodes": len(selection),
            "metric_tokens": [int(t) for t in metric.token_ids],
            "metric_coefficients": [float(c) for c in metric.coefficients],
        }
        metadata = GraphMetadata(
            slug=slug or ("relp-" + slugify(prompt)),
            scan=self.model_name,
            target_position=t_pos,
            node_threshold=cfg.tau,
            metric_value=node_scores.metric_value,
            nodes_exceeded=selection.nodes_exceeded,
            max_n_logits=len(metric.token_ids),
            create_time_ms=int(time.time() * 1000),
            extra={"generation_settings": generation_settings},
        )
        return Graph(
            units=tuple(units), edges=edge_table, prompt=prompt, prompt_tokens=prompt_tokens,
            model=self.model_name, graph_id=graph_id, metadata=metadata,
        )


def _empty_edge_table() -> EdgeTable:
    empty_i = np.zeros(0, dtype=np.int64)
    empty_f = np.zeros(0, dtype=np.float64)
    return EdgeTable(
        src_layer=empty_i, src_index=empty_i, src_position=empty_i, tgt_layer=empty_i,
        tgt_index=empty_i, tgt_position=empty_i, raw=empty_f, flow=empty_f,
    )


def _tensor_digest(tensor: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.detach().to(torch.float64).cpu().numpy().tobytes()).hexdigest()[:16]
