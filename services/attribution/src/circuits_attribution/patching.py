"""Activation patching on the real model, with RelP's prediction beside each measured effect.

See :mod:`circuits_core.patching` for the definitions. Patched runs reuse the intervention
machinery (:func:`circuits_attribution.interventions.neuron_interventions`): patching neuron
``(l, i)`` at position ``p`` is a ``set`` intervention to the other run's value there. The RelP
prediction comes from one linearized forward + backward of the clean prompt with the patch metric
(:meth:`RelPAttributor.node_scores` with a dense direction ``e_A - e_B``), so it always matches the
metric that is patched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from circuits_core.errors import InvalidArgument
from circuits_core.interventions import NeuronIntervention
from circuits_core.patching import (
    NeuronPatchEffect,
    PatchNeuron,
    PatchRequest,
    PatchResult,
    rank_correlation,
)

from circuits_attribution.interventions import neuron_interventions, neuron_shape
from circuits_attribution.linearize import decoder_layers


def capture_activations(model: nn.Module, input_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(neurons [L, T, F], logits [V] at the last position)`` of one real forward (float64 copies)."""
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            captured[index] = args[0][0].detach().to(torch.float64).clone()

        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(input_ids)], device=device), use_cache=False).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[i] for i in range(len(layers))]).cpu(), logits.detach().to(torch.float64).cpu()


