"""Weight-based connectivity of MLP neurons (relp-spec §F ``output_projection`` / ``weight_graph``).

Context-independent structure from the weights alone, for a transformers causal LM with gated
MLPs (Llama / Qwen3 / OLMo layouts; module names as in transformers):

* output projection of neuron ``i`` in layer ``l``: ``o_i = W_U · W_down^l[:, i]`` (``[V]``), or
  through the final norm weight ``W_U · diag(w_norm) · W_down^l[:, i]`` (``include_final_norm``);
  top-k promoted (largest) and suppressed (most negative) tokens, ``output_norm = ‖W_down^l[:, i]‖``
  and ``logit_effect = max_v |o_i[v]|``. The labeler's projections use this same implementation.
* input projection: ``act(W_E W_gate^lᵀ) ⊙ (W_E W_up^lᵀ)`` (``[V, F]``; embeddings straight into
  layer ``l``'s MLP, norms and attention ignored; ``act`` is the MLP's own act_fn, SiLU for all
  supported models); top-k tokens per neuron.
* weight-graph edges into target neuron ``N`` of layer ``t`` from neuron ``m`` of layer ``l < t``:
  ``c_up = W_up^t[N]·W_down^l[:, m]``, ``c_gate = W_gate^t[N]·W_down^l[:, m]``; excitatory when both
  > 0, inhibitory when both < 0, mixed signs dropped; strength ``c_up + c_gate`` (= ±(|c_up|+|c_gate|));
  the top ``per_polarity`` per polarity per target over all earlier layers.
* similarity edges (the atlas's ``aggregation.method: output_projection``): the cosine of two
  neurons' output projections over the vocabulary, ``o_a·o_b / (‖o_a‖‖o_b‖)``, computed exactly in
  model space as ``(R w_a)·(R w_b)`` with ``R`` the Cholesky factor of ``W_effᵀ W_eff`` (``[D, D]``);
  the ``k`` most similar neurons of every neuron, positive similarities only.

Everything runs in blocks -- target neurons in chunks of ``neuron_block`` rows x groups of source
layers (or vocabulary / neuron columns) sized to ``block_memory_mb`` -- as batched matmuls whose
per-block top-k is merged into a running top-k, so Llama-3.1-8B (32 x 14,336 neurons) fits in GPU
memory. :func:`compute_connectivity` writes a :class:`~circuits_core.connectivity.ConnectivityFolder`
one layer at a time and skips layers already written (resume).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circuits_core.connectivity import EXCITATORY, INHIBITORY, ConnectivitySpec, ModelShape
from circuits_core.connectivity_files import ConnectivityFolder
from circuits_core.errors import InvalidArgument

from circuits_attribution.linearize import decoder_layers

_NEG_INF = -math.inf


# --------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------
def _layers(model: Any) -> list[Any]:
    try:
        layers = decoder_layers(model)
    except (TypeError, AttributeError):
        raise InvalidArgument(f"{type(model).__name__}: no model.layers (not a decoder-only transformers LM)") from None
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            raise InvalidArgument(f"layer {index}: no gated MLP (mlp.gate_proj/up_proj/down_proj); connectivity needs one")
    return layers


def model_shape(model: Any, *, name: str = "") -> ModelShape:
    """Layers, neurons per layer, hidden size and vocabulary of a causal LM."""
    layers = _layers(model)
    down = layers[0].mlp.down_proj.weight  # [D, F]
    return ModelShape(
        model=name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        num_layers=len(layers),
        d_mlp=int(down.shape[1]),
        d_model=int(down.shape[0]),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
    )


def effective_unembedding(model: Any, *, include_final_norm: bool, device: Any, dtype: Any) -> torch.Tensor:
    """``W_U`` ``[V, D]``, times the final norm weight per column when ``include_final_norm``."""
    w = model.get_output_embeddings().weight.detach().to(device=device, dtype=dtype)
    if include_final_norm:
        norm = getattr(getattr(model, "model", None), "norm", None)
        weight = getattr(norm, "weight", None)
        if weight is None:
            raise InvalidArgument(f"{type(model).__name__}: no model.norm.weight; use include_final_norm=False")
        w = w * weight.detach().to(device=device, dtype=dtype)[None, :]
    return w


def vocabulary_strings(tokenizer: Any, vocab_size: int) -> list[str]:
    """Printable string of every token id (ids past the tokenizer become ``<id>``)."""
    if tokenizer is None:
        return [f"<{i}>" for i in range(vocab_size)]
    n = min(len(tokenizer), vocab_size)
    decoded = tokenizer.batch_decode([[i] for i in range(n)]) if n else []
    return list(decoded) + [f"<{i}>" for i in range(n, vocab_size)]


def _resolve(model: Any, device: Any, dtype: Any) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    dev = torch.device(device) if device is not None else param.device
    if dtype is None:
        dt = param.dtype
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        from circuits_attribution.models import resolve_dtype

        dt = resolve_dtype(dtype)
    return dev, dt


def _rows_for(budget_bytes: int, columns: int, element: int, copies: int, cap: int) -> int:
    """Rows of a ``[rows, columns]`` block so that ``copies`` such blocks fit the budget (>= 1)."""
    return max(1, min(cap, budget_bytes // max(1, columns * element * copies)))


# --------------------------------------------------------------------------------------------
# Output projections
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class LayerProjection:
    """One layer's output projections (CPU tensors): norms/effects ``[F]``, top/bottom ``[F, k]``."""

    layer: int
    output_norm: torch.Tensor
    logit_effect: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor
    bottom_values: torch.Tensor
    bottom_ids: torch.Tensor


