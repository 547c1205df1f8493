"""Output projections of MLP neurons: which tokens a neuron promotes and suppresses.

For neuron ``i`` of layer ``l`` the projection is ``o_i = W_U · diag(w_norm) · W_down^l[:, i]``
(``lm_head.weight`` ``[V, H]``, the final norm weight ``[H]``, ``mlp.down_proj.weight`` ``[H, F]``):
the direct effect on the logits of a unit of neuron activation, up to the positive RMS factor of
the final norm (which changes no ranking). ``include_final_norm=False`` gives relp-spec §F's
``W_U · W_down[:, i]``. Computed per layer in neuron blocks of ``[V, B]`` so memory stays bounded.

The result is stored as Parquet (one row per neuron: ``output_norm``, ``logit_effect`` = max
|o_i|, top-k promoted / suppressed token ids, strings and weights) and read back with
:meth:`OutputProjections.load`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuits_core.errors import CorruptInput, FailedPrecondition, InvalidArgument, NotFound

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenWeight:
    token_id: int
    token: str
    weight: float


@dataclass(frozen=True, slots=True, kw_only=True)
class NeuronProjection:
    """Top promoted (largest) and suppressed (most negative) tokens of one neuron."""

    layer: int
    neuron: int
    output_norm: float
    #: max_v |o_i[v]|: the strongest direct logit effect.
    logit_effect: float
    promotes: tuple[TokenWeight, ...] = ()
    suppresses: tuple[TokenWeight, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputProjections:
    """All neurons' projections, keyed by ``(layer, neuron)``."""

    model: str
    num_layers: int
    top_k: int
    include_final_norm: bool
    by_unit: dict[tuple[int, int], NeuronProjection] = field(default_factory=dict)

    def get(self, layer: int, neuron: int) -> NeuronProjection | None:
        return self.by_unit.get((layer, neuron))

    def __len__(self) -> int:
        return len(self.by_unit)

    # -- storage -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write Parquet atomically (tmp + rename); metadata carries model, layers, top_k."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = sorted(self.by_unit.values(), key=lambda p: (p.layer, p.neuron))

        def col(fn: Callable[[NeuronProjection], Any]) -> list[Any]:
            return [fn(p) for p in rows]

        table = pa.table({
            "layer": pa.array(col(lambda p: p.layer), pa.int32()),
            "neuron": pa.array(col(lambda p: p.neuron), pa.int32()),
            "output_norm": pa.array(col(lambda p: p.output_norm), pa.float32()),
            "logit_effect": pa.array(col(lambda p: p.logit_effect), pa.float32()),
            "promote_ids": pa.array(col(lambda p: [t.token_id for t in p.promotes]), pa.list_(pa.int32())),
            "promote_tokens": pa.array(col(lambda p: [t.token for t in p.promotes]), pa.list_(pa.string())),
            "promote_weights": pa.array(col(lambda p: [t.weight for t in p.promotes]), pa.list_(pa.float32())),
            "suppress_ids": pa.array(col(lambda p: [t.token_id for t in p.suppresses]), pa.list_(pa.int32())),
            "suppress_tokens": pa.array(col(lambda p: [t.token for t in p.suppresses]), pa.list_(pa.string())),
            "suppress_weights": pa.array(col(lambda p: [t.weight for t in p.suppresses]), pa.list_(pa.float32())),
        })
        meta = {
            "model": self.model, "num_layers": self.num_layers, "top_k": self.top_k,
            "include_final_norm": self.include_final_norm, "schema_version": SCHEMA_VERSION,
        }
        table = table.replace_schema_metadata({"circuits.projections": json.dumps(meta)})
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OutputProjections:
        """Read a file written by :meth:`save`; a missing or foreign file raises NotFound / CorruptInput."""
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise NotFound(f"output projections not found: {path}")
        try:
            table = pq.read_table(path)
            meta = json.loads((table.schema.metadata or {})[b"circuits.projections"])
        except (OSError, KeyError, ValueError) as exc:
            raise CorruptInput(f"{path}: not an output projections file ({exc.__class__.__name__})") from None
        data = table.to_pydict()
        by_unit = {}
        for i in range(table.num_rows):
            proj = NeuronProjection(
                layer=data["layer"][i],
                neuron=data["neuron"][i],
                output_norm=data["output_norm"][i],
                logit_effect=data["logit_effect"][i],
                promotes=tuple(
                    TokenWeight(token_id=t, token=s, weight=w)
                    for t, s, w in zip(data["promote_ids"][i], data["promote_tokens"][i], data["promote_weights"][i])
                ),
                suppresses=tuple(
                    TokenWeight(token_id=t, token=s, weight=w)
                    for t, s, w in zip(data["suppress_ids"][i], data["suppress_tokens"][i], data["suppress_weights"][i])
                ),
            )
            by_unit[(proj.layer, proj.neuron)] = proj
        return cls(
            model=str(meta.get("model", "")),
            num_layers=int(meta["num_layers"]),
            top_k=int(meta["top_k"]),
            include_final_norm=bool(meta["include_final_norm"]),
            by_unit=by_unit,
        )


