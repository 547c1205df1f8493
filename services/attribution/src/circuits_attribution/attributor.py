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

Batches (``trace_many``): B prompts run left-padded in one ``[B, T]`` forward per pass (rows do not
interact: an attention mask hides pads and position ids restart at each row's first token). The
node pass differentiates ``sum_b m_b`` once, which gives every row its own gradient; an edge chunk's
cotangent ``j`` carries target ``j`` of *every* prompt (one per row), so ``K`` vector-Jacobian
products yield ``K`` targets of each of the B prompts. Each graph equals the prompt's single trace
up to the rounding of the batched kernels (identical to ~1e-12 in float64).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from circuits_core.activations import ActivationRequest, ActivationResult
from circuits_core.edge_table import EdgeTable as GraphEdgeTable
from circuits_core.errors import Cancelled, CircuitsError, InvalidArgument, ResourceExhausted
from circuits_core.interventions import InterventionRequest, InterventionResult
from circuits_core.memory import PATTERN_STORAGE, ModelShape, TracePlan, parse_size, plan_trace
from circuits_core.model_registry import PromptFormChoice, choose_prompt_form
from circuits_core.patching import PatchRequest, PatchResult
from circuits_core.schemas import EMBEDDING_LAYER, Graph, GraphMetadata, Unit, graph_content_id, slugify
from circuits_core.tracing import ModelInfo, TraceRequest, TraceSettings

from circuits_attribution.linearize import MLP_RULES, Linearization, frozen_mlp_coefficients
from circuits_attribution.linearize import decoder_layers as _decoder_layers
from circuits_attribution.placement import module_device, module_weight, return_freed_host_memory
from circuits_attribution.targets import resolve_target, resolve_targets, target_notes

#: Edge-chunk memory of a batch's edge pass when no memory budget is set (bytes).
_BATCH_EDGE_BUDGET = 2 << 30

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
class RelPConfig(TraceSettings):
    """Engine settings of a RelPAttributor.

    The per-request settings (k, target_tokens, contrastive, target_position, raw, answer_prefix,
    tau, max_nodes) are inherited from :class:`~circuits_core.tracing.TraceSettings`, their one
    home; here they are the defaults of ``trace(prompt)``. A :class:`TraceRequest` carries its own.
    """

    #: Per-layer pre-filter: only the top this-many |RelP| entries of each layer compete.
    top_k_per_layer: int = 500
    #: Drop the model's known always-on neurons (list keyed by model name; empty for most).
    filter_always_on: bool = True
    #: Explicit always-on list overriding the built-in one (None = by model name).
    always_on_neurons: tuple[tuple[int, int], ...] | None = None
    #: MLP backward rule: relp (half rule), stop_grad_gate, none (plain gradient).
    mlp_rule: str = "relp"
    #: Targets per batched vector-Jacobian product (lowered automatically to fit memory).
    edge_chunk_size: int = 16
    #: Working memory one trace may use beyond the weights, per device (bytes, or text such as 4GiB); the engine then keeps attention patterns in the model dtype or recomputes them per layer and sizes edge chunks to fit (docs/memory.md). None: no limit (on a GPU: its free memory).
    memory_budget: int | str | None = None
    #: How frozen attention patterns are kept: auto (from the memory budget), full, model (model dtype) or recompute (per layer, in blocks of query rows).
    pattern_storage: str = "auto"
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
    #: Show a progress bar over the edge targets of each trace.
    progress: bool = False

    def __post_init__(self) -> None:
        # dataclass(slots=True) rebuilds the class, so zero-argument super() is not available here.
        TraceSettings.__post_init__(self)
        if self.top_k_per_layer < 1:
            raise InvalidArgument(f"top_k_per_layer must be >= 1, got {self.top_k_per_layer}")
        if self.mlp_rule not in MLP_RULES:
            raise InvalidArgument(f"mlp_rule must be one of {', '.join(MLP_RULES)}, got {self.mlp_rule!r}")
        if self.edge_effect not in ("direct", "total"):
            raise InvalidArgument(f"edge_effect must be direct or total, got {self.edge_effect!r}")
        if self.edge_chunk_size < 1:
            raise InvalidArgument(f"edge_chunk_size must be >= 1, got {self.edge_chunk_size}")
        if self.memory_budget is not None:
            budget = parse_size(self.memory_budget, what="memory_budget")
            if budget <= 0:
                raise InvalidArgument(f"memory_budget must be > 0, got {self.memory_budget!r}")
            object.__setattr__(self, "memory_budget", budget)
        if self.pattern_storage != "auto" and self.pattern_storage not in PATTERN_STORAGE:
            raise InvalidArgument(
                f"pattern_storage must be auto or one of {', '.join(PATTERN_STORAGE)}, got {self.pattern_storage!r}"
            )


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
    scores: torch.Tensor | None  # [L, T, F] RelP_v = h * d~m/dh (accumulation dtype); None once dropped
    activations: torch.Tensor | None  # [L, T, F] h (model dtype); None once dropped
    embedding_scores: torch.Tensor  # [T] sum_d e * d~m/de


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """Selected neurons, sorted by |RelP| descending (numpy int64 / float64 arrays)."""

    layers: np.ndarray
    positions: np.ndarray
    indices: np.ndarray
    scores: np.ndarray
    activations: np.ndarray
    #: More neurons passed the threshold than max_nodes and over_max_nodes=skip_edges: neuron edges are skipped.
    nodes_exceeded: bool
    #: Neurons that passed the threshold (before pruning to max_nodes).
    n_candidates: int = 0
    #: Neurons dropped by over_max_nodes=prune (the least influential by |RelP|).
    pruned: int = 0

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
    """Wall-clock seconds of the phases of the last trace (or batch of traces)."""

    nodes_s: float = 0.0
    edges_s: float = 0.0
    total_s: float = 0.0
    edge_chunks: int = 0
    edge_chunk_size: int = 0
    #: The memory plan the trace ran with (pattern storage, chunk size, estimated peak).
    plan: TracePlan | None = None
    #: Prompts traced together in the last call (1 for ``trace``).
    batch_size: int = 0
    extra: dict[str, float] = field(default_factory=dict)


#: Units built between two stop checks while a graph is built.
_UNITS_PER_STOP_CHECK = 1 << 14


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("trace stopped on request")


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptBatch:
    """Token sequences left-padded into one ``[B, T]`` forward whose rows do not interact.

    Row ``b``'s prompt position ``p`` is batch position ``offsets[b] + p``. When a row is padded,
    ``attention_mask`` is an additive ``[B, 1, T, T]`` mask (causal; pads hidden from real tokens; a
    pad query sees only itself, so no softmax row is empty and no NaN reaches a real row) and
    ``position_ids`` restart at 0 on each row's first real token, so every real token sees exactly
    what it sees alone. Without padding both are None and the model builds its usual causal mask.
    """

    input_ids: torch.Tensor  # [B, T]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    attention_mask: torch.Tensor | None  # [B, 1, T, T] additive, model dtype
    position_ids: torch.Tensor | None  # [B, T]

    def __len__(self) -> int:
        return len(self.lengths)

    @staticmethod
    def build(
        sequences: Sequence[Sequence[int]], *, pad_id: int, dtype: torch.dtype, device: torch.device
    ) -> PromptBatch:
        lengths = tuple(len(seq) for seq in sequences)
        T = max(lengths)
        offsets = tuple(T - n for n in lengths)
        rows = [[pad_id] * offset + list(seq) for offset, seq in zip(offsets, sequences)]
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)
        if not any(offsets):
            return PromptBatch(input_ids=input_ids, offsets=offsets, lengths=lengths, attention_mask=None, position_ids=None)
        real = torch.arange(T, device=device)[None, :] >= torch.tensor(offsets, device=device)[:, None]  # [B, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        itself = torch.eye(T, dtype=torch.bool, device=device)
        allowed = causal[None] & (real[:, None, :] | itself[None])  # [B, Tq, Tk]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        return PromptBatch(
            input_ids=input_ids, offsets=offsets, lengths=lengths, attention_mask=mask[:, None], position_ids=positions
        )

    def model_inputs(self) -> dict[str, Any]:
        """The mask and position ids to pass to the model (none when no row is padded)."""
        if self.attention_mask is None:
            return {}
        return {"attention_mask": self.attention_mask, "position_ids": self.position_ids}


@dataclass(frozen=True, slots=True, kw_only=True)
class _PromptPlan:
    """One prompt checked and ready for the batched passes: tokens, target position and, unless the
    metric is the top k of the traced logits, its metric (target tokens resolved before any forward)."""

    settings: TraceSettings
    input_ids: tuple[int, ...]
    target_position: int
    metric: Metric | None


