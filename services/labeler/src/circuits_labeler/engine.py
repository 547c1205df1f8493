"""The two-pass progressive labelling engine (relp-spec §H).

Pass 1 ("output": what the neuron DOES) walks layers late -> early, so a neuron's prompt can cite
the labels of the downstream neurons it drives; pass 2 ("input": what TRIGGERS it) walks early ->
late citing labelled upstream neurons. Within one layer prompts depend only on other layers'
labels, so a layer's neurons are asked concurrently (``concurrency`` requests in flight).

Which neurons qualify:
* candidates: evidence units with ``appearance_count >= min_appearances`` (every projected
  neuron when there is no evidence);
* pass 1: ``max(logit effect, downstream effect) >= min_effect`` (logit effect = max |output
  projection|, downstream effect = max |mean edge weight| to a later neuron);
* pass 2: at least ``min_labeled_upstream`` upstream neurons carry an output label.

Resumability: every answer is appended to the :class:`AnswerCache` the moment it arrives. Prompts
are a deterministic function of the evidence and of earlier layers' labels, so a rerun after a
kill rebuilds the same prompts, finds their answers in the cache and pays only for the rest.
Malformed answers are re-asked ``malformed_retries`` times with the reason, then recorded as
failed (the run goes on). Transport failures after all retries fail only that neuron (not cached,
so a rerun asks again). The budget and ``max_units`` stop dispatching new requests; requests
already in flight finish and are cached, labels are written, and the run reports the state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from circuits_core.config import LabelingSection
from circuits_core.errors import FailedPrecondition, InvalidArgument, echo
from circuits_core.schemas import LABEL_PASSES, LabelProgress

from circuits_labeler.cache import AnswerCache, CachedAnswer, prompt_hash
from circuits_labeler.evidence import Neighbour, NeuronEvidence, UnitRecord
from circuits_labeler.llm import (
    Budget, ChatMessage, FatalLLMError, LLMBackend, LLMRequestError, RetryingLLM, RetryPolicy,
)
from circuits_labeler.projection import LazyOutputProjections, OutputProjections
from circuits_labeler.prompts import (
    INPUT_TYPES, OUTPUT_TYPES, ExemplarLine, LayerBands, LinkedNeuron, LogitLink, MalformedAnswer, NeuronContext,
    ParsedAnswer, Prompt, TokenEffect, correction_message, fit_prompt, parse_answer,
)
from circuits_labeler.scoring import (
    MARK, parse_predictions, predictions_schema, score_predictions, score_prompt, scoring_contexts, split_exemplars,
)
from circuits_labeler.store import LabelStore

log = logging.getLogger("circuits_labeler.engine")

#: Neighbours fetched per neuron before filtering to labelled ones.
NEIGHBOUR_FETCH = 64
MAX_DOWNSTREAM_IN_PROMPT = 8
MAX_UPSTREAM_IN_PROMPT = 10
MAX_UNLABELED_IN_PROMPT = 5

ProgressCallback = Callable[[LabelProgress], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelOutcome:
    """What happened to one neuron in one pass."""

    key: tuple[int, int]
    #: "labelled" (paid now), "cached", "failed", "skipped" (budget / max_units / fatal stop)
    status: str
    answer: ParsedAnswer | None = None
    error: str = ""


@dataclass
class _PassCounters:
    label_pass: str
    total: int
    done: int = 0
    labelled: int = 0
    cached: int = 0
    failed: int = 0


@dataclass
class _RunState:
    llm: RetryingLLM
    semaphore: asyncio.Semaphore
    max_units: int
    retry_failed: bool
    on_progress: ProgressCallback | None
    new_labels: int = 0
    stop_reason: str = ""  # "", "budget_exhausted", "stopped", "failed"
    stop_message: str = ""
    counters: _PassCounters | None = None
    failures: list[str] = field(default_factory=list)


class ProgressiveLabeler:
    """Two-pass progressive labelling over :class:`NeuronEvidence` and output projections.

    ``backend_factory`` makes a fresh LLM backend per run (its SDK client lives in that run's
    event loop). ``labels_path`` (optional) is rewritten after every layer.
    """

    def __init__(
        self,
        *,
        settings: LabelingSection,
        evidence: NeuronEvidence,
        projections: OutputProjections | LazyOutputProjections | None,
        cache: AnswerCache,
        backend_factory: Callable[[], LLMBackend],
        labels_path: str | Path | None = None,
        num_layers: int = 0,
        sleep: Callable[[float], object] | None = None,
        exemplars: object | None = None,
        input_projection: Callable[[int, int], Sequence[object]] | None = None,
    ) -> None:
        self.settings = settings
        self.evidence = evidence
        self.projections = projections
        #: circuits_server.exemplar_files.ExemplarFile: pass-2 evidence and scoring contexts.
        self.exemplars = exemplars
        #: (layer, neuron) -> tokens with ``token``/``weight`` (the input projection), or None.
        self.input_projection = input_projection
        self._logit_links: dict[int, dict[int, list[LogitLink]]] = {}
        self.cache = cache
        self.backend_factory = backend_factory
        self.labels_path = Path(labels_path) if labels_path else None
        self._sleep = sleep
        self.num_layers = (
            num_layers
            or settings.num_layers
            or (projections.num_layers if projections is not None else 0)
            or evidence.max_layer() + 1
        )
        if self.num_layers <= 0:
            raise InvalidArgument("cannot tell the number of layers: no projections, no evidence, labeling.num_layers = 0")
        #: MLP neurons per layer; 0 when unknown (no labeling.neurons_per_layer, no projections).
        self.neurons_per_layer = settings.neurons_per_layer or (
            projections.neurons_per_layer() if projections is not None else 0
        )
        self.bands = LayerBands.for_model(
            self.num_layers, late_fraction=settings.late_band_fraction, early_fraction=settings.early_band_fraction
        )
        # Labels of an earlier run (served by GetLabels); a run rebuilds them from the cache.
        if self.labels_path is not None and self.labels_path.is_file():
            self.store = LabelStore.read_jsonl(self.labels_path)
        else:
            self.store = LabelStore()
        #: Set to stop dispatching new requests (in-flight ones finish and are cached).
        self.cancel_event = threading.Event()
        self._units = self._candidates()
        self.last_budget: Budget | None = None

    # -- which units may be labelled on request ------------------------------------------------
    def evidence_keys(self) -> set[tuple[int, int]]:
        """Units the aggregated evidence lists (any appearance count); without an evidence source,
        the projected units (projection-only labelling)."""
        keys = {(u.layer, u.neuron) for u in self.evidence.units()}
        if not keys and self.projections is not None:
            keys = set(self.projections.unit_keys())
        return keys

    def check_units(self, keys: Sequence[tuple[int, int]], *, allow_without_evidence: bool = False) -> None:
        """Refuse units outside the model (InvalidArgument) and, unless ``allow_without_evidence``,
        units the evidence does not list (FailedPrecondition), before anything is paid for."""
        width = self.neurons_per_layer
        outside = [k for k in keys if not (0 <= k[0] < self.num_layers and k[1] >= 0 and (not width or k[1] < width))]
        if outside:
            shape = f"{self.num_layers} layers x {width} neurons" if width else f"{self.num_layers} layers"
            raise InvalidArgument(f"{_unit_list(outside)} outside the model ({shape})")
        if allow_without_evidence:
            return
        known = self.evidence_keys()
        missing = [k for k in keys if k not in known]
        if missing:
            raise FailedPrecondition(f"no evidence for {_unit_list(missing)}; set allow_without_evidence to label "
                                     "units the aggregated graphs never showed")  # fmt: skip

    # -- candidates and qualification -----------------------------------------------------------
    def _candidates(self) -> dict[tuple[int, int], UnitRecord]:
        units = self.evidence.units()
        if not units and self.projections is not None:
            return {k: UnitRecord(layer=k[0], neuron=k[1]) for k in self.projections.unit_keys()}
        return {
            (u.layer, u.neuron): u
            for u in units
            if u.appearance_count >= self.settings.min_appearances and 0 <= u.layer < self.num_layers
        }

    def _logit_effect(self, key: tuple[int, int]) -> float:
        proj = self.projections.get(*key) if self.projections is not None else None
        return proj.logit_effect if proj is not None else 0.0

    def _output_qualifiers(self, layer: int) -> list[tuple[int, int]]:
        top = self.evidence.downstream(layer, limit=1)
        out = []
        for key in sorted(k for k in self._units if k[0] == layer):
            downstream = abs(top[key[1]][0].mean_weight) if key[1] in top else 0.0
            if max(self._logit_effect(key), downstream) >= self.settings.min_effect:
                out.append(key)
        return out

    def _input_qualifiers(self, layer: int, upstream: dict[int, list[Neighbour]]) -> list[tuple[int, int]]:
        out = []
        for key in sorted(k for k in self._units if k[0] == layer):
            labelled = sum(1 for n in upstream.get(key[1], ()) if self.store.output_label(n.key))
            # Corpus exemplars are evidence of what triggers a neuron on their own.
            if labelled >= self.settings.min_labeled_upstream or self._has_exemplars(key):
                out.append(key)
        return out

    # -- prompts ----------------------------------------------------------------------------------
    def _tokens(self, key: tuple[int, int]) -> tuple[tuple[TokenEffect, ...], tuple[TokenEffect, ...]]:
        proj = self.projections.get(*key) if self.projections is not None else None
        if proj is None:
            return (), ()
        return (
            tuple(TokenEffect(token=t.token, weight=t.weight) for t in proj.promotes),
            tuple(TokenEffect(token=t.token, weight=t.weight) for t in proj.suppresses),
        )

    def _context(self, key: tuple[int, int], label_pass: str = "output") -> NeuronContext:
        unit = self._units.get(key) or UnitRecord(layer=key[0], neuron=key[1])
        promotes, suppresses = self._tokens(key)
        ctx = NeuronContext(
            layer=key[0], neuron=key[1], num_layers=self.num_layers, band=self.bands.band(key[0]),
            appearance_count=unit.appearance_count, prior_description=unit.prior_description,
            promotes=promotes, suppresses=suppresses,
        )
        if label_pass == "output" and ctx.band == "late":
            links = self._layer_logit_links(key[0]).get(key[1], ())
            ctx = replace(ctx, logit_links=tuple(links[: self.settings.logit_links_in_prompt]))
        if label_pass == "input":
            if self._has_exemplars(key):
                shown, _held_out = split_exemplars(self.exemplars.top(*key))  # type: ignore[union-attr]
                stats = self.exemplars.stats(*key)  # type: ignore[union-attr]
                lines = tuple(ExemplarLine(text=c.text(mark=MARK), activation=c.activation)
                              for c in shown[: self.settings.exemplars_in_prompt] if c.activation > 0)
                note = (f"max {stats.maximum:.3f} over {stats.token_count} corpus tokens; typical: median "
                        f"{stats.quantiles.get(0.5, 0.0):.3f}, 99th percentile {stats.quantiles.get(0.99, 0.0):.3f}")
                ctx = replace(ctx, exemplars=lines, activation_note=note)
            if self.input_projection is not None:
                ctx = replace(ctx, input_tokens=tuple(
                    TokenEffect(token=t.token, weight=t.weight) for t in self.input_projection(*key)))  # type: ignore[attr-defined]
        return ctx

    def _has_exemplars(self, key: tuple[int, int]) -> bool:
        if self.exemplars is None or not self.exemplars.has(*key):  # type: ignore[attr-defined]
            return False
        top = self.exemplars.top(*key)  # type: ignore[attr-defined]
        return bool(top) and top[0].activation > 0

    def _layer_logit_links(self, layer: int) -> dict[int, list[LogitLink]]:
        if layer not in self._logit_links:
            fetch = getattr(self.evidence, "logit_links", None)
            raw = fetch(layer, limit=max(1, self.settings.logit_links_in_prompt)) if fetch is not None else {}
            self._logit_links[layer] = {
                n: [LogitLink(token=t.token, count=t.count, mean_weight=t.mean_weight) for t in links]
                for n, links in raw.items()
            }
        return self._logit_links[layer]

    def build_prompt(self, label_pass: str, key: tuple[int, int], neighbours: Sequence[Neighbour]) -> Prompt:
        """The prompt for ``key`` in ``label_pass`` given its neighbours (downstream for output,
        upstream for input) and the labels stored so far."""
        ctx = self._context(key, label_pass)
        if label_pass == "output":
            linked = [
                LinkedNeuron(layer=n.layer, neuron=n.neuron, weight=n.mean_weight, count=n.count,
                             label=self.store.output_label(n.key))
                for n in neighbours if self.store.output_label(n.key)
            ][:MAX_DOWNSTREAM_IN_PROMPT]
            return fit_prompt("output", replace(ctx, downstream=tuple(linked)), budget=self.settings.output_prompt_budget)
        labelled, unlabelled = [], []
        for n in neighbours:
            label = self.store.output_label(n.key)
            if label:
                labelled.append(LinkedNeuron(layer=n.layer, neuron=n.neuron, weight=n.mean_weight, count=n.count,
                                             label=label, input_label=self.store.input_label(n.key)))
            else:
                unlabelled.append(f"L{n.layer}/N{n.neuron}")
        own = self.store.get(key)
        return fit_prompt("input", replace(
            ctx,
            output_label=own.output.label if own and own.output else "",
            output_description=own.output.description if own and own.output else "",
            upstream=tuple(labelled[:MAX_UPSTREAM_IN_PROMPT]),
            unlabeled_upstream=tuple(unlabelled[:MAX_UNLABELED_IN_PROMPT]),
        ), budget=self.settings.input_prompt_budget)

    def _neighbours(self, label_pass: str, layer: int) -> dict[int, list[Neighbour]]:
        if label_pass == "output":
            return self.evidence.downstream(layer, limit=NEIGHBOUR_FETCH)
        return self.evidence.upstream(layer, limit=NEIGHBOUR_FETCH)

    # -- one neuron -------------------------------------------------------------------------------
    async def _label_one(self, state: _RunState, label_pass: str, key: tuple[int, int], prompt: Prompt) -> LabelOutcome:
        settings = self.settings
        types = OUTPUT_TYPES if label_pass == "output" else INPUT_TYPES
        phash = prompt_hash(system=prompt.system, user=prompt.user, max_tokens=settings.max_answer_tokens)
        cache_key = (settings.model, key[0], key[1], label_pass, phash)
        hit = self.cache.get(cache_key)
        if hit is not None and (hit.status == "ok" or not state.retry_failed):
            if hit.status == "ok":
                answer = ParsedAnswer(label=hit.label, description=hit.description, type=hit.type, confidence=hit.confidence)
                return self._apply(label_pass, key, LabelOutcome(key=key, status="cached", answer=answer))
            return LabelOutcome(key=key, status="failed", error=f"cached failure: {hit.error}")
        async with state.semaphore:
            if not self._may_dispatch(state):
                return LabelOutcome(key=key, status="skipped")
            state.new_labels += 1  # reserve: max_units counts labels started
            messages = [ChatMessage(role="user", content=prompt.user)]
            spent_in = spent_out = 0
            text, error = "", ""
            for attempt in range(1 + max(0, settings.malformed_retries)):
                try:
                    completion = await state.llm.complete(
                        system=prompt.system, messages=messages, max_tokens=settings.max_answer_tokens
                    )
                except FatalLLMError as exc:
                    state.stop_reason, state.stop_message = "failed", str(exc)
                    state.new_labels -= 1
                    return LabelOutcome(key=key, status="skipped", error=str(exc))
                except LLMRequestError as exc:
                    state.new_labels -= 1
                    return LabelOutcome(key=key, status="failed", error=f"request failed: {exc}")
                spent_in += completion.input_tokens
                spent_out += completion.output_tokens
                text = completion.text
                try:
                    answer = parse_answer(text, allowed_types=types)
                except MalformedAnswer as exc:
                    error = str(exc)
                    log.info("L%d/N%d %s: malformed answer (%s), attempt %d", key[0], key[1], label_pass, error, attempt + 1)
                    messages = [*messages, ChatMessage(role="assistant", content=text or "(empty)"),
                                ChatMessage(role="user", content=correction_message(error, types))]
                    continue
                self.cache.put(CachedAnswer(
                    model=settings.model, layer=key[0], neuron=key[1], label_pass=label_pass, prompt_hash=phash,
                    status="ok", label=answer.label, description=answer.description, type=answer.type,
                    confidence=answer.confidence, raw=text, input_tokens=spent_in, output_tokens=spent_out,
                    attempts=attempt + 1,
                ))
                return self._apply(label_pass, key, LabelOutcome(key=key, status="labelled", answer=answer))
            self.cache.put(CachedAnswer(
                model=settings.model, layer=key[0], neuron=key[1], label_pass=label_pass, prompt_hash=phash,
                status="failed", raw=text[:4000], error=error, input_tokens=spent_in, output_tokens=spent_out,
                attempts=1 + max(0, settings.malformed_retries),
            ))
            return LabelOutcome(key=key, status="failed", error=f"malformed answer: {error}")

    def _may_dispatch(self, state: _RunState) -> bool:
        if state.stop_reason:
            return False
        if self.cancel_event.is_set():
            state.stop_reason, state.stop_message = "stopped", "cancelled"
            return False
        if state.llm.budget.exhausted:
            state.stop_reason = "budget_exhausted"
            state.stop_message = f"budget reached: {state.llm.budget.describe()}"
            return False
        if state.max_units and state.new_labels >= state.max_units:
            state.stop_reason = "stopped"
            state.stop_message = f"max_units={state.max_units} new labels reached"
            return False
        return True

    def _apply(self, label_pass: str, key: tuple[int, int], outcome: LabelOutcome) -> LabelOutcome:
        if outcome.answer is not None:
            unit = self._units.get(key)
            self.store.set(key, label_pass=label_pass, answer=outcome.answer,
                           appearance_count=unit.appearance_count if unit else 0)
        return outcome

    # -- scores -----------------------------------------------------------------------------------
    def scoring_available(self) -> bool:
        return self.exemplars is not None

    async def _score_one(self, state: _RunState, key: tuple[int, int], label_pass: str, answer: ParsedAnswer) -> LabelOutcome:
        """Score one label (cache honoured): detection and simulation on held-out contexts."""
        s = self.settings
        contexts, threshold = scoring_contexts(
            self.exemplars, key[0], key[1], held_out=s.score_held_out, random_contexts=s.score_random,
            fire_fraction=s.score_fire_fraction,
        )  # fmt: skip
        if not contexts:
            return LabelOutcome(key=key, status="skipped")
        prompt = score_prompt(layer=key[0], neuron=key[1], label_pass=label_pass, label=answer.label,
                              description=answer.description, contexts=contexts)
        activations = [c.activation for c in contexts]
        task = f"score-{label_pass}"
        phash = prompt_hash(system=prompt.system, user=prompt.user, max_tokens=s.score_max_answer_tokens)
        cache_key = (s.model, key[0], key[1], task, phash)
        hit = self.cache.get(cache_key)
        if hit is not None and (hit.status == "ok" or not state.retry_failed):
            if hit.status != "ok":
                return LabelOutcome(key=key, status="failed", error=f"cached scorer failure: {hit.error}")
            score = score_predictions(json.loads(hit.raw), activations, threshold=threshold)
            self.store.set_score(key, label_pass=label_pass, score=score)
            return LabelOutcome(key=key, status="cached")
        async with state.semaphore:
            if not self._may_score(state):
                return LabelOutcome(key=key, status="skipped")
            messages = [ChatMessage(role="user", content=prompt.user)]
            spent_in = spent_out = 0
            text, error = "", ""
            attempts = 1 + max(0, s.malformed_retries)
            for attempt in range(attempts):
                try:
                    completion = await state.llm.complete(
                        system=prompt.system, messages=messages, max_tokens=s.score_max_answer_tokens,
                        response_schema=predictions_schema(len(contexts)),
                    )
                except FatalLLMError as exc:
                    state.stop_reason, state.stop_message = "failed", str(exc)
                    return LabelOutcome(key=key, status="skipped", error=str(exc))
                except LLMRequestError as exc:
                    return LabelOutcome(key=key, status="failed", error=f"scorer request failed: {exc}")
                spent_in += completion.input_tokens
                spent_out += completion.output_tokens
                text = completion.text
                try:
                    predictions = parse_predictions(text, len(contexts))
                except MalformedAnswer as exc:
                    error = str(exc)
                    messages = [*messages, ChatMessage(role="assistant", content=text or "(empty)"),
                                ChatMessage(role="user", content=f"Your answer could not be used: {error}. Reply again "
                                            f'with only {{"predictions": [...]}} holding {len(contexts)} integers 0-10.')]
                    continue
                self.cache.put(CachedAnswer(
                    model=s.model, layer=key[0], neuron=key[1], label_pass=task, prompt_hash=phash, status="ok",
                    raw=json.dumps(predictions), input_tokens=spent_in, output_tokens=spent_out, attempts=attempt + 1,
                ))
                score = score_predictions(predictions, activations, threshold=threshold)
                self.store.set_score(key, label_pass=label_pass, score=score)
                return LabelOutcome(key=key, status="labelled")
            self.cache.put(CachedAnswer(
                model=s.model, layer=key[0], neuron=key[1], label_pass=task, prompt_hash=phash, status="failed",
                raw=text[:4000], error=error, input_tokens=spent_in, output_tokens=spent_out, attempts=attempts,
            ))
            return LabelOutcome(key=key, status="failed", error=f"malformed scorer answer: {error}")

    def _may_score(self, state: _RunState) -> bool:
        if state.stop_reason:
            return False
        if self.cancel_event.is_set():
            state.stop_reason, state.stop_message = "stopped", "cancelled"
            return False
        if state.llm.budget.exhausted:
            state.stop_reason = "budget_exhausted"
            state.stop_message = f"budget reached: {state.llm.budget.describe()}"
            return False
        return True

    async def _score_labels(self, state: _RunState) -> None:
        """Score every stored label of a neuron the exemplar file covers (pass "score")."""
        items = [
            (entry.key, label_pass, answer)
            for entry in self.store.all()
            for label_pass, answer in (("output", entry.output), ("input", entry.input))
            if answer is not None and self.exemplars.has(*entry.key)  # type: ignore[union-attr]
        ]
        state.counters = _PassCounters(label_pass="score", total=len(items))
        self._emit(state, self._progress(state, layer=-1, status="running", message="scoring labels"))

        async def one(key: tuple[int, int], label_pass: str, answer: ParsedAnswer) -> None:
            outcome = await self._score_one(state, key, label_pass, answer)
            self._count(state, outcome, key[0])

        await asyncio.gather(*(one(*item) for item in items))
        self._write_labels()
        if not state.stop_reason:
            self._emit(state, self._progress(state, layer=-1, status="pass_done", message="scoring done"))

    # -- progress ---------------------------------------------------------------------------------
    def _progress(self, state: _RunState, *, layer: int, status: str, message: str = "") -> LabelProgress:
        c = state.counters
        budget = state.llm.budget
        return LabelProgress(
            label_pass=c.label_pass if c else "", layer=layer,
            done=c.done if c else 0, total=c.total if c else 0, labelled=c.labelled if c else 0,
            cached=c.cached if c else 0, failed=c.failed if c else 0,
            input_tokens=budget.input_tokens, output_tokens=budget.output_tokens, spend_usd=budget.spend_usd,
            requests=state.llm.requests, retries=state.llm.retries, state=status, message=message,
        )

    def _emit(self, state: _RunState, progress: LabelProgress) -> None:
        if state.on_progress is not None:
            state.on_progress(progress)

    def _count(self, state: _RunState, outcome: LabelOutcome, layer: int) -> None:
        c = state.counters
        if outcome.status == "skipped":
            return
        c.done += 1
        if outcome.status == "labelled":
            c.labelled += 1
        elif outcome.status == "cached":
            c.cached += 1
        elif outcome.status == "failed":
            c.failed += 1
            state.failures.append(f"L{outcome.key[0]}/N{outcome.key[1]}: {outcome.error}")
        self._emit(state, self._progress(state, layer=layer, status="running"))

    # -- runs -------------------------------------------------------------------------------------
    def _new_state(self, *, max_units: int, retry_failed: bool, on_progress: ProgressCallback | None) -> _RunState:
        budget = Budget.from_settings(self.settings)
        self.last_budget = budget
        policy = RetryPolicy(
            max_retries=self.settings.max_retries,
            base_delay=self.settings.retry_base_delay,
            max_delay=self.settings.retry_max_delay,
        )
        kwargs = {"sleep": self._sleep} if self._sleep is not None else {}
        llm = RetryingLLM(self.backend_factory(), policy=policy, budget=budget, **kwargs)
        return _RunState(
            llm=llm, semaphore=asyncio.Semaphore(max(1, self.settings.concurrency)), max_units=max_units,
            retry_failed=retry_failed, on_progress=on_progress,
        )

    async def _label_layer(self, state: _RunState, label_pass: str, layer: int, keys: Sequence[tuple[int, int]],
                           neighbours: dict[int, list[Neighbour]]) -> list[LabelOutcome]:
        async def one(key: tuple[int, int]) -> LabelOutcome:
            prompt = self.build_prompt(label_pass, key, neighbours.get(key[1], ()))
            outcome = await self._label_one(state, label_pass, key, prompt)
            self._count(state, outcome, layer)
            return outcome

        return list(await asyncio.gather(*(one(k) for k in keys)))

    def _write_labels(self) -> None:
        if self.labels_path is not None:
            self.store.write_jsonl(self.labels_path, model=self.settings.model)

    async def arun(
        self,
        *,
        passes: Sequence[str] = LABEL_PASSES,
        max_units: int = 0,
        retry_failed: bool | None = None,
        on_progress: ProgressCallback | None = None,
        score: bool | None = None,
    ) -> LabelProgress:
        """Run the passes in order, then score the labels (``score``: None = labeling.score where
        exemplars exist; True requires them); return the final progress (state done /
        budget_exhausted / stopped / failed). Starts from an empty label store: cached answers
        rebuild it."""
        passes = _check_passes(passes)
        if score and self.exemplars is None:
            raise InvalidArgument("scoring needs exemplars: set labeling.exemplars_path (see `circuits exemplars`)")
        do_score = self.exemplars is not None and (self.settings.score if score is None else score)
        state = self._new_state(
            max_units=max_units, retry_failed=self.settings.retry_failed if retry_failed is None else retry_failed,
            on_progress=on_progress,
        )
        self.store = LabelStore()
        try:
            for label_pass in passes:
                layers = range(self.num_layers - 1, -1, -1) if label_pass == "output" else range(self.num_layers)
                plan: list[tuple[int, list[tuple[int, int]]]] = []
                uppers: dict[int, dict[int, list[Neighbour]]] = {}
                lazy_plan = label_pass == "output" and isinstance(self.projections, LazyOutputProjections)
                if lazy_plan:
                    # Qualifying a layer reads its projections, computed on demand: qualify each layer
                    # when it is reached, so a run that stops early (max_units, budget) computes only
                    # the layers it labelled. The total starts as every candidate of the pass and
                    # drops by the units a layer does not qualify.
                    plan = [(layer, []) for layer in layers]
                    total = sum(1 for k in self._units if 0 <= k[0] < self.num_layers)
                    state.counters = _PassCounters(label_pass=label_pass, total=total)
                elif label_pass == "output":
                    plan = [(layer, self._output_qualifiers(layer)) for layer in layers]
                    state.counters = _PassCounters(label_pass=label_pass, total=sum(len(k) for _, k in plan))
                else:
                    # Pass-2 qualification reads output labels only, all known now.
                    uppers = {layer: self.evidence.upstream(layer, limit=NEIGHBOUR_FETCH) for layer in layers}
                    plan = [(layer, self._input_qualifiers(layer, uppers[layer])) for layer in layers]
                    state.counters = _PassCounters(label_pass=label_pass, total=sum(len(k) for _, k in plan))
                self._emit(state, self._progress(state, layer=-1, status="running", message=f"pass {label_pass} started"))
                for layer, keys in plan:
                    if lazy_plan:
                        keys = self._output_qualifiers(layer)
                        state.counters.total -= sum(1 for k in self._units if k[0] == layer) - len(keys)
                    if keys:
                        neighbours = uppers[layer] if label_pass == "input" else self._neighbours(label_pass, layer)
                        await self._label_layer(state, label_pass, layer, keys, neighbours)
                    self._write_labels()
                    if state.stop_reason:
                        break
                    self._emit(state, self._progress(state, layer=layer, status="layer_done"))
                if state.stop_reason:
                    break
                self._emit(state, self._progress(state, layer=-1, status="pass_done", message=f"pass {label_pass} done"))
            if do_score and not state.stop_reason:
                await self._score_labels(state)
        finally:
            self._write_labels()
            await state.llm.aclose()
        status = state.stop_reason or "done"
        message = state.stop_message or f"{len(self.store)} neurons labelled; {state.llm.budget.describe()}"
        final = self._progress(state, layer=-1, status=status, message=message)
        self._emit(state, final)
        return final

    def run(self, **kwargs) -> LabelProgress:
        """Synchronous :meth:`arun` (own event loop)."""
        return asyncio.run(self.arun(**kwargs))

    async def alabel_units(self, keys: Sequence[tuple[int, int]], *, label_pass: str) -> tuple[list[LabelOutcome], LabelProgress]:
        """Label the given neurons in one pass now, qualifying or not (cache honoured)."""
        (label_pass,) = _check_passes([label_pass])
        state = self._new_state(max_units=0, retry_failed=True, on_progress=None)
        state.counters = _PassCounters(label_pass=label_pass, total=len(keys))
        outcomes: list[LabelOutcome] = []
        try:
            by_layer: dict[int, list[tuple[int, int]]] = {}
            for key in keys:
                by_layer.setdefault(key[0], []).append(key)
            order = sorted(by_layer, reverse=(label_pass == "output"))
            for layer in order:
                outcomes += await self._label_layer(state, label_pass, layer, by_layer[layer], self._neighbours(label_pass, layer))
            self._write_labels()
        finally:
            await state.llm.aclose()
        status = state.stop_reason or "done"
        return outcomes, self._progress(state, layer=-1, status=status, message=state.stop_message)

    async def ascore_labels(self, *, on_progress: ProgressCallback | None = None) -> LabelProgress:
        """Score the labels in the store now (cache honoured); needs exemplars."""
        if self.exemplars is None:
            raise InvalidArgument("scoring needs exemplars: set labeling.exemplars_path (see `circuits exemplars`)")
        state = self._new_state(max_units=0, retry_failed=self.settings.retry_failed, on_progress=on_progress)
        try:
            await self._score_labels(state)
        finally:
            await state.llm.aclose()
        return self._progress(state, layer=-1, status=state.stop_reason or "done", message=state.stop_message)

    def score_labels(self, **kwargs) -> LabelProgress:
        """Synchronous :meth:`ascore_labels`."""
        return asyncio.run(self.ascore_labels(**kwargs))

    def label_units(self, keys: Sequence[tuple[int, int]], *, label_pass: str) -> tuple[list[LabelOutcome], LabelProgress]:
        return asyncio.run(self.alabel_units(keys, label_pass=label_pass))


def _unit_list(keys: Sequence[tuple[int, int]], shown: int = 5) -> str:
    """``L5/N999999, L1/N3 (+12 more)``: at most ``shown`` units named."""
    names = ", ".join(f"L{layer}/N{neuron}" for layer, neuron in keys[:shown])
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{'unit' if len(keys) == 1 else 'units'} {names}{more}"


def _check_passes(passes: Sequence[str]) -> list[str]:
    passes = list(passes) or list(LABEL_PASSES)
    for p in passes:
        if p not in LABEL_PASSES:
            raise InvalidArgument(f"unknown pass {echo(p, 60)}; use output or input")
    # Always in the progressive order: output (late->early) before input (early->late).
    return [p for p in LABEL_PASSES if p in passes]