def _decoder_layers(model: Any) -> Any:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise InvalidArgument(f"{type(model).__name__}: no model.layers (not a decoder-only transformers LM)")
    return layers


def _final_norm_weight(model: Any) -> Any:
    norm = getattr(getattr(model, "model", None), "norm", None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise InvalidArgument(f"{type(model).__name__}: no model.norm.weight; use include_final_norm=False")
    return weight


def vocabulary_strings(tokenizer: Any, vocab_size: int) -> list[str]:
    """Printable string of every token id (decoded once; ids past the tokenizer become ``<id>``)."""
    if tokenizer is None:
        return [f"<{i}>" for i in range(vocab_size)]
    out = []
    n = len(tokenizer)
    for i in range(vocab_size):
        out.append(tokenizer.decode([i]) if i < n else f"<{i}>")
    return out


def iter_layer_projections(
    model: Any,
    *,
    top_k: int = 20,
    block_size: int = 512,
    include_final_norm: bool = True,
    device: str | None = None,
    dtype: Any = None,
) -> Iterator[tuple[int, Any, Any, Any, Any, Any, Any]]:
    """Per layer: ``(layer, output_norm[F], logit_effect[F], top_vals[F,k], top_ids[F,k],
    bottom_vals[F,k], bottom_ids[F,k])`` as CPU tensors (bottom = most negative first)."""
    import torch

    layers = _decoder_layers(model)
    unembed = model.get_output_embeddings().weight  # [V, H]
    device = device or str(unembed.device)
    dtype = dtype or torch.float32
    with torch.no_grad():
        w_eff = unembed.detach().to(device=device, dtype=dtype)  # [V, H]
        if include_final_norm:
            w_eff = w_eff * _final_norm_weight(model).detach().to(device=device, dtype=dtype)[None, :]
        vocab = w_eff.shape[0]
        k = min(top_k, vocab)
        for layer_index, layer in enumerate(layers):
            w_down = layer.mlp.down_proj.weight.detach().to(device=device, dtype=dtype)  # [H, F]
            n_neurons = w_down.shape[1]
            norms = torch.linalg.vector_norm(w_down, dim=0)  # [F]
            effects, tv, ti, bv, bi = [], [], [], [], []
            for start in range(0, n_neurons, block_size):
                # [B, V]: vocab contiguous so top-k runs along rows (faster than along dim 0).
                proj = w_down[:, start : start + block_size].T @ w_eff.T
                effects.append(proj.abs().amax(dim=1))
                top = torch.topk(proj, k, dim=1, largest=True, sorted=True)
                bottom = torch.topk(proj, k, dim=1, largest=False, sorted=True)
                tv.append(top.values)
                ti.append(top.indices)
                bv.append(bottom.values)
                bi.append(bottom.indices)
            yield (
                layer_index,
                norms.cpu(),
                torch.cat(effects).cpu(),
                torch.cat(tv).cpu(),
                torch.cat(ti).cpu(),
                torch.cat(bv).cpu(),
                torch.cat(bi).cpu(),
            )
            del w_down


def compute_output_projections(
    model: Any,
    *,
    tokenizer: Any = None,
    model_name: str = "",
    top_k: int = 20,
    block_size: int = 512,
    include_final_norm: bool = True,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> OutputProjections:
    """Top-``top_k`` promoted and suppressed tokens of every neuron of a transformers causal LM.

    Promoted weights are the largest entries of ``o_i`` (descending), suppressed the smallest
    (ascending, i.e. most negative first). ``progress(layer_done, num_layers)`` after each layer.
    """
    layers = _decoder_layers(model)
    num_layers = len(layers)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    vocab = vocabulary_strings(tokenizer, vocab_size)
    by_unit: dict[tuple[int, int], NeuronProjection] = {}
    for layer, norms, effects, tv, ti, bv, bi in iter_layer_projections(
        model, top_k=top_k, block_size=block_size, include_final_norm=include_final_norm, device=device
    ):
        norms_l, effects_l = norms.tolist(), effects.tolist()
        tv_l, ti_l, bv_l, bi_l = tv.tolist(), ti.tolist(), bv.tolist(), bi.tolist()
        for neuron in range(len(norms_l)):
            by_unit[(layer, neuron)] = NeuronProjection(
                layer=layer,
                neuron=neuron,
                output_norm=norms_l[neuron],
                logit_effect=effects_l[neuron],
                promotes=tuple(
                    TokenWeight(token_id=t, token=vocab[t], weight=w) for t, w in zip(ti_l[neuron], tv_l[neuron])
                ),
                suppresses=tuple(
                    TokenWeight(token_id=t, token=vocab[t], weight=w) for t, w in zip(bi_l[neuron], bv_l[neuron])
                ),
            )
        if progress is not None:
            progress(layer + 1, num_layers)
    return OutputProjections(
        model=model_name, num_layers=num_layers, top_k=top_k, include_final_norm=include_final_norm, by_unit=by_unit
    )


def load_model_for_projections(name: str, *, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for ``name``: circuits_attribution.load_model when installed (it knows
    the bundled SmolLM2), else transformers from a local directory / the offline hub cache."""
    try:
        from circuits_attribution.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        loaded = load_model(name, dtype="float32", device=device)
        return loaded.model, loaded.tokenizer
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:  # e.g. the circuits-labeler image, which carries no torch
        raise FailedPrecondition(
            "computing output projections needs torch and transformers (pip install 'circuits-labeler[projections]'); "
            "set labeling.compute_projections: false or provide labeling.projections_path"
        ) from None

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise NotFound(f"cannot load model {name!r} for output projections: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer


class InputProjection:
    """Tokens whose embeddings, fed straight into a layer's MLP, drive a neuron most (relp-spec §F:
    ``silu(W_E W_gate[i]) * (W_E W_up[i])`` per vocabulary token, norms and attention ignored).

    A small per-neuron computation (``[V, H] @ [H]`` twice), done on demand and cached; called as
    ``projection(layer, neuron) -> [TokenWeight, ...]`` (strongest positive first).
    """

    def __init__(self, model: Any, tokenizer: Any, *, top_k: int = 10) -> None:
        self.model = model
        self.top_k = top_k
        self._vocab: list[str] | None = None
        self._tokenizer = tokenizer
        self._cache: dict[tuple[int, int], tuple[TokenWeight, ...]] = {}

    def __call__(self, layer: int, neuron: int) -> tuple[TokenWeight, ...]:
        import torch

        key = (layer, neuron)
        if key in self._cache:
            return self._cache[key]
        layers = _decoder_layers(self.model)
        if not 0 <= layer < len(layers):
            return ()
        mlp = layers[layer].mlp
        if not 0 <= neuron < mlp.gate_proj.weight.shape[0]:
            return ()
        with torch.no_grad():
            embed = self.model.get_input_embeddings().weight.float()  # [V, H]
            gate = embed @ mlp.gate_proj.weight[neuron].float()  # [V]
            up = embed @ mlp.up_proj.weight[neuron].float()  # [V]
            drive = torch.nn.functional.silu(gate) * up
            top = torch.topk(drive, min(self.top_k, drive.shape[0]))
        if self._vocab is None:
            self._vocab = vocabulary_strings(self._tokenizer, embed.shape[0])
        out = tuple(TokenWeight(token_id=int(i), token=self._vocab[int(i)], weight=float(v))
                    for v, i in zip(top.values.tolist(), top.indices.tolist()))
        self._cache[key] = out
        return out
