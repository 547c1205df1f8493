"""The linearized ("replacement") model: same forward, RelP backward (relp-spec §A).

`Linearization(model, ...)` is a context manager that patches one transformers causal LM
*instance* (Llama 3.x, Qwen3, OLMo-2/3 layouts) in place and restores it on exit. Every patch is
per instance (module ``forward`` attributes, hooks, and a per-module view of the config that names
the frozen-pattern attention function), so one process can hold several models, or several
replicas of one model, and linearize them concurrently from different threads; one model instance
is linearized by at most one Linearization at a time (a second raises RuntimeError):

* every module whose class name ends in ``RMSNorm`` gets a backward with the RMS factor
  ``rho`` frozen (as the effective factor ``y / x`` of HF's own float32 computation); the
  forward output is the module's own;
* the attention pattern is frozen by detaching the outputs of ``q_proj`` and ``k_proj``; the
  attention function itself (eager, sdpa, flash...) still computes the forward, but its backward
  is replaced by the value path ``dV = A^T dOut`` with the pattern ``A`` as used (eager) or
  recomputed (fused kernels), which is cheaper and batches under vmap. The model's attention
  modules see, while linearized, a view of their config whose ``_attn_implementation`` is
  :data:`RELP_ATTENTION`, a function registered once in transformers' ``AttentionInterface`` (a new
  name: no existing entry is replaced) that finds the wrapped implementation in that view;
* the MLP product ``h = act(gate) * up`` gets the RelP half rule (``mlp_rule="relp"``), the
  stop-gradient-on-gate rule (``"stop_grad_gate"``) or the true gradient (``"none"``).

The forward values are bit-identical to the unpatched model: the patches only wrap the
original computations in autograd functions whose forward reproduces HF's op order.

While active it records, per decoder layer ``l``: ``neurons[l]`` (= ``h_l``, the input of
``down_proj``, shape ``[B, T, F]``, connected to the graph so it can be a gradient *target*),
``mlp_inputs[l]`` (an identity view of the MLP input, for conservation checks),
``mlp_outputs[l]`` (``down_proj`` output) and, when ``detach_neurons=True``,
``neuron_leaves[l]``: a detached leaf copy of ``h_l`` that ``down_proj`` consumes instead of
``h_l``. Differentiating anything w.r.t. the leaves yields *direct* effects (no gradient
crosses an MLP, relp-spec §C.4). ``neuron_coefficients[l] = (coef_g, coef_z)`` are the frozen
half-rule factors (``None`` for ``mlp_rule="none"``): ``d~h/dgate = coef_g``, ``d~h/dup = coef_z``
(``coef_g`` is ``None`` for ``stop_grad_gate``). ``detach_mlp_outputs=True`` does the same one step later:
``mlp_output_leaves[l]`` is a detached leaf copy of the ``down_proj`` output that the block
consumes; since ``down_proj`` is linear, the direct effect of neuron ``i`` at position ``p`` is
``W_down[:, i] . grad(mlp_output_leaves[l])[p]`` — cheaper (``D`` instead of ``F`` per position,
and no ``down_proj`` backward). ``residuals[l]`` (decoder-layer inputs, ``residuals[L]`` = the
final norm input) are recorded when ``record_residuals=True``.

For long prompts (docs/memory.md): ``pattern_storage`` keeps the frozen attention patterns as
computed (``full``), in the model dtype (``model``) or as their inputs, recomputed per layer in
blocks of ``pattern_block`` query rows (``recompute``); ``cone.end`` limits the attention backward to
the query positions before it. ``mlp_graph=False`` runs the MLPs without a graph (direct-effect
edges: no gradient crosses them). Callbacks let a caller take what it needs while the forward runs
instead of recording whole tensors: ``mlp_observer(l, v, gate, up)``, ``neuron_observer(l, h)`` and
``mlp_output_transform(l, out) -> out``; ``record_neurons`` / ``record_mlp_inputs`` turn the
recording off.

``should_stop`` (optional) is polled before every decoder layer's forward and in every attention
layer's backward: once it returns true, the forward or backward raises
:class:`~circuits_core.errors.Cancelled`, so a long pass can be stopped within one layer.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from circuits_attribution.placement import module_weight
from circuits_core.errors import Cancelled

MlpRule = Literal["relp", "stop_grad_gate", "none"]
MLP_RULES: tuple[str, ...] = ("relp", "stop_grad_gate", "none")
#: How frozen attention patterns are kept for the backward: as computed (``full``: the eager
#: weights, or the recomputed softmax in the accumulation dtype), cast to the model dtype
#: (``model``), or as their queries and keys, recomputed per layer in blocks (``recompute``).
PATTERN_STORAGE: tuple[str, ...] = ("full", "model", "recompute")
#: Name of the frozen-pattern attention function in transformers' AttentionInterface.
RELP_ATTENTION = "circuits_relp_frozen_pattern"
StopCheck = Callable[[], bool]

_registry_lock = threading.Lock()
_registered = False
#: Models currently linearized (by id), so a second Linearization of one instance is refused.
_active_models: set[int] = set()


def _rms_eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float | int):
            return float(value)
    raise TypeError(f"{type(module).__name__}: cannot find the epsilon attribute of this RMSNorm")


class _FrozenRMSNorm(torch.autograd.Function):
    """y = original_forward(x); backward: dy/dx = diag(y / x), i.e. w * rho(x) with rho frozen.

    HF evaluates RMSNorm in float32 and casts back, so the forward is ``w * rho * x`` only up to
    that rounding. Freezing the effective per-element factor ``y / x`` (equal to ``w * rho`` up to
    the forward's own rounding) makes the linear replacement reproduce the forward exactly, so
    conservation (relp-spec §J.2-4) holds to working precision even in float64 / bf16.
    Where ``x == 0`` the factor falls back to ``w * rho``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module, original_forward: Any) -> torch.Tensor:
        y = original_forward(x)
        acc = torch.promote_types(x.dtype, torch.float32)
        x_acc = x.to(acc)
        zero = x_acc == 0
        factor = y.to(acc) / torch.where(zero, torch.ones_like(x_acc), x_acc)
        if bool(zero.any()):
            rho = torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + _rms_eps(module)).to(acc)
            weight = module_weight(module, "weight")
            fallback = rho if weight is None else weight.to(device=rho.device, dtype=acc) * rho
            factor = torch.where(zero, fallback.expand_as(factor), factor)
        ctx.save_for_backward(factor)
        ctx.input_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (factor,) = ctx.saved_tensors
        grad_x = grad_y.to(factor.dtype) * factor
        return grad_x.to(ctx.input_dtype), None, None


