"""Output projections of MLP neurons for the labeler: which tokens a neuron promotes and suppresses.

For neuron ``i`` of layer ``l`` the projection is ``o_i = W_U · diag(w_norm) · W_down^l[:, i]``
(``include_final_norm=True``, the labeler's default: the direct effect on the logits of a unit of
neuron activation, up to the positive RMS factor of the final norm, which changes no ranking) or
relp-spec §F's ``W_U · W_down[:, i]`` (``include_final_norm=False``). The computation is the one
implementation in :mod:`circuits_attribution.connectivity` (install ``circuits-labeler[projections]``);
the Parquet file is owned by :mod:`circuits_core.projections` (``circuits connectivity`` writes the
same file, so its ``output_projections.parquet`` can be the labeler's ``projections_path``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from circuits_core.errors import FailedPrecondition
from circuits_core.projections import SCHEMA_VERSION, NeuronProjection, OutputProjections, TokenWeight

__all__ = [
    "SCHEMA_VERSION", "InputProjection", "LazyOutputProjections", "NeuronProjection", "OutputProjections", "TokenWeight",
    "compute_output_projections",
    "iter_layer_projections", "load_model_for_projections", "vocabulary_strings",
]


def vocabulary_strings(tokenizer: Any, vocab_size: int) -> list[str]:
    """Printable string of every token id (ids past the tokenizer become ``<id>``)."""
    from circuits_attribution.connectivity import vocabulary_strings as strings

    return strings(tokenizer, vocab_size)


def iter_layer_projections(
    model: Any,
    *,
    top_k: int = 20,
    block_size: int = 512,
    include_final_norm: bool = True,
    device: str | None = None,
    dtype: Any = None,
    only_layers: Sequence[int] | None = None,
) -> Iterator[tuple[int, Any, Any, Any, Any, Any, Any]]:
    """Per layer: ``(layer, output_norm[F], logit_effect[F], top_vals[F,k], top_ids[F,k],
    bottom_vals[F,k], bottom_ids[F,k])`` as CPU tensors (bottom = most negative first).
    ``only_layers``: just these layers (default: all)."""
    import torch

    from circuits_attribution.connectivity import iter_output_projections

    for proj in iter_output_projections(
        model, top_k=top_k, include_final_norm=include_final_norm, neuron_block=block_size,
        device=device, dtype=dtype or torch.float32, layers=only_layers,
    ):
        yield (proj.layer, proj.output_norm.float(), proj.logit_effect, proj.top_values, proj.top_ids,
               proj.bottom_values, proj.bottom_ids)


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
    from circuits_attribution.connectivity import model_shape

    shape = model_shape(model)
    num_layers, vocab_size = shape.num_layers, shape.vocab_size
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


def _layer_entries(item: tuple[int, Any, Any, Any, Any, Any, Any], vocab: Sequence[str]) -> dict[tuple[int, int], NeuronProjection]:
    """The NeuronProjections of one :func:`iter_layer_projections` item."""
    layer, norms, effects, tv, ti, bv, bi = item
    norms_l, effects_l = norms.tolist(), effects.tolist()
    tv_l, ti_l, bv_l, bi_l = tv.tolist(), ti.tolist(), bv.tolist(), bi.tolist()
    return {
        (layer, neuron): NeuronProjection(
            layer=layer,
            neuron=neuron,
            output_norm=norms_l[neuron],
            logit_effect=effects_l[neuron],
            promotes=tuple(TokenWeight(token_id=t, token=vocab[t], weight=w) for t, w in zip(ti_l[neuron], tv_l[neuron])),
            suppresses=tuple(TokenWeight(token_id=t, token=vocab[t], weight=w) for t, w in zip(bi_l[neuron], bv_l[neuron])),
        )
        for neuron in range(len(norms_l))
    }


class LazyOutputProjections:
    """Output projections computed layer by layer, when a unit of that layer is first asked for.

    A run that labels a few units (``circuits label --max-units 20``: the late layers) computes
    only their layers. Once every layer has been computed the full set is written to ``save_to``
    (when given), so a complete run leaves the same file :func:`compute_output_projections` +
    :meth:`OutputProjections.save` would; a partial run writes nothing.
    """

    def __init__(
        self, model: Any, *, tokenizer: Any = None, model_name: str = "", top_k: int = 20, block_size: int = 512,
        include_final_norm: bool = True, device: str | None = None, save_to: str | Path | None = None,
    ) -> None:
        import threading

        self._model = model
        self._tokenizer = tokenizer
        self._block_size = block_size
        self._device = device
        self._save_to = Path(save_to) if save_to else None
        self._vocab: list[str] | None = None
        self._lock = threading.RLock()
        self._computed: dict[int, dict[tuple[int, int], NeuronProjection]] = {}
        from circuits_attribution.connectivity import model_shape

        shape = model_shape(model)
        self.model = model_name
        self.num_layers = shape.num_layers
        self.top_k = top_k
        self.include_final_norm = include_final_norm
        self._width = shape.d_mlp
        self._vocab_size = shape.vocab_size

    @property
    def computed_layers(self) -> list[int]:
        """The layers computed so far."""
        return sorted(self._computed)

    def get(self, layer: int, neuron: int) -> NeuronProjection | None:
        if not (0 <= layer < self.num_layers):
            return None
        entries = self._computed.get(layer)
        if entries is None:
            entries = self._compute(layer)
        return entries.get((layer, neuron))

    def _compute(self, layer: int) -> dict[tuple[int, int], NeuronProjection]:
        with self._lock:
            if layer in self._computed:
                return self._computed[layer]
            if self._vocab is None:
                self._vocab = vocabulary_strings(self._tokenizer, self._vocab_size)
            (item,) = iter_layer_projections(
                self._model, top_k=self.top_k, block_size=self._block_size, include_final_norm=self.include_final_norm,
                device=self._device, only_layers=(layer,),
            )  # fmt: skip
            self._computed[layer] = entries = _layer_entries(item, self._vocab)
            if self._save_to is not None and len(self._computed) == self.num_layers:
                self.complete().save(self._save_to)
            return entries

    def complete(self) -> OutputProjections:
        """Every layer's projections (computing the missing layers) as an :class:`OutputProjections`."""
        for layer in range(self.num_layers):
            if layer not in self._computed:
                self._compute(layer)
        by_unit: dict[tuple[int, int], NeuronProjection] = {}
        for layer in sorted(self._computed):
            by_unit.update(self._computed[layer])
        return OutputProjections(model=self.model, num_layers=self.num_layers, top_k=self.top_k,
                                 include_final_norm=self.include_final_norm, by_unit=by_unit)  # fmt: skip

    def neurons_per_layer(self) -> int:
        return self._width

    def unit_keys(self) -> list[tuple[int, int]]:
        return [(layer, neuron) for layer in range(self.num_layers) for neuron in range(self._width)]

    def __len__(self) -> int:
        return self.num_layers * self._width


