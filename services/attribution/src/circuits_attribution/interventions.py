"""Interventions on the real (not linearized) model: set, scale, zero or mean-ablate neurons.

A neuron value is a coordinate of the input of ``mlp.down_proj`` (relp-spec §B.1). Changes are
applied by forward pre-hooks on ``down_proj`` that rewrite ``input[0][..., position, index]``.
Hooks live only inside the :func:`neuron_interventions` / :func:`neuron_masks` context managers
(removed in ``finally``), so an intervention never leaks into a later forward or trace.

Mean ablation uses per-neuron means over a reference prompt set, computed once per model and
cached on disk at ``circuits_home()/means/<model-hash>.pt`` (:func:`neuron_means`).
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from circuits_core.activations import ActivationRequest, ActivationResult, PromptActivations
from circuits_core.config import circuits_home
from circuits_core.errors import InvalidArgument
from circuits_core.interventions import InterventionRequest, InterventionResult, NeuronIntervention, TokenProbability

from circuits_attribution.linearize import decoder_layers

#: Reference prompts for mean activations (generic text of mixed kinds; raw, no chat template).
DEFAULT_MEAN_PROMPTS: tuple[str, ...] = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the door slowly and looked into the dark room.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "My favourite colours are blue, green and a deep shade of red.",
    "Question: What is 12 plus 30? Answer: 42.",
    "The stock market fell sharply on Monday after the announcement.",
    "Shakespeare wrote Hamlet, Macbeth, Othello and King Lear.",
    "To make bread, mix flour, water, yeast and salt, then let the dough rise.",
    "The mitochondria is the powerhouse of the cell.",
    "He said, \"I will be there at seven o'clock tomorrow evening.\"",
    "Tokyo is the largest city in Japan, with more than thirteen million people.",
    "for i in range(10):\n    total += i * i",
    "The weather today is sunny with a light breeze from the west.",
    "Dogs, cats and rabbits are common household pets.",
    "The theorem states that the square of the hypotenuse equals the sum of the squares of the other sides.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "Please send the report to the whole team before Friday.",
    "The Amazon river flows through Brazil into the Atlantic Ocean.",
    "Mount Everest is the highest mountain on Earth.",
    "I can't believe how fast this year has gone by!",
)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def neuron_shape(model: nn.Module) -> tuple[int, int]:
    """(number of decoder layers, neurons per layer = down_proj input size)."""
    layers = decoder_layers(model)
    return len(layers), int(layers[0].mlp.down_proj.in_features)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Resolved:
    layer: int
    index: int
    mode: str
    value: float
    positions: tuple[int, ...] | None  # absolute prompt positions; None = every prompt position
    include_generated: bool


def resolve_interventions(
    interventions: Sequence[NeuronIntervention], *, n_layers: int, n_neurons: int, prompt_length: int
) -> list[_Resolved]:
    """Check layer / index / positions against the model and prompt; negative positions -> absolute.

    Raises InvalidArgument naming the offending intervention and the valid range.
    """
    resolved: list[_Resolved] = []
    for item in interventions:
        if not isinstance(item, NeuronIntervention):
            raise InvalidArgument(f"expected a NeuronIntervention, got {type(item).__name__}")
        name = item.describe()
        if not 0 <= item.layer < n_layers:
            raise InvalidArgument(f"intervention {name}: layer {item.layer} is out of range (model has layers 0..{n_layers - 1})")
        if not 0 <= item.index < n_neurons:
            raise InvalidArgument(
                f"intervention {name}: neuron index {item.index} is out of range (layers have neurons 0..{n_neurons - 1})"
            )
        positions = None
        if item.positions is not None:
            absolute = []
            for p in item.positions:
                q = p + prompt_length if p < 0 else p
                if not 0 <= q < prompt_length:
                    raise InvalidArgument(
                        f"intervention {name}: position {p} is outside the prompt "
                        f"({prompt_length} tokens: 0..{prompt_length - 1} or -{prompt_length}..-1)"
                    )
                absolute.append(q)
            positions = tuple(sorted(set(absolute)))
        resolved.append(
            _Resolved(layer=item.layer, index=item.index, mode=item.mode, value=float(item.value),
                      positions=positions, include_generated=item.include_generated)
        )
    return resolved


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class HookState:
    """Mutable state shared with the hooks: absolute position of the first token of the next call.

    Set ``offset`` before each incremental (KV-cached) forward; 0 for a full-sequence forward.
    ``calls`` counts hook invocations (tests use it to prove hooks fired / are gone).
    """

    offset: int = 0
    calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _position_mask(item: _Resolved, offset: int, length: int, prompt_length: int, device: torch.device) -> torch.Tensor:
    absolute = torch.arange(offset, offset + length, device=device)
    if item.positions is None:
        mask = absolute < prompt_length
    else:
        mask = torch.isin(absolute, torch.tensor(item.positions, device=device))
    if item.include_generated:
        mask = mask | (absolute >= prompt_length)
    return mask


@contextmanager
def neuron_interventions(
    model: nn.Module,
    interventions: Sequence[NeuronIntervention],
    *,
    prompt_length: int,
    means: torch.Tensor | None = None,
) -> Iterator[HookState]:
    """Apply `interventions` to every forward of `model` inside the block; hooks removed on exit.

    Positions are absolute token positions; for KV-cached decoding set ``state.offset`` to the
    position of the first token fed in each call. `means` ([L, F]) is required for mode 'mean'.
    Multiple interventions on the same neuron apply in the given order. Raises InvalidArgument
    for out-of-range layers, indices or positions.
    """
    n_layers, n_neurons = neuron_shape(model)
    resolved = resolve_interventions(interventions, n_layers=n_layers, n_neurons=n_neurons, prompt_length=prompt_length)
    if any(item.mode == "mean" for item in resolved):
        if means is None:
            raise InvalidArgument("mean ablation needs neuron means (none were given)")
        if tuple(means.shape) != (n_layers, n_neurons):
            raise InvalidArgument(f"neuron means have shape {tuple(means.shape)}, the model needs {(n_layers, n_neurons)}")
    by_layer: dict[int, list[_Resolved]] = {}
    for item in resolved:
        by_layer.setdefault(item.layer, []).append(item)
    state = HookState()
    layers = decoder_layers(model)

    def make_hook(layer_index: int, items: list[_Resolved]):
        def pre_hook(_module: nn.Module, args: tuple) -> tuple:
            state.calls += 1
            x = args[0].clone()
            length = x.shape[-2]
            for item in items:
                mask = _position_mask(item, state.offset, length, prompt_length, x.device)
                if not bool(mask.any()):
                    continue
                current = x[..., mask, item.index]
                if item.mode == "zero":
                    new = torch.zeros_like(current)
                elif item.mode == "set":
                    new = torch.full_like(current, item.value)
                elif item.mode == "scale":
                    new = current * item.value
                else:  # mean
                    new = torch.full_like(current, float(means[layer_index, item.index]))
                x[..., mask, item.index] = new
            return (x, *args[1:])

        return pre_hook

    handles = []
    try:
        for layer_index, items in by_layer.items():
            handles.append(layers[layer_index].mlp.down_proj.register_forward_pre_hook(make_hook(layer_index, items)))
        yield state
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def neuron_masks(
    model: nn.Module,
    keep: torch.Tensor,
    *,
    replacement: torch.Tensor | None = None,
) -> Iterator[HookState]:
    """Ablate every neuron where ``keep`` is False: ``h <- where(keep, h, replacement)``.

    ``keep``: bool ``[B, L, T, F]`` (one mask per batch row) for full-sequence forwards of exactly
    ``T`` tokens. ``replacement``: ``[L, F]`` values (e.g. means), default zeros. Hooks are removed
    on exit.
    """
    layers = decoder_layers(model)
    n_layers = len(layers)
    if keep.dim() != 4 or keep.shape[1] != n_layers:
        raise InvalidArgument(f"keep mask must be [B, {n_layers}, T, F], got {tuple(keep.shape)}")
    state = HookState()

    def make_hook(layer_index: int):
        def pre_hook(_module: nn.Module, args: tuple) -> tuple:
            state.calls += 1
            x = args[0]
            if x.shape[0] != keep.shape[0] or x.shape[-2:] != keep.shape[-2:]:
                raise RuntimeError(f"keep mask {tuple(keep.shape)} does not fit neuron input {tuple(x.shape)}")
            mask = keep[:, layer_index].to(x.device)
            if replacement is None:
                fill = torch.zeros((), dtype=x.dtype, device=x.device)
            else:
                fill = replacement[layer_index].to(device=x.device, dtype=x.dtype)
            return (torch.where(mask, x, fill), *args[1:])

        return pre_hook

    handles = []
    try:
        for layer_index, layer in enumerate(layers):
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(make_hook(layer_index)))
        yield state
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# Mean activations
# --------------------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module, *, name: str | None = None) -> str:
    """Short hash identifying a model: name, config and a sample of every down_proj's weights."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    label = name or str(getattr(config, "_name_or_path", "") or type(model).__name__)
    digest.update(label.encode())
    if config is not None:
        shape_keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
        digest.update(json.dumps({k: getattr(config, k, None) for k in shape_keys}, sort_keys=True).encode())
    with torch.no_grad():
        for layer in decoder_layers(model):
            weight = layer.mlp.down_proj.weight
            sample = torch.stack([weight.reshape(-1)[:256].to(torch.float64).sum(), weight.to(torch.float64).abs().sum()])
            digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def _prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:12]


