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

from circuits_core.errors import Cancelled

MlpRule = Literal["relp", "stop_grad_gate", "none"]
MLP_RULES: tuple[str, ...] = ("relp", "stop_grad_gate", "none")
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
            weight = getattr(module, "weight", None)
            fallback = rho if weight is None else weight.to(acc) * rho
            factor = torch.where(zero, fallback.expand_as(factor), factor)
        ctx.save_for_backward(factor)
        ctx.input_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (factor,) = ctx.saved_tensors
        grad_x = grad_y.to(factor.dtype) * factor
        return grad_x.to(ctx.input_dtype), None, None


class _HalfRuleProduct(torch.autograd.Function):
    """h = act(g) * z (HF op order); backward: dh/dg = coef_g, dh/dz = coef_z (frozen)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, z: torch.Tensor, act_fn: Any, rule: str, sink: list) -> torch.Tensor:
        s = act_fn(g)
        h = s * z
        if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
            gate_ratio = torch.sigmoid(g)
        else:
            # Identity rule for a generic act(g) = g * ratio(g): ratio frozen at its clean value.
            gate_ratio = torch.where(g == 0, torch.zeros_like(g), s / torch.where(g == 0, torch.ones_like(g), g))
        if rule == "relp":
            coef_g = 0.5 * z * gate_ratio
            coef_z = 0.5 * s
        elif rule == "stop_grad_gate":
            coef_g = None
            coef_z = s
        else:  # pragma: no cover - guarded by the caller
            raise ValueError(rule)
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


class _FrozenPatternValue(torch.autograd.Function):
    """out = attention output (computed by the model's attention function); backward: value path
    only, dV = sum over query heads of the group of A^T dOut, with the pattern A frozen."""

    @staticmethod
    def forward(
        ctx, value: torch.Tensor, out: torch.Tensor, probs: torch.Tensor, n_rep: int, should_stop: StopCheck | None
    ) -> torch.Tensor:
        ctx.save_for_backward(probs)
        ctx.n_rep = n_rep
        ctx.should_stop = should_stop
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.should_stop is not None and ctx.should_stop():
            raise Cancelled("trace stopped on request")
        (probs,) = ctx.saved_tensors  # [B, H, Tq, Tk]
        # grad_out: [B, Tq, H, d_h] (HF attention functions return the transposed layout)
        # (einsum has no batching rule under is_grads_batched; matmul does)
        grad_rep = torch.matmul(probs.to(grad_out.dtype).transpose(-1, -2), grad_out.transpose(-3, -2))  # [B, H, Tk, d_h]
        b, h, tk, d = grad_rep.shape
        grad_value = grad_rep.reshape(b, h // ctx.n_rep, ctx.n_rep, tk, d).sum(-3)
        return grad_value, None, None, None, None


def _attention_probabilities(module: nn.Module, query, key, attention_mask, kwargs: dict) -> torch.Tensor:
    """Softmax pattern [B, H, Tq, Tk] for attention functions that do not return it (sdpa, flash)."""
    n_rep = int(getattr(module, "num_key_value_groups", 1))
    if n_rep > 1:
        b, kvh, tk, d = key.shape
        key = key[:, :, None].expand(b, kvh, n_rep, tk, d).reshape(b, kvh * n_rep, tk, d)
    scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
    acc = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query.to(acc), key.to(acc).transpose(-1, -2)) * scaling
    tq, tk = scores.shape[-2:]
    if attention_mask is not None and attention_mask.dim() == 4:  # eager/sdpa: full [B, 1|H, Tq, Tk] mask
        mask = attention_mask[..., :tk]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    else:  # causal (+ sliding window) implied by the kernel; flash passes a 2-D padding mask
        blocked = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).triu(1 + tk - tq)
        window = kwargs.get("sliding_window")
        if window:
            blocked |= torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq - int(window))
        scores = scores.masked_fill(blocked, float("-inf"))
        if attention_mask is not None and attention_mask.dim() == 2:
            scores = scores.masked_fill(~attention_mask[:, None, None, :tk].bool(), float("-inf"))
    return torch.softmax(scores, dim=-1)


class _AttentionConfigView:
    """The model config as one attention module sees it while linearized: every attribute is the
    real config's, except ``_attn_implementation`` (:data:`RELP_ATTENTION`). It carries the
    implementation the frozen-pattern function wraps and the linearization's stop check."""

    __slots__ = ("_config", "relp_original_attention", "relp_should_stop")

    def __init__(self, config: Any, original: Any, should_stop: StopCheck | None) -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "relp_original_attention", original)
        object.__setattr__(self, "relp_should_stop", should_stop)

    @property
    def _attn_implementation(self) -> str:
        return RELP_ATTENTION

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the linearized view of a model config is read-only")


def _frozen_pattern_attention(module, query, key_states, value, attention_mask, *args, **kwargs):
    """The attention function of linearized modules: the wrapped implementation computes the
    forward; with gradients on, the backward is the frozen-pattern value path."""
    view = module.config
    original = view.relp_original_attention
    if not torch.is_grad_enabled() or not value.requires_grad:
        return original(module, query, key_states, value, attention_mask, *args, **kwargs)
    with torch.no_grad():
        out, weights = original(module, query, key_states, value.detach(), attention_mask, *args, **kwargs)
        probs = weights
        if probs is None or probs.shape[-1] != value.shape[-2] or probs.shape[-3] != query.shape[1]:
            probs = _attention_probabilities(module, query, key_states, attention_mask, kwargs)
    n_rep = query.shape[1] // value.shape[1]
    return _FrozenPatternValue.apply(value, out, probs.detach(), n_rep, view.relp_should_stop), weights


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
        should_stop: StopCheck | None = None,
    ) -> None:
        if mlp_rule not in MLP_RULES:
            raise ValueError(f"mlp_rule must be one of {MLP_RULES}, got {mlp_rule!r}")
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
            state.mlp_inputs[layer_index] = x
            gate = this.gate_proj(x)
            up = this.up_proj(x)
            if rule == "none" or not torch.is_grad_enabled():
                h = this.act_fn(gate) * up
            else:
                sink: list = []
                h = _HalfRuleProduct.apply(gate, up, this.act_fn, rule, sink)
                state.neuron_coefficients[layer_index] = sink[0]
            state.neurons[layer_index] = h
            if state.detach_neurons:
                leaf = h.detach().requires_grad_(True)
                state.neuron_leaves[layer_index] = leaf
                h = leaf
            out = this.down_proj(h)
            state.mlp_outputs[layer_index] = out
            if state.detach_mlp_outputs:
                out = out.detach().requires_grad_(True)
                state.mlp_output_leaves[layer_index] = out
            return out

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
            attention.__dict__["config"] = _AttentionConfigView(config, original, self.should_stop)

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