def output_projection_layer(
    model: Any,
    layer: int,
    *,
    top_k: int = 50,
    include_final_norm: bool = False,
    neuron_block: int = 512,
    block_memory_mb: int = 256,
    device: Any = None,
    dtype: Any = None,
    unembedding: torch.Tensor | None = None,
) -> LayerProjection:
    """Top-k promoted / suppressed tokens of every neuron of one layer (module docstring)."""
    layers = _layers(model)
    if not 0 <= layer < len(layers):
        raise InvalidArgument(f"layer {layer} is out of range (model has layers 0..{len(layers) - 1})")
    dev, dt = _resolve(model, device, dtype)
    with torch.no_grad():
        w_eff = unembedding if unembedding is not None else effective_unembedding(
            model, include_final_norm=include_final_norm, device=dev, dtype=dt
        )  # [V, D]
        vocab = w_eff.shape[0]
        k = min(top_k, vocab)
        w_down = layers[layer].mlp.down_proj.weight.detach().to(device=dev, dtype=dt)  # [D, F]
        n_neurons = w_down.shape[1]
        rows = _rows_for(block_memory_mb << 20, vocab, torch.finfo(dt).bits // 8, 3, neuron_block)
        effects, tv, ti, bv, bi = [], [], [], [], []
        for start in range(0, n_neurons, rows):
            # [B, V]: vocabulary contiguous so top-k runs along rows.
            proj = w_down[:, start : start + rows].T @ w_eff.T
            effects.append(proj.abs().amax(dim=1))
            top = torch.topk(proj, k, dim=1, largest=True, sorted=True)
            bottom = torch.topk(proj, k, dim=1, largest=False, sorted=True)
            tv.append(top.values)
            ti.append(top.indices)
            bv.append(bottom.values)
            bi.append(bottom.indices)
            del proj
        return LayerProjection(
            layer=layer,
            output_norm=torch.linalg.vector_norm(w_down.to(torch.float64), dim=0).cpu(),
            logit_effect=torch.cat(effects).cpu(),
            top_values=torch.cat(tv).cpu(),
            top_ids=torch.cat(ti).cpu(),
            bottom_values=torch.cat(bv).cpu(),
            bottom_ids=torch.cat(bi).cpu(),
        )


def iter_output_projections(
    model: Any,
    *,
    top_k: int = 50,
    include_final_norm: bool = False,
    neuron_block: int = 512,
    block_memory_mb: int = 256,
    device: Any = None,
    dtype: Any = None,
    layers: Iterable[int] | None = None,
) -> Iterator[LayerProjection]:
    """:func:`output_projection_layer` for every layer (or ``layers``), the unembedding prepared once."""
    dev, dt = _resolve(model, device, dtype)
    w_eff = effective_unembedding(model, include_final_norm=include_final_norm, device=dev, dtype=dt)
    wanted = range(len(_layers(model))) if layers is None else layers
    for layer in wanted:
        yield output_projection_layer(
            model, layer, top_k=top_k, include_final_norm=include_final_norm, neuron_block=neuron_block,
            block_memory_mb=block_memory_mb, device=dev, dtype=dt, unembedding=w_eff,
        )


# --------------------------------------------------------------------------------------------
# Input projections
# --------------------------------------------------------------------------------------------
def input_projection_rows(
    model: Any,
    layer: int,
    neurons: Sequence[int],
    *,
    top_k: int = 50,
    device: Any = None,
    dtype: Any = None,
    embedding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [n, k], token ids [n, k])`` of the input projection for the given neurons of ``layer``."""
    layers = _layers(model)
    if not 0 <= layer < len(layers):
        raise InvalidArgument(f"layer {layer} is out of range (model has layers 0..{len(layers) - 1})")
    dev, dt = _resolve(model, device, dtype)
    with torch.no_grad():
        emb = embedding if embedding is not None else model.get_input_embeddings().weight.detach().to(device=dev, dtype=dt)
        mlp = layers[layer].mlp
        rows = torch.as_tensor(list(neurons), dtype=torch.long, device=mlp.gate_proj.weight.device)
        w_gate = mlp.gate_proj.weight.detach()[rows].to(device=dev, dtype=dt)  # [n, D]
        w_up = mlp.up_proj.weight.detach()[rows].to(device=dev, dtype=dt)  # [n, D]
        score = mlp.act_fn(w_gate @ emb.T)  # [n, V]
        score.mul_(w_up @ emb.T)
        top = torch.topk(score, min(top_k, emb.shape[0]), dim=1, largest=True, sorted=True)
        return top.values.cpu(), top.indices.cpu()


def input_projection_layer(
    model: Any,
    layer: int,
    *,
    top_k: int = 50,
    neuron_block: int = 512,
    block_memory_mb: int = 256,
    device: Any = None,
    dtype: Any = None,
    embedding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [F, k], token ids [F, k])``: the tokens whose embeddings most activate each neuron."""
    layers = _layers(model)
    if not 0 <= layer < len(layers):
        raise InvalidArgument(f"layer {layer} is out of range (model has layers 0..{len(layers) - 1})")
    dev, dt = _resolve(model, device, dtype)
    emb = embedding if embedding is not None else model.get_input_embeddings().weight.detach().to(device=dev, dtype=dt)
    n_neurons = int(layers[layer].mlp.gate_proj.weight.shape[0])
    rows = _rows_for(block_memory_mb << 20, emb.shape[0], torch.finfo(dt).bits // 8, 3, neuron_block)
    values, ids = [], []
    for start in range(0, n_neurons, rows):
        v, i = input_projection_rows(model, layer, range(start, min(start + rows, n_neurons)), top_k=top_k,
                                     device=dev, dtype=dt, embedding=emb)
        values.append(v)
        ids.append(i)
    return torch.cat(values), torch.cat(ids)


# --------------------------------------------------------------------------------------------
# Weight graph
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _RunningTopK:
    """Per-row running top-k of a score, carrying extra per-entry columns (merged per block)."""

    k: int
    largest: bool = True
    values: torch.Tensor | None = None
    extras: list[torch.Tensor] = field(default_factory=list)

    def merge(self, values: torch.Tensor, extras: Sequence[torch.Tensor]) -> None:
        if self.values is not None:
            values = torch.cat([self.values, values], dim=1)
            extras = [torch.cat([old, new], dim=1) for old, new in zip(self.extras, extras)]
        k = min(self.k, values.shape[1])
        top = torch.topk(values, k, dim=1, largest=self.largest, sorted=True)
        self.values = top.values
        self.extras = [extra.gather(1, top.indices) for extra in extras]


def weight_graph_layer(
    model: Any,
    target_layer: int,
    *,
    per_polarity: int = 100,
    neuron_block: int = 512,
    block_memory_mb: int = 256,
    device: Any = None,
    dtype: Any = None,
    down_all: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Weight-graph edges into every neuron of ``target_layer`` (module docstring), as columns.

    Returns numpy columns ``src_layer, src_neuron, tgt_layer, tgt_neuron`` (int32), ``polarity``
    (int8, +1 / -1), ``c_up, c_gate, strength`` (float64), per target: excitatory edges by strength
    descending, then inhibitory edges by strength ascending. ``down_all`` (``[D, L*F]``, every
    layer's ``W_down`` side by side) may be passed in to avoid rebuilding it per layer.
    """
    layers = _layers(model)
    if not 0 <= target_layer < len(layers):
        raise InvalidArgument(f"layer {target_layer} is out of range (model has layers 0..{len(layers) - 1})")
    dev, dt = _resolve(model, device, dtype)
    n_f = int(layers[0].mlp.down_proj.weight.shape[1])
    empty = _empty_weight_columns()
    if target_layer == 0:
        return empty
    with torch.no_grad():
        if down_all is None:
            down_all = stacked_down_projections(model, device=dev, dtype=dt, layers=range(target_layer))
        mlp = layers[target_layer].mlp
        w_up = mlp.up_proj.weight.detach().to(device=dev, dtype=dt)  # [F, D]
        w_gate = mlp.gate_proj.weight.detach().to(device=dev, dtype=dt)  # [F, D]
        n_sources = target_layer * n_f
        element = torch.finfo(dt).bits // 8
        rows = min(neuron_block, w_up.shape[0])
        # Columns (whole source layers) per block so up, gate and two masked scores fit the budget.
        group_layers = max(1, min(target_layer, (block_memory_mb << 20) // max(1, rows * n_f * element * 5)))
        cols: dict[str, list[np.ndarray]] = {name: [] for name in empty}
        for start in range(0, w_up.shape[0], rows):
            up_rows, gate_rows = w_up[start : start + rows], w_gate[start : start + rows]
            b = up_rows.shape[0]
            exc = _RunningTopK(per_polarity)
            inh = _RunningTopK(per_polarity, largest=False)
            for l0 in range(0, target_layer, group_layers):
                c0, c1 = l0 * n_f, min(target_layer, l0 + group_layers) * n_f
                d = down_all[:, c0:c1]  # [D, n] (a view)
                c_up = up_rows @ d  # [B, n]
                c_gate = gate_rows @ d  # [B, n]
                strength = c_up + c_gate
                source = torch.arange(c0, c1, device=dev).expand(b, -1)
                # Excitatory: both > 0 <=> min > 0; inhibitory: both < 0 <=> max < 0 (scalar fills:
                # no extra full-size tensors; these elementwise passes are memory-bound).
                excite = torch.where(torch.minimum(c_up, c_gate) > 0, strength, _NEG_INF)
                exc.merge(*_block_topk(excite, per_polarity, (source, c_up, c_gate)))
                del excite
                inhibit = torch.where(torch.maximum(c_up, c_gate) < 0, strength, -_NEG_INF)
                inh.merge(*_block_topk(inhibit, per_polarity, (source, c_up, c_gate), largest=False))
                del c_up, c_gate, strength, inhibit
            for polarity, running in ((EXCITATORY, exc), (INHIBITORY, inh)):
                valid = torch.isfinite(running.values)
                rows_idx, _ = valid.nonzero(as_tuple=True)
                source, c_up, c_gate = (extra[valid] for extra in running.extras)
                source_np = source.cpu().numpy()
                cols["src_layer"].append((source_np // n_f).astype(np.int32))
                cols["src_neuron"].append((source_np % n_f).astype(np.int32))
                cols["tgt_layer"].append(np.full(len(source_np), target_layer, dtype=np.int32))
                cols["tgt_neuron"].append((rows_idx.cpu().numpy() + start).astype(np.int32))
                cols["polarity"].append(np.full(len(source_np), polarity, dtype=np.int8))
                c_up_np = c_up.to(torch.float64).cpu().numpy()
                c_gate_np = c_gate.to(torch.float64).cpu().numpy()
                cols["c_up"].append(c_up_np)
                cols["c_gate"].append(c_gate_np)
                cols["strength"].append(c_up_np + c_gate_np)
        merged = {name: np.concatenate(parts) for name, parts in cols.items()}
    # Per target: excitatory (strongest first) then inhibitory (most negative first).
    order = np.lexsort((-np.abs(merged["strength"]), -merged["polarity"], merged["tgt_neuron"]))
    return {name: values[order] for name, values in merged.items()}


def _block_topk(
    scores: torch.Tensor, k: int, extras: Sequence[torch.Tensor], *, largest: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    k = min(k, scores.shape[1])
    top = torch.topk(scores, k, dim=1, largest=largest, sorted=False)
    return top.values, [extra.gather(1, top.indices) for extra in extras]


def _empty_weight_columns() -> dict[str, np.ndarray]:
    return {
        "src_layer": np.zeros(0, np.int32), "src_neuron": np.zeros(0, np.int32),
        "tgt_layer": np.zeros(0, np.int32), "tgt_neuron": np.zeros(0, np.int32),
        "polarity": np.zeros(0, np.int8), "c_up": np.zeros(0), "c_gate": np.zeros(0), "strength": np.zeros(0),
    }  # fmt: skip


def stacked_down_projections(model: Any, *, device: Any = None, dtype: Any = None, layers: Iterable[int] | None = None) -> torch.Tensor:
    """Every (or the given leading) layer's ``W_down`` side by side: ``[D, n_layers * F]``."""
    dev, dt = _resolve(model, device, dtype)
    all_layers = _layers(model)
    wanted = list(range(len(all_layers))) if layers is None else list(layers)
    if wanted != list(range(len(wanted))):
        raise InvalidArgument("stacked_down_projections takes the leading layers 0..n-1")
    with torch.no_grad():
        return torch.cat([all_layers[i].mlp.down_proj.weight.detach().to(device=dev, dtype=dt) for i in wanted], dim=1)


# --------------------------------------------------------------------------------------------
# Output-projection similarity
# --------------------------------------------------------------------------------------------
def projection_embedding(
    model: Any, *, include_final_norm: bool = False, device: Any = None, dtype: Any = None
) -> torch.Tensor:
    """Unit vectors ``ô_i = R W_down[:, i] / ‖·‖`` ``[L*F, D]`` whose dot products are the cosines
    of the output projections over the vocabulary (``R``: Cholesky factor of ``W_effᵀ W_eff``)."""
    dev, dt = _resolve(model, device, dtype)
    with torch.no_grad():
        w_eff = effective_unembedding(model, include_final_norm=include_final_norm, device=dev, dtype=torch.float64)
        gram = w_eff.T @ w_eff  # [D, D]
        # A tiny ridge keeps the factorization defined if W_U is rank-deficient (tiny vocabularies).
        ridge = 1e-12 * torch.trace(gram) / gram.shape[0]
        factor = torch.linalg.cholesky(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=dev))  # L Lᵀ
        parts = []
        for layer in _layers(model):  # one layer at a time in float64, stored in the compute dtype
            down = layer.mlp.down_proj.weight.detach().to(device=dev, dtype=torch.float64)  # [D, F]
            z = (factor.T @ down).T  # [F, D]: ‖z_i‖² = w_iᵀ G w_i = ‖o_i‖²
            parts.append((z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-30)).to(dt))
        return torch.cat(parts)


def similarity_layer(
    model: Any,
    layer: int,
    *,
    k: int = 20,
    neuron_block: int = 512,
    block_memory_mb: int = 256,
    embedding: torch.Tensor | None = None,
    include_final_norm: bool = False,
    device: Any = None,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """The ``k`` neurons (any layer, self excluded) whose output projections are most similar to
    each neuron of ``layer``; positive cosines only. Columns ``src_*`` / ``tgt_*`` hold each pair in
    canonical order (earlier (layer, neuron) first) and ``similarity`` (float64)."""
    layers = _layers(model)
    if not 0 <= layer < len(layers):
        raise InvalidArgument(f"layer {layer} is out of range (model has layers 0..{len(layers) - 1})")
    dev, dt = _resolve(model, device, dtype)
    n_f = int(layers[0].mlp.down_proj.weight.shape[1])
    with torch.no_grad():
        z = embedding if embedding is not None else projection_embedding(
            model, include_final_norm=include_final_norm, device=dev, dtype=dt
        )
        n_total = z.shape[0]
        rows = min(neuron_block, n_f)
        element = torch.finfo(z.dtype).bits // 8
        group = max(1, (block_memory_mb << 20) // max(1, rows * element * 3))
        out_a, out_b, out_s = [], [], []
        for start in range(layer * n_f, (layer + 1) * n_f, rows):
            stop = min(start + rows, (layer + 1) * n_f)
            queries = z[start:stop]
            running = _RunningTopK(k)
            for c0 in range(0, n_total, group):
                c1 = min(n_total, c0 + group)
                sims = queries @ z[c0:c1].T  # [B, n]
                ids = torch.arange(c0, c1, device=dev).expand(sims.shape[0], -1)
                self_mask = ids == torch.arange(start, stop, device=dev)[:, None]
                sims = sims.masked_fill(self_mask, _NEG_INF)
                running.merge(*_block_topk(sims, k, (ids,)))
            values, (neighbours,) = running.values, running.extras
            valid = values > 0
            query_ids = torch.arange(start, stop, device=dev)[:, None].expand_as(neighbours)[valid]
            out_a.append(query_ids.cpu().numpy())
            out_b.append(neighbours[valid].cpu().numpy())
            out_s.append(values[valid].to(torch.float64).cpu().numpy())
    a, b, s = np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return {
        "src_layer": (lo // n_f).astype(np.int32), "src_neuron": (lo % n_f).astype(np.int32),
        "tgt_layer": (hi // n_f).astype(np.int32), "tgt_neuron": (hi % n_f).astype(np.int32),
        "similarity": s,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectivityReport:
    """What :func:`compute_connectivity` did: seconds per part and layers computed vs. resumed."""

    folder: Path
    seconds: dict[str, float]
    computed_layers: dict[str, int]
    resumed_layers: dict[str, int]
    total_seconds: float


def _columns_table(columns: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    return pa.table({name: pa.array(values) for name, values in columns.items()})


def compute_connectivity(
    model: Any,
    tokenizer: Any,
    spec: ConnectivitySpec,
    output: str | Path,
    *,
    model_name: str = "",
    device: Any = None,
    progress: bool | Callable[[str, int, int], None] = False,
) -> ConnectivityReport:
    """Compute ``spec.parts`` for ``model`` into the folder ``output`` (created or resumed).

    Layers whose part file exists are skipped (resume); each finished part is merged into its
    final file. ``progress``: True for a tqdm bar per part, or a callable ``(part, done, total)``.
    """
    from circuits_core.projections import projection_metadata, projection_table

    started = time.perf_counter()
    shape = model_shape(model, name=model_name)
    folder = ConnectivityFolder.create_or_resume(output, shape, spec)
    dev, dt = _resolve(model, device, spec.dtype)
    vocab: list[str] | None = None
    seconds: dict[str, float] = {}
    computed: dict[str, int] = {}
    resumed: dict[str, int] = {}
    common = {"neuron_block": spec.neuron_block, "block_memory_mb": spec.block_memory_mb, "device": dev, "dtype": dt}
    for part in spec.parts:
        t0 = time.perf_counter()
        done = folder.layers_done(part)
        todo = [layer for layer in range(shape.num_layers) if layer not in done]
        resumed[part], computed[part] = len(done), len(todo)
        if todo:
            report = _progress(progress, part, shape.num_layers, len(done))
            if part in ("output", "input") and vocab is None:
                vocab = vocabulary_strings(tokenizer, shape.vocab_size)
            shared: Any = None
            if part == "output":
                shared = effective_unembedding(model, include_final_norm=spec.final_norm, device=dev, dtype=dt)
            elif part == "input":
                shared = model.get_input_embeddings().weight.detach().to(device=dev, dtype=dt)
            elif part == "weights":
                shared = stacked_down_projections(model, device=dev, dtype=dt, layers=range(shape.num_layers - 1))
            else:
                shared = projection_embedding(model, include_final_norm=spec.final_norm, device=dev, dtype=dt)
            for layer in todo:
                if part == "output":
                    proj = output_projection_layer(model, layer, top_k=spec.top_k, unembedding=shared, **common)
                    table = projection_table(
                        layer=layer, output_norm=proj.output_norm.numpy(), logit_effect=proj.logit_effect.float().numpy(),
                        top_ids=proj.top_ids.numpy(), top_values=proj.top_values.float().numpy(),
                        bottom_ids=proj.bottom_ids.numpy(), bottom_values=proj.bottom_values.float().numpy(), vocab=vocab,
                    )
                elif part == "input":
                    values, ids = input_projection_layer(model, layer, top_k=spec.top_k, embedding=shared, **common)
                    table = _input_table(layer, values.float().numpy(), ids.numpy(), vocab)
                elif part == "weights":
                    table = _columns_table(weight_graph_layer(
                        model, layer, per_polarity=spec.edges_per_polarity, down_all=shared, **common
                    ))
                else:
                    table = _columns_table(similarity_layer(model, layer, k=spec.similarity_k, embedding=shared, **common))
                folder.write_part(part, layer, table)
                report(1)
            report(None)
            del shared
        metadata = None
        if part == "output":
            metadata = projection_metadata(
                model=shape.model, num_layers=shape.num_layers, top_k=spec.top_k, include_final_norm=spec.final_norm
            )
        elapsed = time.perf_counter() - t0
        folder.finish_part(part, metadata=metadata, seconds=elapsed if todo else None)
        seconds[part] = elapsed
    return ConnectivityReport(
        folder=folder.path, seconds=seconds, computed_layers=computed, resumed_layers=resumed,
        total_seconds=time.perf_counter() - started,
    )


def _input_table(layer: int, values: np.ndarray, ids: np.ndarray, vocab: Sequence[str]) -> Any:
    import pyarrow as pa

    from circuits_core.projections import token_list_array, weight_list_array

    top_ids, top_tokens = token_list_array(ids, vocab)
    n = values.shape[0]
    return pa.table({
        "layer": pa.array(np.full(n, layer, dtype=np.int32)),
        "neuron": pa.array(np.arange(n, dtype=np.int32)),
        "top_ids": top_ids,
        "top_tokens": top_tokens,
        "top_weights": weight_list_array(values),
    })


def _progress(progress: Any, part: str, total: int, initial: int) -> Callable[[int | None], None]:
    """A step function: ``step(1)`` after a layer, ``step(None)`` at the end of the part."""
    if callable(progress):
        state = {"done": initial}

        def call(step: int | None) -> None:
            if step:
                state["done"] += step
                progress(part, state["done"], total)

        return call
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=initial, desc=f"connectivity {part}", unit="layer")

        def tick(step: int | None) -> None:
            if step is None:
                bar.close()
            else:
                bar.update(step)

        return tick
    return lambda _step: None