def frozen_mlp_coefficients(
    gate: torch.Tensor, up: torch.Tensor, act_fn: Any, rule: str
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The frozen factors of ``h = act(gate) * up`` under an MLP rule: ``(coef_g, coef_z)`` with
    ``d~h/dgate = coef_g`` (None for stop_grad_gate) and ``d~h/dup = coef_z``; any shape, HF's op order."""
    s = act_fn(gate)
    if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        gate_ratio = torch.sigmoid(gate)
    else:
        # Identity rule for a generic act(g) = g * ratio(g): ratio frozen at its clean value.
        gate_ratio = torch.where(gate == 0, torch.zeros_like(gate), s / torch.where(gate == 0, torch.ones_like(gate), gate))
    if rule == "relp":
        return 0.5 * up * gate_ratio, 0.5 * s
    if rule == "stop_grad_gate":
        return None, s
    raise ValueError(f"no frozen coefficients for mlp_rule {rule!r}")


class _HalfRuleProduct(torch.autograd.Function):
    """h = act(g) * z (HF op order); backward: dh/dg = coef_g, dh/dz = coef_z (frozen)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, z: torch.Tensor, act_fn: Any, rule: str, sink: list) -> torch.Tensor:
        h = act_fn(g) * z
        coef_g, coef_z = frozen_mlp_coefficients(g, z, act_fn, rule)
        ctx.has_gate_grad = coef_g is not None
        ctx.save_for_backward(*(t for t in (coef_g, coef_z) if t is not None))
        sink.append((coef_g, coef_z))  # the caller keeps them (frozen constants of this layer)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        if ctx.has_gate_grad:
            coef_g, coef_z = ctx.saved_tensors
            return grad_h * coef_g, grad_h * coef_z, None, None, None
        (coef_z,) = ctx.saved_tensors
        return None, grad_h * coef_z, None, None, None


class _Cone:
    """Positions at or after ``end`` carry no gradient in the backward being run (None: no limit).

    The edge pass sets it per chunk of targets: a target at position p only depends on positions
    <= p (causal attention), so the attention backward of a chunk can stop at its latest target.
    """

    __slots__ = ("end",)

    def __init__(self) -> None:
        self.end: int | None = None


class _StoredPattern:
    """A frozen attention pattern held in memory: probs [B, H, Tq, Tk] (as computed, or cast to the model dtype)."""

    __slots__ = ("probs",)

    def __init__(self, probs: torch.Tensor) -> None:
        self.probs = probs

    def apply_transposed(self, grad: torch.Tensor, end: int) -> torch.Tensor:
        """``A[..., :end, :end]^T @ grad`` for grad [B, H, end, d_h] (rows >= end of the cotangent are zero)."""
        probs = self.probs[..., :end, :end]
        return torch.matmul(probs.to(grad.dtype).transpose(-1, -2), grad)


class _RecomputedPattern:
    """A frozen attention pattern kept as its inputs (post-RoPE queries and keys, the mask) and
    recomputed in blocks of query rows whenever a backward needs it.

    Memory: ``T * (H + K) * d_h`` elements per layer instead of ``H * T^2``; the transient of one
    block is ``H * block * T`` elements. ``eager=True`` reproduces transformers' eager attention
    bit for bit (scores in the query dtype, softmax in float32, cast back), so the pattern equals
    the one the forward used; otherwise (sdpa, flash) the softmax runs in the accumulation dtype.
    """

    __slots__ = ("query", "key", "mask", "scaling", "window", "eager", "block")

    def __init__(self, *, query, key, mask, scaling: float, window: int | None, eager: bool, block: int | None) -> None:
        self.query = query  # [B, H, Tq, d_h]
        self.key = key  # [B, K, Tk, d_h]
        self.mask = mask  # None, [B, 1|H, Tq, Tk] additive/bool, or [B, Tk] padding (flash)
        self.scaling = scaling
        self.window = window
        self.eager = eager
        self.block = block

    def rows(self, q0: int, q1: int, k_end: int | None = None) -> torch.Tensor:
        """Pattern rows ``q0:q1`` over keys ``:k_end`` (all keys by default): [B, H, q1 - q0, k_end]."""
        query, key = self.query[:, :, q0:q1], self.key
        n_rep = query.shape[1] // key.shape[1]
        if n_rep > 1:
            b, kvh, tk, d = key.shape
            key = key[:, :, None].expand(b, kvh, n_rep, tk, d).reshape(b, kvh * n_rep, tk, d)
        tk = key.shape[-2]
        k_end = tk if k_end is None else k_end
        mask = self.mask
        if self.eager:  # transformers' eager_attention_forward, op for op
            scores = torch.matmul(query, key[:, :, :k_end].transpose(2, 3)) * self.scaling
            if mask is not None:
                scores = scores + mask[:, :, q0:q1, :k_end]
            return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        acc = torch.promote_types(query.dtype, torch.float32)
        scores = torch.matmul(query.to(acc), key[:, :, :k_end].to(acc).transpose(-1, -2)) * self.scaling
        tq = self.query.shape[-2]
        if mask is not None and mask.dim() == 4:  # eager/sdpa: full [B, 1|H, Tq, Tk] mask
            rows = mask[:, :, q0:q1, :k_end]
            if rows.dtype == torch.bool:
                scores = scores.masked_fill(~rows, float("-inf"))
            else:
                scores = scores + rows.to(scores.dtype)
        else:  # causal (+ sliding window) implied by the kernel; flash passes a 2-D padding mask
            q_pos = torch.arange(q0, q1, device=scores.device)[:, None] + (tk - tq)
            k_pos = torch.arange(k_end, device=scores.device)[None, :]
            blocked = k_pos > q_pos
            if self.window:
                blocked |= k_pos <= q_pos - int(self.window)
            scores = scores.masked_fill(blocked, float("-inf"))
            if mask is not None and mask.dim() == 2:
                scores = scores.masked_fill(~mask[:, None, None, :k_end].bool(), float("-inf"))
        return torch.softmax(scores, dim=-1)

    def apply_transposed(self, grad: torch.Tensor, end: int) -> torch.Tensor:
        """``A[..., :end, :end]^T @ grad`` for grad [B, H, end, d_h], one block of query rows at a time."""
        block = self.block or end
        # eager recomputes over every key so that its float32 softmax rounds exactly as the forward's
        k_end = None if self.eager else end
        out = None
        for q0 in range(0, end, block):
            q1 = min(end, q0 + block)
            probs = self.rows(q0, q1, k_end)[..., :end]  # [B, H, q1 - q0, end]
            part = torch.matmul(probs.to(grad.dtype).transpose(-1, -2), grad.narrow(-2, q0, q1 - q0))
            out = part if out is None else out + part
        return out


class _FrozenPatternValue(torch.autograd.Function):
    """out = attention output (computed by the model's attention function); backward: value path
    only, dV = sum over query heads of the group of A^T dOut, with the pattern A frozen (stored
    or recomputed, see :class:`_StoredPattern`, :class:`_RecomputedPattern`) and the query rows
    limited to the current causal cone."""

    @staticmethod
    def forward(
        ctx, value: torch.Tensor, out: torch.Tensor, pattern: Any, n_rep: int, cone: _Cone,
        should_stop: StopCheck | None,
    ) -> torch.Tensor:
        ctx.pattern = pattern
        ctx.n_rep = n_rep
        ctx.cone = cone
        ctx.should_stop = should_stop
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.should_stop is not None and ctx.should_stop():
            raise Cancelled("trace stopped on request")
        # grad_out: [B, Tq, H, d_h] (HF attention functions return the transposed layout)
        tq = grad_out.shape[-3]
        end = tq if ctx.cone.end is None else max(1, min(tq, ctx.cone.end))
        grad = grad_out.narrow(-3, 0, end).transpose(-3, -2)  # [B, H, end, d_h] (narrow: vmap has no rule for `...`)
        # (einsum has no batching rule under is_grads_batched; matmul does)
        grad_rep = ctx.pattern.apply_transposed(grad, end)  # [B, H, end, d_h]
        if end < tq:
            grad_rep = torch.nn.functional.pad(grad_rep, (0, 0, 0, tq - end))
        b, h, tk, d = grad_rep.shape
        grad_value = grad_rep.reshape(b, h // ctx.n_rep, ctx.n_rep, tk, d).sum(-3)
        return grad_value, None, None, None, None, None


def _attention_probabilities(module: nn.Module, query, key, attention_mask, kwargs: dict) -> torch.Tensor:
    """Softmax pattern [B, H, Tq, Tk] for attention functions that do not return it (sdpa, flash)."""
    return _RecomputedPattern(
        query=query, key=key, mask=attention_mask, scaling=_scaling(module, query, kwargs),
        window=kwargs.get("sliding_window"), eager=False, block=None,
    ).rows(0, query.shape[-2])


def _scaling(module: nn.Module, query: torch.Tensor, kwargs: dict) -> float:
    return kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)


class _AttentionConfigView:
    """The model config as one attention module sees it while linearized: every attribute is the
    real config's, except ``_attn_implementation`` (:data:`RELP_ATTENTION`). It carries the
    implementation the frozen-pattern function wraps, the linearization's stop check, how the
    frozen patterns are kept (``pattern_storage``, ``pattern_block``) and the causal cone of the
    backward being run."""

    __slots__ = (
        "_config", "relp_original_attention", "relp_should_stop", "relp_pattern_storage", "relp_pattern_block",
        "relp_cone",
    )

    def __init__(
        self, config: Any, original: Any, should_stop: StopCheck | None, *, pattern_storage: str = "full",
        pattern_block: int | None = None, cone: _Cone | None = None,
    ) -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "relp_original_attention", original)
        object.__setattr__(self, "relp_should_stop", should_stop)
        object.__setattr__(self, "relp_pattern_storage", pattern_storage)
        object.__setattr__(self, "relp_pattern_block", pattern_block)
        object.__setattr__(self, "relp_cone", _Cone() if cone is None else cone)

    @property
    def _attn_implementation(self) -> str:
        return RELP_ATTENTION

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the linearized view of a model config is read-only")


def _frozen_pattern_attention(module, query, key_states, value, attention_mask, *args, **kwargs):
    """The attention function of linearized modules: the wrapped implementation computes the
    forward; with gradients on, the backward is the frozen-pattern value path (the pattern stored
    or recomputed as the view says, the query rows limited to its cone)."""
    view = module.config
    original = view.relp_original_attention
    if not torch.is_grad_enabled() or not value.requires_grad:
        return original(module, query, key_states, value, attention_mask, *args, **kwargs)
    with torch.no_grad():
        out, weights = original(module, query, key_states, value.detach(), attention_mask, *args, **kwargs)
    eager = weights is not None and weights.shape[-1] == value.shape[-2] and weights.shape[-3] == query.shape[1]
    storage = view.relp_pattern_storage
    pattern: Any
    if storage == "recompute":
        pattern = _RecomputedPattern(
            query=query.detach(), key=key_states.detach(), mask=attention_mask,
            scaling=_scaling(module, query, kwargs), window=kwargs.get("sliding_window"),
            eager=eager, block=view.relp_pattern_block,
        )
    else:
        with torch.no_grad():
            probs = weights if eager else _attention_probabilities(module, query, key_states, attention_mask, kwargs)
        if storage == "model":
            probs = probs.to(query.dtype)
        pattern = _StoredPattern(probs.detach())
    n_rep = query.shape[1] // value.shape[1]
    return _FrozenPatternValue.apply(value, out, pattern, n_rep, view.relp_cone, view.relp_should_stop), weights


def _register_frozen_pattern_attention() -> None:
    """Add :data:`RELP_ATTENTION` to transformers' attention registry (once; a new name, so no
    model that does not ask for it by name is affected)."""
    global _registered
    if _registered:
        return
    with _registry_lock:
        if not _registered:
            from transformers.modeling_utils import AttentionInterface

            AttentionInterface.register(RELP_ATTENTION, _frozen_pattern_attention)
            _registered = True


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (Llama/Qwen3/OLMo layouts)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: no decoder layers found at model.model.layers")
    return list(layers)[: model.config.num_hidden_layers]


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "model", model)
    return getattr(base, "norm", None)


class Linearization:
    """Context manager installing the RelP backward rules on `model` (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        mlp_rule: MlpRule = "relp",
        detach_neurons: bool = False,
        detach_mlp_outputs: bool = False,
        record_residuals: bool = False,
        freeze_norms: bool = True,
        freeze_attention: bool = True,
        pattern_storage: str = "full",
        pattern_block: int | None = None,
        mlp_graph: bool = True,
        record_mlp_inputs: bool = True,
        mlp_observer: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
        mlp_output_transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        neuron_observer: Callable[[int, torch.Tensor], None] | None = None,
        record_neurons: bool = True,
        should_stop: StopCheck | None = None,
    ) -> None:
        if mlp_rule not in MLP_RULES:
            raise ValueError(f"mlp_rule must be one of {MLP_RULES}, got {mlp_rule!r}")
        if pattern_storage not in PATTERN_STORAGE:
            raise ValueError(f"pattern_storage must be one of {PATTERN_STORAGE}, got {pattern_storage!r}")
        if not mlp_graph and mlp_rule == "none":
            raise ValueError("mlp_rule='none' reads the neurons themselves: it needs mlp_graph=True")
        self.pattern_storage = pattern_storage
        self.pattern_block = pattern_block
        self.mlp_graph = mlp_graph
        self.record_mlp_inputs = record_mlp_inputs
        self.mlp_observer = mlp_observer
        self.mlp_output_transform = mlp_output_transform
        self.neuron_observer = neuron_observer
        self.record_neurons = record_neurons
        #: The causal cone of the backward being run (read by the attention backward).
        self.cone = _Cone()
        self.model = model
        self.mlp_rule = mlp_rule
        self.detach_neurons = detach_neurons
        self.detach_mlp_outputs = detach_mlp_outputs
        self.record_residuals = record_residuals
        self.freeze_norms = freeze_norms
        self.freeze_attention = freeze_attention
        self.should_stop = should_stop
        self.layers = decoder_layers(model)
        n_layers = len(self.layers)
        self.neurons: list[torch.Tensor | None] = [None] * n_layers
        self.neuron_leaves: list[torch.Tensor | None] = [None] * n_layers
        self.mlp_inputs: list[torch.Tensor | None] = [None] * n_layers
        self.mlp_outputs: list[torch.Tensor | None] = [None] * n_layers
        self.mlp_output_leaves: list[torch.Tensor | None] = [None] * n_layers
        self.neuron_coefficients: list[tuple[torch.Tensor | None, torch.Tensor] | None] = [None] * n_layers
        self.residuals: list[torch.Tensor | None] = [None] * (n_layers + 1)
        self._saved_forwards: list[tuple[nn.Module, Any]] = []
        self._saved_configs: list[tuple[nn.Module, Any]] = []
        self._hooks: list[Any] = []
        self._active = False
        self._claimed = False

    # -- patch helpers -------------------------------------------------------------------
    def _set_forward(self, module: nn.Module, new_forward: Any) -> None:
        self._saved_forwards.append((module, module.__dict__.get("forward")))
        module.forward = new_forward

    def _patch_rmsnorm(self, module: nn.Module) -> None:
        original = module.forward

        def frozen_forward(this: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled() or not hidden_states.requires_grad:
                return original(hidden_states)
            return _FrozenRMSNorm.apply(hidden_states, this, original)

        self._set_forward(module, types.MethodType(frozen_forward, module))

    def _patch_mlp(self, layer_index: int, mlp: nn.Module) -> None:
        state = self
        rule = self.mlp_rule

        def relp_mlp_forward(this: nn.Module, x: torch.Tensor) -> torch.Tensor:
            x = x.view_as(x)  # a graph node holding only the MLP-branch gradient (spec §J.3)
            if state.record_mlp_inputs:
                state.mlp_inputs[layer_index] = x
            if not state.mlp_graph:
                # Direct-effect edges: no gradient crosses an MLP, so it runs without a graph
                # (nothing of it is saved) and its output enters the block as a constant.
                with torch.no_grad():
                    gate = this.gate_proj(x)
                    up = this.up_proj(x)
                    out = this.down_proj(this.act_fn(gate) * up)
                if state.mlp_observer is not None:
                    state.mlp_observer(layer_index, x, gate, up)
                return out if state.mlp_output_transform is None else state.mlp_output_transform(layer_index, out)
            gate = this.gate_proj(x)
            up = this.up_proj(x)
            if state.mlp_observer is not None:
                state.mlp_observer(layer_index, x, gate, up)
            if rule == "none" or not torch.is_grad_enabled():
                h = this.act_fn(gate) * up
            else:
                sink: list = []
                h = _HalfRuleProduct.apply(gate, up, this.act_fn, rule, sink)
                state.neuron_coefficients[layer_index] = sink[0]
            if state.record_neurons:
                state.neurons[layer_index] = h
            if state.neuron_observer is not None:
                state.neuron_observer(layer_index, h)
            if state.detach_neurons:
                leaf = h.detach().requires_grad_(True)
                state.neuron_leaves[layer_index] = leaf
                h = leaf
            out = this.down_proj(h)
            state.mlp_outputs[layer_index] = out
            if state.detach_mlp_outputs:
                out = out.detach().requires_grad_(True)
                state.mlp_output_leaves[layer_index] = out
            return out if state.mlp_output_transform is None else state.mlp_output_transform(layer_index, out)

        self._set_forward(mlp, types.MethodType(relp_mlp_forward, mlp))

    def _install_attention_backward(self) -> None:
        import sys

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _register_frozen_pattern_attention()
        for layer in self.layers:
            attention = layer.self_attn
            config = attention.__dict__.get("config")
            if config is None:
                continue
            key = getattr(config, "_attn_implementation", None) or "eager"
            default = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
            original = ALL_ATTENTION_FUNCTIONS.get_interface(key, default)
            if original is None:
                continue
            self._saved_configs.append((attention, config))
            attention.__dict__["config"] = _AttentionConfigView(
                config, original, self.should_stop, pattern_storage=self.pattern_storage,
                pattern_block=self.pattern_block, cone=self.cone,
            )

    def _remove_attention_backward(self) -> None:
        for attention, config in reversed(self._saved_configs):
            attention.__dict__["config"] = config
        self._saved_configs.clear()

    def _stop_check(self, _module: nn.Module, _args: Any) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("trace stopped on request")

    def _residual_tap(self, index: int) -> Any:
        state = self

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
            if args:
                hidden = args[0].view_as(args[0])
                state.residuals[index] = hidden
                return (hidden, *args[1:]), kwargs
            hidden = kwargs["hidden_states"].view_as(kwargs["hidden_states"])
            state.residuals[index] = hidden
            return args, {**kwargs, "hidden_states": hidden}

        return pre_hook

    # -- context protocol ----------------------------------------------------------------
    def __enter__(self) -> Linearization:
        if self._active:
            raise RuntimeError("Linearization is not re-entrant")
        with _registry_lock:
            if id(self.model) in _active_models:
                raise RuntimeError(
                    f"{type(self.model).__name__} instance is already linearized by another trace; "
                    "trace concurrently on replicas (RelPAttributor.replicate), not on one model object"
                )
            _active_models.add(id(self.model))
            self._claimed = True
        self._active = True
        try:
            if self.freeze_norms:
                for module in self.model.modules():
                    if type(module).__name__.endswith("RMSNorm"):
                        self._patch_rmsnorm(module)
            for index, layer in enumerate(self.layers):
                if self.should_stop is not None:
                    self._hooks.append(layer.register_forward_pre_hook(self._stop_check))
                if self.freeze_attention:
                    attention = layer.self_attn
                    for projection in (attention.q_proj, attention.k_proj):
                        self._hooks.append(projection.register_forward_hook(lambda _m, _i, out: out.detach()))
                self._patch_mlp(index, layer.mlp)
                if self.record_residuals:
                    self._hooks.append(layer.register_forward_pre_hook(self._residual_tap(index), with_kwargs=True))
            if self.freeze_attention:
                self._install_attention_backward()
            if self.record_residuals:
                norm = _final_norm(self.model)
                if norm is not None:
                    self._hooks.append(
                        norm.register_forward_pre_hook(self._residual_tap(len(self.layers)), with_kwargs=True)
                    )
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        self._remove_attention_backward()
        for handle in reversed(self._hooks):
            handle.remove()
        self._hooks.clear()
        for module, previous in reversed(self._saved_forwards):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._saved_forwards.clear()
        self._active = False
        if self._claimed:
            with _registry_lock:
                _active_models.discard(id(self.model))
            self._claimed = False

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def release(self) -> None:
        """Drop references to recorded tensors (frees the autograd graph they hold)."""
        n_layers = len(self.layers)
        self.neurons = [None] * n_layers
        self.neuron_leaves = [None] * n_layers
        self.mlp_inputs = [None] * n_layers
        self.mlp_outputs = [None] * n_layers
        self.mlp_output_leaves = [None] * n_layers
        self.neuron_coefficients = [None] * n_layers
        self.residuals = [None] * (n_layers + 1)