class RelPAttributor:
    """Builds RelP graphs for a transformers causal LM (Llama 3.x, Qwen3, OLMo-2/3 layouts).

    It is the attribution service's engine (``circuits_attribution.service.AttributionEngine``) and
    the in-process :class:`~circuits_core.capabilities.Tracer` and ``Intervener`` of the app.
    """

    #: Linearization patches only this engine's model instance, so replicas (and other models) in
    #: one process trace at the same time.
    replicas_trace_concurrently = True

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
        """Where inputs go and results are gathered: the input embeddings' device (with a device
        map, the layers may live elsewhere; see :mod:`circuits_attribution.placement`)."""
        return module_device(self.model.get_input_embeddings())

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
    def prompt_form(self, raw: bool | None = None) -> PromptFormChoice:
        """The prompt form a trace with this ``raw`` setting uses (None: the configured one, else the
        model's own form; :mod:`circuits_core.model_registry`)."""
        raw = self.config.raw if raw is None else raw
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        return choose_prompt_form(self.model_name, raw, has_chat_template=has_template)

    def encode_prompt(self, prompt: str, *, raw: bool | None = None, answer_prefix: str | None = None) -> list[int]:
        """Token ids for a prompt: chat template (single user turn + generation prompt) or the prompt
        as is, by :meth:`prompt_form` (``raw`` None: the configured form, else the model's own)."""
        raw = self.prompt_form(raw).raw
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
        """Vocabulary id traced for a target string (:func:`circuits_attribution.targets.resolve_target`:
        the token itself, or the first token of a multi-token string)."""
        if self._vocab is None:
            self._vocab = dict(self.tokenizer.get_vocab())
        found = resolve_target(self.tokenizer, text, vocab=self._vocab)
        if isinstance(found, str):
            raise InvalidArgument(f"target token {text!r} {found} for {self.model_name}")
        return found.token_id

    def resolve_single_token(self, text: str) -> int:
        """Vocabulary id of a string that is one token; a multi-token string raises InvalidArgument
        (for metrics that report no "first token of" note, e.g. activation patching)."""
        if self._vocab is None:
            self._vocab = dict(self.tokenizer.get_vocab())
        found = resolve_target(self.tokenizer, text, vocab=self._vocab)
        if isinstance(found, str):
            raise InvalidArgument(f"target token {text!r} {found} for {self.model_name}")
        if found.multi_token:
            raise InvalidArgument(f"target token {text!r} is not a single token for {self.model_name}: it splits into "
                                  f"{list(found.pieces)}")
        return found.token_id

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
        fixed = self._fixed_metric(
            k=k, target_tokens=target_tokens, contrastive=contrastive, direction=direction, vocab=logits_row.shape[0]
        )
        return fixed if fixed is not None else self._top_k_metric(logits_row, k)

    def vocab_size(self) -> int:
        """Number of logits the model produces."""
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is not None:
            return int(weight.shape[0])
        return int(self.model.config.vocab_size)

    def _fixed_metric(
        self,
        *,
        k: int,
        target_tokens: Sequence[str] = (),
        contrastive: Sequence[str] | None = None,
        direction: Any = None,
        vocab: int,
    ) -> Metric | None:
        """The metric when it does not depend on the logits (direction, contrastive or target
        tokens), else None after checking that the top ``k`` exist. InvalidArgument for bad input."""
        if k > vocab:
            raise InvalidArgument(f"k={k} is larger than the vocabulary of {self.model_name} ({vocab} tokens)")
        if direction is not None:
            d = torch.as_tensor(direction, dtype=self.acc_dtype, device=self.device).reshape(-1)
            if d.shape[0] != vocab:
                raise InvalidArgument(f"direction has {d.shape[0]} entries, the vocabulary has {vocab}")
            top = torch.topk(d.abs(), k).indices.tolist()
            return Metric(token_ids=tuple(top), coefficients=tuple(float(d[i]) for i in top), direction=d)
        if contrastive is not None or target_tokens:
            settings = TraceSettings(target_tokens=tuple(target_tokens), contrastive=contrastive)
            resolved = resolve_targets(self.tokenizer, settings, model_name=self.model_name)
            if contrastive is not None:
                pos, neg = resolved["contrastive"]
                return Metric(token_ids=(pos.token_id, neg.token_id), coefficients=(1.0, -1.0))
            ids: list[int] = []
            for target in resolved["target_tokens"]:
                if target.token_id not in ids:
                    ids.append(target.token_id)
            return Metric(token_ids=tuple(ids), coefficients=(1.0,) * len(ids))
        return None

    @staticmethod
    def _top_k_metric(logits_row: torch.Tensor, k: int) -> Metric:
        top = torch.topk(logits_row, min(k, logits_row.shape[0])).indices.tolist()
        return Metric(token_ids=tuple(top), coefficients=(1.0,) * len(top))

    def _metric_value(self, logits_row: torch.Tensor, metric: Metric) -> torch.Tensor:
        if metric.direction is not None:
            return (logits_row.to(self.acc_dtype) * metric.direction).sum()
        ids = torch.tensor(metric.token_ids, device=logits_row.device)
        coefs = torch.tensor(metric.coefficients, dtype=self.acc_dtype, device=logits_row.device)
        return (logits_row[ids].to(self.acc_dtype) * coefs).sum()

    # ------------------------------------------------------------------ batches
    def plan(self, input_ids: Sequence[int], settings: TraceSettings | None = None, *, direction: Any = None) -> _PromptPlan:
        """Check one prompt's tokens and settings before any forward (InvalidArgument when they
        cannot be traced: target position outside the prompt, k over the vocabulary, multi-token
        targets, a direction of the wrong size)."""
        cfg = self.config if settings is None else settings
        T = len(input_ids)
        if T == 0:
            raise InvalidArgument("prompt tokenizes to nothing")
        t_pos = T - 1 if cfg.target_position is None else int(cfg.target_position)
        if t_pos < 0:
            t_pos += T
        if not 0 <= t_pos < T:
            raise InvalidArgument(f"target position {cfg.target_position} is outside the prompt (0..{T - 1})")
        metric = self._fixed_metric(
            k=cfg.k, target_tokens=cfg.target_tokens, contrastive=cfg.contrastive, direction=direction,
            vocab=self.vocab_size(),
        )
        return _PromptPlan(settings=cfg, input_ids=tuple(int(i) for i in input_ids), target_position=t_pos, metric=metric)

    def prompt_batch(self, sequences: Sequence[Sequence[int]]) -> PromptBatch:
        """``sequences`` left-padded into one batch for this engine's model."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        return PromptBatch.build(sequences, pad_id=int(pad or 0), dtype=self.dtype, device=self.device)

    def pads_batches(self) -> bool:
        """Whether prompts of different lengths can share a batch: the attention implementation must
        take the 4-D additive mask (eager, sdpa); others trace such prompts one by one."""
        key = getattr(self.model.config, "_attn_implementation", None) or "eager"
        return key in ("eager", "sdpa")

    # ------------------------------------------------------------------ node pass
    def node_scores(
        self, input_ids: Sequence[int], settings: TraceSettings | None = None, *, direction: Any = None
    ) -> NodeScores:
        """One linearized forward + backward: RelP of every neuron and embedding position (§B.3).

        The target mode and position come from `settings` (a TraceRequest, or the attributor's
        config by default); `direction` (a dense [V] vector) makes the metric ``logits . direction``.
        """
        return self.node_scores_batch([self.plan(input_ids, settings, direction=direction)])[0]

    def node_scores_batch(
        self, plans: Sequence[_PromptPlan], *, should_stop: Callable[[], bool] | None = None
    ) -> list[NodeScores]:
        """The node pass of several prompts in one left-padded forward + one backward of
        ``sum_b m_b`` (rows do not interact, so row b's gradient is its own metric's).

        One prompt takes the memory-lean pass (:meth:`_node_scores_one`); a batch keeps every
        layer's neurons until the backward, with attention patterns kept as the memory plan says."""
        if len(plans) == 1:
            return [self._node_scores_one(plans[0], should_stop=should_stop)]
        acc = self.acc_dtype
        batch = self.prompt_batch([plan.input_ids for plan in plans])
        positions = [offset + plan.target_position for offset, plan in zip(batch.offsets, plans)]
        keep = sorted(set(positions))
        embeds = self.model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)  # [B, T, D]
        memory = self.memory_plan(int(batch.input_ids.shape[1]) * len(plans))
        self.last_timings.plan = memory
        with Linearization(
            self.model, mlp_rule=self.config.mlp_rule, should_stop=should_stop, pattern_storage=memory.node_patterns,
            pattern_block=memory.pattern_block or None,
        ) as lin:
            out = self.model(
                inputs_embeds=embeds,
                use_cache=False,
                logits_to_keep=torch.tensor(keep, device=self.device),
                **batch.model_inputs(),
            )
            logits_rows = [out.logits[row, keep.index(pos)] for row, pos in enumerate(positions)]  # [V] each
            metrics = [
                plan.metric if plan.metric is not None else self._top_k_metric(logits_row.detach().to(acc), plan.settings.k)
                for plan, logits_row in zip(plans, logits_rows)
            ]
            values = [self._metric_value(logits_row, metric) for logits_row, metric in zip(logits_rows, metrics)]
            total = values[0] if len(values) == 1 else torch.stack(values).sum()
            neurons = [h for h in lin.neurons]
            if any(h is None for h in neurons):
                raise RuntimeError("linearization did not capture every layer's neurons")
            lin.cone.end = max(positions) + 1  # nothing after the latest target position feeds a metric
            grads = torch.autograd.grad(total, [*neurons, embeds], allow_unused=True)
            lin.release()
        results: list[NodeScores] = []
        with torch.no_grad():
            for row, (plan, metric, value, logits_row) in enumerate(zip(plans, metrics, values, logits_rows)):
                off = batch.offsets[row]
                scores = torch.stack(
                    [
                        (h[row, off:].to(acc) * g[row, off:].to(acc)) if g is not None
                        else torch.zeros_like(h[row, off:], dtype=acc)
                        for h, g in zip(neurons, grads[:-1])
                    ]
                )  # [L, T_b, F]
                activations = torch.stack([h[row, off:].detach() for h in neurons])  # [L, T_b, F]
                g_embed = grads[-1]
                embedding_scores = (embeds[row, off:].detach().to(acc) * g_embed[row, off:].to(acc)).sum(-1)  # [T_b]
                results.append(
                    NodeScores(
                        input_ids=list(plan.input_ids),
                        target_position=plan.target_position,
                        metric=metric,
                        metric_value=float(value.detach()),
                        logits=logits_row.detach().to(acc),
                        scores=scores,
                        activations=activations,
                        embedding_scores=embedding_scores,
                    )
                )
        return results

    def _node_scores_one(self, plan: _PromptPlan, *, should_stop: Callable[[], bool] | None = None) -> NodeScores:
        """The node pass of one prompt within the memory plan (docs/memory.md): RelP of each layer's
        neurons is computed as its gradient arrives (a tensor hook), and the neurons are copied out
        as the forward makes them, so no layer's [T, F] tensors are kept twice or outlive their use;
        attention patterns are kept as the plan says and the backward stops at the target's cone."""
        acc = self.acc_dtype
        input_ids = plan.input_ids
        T = len(input_ids)
        t_pos = plan.target_position
        memory = self.memory_plan(T)
        self.last_timings.plan = memory
        embeds = self._embed(input_ids)
        device = embeds.device
        L, F = self.n_layers, int(self.model.config.intermediate_size)
        activations = torch.empty((L, T, F), dtype=self.dtype, device=device)
        scores = torch.zeros((L, T, F), dtype=acc, device=device)
        seen: list[int] = []

        def capture(layer: int, h: torch.Tensor) -> None:
            activations[layer] = h[0].detach().to(device)
            seen.append(layer)

            def store(grad: torch.Tensor) -> None:
                scores[layer] = activations[layer].to(acc) * grad[0].to(device=device, dtype=acc)

            h.register_hook(store)

        with Linearization(
            self.model, mlp_rule=self.config.mlp_rule, record_mlp_inputs=False, record_neurons=False,
            neuron_observer=capture, pattern_storage=memory.node_patterns, pattern_block=memory.pattern_block or None,
            should_stop=should_stop,
        ) as lin:
            out = self.model(
                inputs_embeds=embeds,
                use_cache=False,
                logits_to_keep=torch.tensor([t_pos], device=device),
            )
            logits_row = out.logits[0, -1].to(device)  # [V]
            del out
            metric = plan.metric if plan.metric is not None else self._top_k_metric(
                logits_row.detach().to(acc), plan.settings.k
            )
            m = self._metric_value(logits_row, metric)
            if sorted(seen) != list(range(L)):
                raise RuntimeError("linearization did not capture every layer's neurons")
            lin.cone.end = t_pos + 1  # nothing after the target position feeds the metric
            (g_embed,) = torch.autograd.grad(m, [embeds])
        with torch.no_grad():
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

    def select_nodes(self, node_scores: NodeScores, settings: TraceSettings | None = None) -> Selection:
        """relp-spec §D.1: per-layer top-k pre-filter, |S| >= tau|m|, always-on filter, sort, cap.

        ``tau``, ``max_nodes`` and ``over_max_nodes`` come from ``settings`` (default: the
        attributor's config). Over max_nodes, ``prune`` keeps the max_nodes neurons with the largest
        |RelP| (``pruned`` counts the rest); ``skip_edges`` keeps all and sets ``nodes_exceeded``.
        """
        cfg = self.config
        request = cfg if settings is None else settings
        scores = node_scores.scores
        L, T, F = scores.shape
        with torch.no_grad():
            flat = scores.reshape(L, T * F)
            kk = min(cfg.top_k_per_layer, T * F)
            # one layer at a time: |S| of the whole [L, T*F] grid would be a second copy of it
            tops = [flat[layer].abs().topk(kk) for layer in range(L)]
            top_abs = torch.stack([top.values for top in tops])  # [L, kk]
            top_idx = torch.stack([top.indices for top in tops])
            del tops
            threshold = request.tau * abs(node_scores.metric_value)
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
        candidates = len(order)
        over = candidates > request.max_nodes
        prune = over and request.over_max_nodes == "prune"
        if prune:  # keep the max_nodes most influential (order is by |RelP| descending)
            order = order[: request.max_nodes]
        return Selection(
            layers=layers_np[order],
            positions=positions_np[order],
            indices=indices_np[order],
            scores=values_np[order],
            activations=acts_np[order],
            nodes_exceeded=over and not prune,
            n_candidates=candidates,
            pruned=candidates - len(order),
        )

    # ------------------------------------------------------------------ edge pass
    def model_shape(self) -> ModelShape:
        """The model's dimensions as the memory model needs them."""
        eager = (getattr(self.model.config, "_attn_implementation", None) or "eager") == "eager"
        return ModelShape.from_config(
            self.model.config, dtype_bytes=torch.finfo(self.dtype).bits // 8, mlp_rule=self.config.mlp_rule, eager=eager
        )

    def memory_plan(self, T: int, *, neurons: int | None = None) -> TracePlan:
        """The memory plan for a ``T``-token trace: how attention patterns are kept and the edge
        chunk size, within ``config.memory_budget`` (docs/memory.md). On a GPU without a budget the
        budget is most of its free memory; if even that plan does not fit, the fastest one is used."""
        cfg = self.config
        budget = cfg.memory_budget
        implicit = False
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            implicit = budget is None
            budget = int(0.8 * free) if budget is None else min(int(budget), int(0.8 * free))
        elif budget is not None and self.device.type == "cpu":
            return_freed_host_memory()  # so that the budget bounds the process's RSS
        storage = None if cfg.pattern_storage == "auto" else cfg.pattern_storage
        kwargs = {"max_chunk": cfg.edge_chunk_size, "neurons": neurons or cfg.max_nodes,
                  "node_patterns": storage, "edge_patterns": storage}
        try:
            return plan_trace(self.model_shape(), T, budget=budget, **kwargs)
        except ResourceExhausted:
            if implicit:
                return plan_trace(self.model_shape(), T, budget=None, **kwargs)
            raise

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
        should_stop: Callable[[], bool] | None = None,
    ) -> EdgeTable:
        """Direct-effect edges into every target (logits, then selected neurons) from every source
        (selected neurons, or `sources` when given, plus embedding positions); §C.3-C.4.

        `batched=False` runs one plain `autograd.grad` per target (the reference loop).
        Rows with no valid source contribute nothing; structural zeros are never emitted.
        `should_stop` is checked before every chunk of targets and in every layer of the passes
        (Cancelled once true).
        """
        return self.compute_edges_batch(
            [node_scores], [selection], neuron_targets=[neuron_targets], chunk_size=chunk_size, batched=batched,
            progress=progress, sources=[sources], should_stop=should_stop,
        )[0]

    def compute_edges_batch(
        self,
        node_scores: Sequence[NodeScores],
        selections: Sequence[Selection],
        *,
        neuron_targets: Sequence[bool] | None = None,
        chunk_size: int | None = None,
        batched: bool = True,
        progress: bool = False,
        sources: Sequence[Selection | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[EdgeTable]:
        """:meth:`compute_edges` of several prompts in one left-padded edge forward: cotangent ``j``
        of a chunk carries target ``j`` of every prompt (one per batch row), so a chunk of ``K``
        VJPs yields ``K`` targets of each prompt. Tables come back aligned with ``node_scores``."""
        n = len(node_scores)
        neuron_targets = [True] * n if neuron_targets is None else list(neuron_targets)
        sources = [None] * n if sources is None else list(sources)
        if n == 1:
            return [
                self._edge_pass(
                    node_scores[0], selections[0], neuron_targets=neuron_targets[0], chunk_size=chunk_size,
                    batched=batched, progress=progress, sources=sources[0], should_stop=should_stop,
                )
            ]
        prompts: list[_PromptEdges] = []
        for ns, selection, with_neurons, own_sources in zip(node_scores, selections, neuron_targets, sources):
            targets = _EdgeTargets.build(ns, selection if with_neurons else None, logit_layer=self.n_layers)
            edge_sources = _EdgeSources.build(self, ns, selection if own_sources is None else own_sources)
            prompts.append(_PromptEdges(node_scores=ns, sources=edge_sources, targets=targets))
        active = [prompt for prompt in prompts if len(prompt.targets)]
        if active:
            self._edge_pass_batch(
                active, chunk_size=chunk_size, batched=batched, progress=progress, should_stop=should_stop
            )
        return [prompt.columns.table() if len(prompt.targets) else _empty_edge_table() for prompt in prompts]

    def _edge_pass_batch(
        self,
        prompts: list[_PromptEdges],
        *,
        chunk_size: int | None,
        batched: bool,
        progress: bool,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        batch = self.prompt_batch([prompt.node_scores.input_ids for prompt in prompts])
        for row, prompt in enumerate(prompts):
            prompt.place(row, batch.offsets[row])
        embeds = self.model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)  # [B, T, D]
        source_layers = {layer for prompt in prompts for layer in prompt.sources.layer_slices}
        memory = self.memory_plan(
            int(embeds.shape[1]) * len(prompts), neurons=sum(prompt.sources.n_neurons for prompt in prompts)
        )
        self.last_timings.plan = memory
        K = chunk_size or self._chunk_size(
            embeds.shape[1], len(source_layers), int(self.model.config.intermediate_size), embeds.shape[-1],
            rows=len(prompts),
        )
        self.last_timings.edge_chunk_size = K
        direct = self.config.edge_effect == "direct"
        n_slots = max(len(prompt.targets) for prompt in prompts)
        bar = _progress_bar(sum(len(prompt.targets) for prompt in prompts)) if progress else nullcontext()
        with Linearization(
            self.model, mlp_rule=self.config.mlp_rule, detach_mlp_outputs=direct, should_stop=should_stop,
            pattern_storage=memory.edge_patterns, pattern_block=memory.pattern_block or None,
        ) as lin, bar:
            edge_pass = _EdgePass.start(self, lin, embeds, batch, prompts, batched)
            start = 0
            while start < n_slots:
                _check_stop(should_stop)
                stop = min(start + K, n_slots)
                # the chunk's causal cone: nothing after its latest target position (in batch positions) reaches it
                lin.cone.end = 1 + max(
                    prompt.offset + max(prompt.targets.positions[start:stop]) for prompt in prompts
                    if len(prompt.targets) > start
                )
                try:
                    chunk = edge_pass.raw_edges(start, stop)  # per prompt: (stop_b, raw [k_b, N_b + T_b])
                except torch.OutOfMemoryError:
                    if K == 1:
                        raise
                    K = self._halve_chunk(K)  # adapt: retry this chunk with half the targets
                    continue
                finally:
                    lin.cone.end = None
                for prompt, prompt_stop, raw_chunk in chunk:
                    edge_pass.keep(prompt, start, prompt_stop, raw_chunk)
                self.last_timings.edge_chunks += 1
                if progress:
                    bar.update(sum(prompt_stop - start for _, prompt_stop, _ in chunk))
                start = stop
            lin.release()

    def _chunk_size(self, T: int, source_layers: int, F: int, D: int, rows: int = 1) -> int:
        """Cotangents per batched VJP of a batch's edge pass: each carries one target of each of
        ``rows`` prompts, within the memory budget (2 GiB when none is set; GPU: also free memory)."""
        element = torch.finfo(self.dtype).bits // 8
        # A VJP row holds the cotangent of every source layer's MLP output and of the embeddings
        # ([T, D] each, per batch row), plus transient buffers of one layer's backward (~[T, F] + attention).
        per_target = max(1, rows * T * ((source_layers + 1) * D + 4 * F) * element)
        budget = int(self.config.memory_budget or _BATCH_EDGE_BUDGET)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = min(budget, int(0.6 * free))
        return max(1, min(self.config.edge_chunk_size, budget // per_target))

    def _edge_pass(
        self,
        node_scores: NodeScores,
        selection: Selection,
        *,
        neuron_targets: bool,
        chunk_size: int | None,
        batched: bool,
        progress: bool,
        sources: Selection | None,
        should_stop: Callable[[], bool] | None,
    ) -> EdgeTable:
        """The edge pass of one prompt within the memory plan (docs/memory.md): sources read as
        gradient taps, neuron targets read out while the forward runs, targets in the cheapest
        chunk order, each chunk's backward limited to its causal cone. Only ``node_scores``' metric,
        logits and positions are read, so a caller may drop its [L, T, F] tensors first."""
        source_selection = selection if sources is None else sources
        T = len(node_scores.input_ids)
        plan = self.memory_plan(T, neurons=len(source_selection))
        self.last_timings.plan = plan
        K = chunk_size or plan.edge_chunk_size
        self.last_timings.edge_chunk_size = K
        targets = _EdgeTargets.build(node_scores, selection if neuron_targets else None, logit_layer=self.n_layers)
        if not len(targets):
            return _empty_edge_table()
        targets = targets.in_cost_order(K, self.model_shape(), T)
        edge_sources = _TapSources.build(self, node_scores, source_selection)
        direct = self.config.edge_effect == "direct"
        # Direct effects never cross an MLP, so its graph is not built (unless the readout is the
        # neuron itself, rule "none"); total effects go through the MLPs.
        mlp_graph = not direct or self.config.mlp_rule == "none"
        readouts = _Readouts(self, targets)
        bar = _progress_bar(len(targets)) if progress else nullcontext()
        with Linearization(
            self.model, mlp_rule=self.config.mlp_rule, mlp_graph=mlp_graph, detach_mlp_outputs=direct and mlp_graph,
            record_mlp_inputs=False, pattern_storage=plan.edge_patterns, pattern_block=plan.pattern_block or None,
            mlp_observer=readouts.observe, mlp_output_transform=edge_sources.tap, should_stop=should_stop,
        ) as lin, bar:
            edge_pass = _TapEdgePass.start(
                self, lin, edge_sources, targets, readouts, node_scores.input_ids, node_scores.target_position, batched
            )
            start = 0
            while start < len(targets):
                _check_stop(should_stop)
                stop = min(start + K, len(targets))
                try:
                    raw_chunk = edge_pass.raw_edges(start, stop)  # [k, N + T] (acc dtype, device)
                except torch.OutOfMemoryError:
                    if K == 1:
                        raise
                    K = self._halve_chunk(K)  # adapt: retry this chunk with half the targets
                    continue
                edge_pass.keep(start, stop, raw_chunk)
                self.last_timings.edge_chunks += 1
                if progress:
                    bar.update(stop - start)
                start = stop
            lin.release()
        return edge_pass.columns.table()

    def _halve_chunk(self, K: int) -> int:
        """The chunk size to retry with after an out-of-memory error."""
        K = max(1, K // 2)
        self.last_timings.edge_chunk_size = K
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return K

    def _neuron_readouts(self, lin: Linearization) -> list[Any]:
        """Per layer, a function (row, pos, idx) -> target scalars [n] of batch row ``row`` (batch
        positions ``pos``) with the neurons' RelP gradient.

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
                readouts.append(lambda row, pos, idx, h=h: h[row, pos, idx])
                continue
            coef_g, coef_z = coefficients
            mlp = layer.mlp

            def readout(row, pos, idx, v=v, coef_g=coef_g, coef_z=coef_z, mlp=mlp):
                rows = v[row, pos, :].to(acc)  # [n, D]
                value = coef_z[row, pos, idx].to(acc) * (rows * module_weight(mlp.up_proj)[idx].to(device=rows.device, dtype=acc)).sum(-1)
                if coef_g is not None:
                    value = value + coef_g[row, pos, idx].to(acc) * (rows * module_weight(mlp.gate_proj)[idx].to(device=rows.device, dtype=acc)).sum(-1)
                return value

            readouts.append(readout)
        return readouts

    # ------------------------------------------------------------------ trace
    def trace(
        self,
        prompt: str | TraceRequest,
        *,
        should_stop: Callable[[], bool] | None = None,
        direction: Any = None,
        compute_edges: bool = True,
        progress: bool | None = None,
        **fields: Any,
    ) -> Graph:
        """Trace one prompt into a Graph (nodes, embeddings, logits and direct-effect edges).

        ``prompt`` is a :class:`TraceRequest`, or a prompt string traced with the config's
        per-request settings overridden by ``fields`` (TraceRequest fields; None keeps the
        configured value; a target mode replaces the configured one). ``should_stop`` is polled in
        every phase (see :meth:`trace_many`): once true, the trace raises Cancelled. Raises
        InvalidArgument for bad input (empty prompt, multi-token targets, conflicting modes,
        too-long prompt, k over the vocabulary).
        """
        if isinstance(prompt, TraceRequest):
            if fields:
                raise InvalidArgument("pass either a TraceRequest or keyword fields, not both")
            request = prompt
        else:
            request = self.config.request(prompt, **{name: v for name, v in fields.items() if v is not None})
        (outcome,) = self.trace_many(
            [request], should_stop=should_stop, directions=None if direction is None else [direction],
            compute_edges=compute_edges, progress=progress,
        )
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def trace_many(
        self,
        requests: Sequence[TraceRequest],
        *,
        should_stop: Callable[[], bool] | None = None,
        directions: Sequence[Any] | None = None,
        compute_edges: bool = True,
        progress: bool | None = None,
    ) -> list[Graph | CircuitsError]:
        """Trace several requests as one batch: one left-padded forward (+ backward) per pass for all.

        The result is aligned with ``requests``: each request's Graph (equal to what :meth:`trace`
        gives for it alone, up to the rounding of batched kernels), or the InvalidArgument that
        request raised (empty prompt, multi-token target, k over the vocabulary, ...): one bad
        request does not fail the others. ``should_stop`` is polled before each phase, before every
        decoder layer's forward, in every attention layer's backward, before every edge chunk and
        while graphs are built; once it returns true the batch raises Cancelled.
        """
        if directions is not None and len(directions) != len(requests):
            raise InvalidArgument(f"{len(directions)} directions for {len(requests)} requests")
        self.last_timings = TraceTimings(batch_size=len(requests))
        show_progress = self.config.progress if progress is None else progress
        started = time.perf_counter()
        outcomes: list[Graph | CircuitsError | None] = [None] * len(requests)
        phase_start = started
        planned: list[tuple[int, TraceRequest, _PromptPlan]] = []
        forms: dict[int, PromptFormChoice] = {}
        for number, request in enumerate(requests):
            try:
                forms[number] = form = self.prompt_form(request.raw)
                request = dataclasses.replace(request, raw=form.raw)  # the graph records the form it used
                input_ids = self.encode_prompt(request.prompt, raw=request.raw, answer_prefix=request.answer_prefix)
                direction = None if directions is None else directions[number]
                planned.append((number, request, self.plan(input_ids, request, direction=direction)))
            except InvalidArgument as exc:
                outcomes[number] = exc
        for group in self._groups(planned):
            _check_stop(should_stop)
            node_scores = self.node_scores_batch([plan for _, _, plan in group], should_stop=should_stop)
            selections = [self.select_nodes(ns, request) for ns, (_, request, _) in zip(node_scores, group)]
            if len(group) == 1:  # one prompt's selection carries what its edges need: free the [L, T, F] tensors
                node_scores[0].scores = node_scores[0].activations = None
            nodes_done = time.perf_counter()
            self.last_timings.nodes_s += nodes_done - phase_start
            _check_stop(should_stop)
            if compute_edges:
                tables = self.compute_edges_batch(
                    node_scores, selections, neuron_targets=[not selection.nodes_exceeded for selection in selections],
                    progress=show_progress, should_stop=should_stop,
                )
            else:
                tables = [_empty_edge_table() for _ in group]
            edges_done = time.perf_counter()
            self.last_timings.edges_s += edges_done - nodes_done
            for (number, request, plan), ns, selection, edges in zip(group, node_scores, selections, tables):
                _check_stop(should_stop)
                direction = None if plan.metric is None else plan.metric.direction
                graph = self._build_graph(
                    request.prompt, request, ns, selection, edges, slug=request.slug, direction=direction,
                    corpus_index=request.corpus_index, should_stop=should_stop,
                )
                outcomes[number] = _with_trace_record(
                    graph, self._trace_record(request, forms[number], ns, selection, direction)
                )
            phase_start = time.perf_counter()
        self.last_timings.total_s = time.perf_counter() - started
        return outcomes  # type: ignore[return-value]  # every slot is filled above

    def _groups(self, planned: list[tuple[int, TraceRequest, _PromptPlan]]) -> list[list[tuple[int, TraceRequest, _PromptPlan]]]:
        """The batches to run: all prompts together, or (attention without 4-D masks) one batch
        per prompt length."""
        if not planned:
            return []
        if self.pads_batches():
            return [planned]
        by_length: dict[int, list[tuple[int, TraceRequest, _PromptPlan]]] = {}
        for item in planned:
            by_length.setdefault(len(item[2].input_ids), []).append(item)
        return list(by_length.values())

    def _trace_record(
        self, request: TraceRequest, form: PromptFormChoice, node_scores: NodeScores, selection: Selection, direction: Any
    ) -> dict[str, Any]:
        """What the trace decided for the user (prompt form, targets, pruning), for the graph metadata."""
        record: dict[str, Any] = {
            "prompt_form": form.form,
            "prompt_form_reason": form.description,
            "over_max_nodes": request.over_max_nodes,
            "n_candidate_nodes": selection.n_candidates,
            "nodes_pruned": selection.pruned,
        }
        if direction is None and (request.target_tokens or request.contrastive):
            resolved = resolve_targets(self.tokenizer, request, model_name=self.model_name)
            targets = list(resolved.get("target_tokens", ())) + list(resolved.get("contrastive", ()))
            probs = torch.softmax(node_scores.logits.to(torch.float64), dim=-1).cpu()
            record["targets"] = [t.record(self.tokenizer) for t in targets]
            record["target_notes"], record["target_warnings"] = target_notes(self.tokenizer, targets, probs)
        return record

    # ------------------------------------------------------------------ engine contract
    def intervene(
        self, request: InterventionRequest, *, should_stop: Callable[[], bool] | None = None
    ) -> InterventionResult:
        """Baseline vs intervened next-token prediction of the real model (the Intervene RPC)."""
        from circuits_attribution.interventions import run_intervention

        with _stop_checks(self.model, should_stop):
            return run_intervention(self, request)

    def activations(
        self, request: ActivationRequest, *, should_stop: Callable[[], bool] | None = None
    ) -> ActivationResult:
        """Per-token activations of neurons on prompts (the GetActivations RPC)."""
        from circuits_attribution.interventions import run_activations

        with _stop_checks(self.model, should_stop):
            return run_activations(self, request)

    def _d_mlp(self) -> int:
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(getattr(text_config, "intermediate_size", 0) or 0)

    def patch(self, request: PatchRequest, *, should_stop: Callable[[], bool] | None = None) -> PatchResult:
        """Activation patching between a clean and a corrupt prompt, with RelP's predictions (the Patch RPC)."""
        from circuits_attribution.patching import run_patch

        with _stop_checks(self.model, should_stop):
            return run_patch(self, request)

    def model_info(self) -> ModelInfo:
        """The model this engine traces (name, shape, dtype, device)."""
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        architectures = getattr(config, "architectures", None) or [type(self.model).__name__]
        return ModelInfo(
            model=self.model_name,
            num_layers=int(getattr(text_config, "num_hidden_layers", 0) or 0),
            d_model=int(getattr(text_config, "hidden_size", 0) or 0),
            d_mlp=int(getattr(text_config, "intermediate_size", 0) or 0),
            vocab_size=int(getattr(text_config, "vocab_size", 0) or 0),
            max_context=int(getattr(text_config, "max_position_embeddings", 0) or 0),
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            architecture=str(architectures[0]),
        )

    def replicate(self) -> RelPAttributor:
        """Another engine on a structural copy of the model that shares its parameters and buffers.

        The copy has its own module objects (so per-trace patches and hooks don't collide) but no
        second copy of the weights.
        """
        memo: dict[int, Any] = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        twin = RelPAttributor(copy.deepcopy(self.model, memo), copy.deepcopy(self.tokenizer), self.config)
        twin.model_name = self.model_name
        return twin

    def close(self) -> None:
        """Nothing to release (the model is freed with the object); here for the Tracer interface."""

    def settings_record(self, cfg: TraceSettings) -> dict[str, Any]:
        """The settings that determine a graph's content (hashed into graph_id): the request's
        ``cfg`` and the engine's own."""
        engine = self.config
        return {
            "method": "relp",
            "edges": engine.edge_effect,
            "k": cfg.k,
            "target_tokens": list(cfg.target_tokens),
            "contrastive": list(cfg.contrastive) if cfg.contrastive else None,
            "target_position": cfg.target_position,
            "raw": cfg.raw,
            "answer_prefix": cfg.answer_prefix,
            "tau": cfg.tau,
            "top_k_per_layer": engine.top_k_per_layer,
            "filter_always_on": engine.filter_always_on,
            "max_nodes": cfg.max_nodes,
            "over_max_nodes": cfg.over_max_nodes,
            "mlp_rule": engine.mlp_rule,
            "embedding_logit_edges": engine.embedding_logit_edges,
            "edge_threshold": engine.edge_threshold,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def _build_graph(
        self,
        prompt: str,
        cfg: TraceSettings,
        node_scores: NodeScores,
        selection: Selection,
        edges: EdgeTable,
        *,
        slug: str | None,
        direction: Any,
        corpus_index: int = -1,
        should_stop: Callable[[], bool] | None = None,
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

        units: list[Unit] = []
        for lo in range(0, len(selection), _UNITS_PER_STOP_CHECK):
            _check_stop(should_stop)
            part = slice(lo, lo + _UNITS_PER_STOP_CHECK)
            units.extend(
                Unit(
                    layer=int(layer), index=int(index), position=int(pos), kind="neuron",
                    activation=float(act), attribution=float(score), token=prompt_tokens[int(pos)],
                )
                for layer, index, pos, act, score in zip(
                    selection.layers[part].tolist(), selection.indices[part].tolist(), selection.positions[part].tolist(),
                    selection.activations[part].tolist(), selection.scores[part].tolist(),
                )
            )
        _check_stop(should_stop)
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
            # The model's shape: the aggregator records it at first ingest and refuses other shapes.
            "num_layers": self.n_layers,
            "d_mlp": self._d_mlp(),
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
            corpus_index=corpus_index,
            extra={"generation_settings": generation_settings},
        )
        return Graph(
            units=tuple(units), edges=edge_table, prompt=prompt, prompt_tokens=prompt_tokens,
            model=self.model_name, graph_id=graph_id, metadata=metadata,
        )


# ---------------------------------------------------------------------- edge pass state
@dataclass(frozen=True, slots=True, kw_only=True)
class _SourceOrder:
    """The source order both edge passes share: selected neurons sorted by (layer, position, index),
    each layer's a contiguous run of columns, then one embedding per prompt position.

    ``order`` maps the sorted neurons back to the Selection's rows; ``all_*_np`` (length N + T) name
    each column's source (embeddings: layer EMBEDDING_LAYER, index the token id)."""

    order: np.ndarray  # [N] Selection row of each sorted neuron
    layer_np: np.ndarray  # [N] sorted neurons only
    position_np: np.ndarray  # [N]
    index_np: np.ndarray  # [N]
    layer_slices: dict[int, slice]  # layer -> its neurons' columns, in layer order
    all_layer_np: np.ndarray  # [N + T]
    all_position_np: np.ndarray  # [N + T]
    all_index_np: np.ndarray  # [N + T]

    @staticmethod
    def of(sources: Selection, input_ids: Sequence[int]) -> _SourceOrder:
        T = len(input_ids)
        order = np.lexsort((sources.indices, sources.positions, sources.layers))
        layer_np, pos_np, idx_np = sources.layers[order], sources.positions[order], sources.indices[order]
        layer_slices = {
            layer: slice(int(np.searchsorted(layer_np, layer, side="left")), int(np.searchsorted(layer_np, layer, side="right")))
            for layer in sorted(set(int(x) for x in layer_np))
        }
        return _SourceOrder(
            order=order, layer_np=layer_np, position_np=pos_np, index_np=idx_np, layer_slices=layer_slices,
            all_layer_np=np.concatenate([layer_np, np.full(T, EMBEDDING_LAYER)]),
            all_position_np=np.concatenate([pos_np, np.arange(T)]),
            all_index_np=np.concatenate([idx_np, np.asarray(input_ids, dtype=np.int64)]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _EdgeSources:
    """Edge sources: neurons sorted by (layer, position, index), then one embedding per prompt position.

    Device tensors feed the gathers; host arrays (``*_np``, length N + T) name each column's source.
    """

    n_neurons: int  # N
    n_positions: int  # T (the prompt's own length)
    layer_slices: dict[int, slice]  # layer -> its neurons' columns
    positions: torch.Tensor  # [N] position of each neuron source
    activations: torch.Tensor  # [N] h_s (accumulation dtype)
    down_columns: dict[int, torch.Tensor]  # layer -> W_down[:, i_s] of its sources, [D, n_l]
    all_layers: torch.Tensor  # [N + T] source layer (embeddings: EMBEDDING_LAYER)
    all_positions: torch.Tensor  # [N + T]
    layer_np: np.ndarray
    index_np: np.ndarray  # neuron index, or token id for embeddings
    position_np: np.ndarray

    @staticmethod
    def build(attributor: RelPAttributor, node_scores: NodeScores, sources: Selection) -> _EdgeSources:
        acc, device = attributor.acc_dtype, attributor.device
        src = _SourceOrder.of(sources, node_scores.input_ids)
        pos_t = torch.as_tensor(src.position_np, device=device)
        idx_t = torch.as_tensor(src.index_np, device=device)
        activations = node_scores.activations[torch.as_tensor(src.layer_np, device=device), pos_t, idx_t].to(acc)
        # Sources are read at the MLP outputs: raw_{s->t} = h_s * W_down[:, i_s] . g_t[p_s], where
        # g_t = d~target/d(mlp output).
        mlps = [layer.mlp for layer in _decoder_layers(attributor.model)]
        down_columns = {
            layer: module_weight(mlps[layer].down_proj).to(device)[:, idx_t[cols]].to(acc) for layer, cols in src.layer_slices.items()
        }
        return _EdgeSources(
            n_neurons=len(src.layer_np), n_positions=len(node_scores.input_ids), layer_slices=src.layer_slices,
            positions=pos_t, activations=activations, down_columns=down_columns,
            all_layers=torch.as_tensor(src.all_layer_np, device=device),
            all_positions=torch.as_tensor(src.all_position_np, device=device), layer_np=src.all_layer_np,
            index_np=src.all_index_np, position_np=src.all_position_np,
        )




@dataclass(frozen=True, slots=True, kw_only=True)
class _EdgeTargets:
    """Edge targets: the metric's logits (layer sentinel ``logit_layer``), then selected neurons.
    ``scales``: flow = raw * scale. :meth:`in_cost_order` reorders them for the edge pass."""

    kinds: list[str]
    layers: list[int]
    positions: list[int]
    indices: list[int]
    scales: list[float]
    layer_np: np.ndarray
    index_np: np.ndarray
    position_np: np.ndarray

    def __len__(self) -> int:
        return len(self.kinds)

    @staticmethod
    def build(node_scores: NodeScores, neurons: Selection | None, *, logit_layer: int) -> _EdgeTargets:
        metric = node_scores.metric
        count = len(metric.token_ids)
        kinds = ["logit"] * count
        layers = [logit_layer] * count
        positions = [node_scores.target_position] * count
        indices = [int(token_id) for token_id in metric.token_ids]
        scales = [float(coef) for coef in metric.coefficients]
        if neurons is not None and len(neurons):
            for j in np.lexsort((neurons.indices, neurons.positions, -neurons.layers)):
                act = float(neurons.activations[j])
                kinds.append("neuron")
                layers.append(int(neurons.layers[j]))
                positions.append(int(neurons.positions[j]))
                indices.append(int(neurons.indices[j]))
                scales.append(float(neurons.scores[j]) / act if act != 0 else 0.0)
        return _EdgeTargets._from_lists(kinds, layers, positions, indices, scales)

    @staticmethod
    def _from_lists(kinds, layers, positions, indices, scales) -> _EdgeTargets:
        return _EdgeTargets(
            kinds=kinds, layers=layers, positions=positions, indices=indices, scales=scales,
            layer_np=np.asarray(layers, dtype=np.int64), index_np=np.asarray(indices, dtype=np.int64),
            position_np=np.asarray(positions, dtype=np.int64),
        )

    def in_cost_order(self, chunk: int, shape: ModelShape, T: int) -> _EdgeTargets:
        """The targets in the order whose chunks of ``chunk`` cost least: a chunk's backward runs
        through the layers below its highest target and, in attention, over the positions up to its
        latest one (its causal cone), so neurons are ordered by layer or by position, whichever the
        cost model ``layers x (T·D·(H+K)·d_h + H·d_h·P²)`` prefers. Logits stay first."""
        n_logits = self.kinds.count("logit")
        neuron_ids = list(range(n_logits, len(self)))
        per_token = shape.d_model * (shape.heads + shape.kv_heads) * shape.head_dim
        per_cone = shape.heads * shape.head_dim

        def cost(order: list[int]) -> float:
            total = 0.0
            for start in range(0, len(order), chunk):
                part = order[start:start + chunk]
                top = max(self.layers[i] for i in part)
                cone = max(self.positions[i] for i in part) + 1
                total += top * len(part) * (T * per_token + per_cone * cone * cone)
            return total

        by_layer = sorted(neuron_ids, key=lambda i: (-self.layers[i], self.positions[i], self.indices[i]))
        by_position = sorted(neuron_ids, key=lambda i: (self.positions[i], -self.layers[i], self.indices[i]))
        head = list(range(n_logits))
        best = min((head + by_layer, head + by_position), key=cost)
        return _EdgeTargets._from_lists(
            [self.kinds[i] for i in best], [self.layers[i] for i in best], [self.positions[i] for i in best],
            [self.indices[i] for i in best], [self.scales[i] for i in best],
        )




@dataclass(slots=True)
class _EdgeColumns:
    """The kept edges, one array per column and chunk; :meth:`table` concatenates them."""

    parts: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {name: [] for name in EdgeTable.__dataclass_fields__}
    )

    def add(self, **columns: np.ndarray) -> None:
        for name, values in columns.items():
            self.parts[name].append(values)

    def table(self) -> EdgeTable:
        return EdgeTable(**{name: np.concatenate(values) for name, values in self.parts.items()})


@dataclass(slots=True, kw_only=True)
class _PromptEdges:
    """One prompt's share of a (batched) edge pass: its sources and targets, its batch row and left
    padding (:meth:`place`), its logits row in the edge forward, and the edges kept so far."""

    node_scores: NodeScores
    sources: _EdgeSources
    targets: _EdgeTargets
    row: int = 0
    offset: int = 0
    source_positions: torch.Tensor | None = None  # [N] batch positions of the neuron sources
    logits_row: torch.Tensor | None = None  # [V] at the target position
    columns: _EdgeColumns = field(default_factory=_EdgeColumns)

    def place(self, row: int, offset: int) -> None:
        self.row, self.offset = row, offset
        positions = self.sources.positions
        self.source_positions = positions + offset if offset else positions

    def batch_positions(self, positions: Sequence[int]) -> torch.Tensor:
        pos = torch.as_tensor(positions, device=self.sources.positions.device)
        return pos + self.offset if self.offset else pos


@dataclass(slots=True, kw_only=True)
class _EdgePass:
    """The state of one (batched) edge pass inside a Linearization: the forward's leaves and
    readouts and the prompts' shares; :meth:`raw_edges` and :meth:`keep` handle one chunk."""

    attributor: RelPAttributor
    prompts: list[_PromptEdges]
    embeds: torch.Tensor  # [B, T, D] leaf
    readouts: list[Any]  # per layer: (row, pos, idx) -> neuron target scalars
    leaves: list[torch.Tensor]  # per layer: the MLP output each source is read at
    batched: bool

    @staticmethod
    def start(
        attributor: RelPAttributor, lin: Linearization, embeds: torch.Tensor, batch: PromptBatch,
        prompts: list[_PromptEdges], batched: bool,
    ) -> _EdgePass:
        """Run the linearized forward the chunks differentiate."""
        positions = [prompt.offset + prompt.node_scores.target_position for prompt in prompts]
        keep = sorted(set(positions))
        out = attributor.model(
            inputs_embeds=embeds,
            use_cache=False,
            logits_to_keep=torch.tensor(keep, device=attributor.device),
            **batch.model_inputs(),
        )
        for prompt, pos in zip(prompts, positions):
            prompt.logits_row = out.logits[prompt.row, keep.index(pos)]
        # Direct effects differentiate w.r.t. the detached MLP-output leaves (no path crosses an
        # MLP), total effects w.r.t. the connected MLP outputs.
        direct = attributor.config.edge_effect == "direct"
        return _EdgePass(
            attributor=attributor, prompts=prompts, embeds=embeds, readouts=attributor._neuron_readouts(lin),
            leaves=list(lin.mlp_output_leaves) if direct else list(lin.mlp_outputs), batched=batched,
        )

    def _target_scalars(self, prompt: _PromptEdges, start: int, stop: int) -> torch.Tensor:
        """A prompt's targets ``start:stop`` as scalars [k], gathered per run of one kind and layer in one indexing op."""
        t = prompt.targets
        device = self.embeds.device
        pieces: list[torch.Tensor] = []
        run_start = start
        while run_start < stop:
            run_end = run_start
            while run_end < stop and t.kinds[run_end] == t.kinds[run_start] and t.layers[run_end] == t.layers[run_start]:
                run_end += 1
            idx = torch.as_tensor(t.indices[run_start:run_end], device=device)
            if t.kinds[run_start] == "logit":
                pieces.append(prompt.logits_row[idx])
            else:
                pos = prompt.batch_positions(t.positions[run_start:run_end])
                pieces.append(self.readouts[t.layers[run_start]](prompt.row, pos, idx))
            run_start = run_end
        return torch.cat([piece.to(self.attributor.acc_dtype) for piece in pieces])

    def raw_edges(self, start: int, stop: int) -> list[tuple[_PromptEdges, int, torch.Tensor]]:
        """Raw direct edges of target slots ``start:stop``: for each prompt that has targets there,
        ``(prompt, its stop, raw [k_b, N_b + T_b])`` with h_s * d~target/dh_s, then e_p . d~target/de_p.

        Cotangent ``j`` of the batched VJP selects target ``start + j`` of every prompt at once
        (each lives in its own batch row, and rows do not interact)."""
        acc = self.attributor.acc_dtype
        device = self.embeds.device
        members = [prompt for prompt in self.prompts if len(prompt.targets) > start]
        stops = [min(stop, len(prompt.targets)) for prompt in members]
        scalars = [self._target_scalars(prompt, start, prompt_stop) for prompt, prompt_stop in zip(members, stops)]
        targets = scalars[0] if len(scalars) == 1 else torch.cat(scalars)  # [n]
        below = [max(prompt.targets.layers[start:prompt_stop]) for prompt, prompt_stop in zip(members, stops)]
        used_layers = sorted(
            {layer for prompt, top in zip(members, below) for layer in prompt.sources.layer_slices if layer < top}
        )
        inputs = [self.leaves[layer] for layer in used_layers] + [self.embeds]
        raws = [
            torch.zeros((prompt_stop - start, prompt.sources.n_neurons + prompt.sources.n_positions), dtype=acc, device=device)
            for prompt, prompt_stop in zip(members, stops)
        ]
        counts = [prompt_stop - start for prompt_stop in stops]
        if self.batched:
            slots = max(counts)
            if len(members) == 1:
                eye = torch.eye(slots, dtype=targets.dtype, device=device)
            else:
                eye = torch.zeros((slots, targets.shape[0]), dtype=targets.dtype, device=device)
                column = 0
                for count in counts:
                    diagonal = torch.arange(count, device=device)
                    eye[diagonal, column + diagonal] = 1
                    column += count
            grads = torch.autograd.grad(
                targets, inputs, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
            )  # each [slots, B, T, D]
            for prompt, top, raw, count in zip(members, below, raws, counts):
                self._gather_into(prompt, raw, grads, used_layers, top, rows=slice(None), grad_rows=slice(0, count))
            del grads
        else:
            column = 0
            for prompt, top, raw, count in zip(members, below, raws, counts):
                for row in range(count):
                    grads = torch.autograd.grad(targets[column + row], inputs, retain_graph=True, allow_unused=True)
                    grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
                    self._gather_into(prompt, raw, grads, used_layers, top, rows=slice(row, row + 1), grad_rows=slice(0, 1))
                    del grads
                column += count
        return list(zip(members, stops, raws))

    def _gather_into(
        self, prompt: _PromptEdges, raw: torch.Tensor, grads: Sequence[torch.Tensor | None], used_layers: list[int],
        below: int, *, rows: slice, grad_rows: slice,
    ) -> None:
        """Write each of the prompt's sources' raw edges into ``raw[rows]`` from the cotangents
        ``grads[grad_rows]`` of its batch row (one per used layer, then embeddings); source layers
        at or above ``below`` (the prompt's highest target layer in the chunk) stay zero."""
        acc = raw.dtype
        src = prompt.sources
        for grad, layer in zip(grads[:-1], used_layers):
            if grad is None or layer >= below or layer not in src.layer_slices:
                continue
            cols = src.layer_slices[layer]
            # [k, n_l, D]: cotangent at each source's position
            picked = grad[grad_rows, prompt.row, prompt.source_positions[cols], :].to(acc)
            through_down = torch.einsum("knd,dn->kn", picked, src.down_columns[layer])  # d~target/dh_s
            raw[rows, cols] = through_down * src.activations[cols]
        g_embed = grads[-1]
        if g_embed is not None:
            off = prompt.offset
            embeds = self.embeds[prompt.row, off:].detach().to(acc)  # [T_b, D]
            raw[rows, src.n_neurons:] = (g_embed[grad_rows, prompt.row, off:].to(acc) * embeds).sum(-1)  # [k, T_b]

    def keep(self, prompt: _PromptEdges, start: int, stop: int, raw_chunk: torch.Tensor) -> None:
        """Keep the valid edges of one prompt's chunk (see :func:`_keep_chunk_edges`)."""
        _keep_chunk_edges(self.attributor, prompt.sources, prompt.targets, prompt.columns, start, stop, raw_chunk)




# ---------------------------------------------------------------------- one prompt's edge pass (memory-lean)
@dataclass(frozen=True, slots=True, kw_only=True)
class _LayerTaps:
    """The sources of one layer as gradient taps on its MLP output.

    ``out + index_add(zeros[T, D], positions, delta[:, None] * rows)`` with ``delta = 0`` leaves
    the forward unchanged, and ``d target / d delta_s = h_s · W_down[:, i_s] · d target / d out[p_s]``
    is exactly the raw direct edge ``s -> target``: the backward gathers each source's edge as it
    passes, so no chunk ever holds a [chunk, T, D] gradient per layer (docs/memory.md).
    """

    columns: slice  # this layer's sources in the source order
    positions: torch.Tensor  # [n] on the layer's device
    rows: torch.Tensor  # [n, D] = h_s * W_down[:, i_s] (accumulation dtype, layer device)
    delta: torch.Tensor  # [n] zeros, requires grad


@dataclass(frozen=True, slots=True, kw_only=True)
class _TapSources:
    """One prompt's edge sources as gradient taps (the single-prompt edge pass, :class:`_TapEdgePass`):
    neurons sorted by (layer, position, index), then one embedding per prompt position.

    Host arrays (``*_np``, length N + T) name each column's source; ``taps`` read the neurons'
    edges off their layers' MLP outputs, ``embedding_delta`` the embeddings' off the input.
    """

    n_neurons: int  # N
    taps: dict[int, _LayerTaps]  # layer -> its sources
    embedding_delta: torch.Tensor  # [T] zeros, requires grad
    all_layers: torch.Tensor  # [N + T] source layer (embeddings: EMBEDDING_LAYER), main device
    all_positions: torch.Tensor  # [N + T]
    layer_np: np.ndarray
    index_np: np.ndarray  # neuron index, or token id for embeddings
    position_np: np.ndarray

    @staticmethod
    def build(attributor: RelPAttributor, node_scores: NodeScores, sources: Selection) -> _TapSources:
        acc, device = attributor.acc_dtype, attributor.device
        src = _SourceOrder.of(sources, node_scores.input_ids)
        act_np = np.asarray(sources.activations, dtype=np.float64)[src.order]
        mlps = [layer.mlp for layer in _decoder_layers(attributor.model)]
        taps: dict[int, _LayerTaps] = {}
        for layer, cols in src.layer_slices.items():
            down = mlps[layer].down_proj
            layer_device = module_device(down)
            idx = torch.as_tensor(src.index_np[cols], device=layer_device)
            h = torch.as_tensor(act_np[cols], dtype=acc, device=layer_device)
            with torch.no_grad():
                rows = module_weight(down).to(layer_device)[:, idx].T.to(acc) * h[:, None]  # [n, D]
            taps[layer] = _LayerTaps(
                columns=cols, positions=torch.as_tensor(src.position_np[cols], device=layer_device), rows=rows,
                delta=torch.zeros(rows.shape[0], dtype=acc, device=layer_device, requires_grad=True),
            )
        return _TapSources(
            n_neurons=len(src.layer_np), taps=taps,
            embedding_delta=torch.zeros(len(node_scores.input_ids), dtype=acc, device=device, requires_grad=True),
            all_layers=torch.as_tensor(src.all_layer_np, device=device),
            all_positions=torch.as_tensor(src.all_position_np, device=device),
            layer_np=src.all_layer_np, index_np=src.all_index_np, position_np=src.all_position_np,
        )

    def tap(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The MLP output of ``layer`` with its sources' taps added (values unchanged)."""
        taps = self.taps.get(layer)
        if taps is None:
            return out
        picked = taps.delta.to(out.device)[:, None] * taps.rows.to(out.device)  # [n, D], zeros
        added = torch.zeros(out.shape[-2:], dtype=picked.dtype, device=out.device).index_add(0, taps.positions.to(out.device), picked)
        return out + added.to(out.dtype)

    def tapped_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:
        """``embeds`` [1, T, D] with the embedding taps: d target / d delta_p = e_p · d target / d e_p."""
        constant = embeds.detach()
        added = self.embedding_delta[:, None] * constant[0].to(self.embedding_delta.dtype)
        return constant + added.to(constant.dtype)[None]



class _Readouts:
    """The neuron targets as scalars of the edge forward, made while each MLP runs.

    With a linear MLP rule, ``h~_{p,i} = coef_g·(W_gate[i]·v_p) + coef_z·(W_up[i]·v_p)`` is linear in
    the MLP input ``v`` with the RelP gradient of ``h``, so a target's backward starts at one row of
    ``v``; the coefficients are the forward's own (:func:`frozen_mlp_coefficients` of its gate and up
    values). ``mlp_rule="none"`` reads the neuron itself.
    """

    def __init__(self, attributor: RelPAttributor, targets: _EdgeTargets) -> None:
        self.attributor = attributor
        self.by_layer: dict[int, list[int]] = {}
        for j, kind in enumerate(targets.kinds):
            if kind == "neuron":
                self.by_layer.setdefault(targets.layers[j], []).append(j)
        self.targets = targets
        self.values: dict[int, torch.Tensor] = {}  # target number -> scalar in the graph
        self.mlps = [layer.mlp for layer in _decoder_layers(attributor.model)]

    def observe(self, layer: int, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None:
        wanted = self.by_layer.get(layer)
        if not wanted:
            return
        rule = self.attributor.config.mlp_rule
        t = self.targets
        pos = torch.as_tensor([t.positions[j] for j in wanted], device=x.device)
        idx = torch.as_tensor([t.indices[j] for j in wanted], device=x.device)
        if rule == "none":
            return  # read from the recorded neurons after the forward (see finish)
        acc = self.attributor.acc_dtype
        mlp = self.mlps[layer]
        with torch.no_grad():
            coef_g, coef_z = frozen_mlp_coefficients(gate[0, pos, idx], up[0, pos, idx], mlp.act_fn, rule)
        rows = x[0, pos, :].to(acc)  # [n, D], in the graph
        value = coef_z.to(acc) * (rows * module_weight(mlp.up_proj)[idx].to(device=x.device, dtype=acc)).sum(-1)
        if coef_g is not None:
            value = value + coef_g.to(acc) * (rows * module_weight(mlp.gate_proj)[idx].to(device=x.device, dtype=acc)).sum(-1)
        for k, j in enumerate(wanted):
            self.values[j] = value[k]

    def finish(self, lin: Linearization) -> None:
        """Targets read from the neurons themselves (rule none), once the forward has run."""
        if self.attributor.config.mlp_rule != "none":
            return
        t = self.targets
        for layer, wanted in self.by_layer.items():
            h = lin.neurons[layer]
            pos = torch.as_tensor([t.positions[j] for j in wanted], device=h.device)
            idx = torch.as_tensor([t.indices[j] for j in wanted], device=h.device)
            value = h[0, pos, idx].to(self.attributor.acc_dtype)
            for k, j in enumerate(wanted):
                self.values[j] = value[k]



@dataclass(slots=True, kw_only=True)
class _TapEdgePass:
    """The state of one prompt's memory-lean edge pass inside a Linearization: the forward's
    readouts, the sources' taps and the targets, and the kept edges; :meth:`raw_edges` and :meth:`keep` handle one chunk."""

    attributor: RelPAttributor
    lin: Linearization
    sources: _TapSources
    targets: _EdgeTargets
    readouts: _Readouts
    logits_row: torch.Tensor  # [V] at the target position
    batched: bool
    columns: _EdgeColumns = field(default_factory=_EdgeColumns)

    @staticmethod
    def start(
        attributor: RelPAttributor, lin: Linearization, sources: _TapSources, targets: _EdgeTargets,
        readouts: _Readouts, input_ids: Sequence[int], target_position: int, batched: bool,
    ) -> _TapEdgePass:
        """Run the linearized forward the chunks differentiate (its MLPs record the readouts and
        carry the sources' taps)."""
        embeds = sources.tapped_embeddings(attributor._embed(input_ids))
        out = attributor.model(
            inputs_embeds=embeds,
            use_cache=False,
            logits_to_keep=torch.tensor([target_position], device=embeds.device),
        )
        readouts.finish(lin)
        return _TapEdgePass(
            attributor=attributor, lin=lin, sources=sources, targets=targets, readouts=readouts,
            logits_row=out.logits[0, -1].to(attributor.device), batched=batched,
        )

    def _target_scalars(self, start: int, stop: int) -> torch.Tensor:
        """Targets ``start:stop`` as scalars [k] on the main device."""
        t = self.targets
        device = self.attributor.device
        acc = self.attributor.acc_dtype
        pieces: list[torch.Tensor] = []
        run_start = start
        while run_start < stop:
            run_end = run_start
            while run_end < stop and t.kinds[run_end] == t.kinds[run_start]:
                run_end += 1
            if t.kinds[run_start] == "logit":
                idx = torch.as_tensor(t.indices[run_start:run_end], device=device)
                pieces.append(self.logits_row[idx].to(acc))
            else:
                pieces.append(torch.stack([self.readouts.values[j].to(device) for j in range(run_start, run_end)]))
            run_start = run_end
        return torch.cat(pieces)

    def raw_edges(self, start: int, stop: int) -> torch.Tensor:
        """Raw direct edges [k, N + T] into targets ``start:stop``: h_s * d~target/dh_s, then e_p . d~target/de_p."""
        acc = self.attributor.acc_dtype
        device = self.attributor.device
        k = stop - start
        targets = self._target_scalars(start, stop)  # [k]
        max_layer = max(self.targets.layers[start:stop])
        used_layers = [layer for layer in self.sources.taps if layer < max_layer]
        inputs = [self.sources.taps[layer].delta for layer in used_layers] + [self.sources.embedding_delta]
        raw = torch.zeros((k, self.sources.n_neurons + len(self.sources.embedding_delta)), dtype=acc, device=device)
        # the chunk's causal cone: nothing after its latest target position reaches it
        self.lin.cone.end = max(self.targets.positions[start:stop]) + 1
        try:
            if self.batched:
                eye = torch.eye(k, dtype=targets.dtype, device=device)
                grads = torch.autograd.grad(
                    targets, inputs, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
                )  # [k, n_l] per used layer, then [k, T]
                self._gather_into(raw, grads, used_layers, rows=slice(None))
            else:
                for row in range(k):
                    grads = torch.autograd.grad(targets[row], inputs, retain_graph=True, allow_unused=True)
                    grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
                    self._gather_into(raw, grads, used_layers, rows=slice(row, row + 1))
        finally:
            self.lin.cone.end = None
        return raw

    def _gather_into(
        self, raw: torch.Tensor, grads: Sequence[torch.Tensor | None], used_layers: list[int], *, rows: slice
    ) -> None:
        """Write the taps' gradients (each source's raw edge) into ``raw[rows]``."""
        for grad, layer in zip(grads[:-1], used_layers):
            if grad is not None:
                raw[rows, self.sources.taps[layer].columns] = grad.to(device=raw.device, dtype=raw.dtype)
        if grads[-1] is not None:
            raw[rows, self.sources.n_neurons:] = grads[-1].to(device=raw.device, dtype=raw.dtype)  # [k, T]

    def keep(self, start: int, stop: int, raw_chunk: torch.Tensor) -> None:
        """Keep the valid edges of one chunk (see :func:`_keep_chunk_edges`)."""
        _keep_chunk_edges(self.attributor, self.sources, self.targets, self.columns, start, stop, raw_chunk)




def _with_trace_record(graph: Graph, record: dict[str, Any]) -> Graph:
    """``graph`` with ``record`` added to its metadata's ``generation_settings``."""
    extra = dict(graph.metadata.extra)
    extra["generation_settings"] = {**dict(extra.get("generation_settings", {}) or {}), **record}
    return dataclasses.replace(graph, metadata=dataclasses.replace(graph.metadata, extra=extra))


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="edges", unit="target", leave=False)


def _empty_edge_table() -> EdgeTable:
    empty_i = np.zeros(0, dtype=np.int64)
    empty_f = np.zeros(0, dtype=np.float64)
    return EdgeTable(
        src_layer=empty_i, src_index=empty_i, src_position=empty_i, tgt_layer=empty_i,
        tgt_index=empty_i, tgt_position=empty_i, raw=empty_f, flow=empty_f,
    )


@contextmanager
def _stop_checks(model: Any, should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """While active, every decoder layer's forward first checks ``should_stop`` and raises
    Cancelled once it is true (hooks are removed on exit, so the model stays clean)."""
    if should_stop is None:
        yield
        return

    def check(_module: Any, _args: Any) -> None:
        if should_stop():
            raise Cancelled("trace stopped on request")

    handles = [layer.register_forward_pre_hook(check) for layer in _decoder_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _tensor_digest(tensor: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.detach().to(torch.float64).cpu().numpy().tobytes()).hexdigest()[:16]


def _keep_chunk_edges(
    attributor: Any, src: Any, tgt: Any, columns: Any, start: int, stop: int, raw_chunk: torch.Tensor
) -> None:
    """Keep the valid edges of targets ``start:stop``: source before target (layer and position),
    nonzero, |flow| above the threshold; one device->host transfer, appended to ``columns``."""
    cfg = attributor.config
    device = raw_chunk.device
    tgt_layer_t = torch.as_tensor(tgt.layers[start:stop], device=device)
    tgt_pos_t = torch.as_tensor(tgt.positions[start:stop], device=device)
    valid = (src.all_layers[None, :] < tgt_layer_t[:, None]) & (src.all_positions[None, :] <= tgt_pos_t[:, None])
    if not cfg.embedding_logit_edges:
        is_logit = tgt_layer_t == attributor.n_layers
        valid &= ~(is_logit[:, None] & (src.all_layers[None, :] == EMBEDDING_LAYER))
    scale = torch.tensor(tgt.scales[start:stop], dtype=raw_chunk.dtype, device=device)
    flow = raw_chunk * scale[:, None]
    valid &= (raw_chunk != 0) & (flow.abs() > cfg.edge_threshold)
    rows, srcs = valid.nonzero(as_tuple=True)
    packed = torch.stack(
        [rows.to(torch.float64), srcs.to(torch.float64),
         raw_chunk[rows, srcs].to(torch.float64), flow[rows, srcs].to(torch.float64)]
    ).cpu().numpy()
    r = packed[0].astype(np.int64) + start
    s = packed[1].astype(np.int64)
    columns.add(
        src_layer=src.layer_np[s], src_index=src.index_np[s], src_position=src.position_np[s],
        tgt_layer=tgt.layer_np[r], tgt_index=tgt.index_np[r], tgt_position=tgt.position_np[r],
        raw=packed[2], flow=packed[3],
    )