def load_model_for_projections(name: str, *, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for ``name`` through circuits_attribution.load_model (local directories,
    the bundled SmolLM2, the offline hub cache); NotFound with one line when nothing matches."""
    try:
        from circuits_attribution.models import load_model
    except ImportError:  # e.g. the circuits-labeler image, which carries neither it nor torch
        raise FailedPrecondition(
            "computing output projections needs torch and transformers (pip install 'circuits-labeler[projections]'); "
            "set labeling.compute_projections: false or provide labeling.projections_path"
        ) from None

    loaded = load_model(name, dtype="float32", device=device)
    return loaded.model, loaded.tokenizer


class InputProjection:
    """Tokens whose embeddings, fed straight into a layer's MLP, drive a neuron most (relp-spec §F:
    ``act(W_E W_gate[i]) * (W_E W_up[i])`` per vocabulary token, norms and attention ignored).

    The per-neuron form of :func:`circuits_attribution.connectivity.input_projection_rows` (the one
    implementation), done on demand and cached; called as ``projection(layer, neuron) ->
    [TokenWeight, ...]`` (strongest positive first); () for a neuron the model does not have.
    """

    def __init__(self, model: Any, tokenizer: Any, *, top_k: int = 10) -> None:
        self.model = model
        self.top_k = top_k
        self._vocab: list[str] | None = None
        self._tokenizer = tokenizer
        self._cache: dict[tuple[int, int], tuple[TokenWeight, ...]] = {}

    def __call__(self, layer: int, neuron: int) -> tuple[TokenWeight, ...]:
        import torch

        from circuits_attribution.connectivity import input_projection_rows, model_shape

        key = (layer, neuron)
        if key in self._cache:
            return self._cache[key]
        shape = model_shape(self.model)
        if not (0 <= layer < shape.num_layers and 0 <= neuron < shape.d_mlp):
            return ()
        values, ids = input_projection_rows(self.model, layer, [neuron], top_k=self.top_k, dtype=torch.float32)
        if self._vocab is None:
            self._vocab = vocabulary_strings(self._tokenizer, shape.vocab_size)
        out = tuple(TokenWeight(token_id=int(i), token=self._vocab[int(i)], weight=float(v))
                    for v, i in zip(values[0].tolist(), ids[0].tolist()))
        self._cache[key] = out
        return out