def compute_neuron_means(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, skip_bos: bool = True, progress: bool = False
) -> tuple[torch.Tensor, int]:
    """Mean of every neuron over all tokens of `prompts` (raw text, tokenizer's special tokens).

    Returns (means ``[L, F]`` float64 on CPU, number of tokens averaged). With `skip_bos` the
    leading BOS token (an outlier "attention sink" position) is left out.
    """
    if not prompts:
        raise InvalidArgument("the prompt set for neuron means is empty")
    layers = decoder_layers(model)
    n_layers, n_neurons = neuron_shape(model)
    device = next(model.parameters()).device
    totals = torch.zeros((n_layers, n_neurons), dtype=torch.float64, device=device)
    count = 0
    start = [0]
    bos_id = getattr(tokenizer, "bos_token_id", None)

    def make_hook(layer_index: int):
        def pre_hook(_module: nn.Module, args: tuple) -> None:
            totals[layer_index] += args[0][0, start[0]:].to(torch.float64).sum(0)

        return pre_hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(layers)]
    iterator: Any = prompts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(prompts, desc="neuron means", unit="prompt", leave=False)
    try:
        with torch.no_grad():
            for prompt in iterator:
                ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
                start[0] = 1 if (skip_bos and bos_id is not None and len(ids) > 1 and ids[0] == bos_id) else 0
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                count += len(ids) - start[0]
    finally:
        for handle in handles:
            handle.remove()
    return (totals / max(count, 1)).cpu(), count