def patched_effects(
    model: nn.Module,
    input_ids: Sequence[int],
    patches: Sequence[Sequence[tuple[int, int, int, float]]],
    positive: int,
    negative: int,
    *,
    batch_size: int = 16,
) -> list[float]:
    """Metric change of one patched forward per patch set, batched: row ``r`` runs ``input_ids``
    with every ``(layer, position, index, value)`` of ``patches[r]`` set (the batched form of one
    :func:`neuron_interventions` ``set`` run per patch set; the tests compare the two). Each batch
    also holds an unpatched row, and effects are taken against it, so a patch that changes
    nothing measures exactly 0 whatever the batch does to rounding."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    out: list[float] = []
    step = max(1, batch_size - 1)
    for start in range(0, len(patches), step):
        chunk = [(), *patches[start : start + step]]
        by_layer: dict[int, list[tuple[int, int, int, float]]] = {}
        for row, entries in enumerate(chunk):
            for layer, position, index, value in entries:
                by_layer.setdefault(layer, []).append((row, position, index, value))

        def make_hook(entries: list[tuple[int, int, int, float]]):
            rows = torch.tensor([e[0] for e in entries], device=device)
            positions = torch.tensor([e[1] for e in entries], device=device)
            indices = torch.tensor([e[2] for e in entries], device=device)
            values = torch.tensor([e[3] for e in entries], dtype=torch.float64, device=device)

            def hook(_module: nn.Module, args: tuple) -> tuple:
                x = args[0].clone()
                x[rows, positions, indices] = values.to(x.dtype)
                return (x, *args[1:])

            return hook

        handles = [layers[layer].mlp.down_proj.register_forward_pre_hook(make_hook(entries))
                   for layer, entries in by_layer.items()]
        try:
            with torch.no_grad():
                ids = torch.tensor([list(input_ids)] * len(chunk), device=device)
                logits = model(input_ids=ids, use_cache=False).logits[:, -1].detach().to(torch.float64).cpu()
        finally:
            for handle in handles:
                handle.remove()
        metric = logits[:, positive] - (logits[:, negative] if negative >= 0 else 0.0)
        out.extend((metric[1:] - metric[0]).tolist())
    return out


class Patcher:
    """Runs :class:`~circuits_core.patching.PatchRequest` experiments on one model.

    ``batch_size``: patched runs per batched forward (the per-neuron runs); the whole-set runs go
    through :func:`neuron_interventions`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, model_name: str | None = None, batch_size: int = 16) -> None:
        self.batch_size = max(1, int(batch_size))
        from circuits_attribution.attributor import RelPAttributor, RelPConfig

        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._config_cls = RelPConfig
        self._attributor_cls = RelPAttributor
        self.n_layers, self.n_neurons = neuron_shape(model)

    def _attributor(self, request: PatchRequest) -> Any:
        config = self._config_cls(raw=request.raw, answer_prefix=request.answer_prefix, model_name=self.model_name)
        return self._attributor_cls(self.model, self.tokenizer, config)

    # ------------------------------------------------------------------ metric
    def _metric_tokens(self, attributor: Any, request: PatchRequest, clean_logits: torch.Tensor,
                       corrupt_logits: torch.Tensor) -> tuple[int, int]:
        """(positive id, negative id or -1)."""
        if request.target_tokens:
            ids = [attributor.resolve_single_token(t) for t in request.target_tokens]
            if len(ids) == 2 and ids[0] == ids[1]:
                raise InvalidArgument(f"target tokens {request.target_tokens[0]!r} and {request.target_tokens[1]!r} are the same token")
            return ids[0], (ids[1] if len(ids) == 2 else -1)
        positive, negative = int(clean_logits.argmax()), int(corrupt_logits.argmax())
        if positive == negative:
            raise InvalidArgument(
                f"clean and corrupt prompts both predict {self.tokenizer.decode([positive])!r}; "
                "name the metric tokens with --target-tokens A B"
            )
        return positive, negative

    @staticmethod
    def _metric(logits: torch.Tensor, positive: int, negative: int) -> float:
        value = float(logits[positive])
        return value - float(logits[negative]) if negative >= 0 else value

    def _run_metric(self, ids: Sequence[int], interventions: Sequence[NeuronIntervention], positive: int, negative: int) -> float:
        device = next(self.model.parameters()).device
        with torch.no_grad(), neuron_interventions(self.model, interventions, prompt_length=len(ids)):
            logits = self.model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False).logits[0, -1]
        return self._metric(logits.detach().to(torch.float64).cpu(), positive, negative)

    # ------------------------------------------------------------------ neurons
    def _resolve_neurons(self, neurons: Sequence[PatchNeuron], length: int) -> list[tuple[PatchNeuron, tuple[int, ...]]]:
        resolved = []
        for item in neurons:
            if not 0 <= item.layer < self.n_layers:
                raise InvalidArgument(f"neuron {item.describe()}: layer {item.layer} is out of range (model has layers 0..{self.n_layers - 1})")
            if not 0 <= item.index < self.n_neurons:
                raise InvalidArgument(f"neuron {item.describe()}: index {item.index} is out of range (layers have neurons 0..{self.n_neurons - 1})")
            if item.position is None:
                positions = tuple(range(length))
            else:
                p = item.position + length if item.position < 0 else item.position
                if not 0 <= p < length:
                    raise InvalidArgument(
                        f"neuron {item.describe()}: position {item.position} is outside the prompt "
                        f"({length} tokens: 0..{length - 1} or -{length}..-1)"
                    )
                positions = (p,)
            resolved.append((item, positions))
        return resolved

    @staticmethod
    def top_neurons(scores: torch.Tensor, top: int) -> list[PatchNeuron]:
        """The ``top`` (layer, index, position) entries by |RelP| (``scores`` ``[L, T, F]``), largest first."""
        L, T, F = scores.shape
        flat = scores.reshape(-1).abs().to(torch.float64)
        k = min(top, flat.numel())
        values, order = torch.topk(flat, k)
        picked = []
        for value, flat_index in zip(values.tolist(), order.tolist()):
            if value <= 0:
                break
            layer, rest = divmod(flat_index, T * F)
            position, index = divmod(rest, F)
            picked.append(PatchNeuron(layer=layer, index=index, position=position))
        return picked

    @staticmethod
    def _patch(item: tuple[int, int, tuple[int, ...]], source: torch.Tensor) -> list[NeuronIntervention]:
        layer, index, positions = item
        return [
            NeuronIntervention(layer=layer, index=index, mode="set", value=float(source[layer, p, index]), positions=(p,))
            for p in positions
        ]

    # ------------------------------------------------------------------ run
    def run(self, request: PatchRequest) -> PatchResult:
        """Patch each neuron and the whole set in both directions; predictions from RelP."""
        attributor = self._attributor(request)
        clean_ids = attributor.encode_prompt(request.clean)
        corrupt_ids = attributor.encode_prompt(request.corrupt)
        decode = self.tokenizer.decode
        if len(clean_ids) != len(corrupt_ids):
            raise InvalidArgument(
                f"clean and corrupt prompts tokenize to {len(clean_ids)} and {len(corrupt_ids)} tokens; "
                "patching needs prompts of the same length (e.g. swap one single-token word)"
            )
        T = len(clean_ids)
        differing = [p for p in range(T) if clean_ids[p] != corrupt_ids[p]]
        if not differing:
            raise InvalidArgument("clean and corrupt prompts tokenize to the same tokens; there is nothing to patch")
        first_difference = differing[0]
        clean_acts, clean_logits = capture_activations(self.model, clean_ids)
        corrupt_acts, corrupt_logits = capture_activations(self.model, corrupt_ids)
        positive, negative = self._metric_tokens(attributor, request, clean_logits, corrupt_logits)
        clean_metric = self._metric(clean_logits, positive, negative)
        corrupt_metric = self._metric(corrupt_logits, positive, negative)

        # RelP of every neuron of the clean prompt for exactly this metric: m = logits . direction.
        vocab = clean_logits.shape[0]
        direction = torch.zeros(vocab, dtype=torch.float64)
        direction[positive] = 1.0
        if negative >= 0:
            direction[negative] = -1.0
        node_scores = attributor.node_scores(clean_ids, direction=direction)
        scores = node_scores.scores.detach().to(torch.float64).cpu()  # [L, T, F]
        relp_acts = node_scores.activations.detach().to(torch.float64).cpu()
        # d~m/dh = RelP / h (the node pass multiplies the linearized gradient by h).
        grad = torch.where(relp_acts != 0, scores / torch.where(relp_acts != 0, relp_acts, torch.ones_like(relp_acts)),
                           torch.zeros_like(scores))

        if request.neurons:
            neurons = list(request.neurons)
        else:
            # Before the first differing token both runs are identical: nothing to patch there.
            candidates = scores.clone()
            candidates[:, :first_difference, :] = 0
            neurons = self.top_neurons(candidates, request.top)
        resolved = self._resolve_neurons(neurons, T)
        set_noise: list[NeuronIntervention] = []
        set_denoise: list[NeuronIntervention] = []
        noise_rows, denoise_rows = [], []
        for item, positions in resolved:
            key = (item.layer, item.index, positions)
            set_noise += self._patch(key, corrupt_acts)
            set_denoise += self._patch(key, clean_acts)
            noise_rows.append([(item.layer, p, item.index, float(corrupt_acts[item.layer, p, item.index])) for p in positions])
            denoise_rows.append([(item.layer, p, item.index, float(clean_acts[item.layer, p, item.index])) for p in positions])
        noised = patched_effects(self.model, clean_ids, noise_rows, positive, negative, batch_size=self.batch_size)
        denoised = patched_effects(self.model, corrupt_ids, denoise_rows, positive, negative, batch_size=self.batch_size)
        effects = []
        set_predicted = 0.0
        for (item, positions), noise_m, denoise_m in zip(resolved, noised, denoised):
            where = list(positions)
            delta = corrupt_acts[item.layer, where, item.index] - clean_acts[item.layer, where, item.index]
            predicted = float((grad[item.layer, where, item.index] * delta).sum())
            set_predicted += predicted
            single = item.position is not None
            effects.append(NeuronPatchEffect(
                layer=item.layer, index=item.index, position=positions[0] if single else None,
                clean_activation=float(clean_acts[item.layer, positions[0], item.index]) if single else math.nan,
                corrupt_activation=float(corrupt_acts[item.layer, positions[0], item.index]) if single else math.nan,
                relp=float(scores[item.layer, where, item.index].sum()),
                predicted=predicted,
                noising=noise_m,
                denoising=denoise_m,
            ))
        set_noising = self._run_metric(clean_ids, _dedupe(set_noise), positive, negative) - clean_metric if effects else 0.0
        set_denoising = self._run_metric(corrupt_ids, _dedupe(set_denoise), positive, negative) - corrupt_metric if effects else 0.0
        differs = [bool((clean_acts[item.layer, list(positions), item.index]
                         != corrupt_acts[item.layer, list(positions), item.index]).any()) for item, positions in resolved]
        predicted_list = [e.predicted for e, d in zip(effects, differs) if d]
        noising_list = [e.noising for e, d in zip(effects, differs) if d]
        pos_text = decode([positive])
        neg_text = decode([negative]) if negative >= 0 else ""
        metric = f"logit({pos_text!r}) - logit({neg_text!r})" if negative >= 0 else f"logit({pos_text!r})"
        return PatchResult(
            clean_tokens=tuple(decode([i]) for i in clean_ids),
            corrupt_tokens=tuple(decode([i]) for i in corrupt_ids),
            metric=metric,
            positive_token=pos_text, positive_token_id=positive,
            negative_token=neg_text, negative_token_id=negative,
            clean_metric=clean_metric, corrupt_metric=corrupt_metric,
            neurons=tuple(effects),
            set_noising=set_noising, set_denoising=set_denoising, set_predicted=set_predicted,
            rank_correlation=rank_correlation(predicted_list, noising_list),
            magnitude_rank_correlation=rank_correlation([abs(v) for v in predicted_list], [abs(v) for v in noising_list]),
            compared=len(predicted_list),
            first_difference=first_difference,
        )


def _dedupe(interventions: list[NeuronIntervention]) -> list[NeuronIntervention]:
    """One set-intervention per (layer, index, position): overlapping neuron specs patch once."""
    seen: dict[tuple[int, int, tuple[int, ...] | None], NeuronIntervention] = {}
    for item in interventions:
        seen.setdefault((item.layer, item.index, item.positions), item)
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# Service entry point
# --------------------------------------------------------------------------------------------
def run_patch(engine: Any, request: PatchRequest) -> PatchResult:
    """Serve one Patch request on an attribution engine (anything with ``model`` and ``tokenizer``;
    the caller holds it exclusively because patching installs hooks)."""
    return Patcher(engine.model, engine.tokenizer, model_name=getattr(engine, "model_name", None)).run(request)