def means_cache_path(model: nn.Module, *, name: str | None = None, prompts: Sequence[str] | None = None) -> Path:
    """``circuits_home()/means/<model-hash>.pt`` (custom prompt sets add ``-<prompts-hash>``)."""
    stem = model_fingerprint(model, name=name)
    if prompts is not None and tuple(prompts) != DEFAULT_MEAN_PROMPTS:
        stem += "-" + _prompts_digest(prompts)
    return Path(circuits_home()).expanduser() / "means" / f"{stem}.pt"


def neuron_means(
    model: nn.Module,
    tokenizer: Any,
    *,
    prompts: Sequence[str] | None = None,
    name: str | None = None,
    refresh: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Per-neuron means ``[L, F]`` (float64, CPU) over `prompts` (default DEFAULT_MEAN_PROMPTS).

    Computed once and cached at :func:`means_cache_path`; later calls load the file. The file
    records the prompt digest and shape; a mismatching file is recomputed. Writes are atomic.
    """
    prompt_set = tuple(prompts) if prompts is not None else DEFAULT_MEAN_PROMPTS
    path = means_cache_path(model, name=name, prompts=prompt_set)
    n_layers, n_neurons = neuron_shape(model)
    digest = _prompts_digest(prompt_set)
    if path.is_file() and not refresh:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            means = payload["means"]
            if payload.get("prompts_digest") == digest and tuple(means.shape) == (n_layers, n_neurons):
                return means.to(torch.float64)
        except Exception:  # noqa: BLE001 - a corrupt cache file is simply recomputed
            pass
    means, count = compute_neuron_means(model, tokenizer, prompt_set, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"means": means, "prompts_digest": digest, "n_tokens": count, "n_prompts": len(prompt_set)}, tmp)
    os.replace(tmp, path)
    return means


# --------------------------------------------------------------------------------------------
# High-level API
# --------------------------------------------------------------------------------------------
def _cache_keyword(model: nn.Module) -> str:
    """The KV-cache argument/output name: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Intervener:
    """Next-token predictions and greedy continuations of `model` with neurons changed.

    Prompts are encoded exactly like the RelP engine encodes them (raw None: the model's own prompt form).
    Neuron means for mode 'mean' are loaded lazily (:func:`neuron_means`) unless given.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, model_name: str | None = None,
                 means: torch.Tensor | None = None) -> None:
        from circuits_attribution.attributor import RelPAttributor

        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._means = means
        self._encoder = RelPAttributor(model, tokenizer)
        if model_name:
            self._encoder.model_name = model_name
        self.n_layers, self.n_neurons = neuron_shape(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def means(self) -> torch.Tensor:
        if self._means is None:
            self._means = neuron_means(self.model, self.tokenizer, name=self.model_name)
        return self._means

    def encode(self, prompt: str, *, raw: bool | None = None, answer_prefix: str = "") -> list[int]:
        """Token ids as the RelP engine encodes them (``raw`` None: the model's own prompt form)."""
        return self._encoder.encode_prompt(prompt, raw=raw, answer_prefix=answer_prefix)

    def _means_for(self, interventions: Sequence[NeuronIntervention]) -> torch.Tensor | None:
        return self.means() if any(i.mode == "mean" for i in interventions) else None

    def logits(self, input_ids: Sequence[int], interventions: Sequence[NeuronIntervention] = ()) -> torch.Tensor:
        """Logits ``[T, V]`` of a full forward of `input_ids` with `interventions` applied."""
        ids = torch.tensor([list(input_ids)], device=self.device)
        with torch.no_grad(), neuron_interventions(
            self.model, interventions, prompt_length=len(input_ids), means=self._means_for(interventions)
        ):
            return self.model(input_ids=ids, use_cache=False).logits[0]

    def generate(self, input_ids: Sequence[int], interventions: Sequence[NeuronIntervention] = (),
                 max_new_tokens: int = 20) -> list[int]:
        """Greedy continuation (KV-cached), interventions applied at their positions; stops at EOS."""
        if max_new_tokens < 0:
            raise InvalidArgument(f"number of tokens to generate must be >= 0, got {max_new_tokens}")
        prompt_length = len(input_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        generated: list[int] = []
        if max_new_tokens == 0:
            return generated
        with torch.no_grad(), neuron_interventions(
            self.model, interventions, prompt_length=prompt_length, means=self._means_for(interventions)
        ) as state:
            state.offset = 0
            out = self.model(input_ids=torch.tensor([list(input_ids)], device=self.device), use_cache=True)
            cache_kw = _cache_keyword(self.model)
            past = getattr(out, cache_kw, None)
            for step in range(max_new_tokens):
                next_id = int(out.logits[0, -1].argmax())
                generated.append(next_id)
                if next_id in eos_ids or step == max_new_tokens - 1:
                    break
                state.offset = prompt_length + step
                out = self.model(
                    input_ids=torch.tensor([[next_id]], device=self.device), use_cache=True, **{cache_kw: past}
                )
                past = getattr(out, cache_kw, None)
        return generated

    def neuron_values(self, input_ids: Sequence[int], neurons: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Activations ``[K, T]`` (float64, CPU) of ``neurons`` at every token of one plain forward."""
        layers = decoder_layers(self.model)
        for layer, index in neurons:
            if not 0 <= layer < self.n_layers:
                raise InvalidArgument(f"neuron L{layer}/N{index}: layer {layer} is out of range "
                                      f"(model has layers 0..{self.n_layers - 1})")
            if not 0 <= index < self.n_neurons:
                raise InvalidArgument(f"neuron L{layer}/N{index}: index {index} is out of range "
                                      f"(layers have neurons 0..{self.n_neurons - 1})")
        wanted: dict[int, list[int]] = {}
        for k, (layer, _index) in enumerate(neurons):
            wanted.setdefault(layer, []).append(k)
        out = torch.zeros((len(neurons), len(input_ids)), dtype=torch.float64)

        def make_hook(rows: list[int]):
            columns = torch.tensor([neurons[k][1] for k in rows])

            def pre_hook(_module: nn.Module, args: tuple) -> None:
                out[rows] = args[0][0][:, columns.to(args[0].device)].T.to(torch.float64).cpu()

            return pre_hook

        handles = [layers[layer].mlp.down_proj.register_forward_pre_hook(make_hook(rows)) for layer, rows in wanted.items()]
        try:
            with torch.no_grad():
                self.model(input_ids=torch.tensor([list(input_ids)], device=self.device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return out

    def activations(self, request: ActivationRequest) -> ActivationResult:
        """Every prompt token's activation of every requested neuron (one forward per prompt)."""
        special = set(getattr(self.tokenizer, "all_special_ids", ()) or ())
        prompts = []
        for prompt in request.prompts:
            ids = self.encode(prompt, raw=request.raw, answer_prefix=request.answer_prefix)
            values = self.neuron_values(ids, request.neurons)
            prompts.append(PromptActivations(
                prompt=prompt,
                tokens=tuple(self.tokenizer.decode([i]) for i in ids),
                values=tuple(tuple(float(v) for v in row) for row in values.tolist()),
                special_positions=tuple(p for p, i in enumerate(ids) if i in special),
            ))
        return ActivationResult(neurons=tuple(request.neurons), prompts=tuple(prompts))

    def _top(self, row: torch.Tensor, k: int) -> tuple[TokenProbability, ...]:
        probs = torch.softmax(row.to(torch.float64), -1)
        top = torch.topk(row, min(k, row.shape[-1])).indices.tolist()
        return tuple(self._entry(row, probs, t) for t in top)

    def _entry(self, row: torch.Tensor, probs: torch.Tensor, token_id: int) -> TokenProbability:
        return TokenProbability(
            token=self.tokenizer.decode([token_id]), token_id=int(token_id),
            logit=float(row[token_id]), probability=float(probs[token_id]),
        )

    def run(
        self,
        prompt: str | None,
        interventions: Sequence[NeuronIntervention],
        *,
        raw: bool | None = None,
        answer_prefix: str = "",
        top_k: int = 10,
        generate_tokens: int = 0,
        input_ids: Sequence[int] | None = None,
    ) -> InterventionResult:
        """Baseline vs intervened top-k next tokens at the last prompt position (+ greedy texts)."""
        if top_k < 1:
            raise InvalidArgument(f"top_k must be >= 1, got {top_k}")
        ids = list(input_ids) if input_ids is not None else self.encode(prompt or "", raw=raw, answer_prefix=answer_prefix)
        interventions = tuple(interventions)
        # Validate before any work so bad ids fail fast with a clear message.
        resolve_interventions(interventions, n_layers=self.n_layers, n_neurons=self.n_neurons, prompt_length=len(ids))
        base_row = self.logits(ids)[-1]
        new_row = self.logits(ids, interventions)[-1]
        baseline = self._top(base_row, top_k)
        new_probs = torch.softmax(new_row.to(torch.float64), -1)
        tracked = tuple(self._entry(new_row, new_probs, t.token_id) for t in baseline)
        baseline_text = generated_text = ""
        if generate_tokens:
            baseline_text = self.tokenizer.decode(self.generate(ids, (), generate_tokens))
            generated_text = self.tokenizer.decode(self.generate(ids, interventions, generate_tokens))
        return InterventionResult(
            prompt_tokens=tuple(self.tokenizer.decode([i]) for i in ids),
            position=len(ids) - 1,
            baseline=baseline,
            intervened=self._top(new_row, top_k),
            tracked=tracked,
            baseline_text=baseline_text,
            generated_text=generated_text,
            interventions=interventions,
        )


# --------------------------------------------------------------------------------------------
# Service entry point
# --------------------------------------------------------------------------------------------
_INTERVENERS: weakref.WeakKeyDictionary[nn.Module, Intervener] = weakref.WeakKeyDictionary()


def intervener_for(engine: Any) -> Intervener:
    """The (cached) Intervener of an attribution engine (anything with ``model`` and ``tokenizer``)."""
    model = engine.model
    intervener = _INTERVENERS.get(model)
    if intervener is None:
        intervener = Intervener(model, engine.tokenizer, model_name=getattr(engine, "model_name", None))
        _INTERVENERS[model] = intervener
    return intervener


def run_activations(engine: Any, request: ActivationRequest) -> ActivationResult:
    """Serve one GetActivations request on `engine` (the caller holds it exclusively)."""
    return intervener_for(engine).activations(request)


def run_intervention(engine: Any, request: InterventionRequest) -> InterventionResult:
    """Serve one Intervene request on `engine` (the caller holds it exclusively)."""
    return intervener_for(engine).run(
        request.prompt, request.interventions, raw=request.raw, answer_prefix=request.answer_prefix,
        top_k=request.top_k, generate_tokens=request.generate_tokens,
    )
