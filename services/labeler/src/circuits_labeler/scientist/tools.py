"""The neuron scientist's tools: what it may look up and which experiments it may run.

A :class:`Tool` is a name, a description, typed :class:`~circuits_labeler.scientist.params.Param`
arguments (the JSON schema the LLM sees and the validator that runs first) and a function of
``(Investigation, arguments) -> ToolOutcome``. :func:`build_registry` returns every tool; a tool
whose source is absent (no atlas, no exemplar file, a remote engine without an operation) still
answers, with a result that says which source is missing and how to provide it.

Sources (:class:`Sources`), each optional:

* ``engine``: runs the model: ``activations`` (per-token reads), ``intervene`` (ablation, steering,
  patching) and ``trace`` (RelP graphs). The in-process ``RelPAttributor`` or the SDK's
  ``AttributionClient`` (``--remote``); operations the object lacks are reported missing.
* ``atlas``: :class:`circuits_core.capabilities.AtlasQueries` (label, score, cluster, neighbours).
* ``exemplars``: a :class:`circuits_server.exemplar_files.ExemplarFile` (top contexts, statistics).
* projections come from the engine's weights when the model is in this process.

Every call is bounded by :class:`ToolLimits` (prompt characters, prompts per call, generated
tokens), enforced by the params before anything runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from circuits_core.errors import CircuitsError

from circuits_labeler.scientist.params import Param, object_schema
from circuits_labeler.scientist.transcript import (
    CONFIDENCES,
    Hypothesis,
    Prediction,
    PredictionItem,
    Transcript,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolLimits:
    """Bounds of one tool call."""

    max_prompt_chars: int = 400
    max_prompts: int = 12
    max_generate_tokens: int = 24
    max_predictions: int = 16
    max_exemplars: int = 20


@dataclass(slots=True, kw_only=True)
class Sources:
    """What the tools can reach (None: absent); ``missing`` explains absent ones."""

    engine: Any = None
    atlas: Any = None
    exemplars: Any = None
    missing: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, str]:
        """source -> 'available' or why it is missing (recorded in the transcript)."""
        out = {}
        out["model"] = "available" if self.engine is not None else self.missing.get("model", "missing: no model")
        for op in ("activations", "intervene", "trace"):
            out[f"model.{op}"] = (
                "available" if self.engine is not None and callable(getattr(self.engine, op, None))
                else f"missing: the engine has no {op} operation"
                + (" (this attribution server predates it)" if self.engine is not None else "")
            )
        out["projections"] = ("available (from the model's weights)" if _local_model(self.engine) is not None
                              else "missing: needs the model in this process (not --remote)")
        out["atlas"] = "available" if self.atlas is not None else self.missing.get("atlas", "missing: pass --atlas")
        out["exemplars"] = ("available" if self.exemplars is not None
                            else self.missing.get("exemplars", "missing: pass --exemplars (circuits exemplars)"))
        out["connectivity"] = self.missing.get(
            "connectivity", "not used: weight-based connectivity and graph diff are not scientist tools yet "
                            "(see `circuits connectivity`, `circuits diff`)")
        out["model.patch"] = ("available (RelP-predicted patching beside the intervention)"
                              if self.engine is not None and callable(getattr(self.engine, "patch", None))
                              else "missing: the engine has no patch operation (patching uses interventions only)")
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolOutcome:
    """What a tool returns: a short summary line, the structured result (sent to the LLM as JSON
    and kept for the report) and whether it ends the investigation."""

    summary: str
    result: Mapping[str, Any]
    finish: bool = False


class ToolRefused(Exception):
    """A tool could not do what was asked (bad reference, missing source): told to the LLM."""


@dataclass(slots=True, kw_only=True)
class Investigation:
    """What a tool sees: the neuron, the sources, the limits and the transcript."""

    layer: int
    neuron: int
    sources: Sources
    limits: ToolLimits
    transcript: Transcript
    step: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Tool:
    name: str
    description: str
    params: tuple[Param, ...]
    run: Callable[[Investigation, dict[str, Any]], ToolOutcome]

    def schema(self) -> dict[str, Any]:
        return object_schema(self.params)


# -- helpers ---------------------------------------------------------------------------------
def _local_model(engine: Any) -> Any:
    model = getattr(engine, "model", None)
    return model if model is not None and hasattr(model, "get_input_embeddings") else None


def _need(inv: Investigation, op: str) -> Callable[..., Any]:
    fn = getattr(inv.sources.engine, op, None) if inv.sources.engine is not None else None
    if not callable(fn):
        raise ToolRefused(f"source missing: {inv.sources.describe()[f'model.{op}']}")
    return fn


def _round(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def _prompts(limits: ToolLimits, name: str = "prompts", description: str = "Prompts to run") -> Param:
    return Param(name=name, kind="array", description=f"{description} (at most {limits.max_prompts}).",
                 items=Param(name="prompt", kind="string", max_chars=limits.max_prompt_chars),
                 min_items=1, max_items=limits.max_prompts)


def _prompt(limits: ToolLimits, name: str = "prompt", description: str = "The prompt (plain text, no chat template).") -> Param:
    return Param(name=name, kind="string", description=description, max_chars=limits.max_prompt_chars)


def read_activations(inv: Investigation, prompts: list[str]) -> list[dict[str, Any]]:
    """Per-token activations of the investigated neuron on each prompt (special tokens flagged)."""
    from circuits_core.activations import ActivationRequest

    fn = _need(inv, "activations")
    result = fn(ActivationRequest(prompts=tuple(prompts), neurons=((inv.layer, inv.neuron),)))
    out = []
    for pa in result.prompts:
        best, where = pa.max_over_text(0)
        out.append({
            "prompt": pa.prompt,
            "tokens": list(pa.tokens),
            "activations": [_round(v) for v in pa.values[0]],
            "special_positions": list(pa.special_positions),
            "max_activation": _round(best) if where >= 0 else None,
            "max_token": pa.tokens[where] if where >= 0 else "",
            "max_position": where,
        })
    return out


# -- context tools ---------------------------------------------------------------------------
def _atlas_info(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    atlas = inv.sources.atlas
    if atlas is None:
        raise ToolRefused(f"source missing: atlas ({inv.sources.describe()['atlas']})")
    card = atlas.get_unit_card(inv.layer, inv.neuron)
    if card is None:
        return ToolOutcome(summary=f"the atlas has no record of {inv.transcript.unit_id}",
                           result={"found": False})
    unit = card.unit
    labels = [{"text": lab.text, "source": lab.source, "description": lab.description,
               "score_detection": _round(lab.score_detection), "score_simulation": _round(lab.score_simulation)}
              for lab in unit.labels]
    if not labels and unit.label:
        labels = [{"text": unit.label, "source": "", "score_detection": None, "score_simulation": None}]
    limit = int(args["neighbours"])
    edges = atlas.get_edges_for_unit(inv.layer, inv.neuron, "both", limit * 2)
    up = [e for e in edges if (e.tgt_layer, e.tgt_index) == (inv.layer, inv.neuron)]
    down = [e for e in edges if (e.src_layer, e.src_index) == (inv.layer, inv.neuron)]

    def edge_row(layer: int, index: int, e: Any) -> dict[str, Any]:
        return {"unit": f"L{layer}/N{index}", "count": int(e.count), "mean_weight": _round(e.weight)}

    result = {
        "found": True,
        "labels": labels,
        "cluster": card.cluster.cluster_path if card.cluster else unit.cluster,
        "cluster_size": card.cluster.size if card.cluster else None,
        "atlas_max_activation": _round(card.stats.max_activation) if card.stats.max_activation is not None else None,
        "appearance_count": unit.appearance_count,
        "upstream": [edge_row(e.src_layer, e.src_index, e) for e in up[:limit]],
        "downstream": [edge_row(e.tgt_layer, e.tgt_index, e) for e in down[:limit]],
    }
    shown = labels[0]["text"] if labels else "(no label)"
    return ToolOutcome(summary=f"atlas: label {shown!r}, cluster {result['cluster'] or '-'}, "
                               f"{len(result['upstream'])} upstream / {len(result['downstream'])} downstream",
                       result=result)


def _exemplars(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    ex = inv.sources.exemplars
    if ex is None:
        raise ToolRefused(f"source missing: exemplars ({inv.sources.describe()['exemplars']})")
    if not ex.has(inv.layer, inv.neuron):
        raise ToolRefused(f"source missing: the exemplar file has no layer {inv.layer} (layers {list(ex.layers)})")
    top = ex.top(inv.layer, inv.neuron)[: int(args["count"])]
    stats = ex.stats(inv.layer, inv.neuron)
    contexts = [{"text": c.text(), "token": c.token, "activation": _round(c.activation)} for c in top]
    result = {
        "contexts": contexts,
        "stats": {"tokens_seen": stats.token_count, "mean": _round(stats.mean), "std": _round(stats.std),
                  "max": _round(stats.maximum)},
    }
    tokens = sorted({c["token"] for c in contexts})
    return ToolOutcome(summary=f"{len(contexts)} top exemplars (max {result['stats']['max']}); tokens {tokens[:8]}",
                       result=result)


def _projections(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    model = _local_model(inv.sources.engine)
    if model is None:
        raise ToolRefused(f"source missing: projections ({inv.sources.describe()['projections']})")
    import torch

    from circuits_labeler.projection import InputProjection, vocabulary_strings

    k = int(args["top_k"])
    tokenizer = inv.sources.engine.tokenizer
    layers = model.model.layers
    if not 0 <= inv.layer < len(layers):
        raise ToolRefused(f"layer {inv.layer} is out of range")
    with torch.no_grad():
        down = layers[inv.layer].mlp.down_proj.weight[:, inv.neuron].double()
        norm = getattr(model.model, "norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            down = down * norm.weight.double()
        logits = model.get_output_embeddings().weight.double() @ down
        vocab = vocabulary_strings(tokenizer, logits.shape[0])
        up_idx = torch.topk(logits, min(k, logits.shape[0])).indices.tolist()
        dn_idx = torch.topk(-logits, min(k, logits.shape[0])).indices.tolist()
    promotes = [{"token": vocab[i], "weight": _round(float(logits[i]))} for i in up_idx]
    suppresses = [{"token": vocab[i], "weight": _round(float(logits[i]))} for i in dn_idx]
    inputs = [{"token": t.token, "weight": _round(t.weight)} for t in InputProjection(model, tokenizer, top_k=k)(inv.layer, inv.neuron)]
    return ToolOutcome(
        summary=f"promotes {[p['token'] for p in promotes[:5]]}; driven by {[p['token'] for p in inputs[:5]]}",
        result={"output_promotes": promotes, "output_suppresses": suppresses, "input_drivers": inputs},
    )


# -- experiments -----------------------------------------------------------------------------
def _run_prompts(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    rows = read_activations(inv, args["prompts"])
    best = max((r["max_activation"] for r in rows if r["max_activation"] is not None), default=None)
    parts = [f"{r['max_activation']} on {r['max_token']!r}" for r in rows]
    return ToolOutcome(summary=f"{len(rows)} prompt(s); max per prompt: " + "; ".join(parts[:6]),
                       result={"prompts": rows, "max_activation": best})


def _intervention_result(res: Any) -> dict[str, Any]:
    def probs(items: Any) -> list[dict[str, Any]]:
        return [{"token": t.token, "probability": _round(t.probability), "logit": _round(t.logit)} for t in items]

    baseline = probs(res.baseline)
    tracked = probs(res.tracked)
    shifts = [{"token": b["token"], "before": b["probability"], "after": a["probability"],
               "change": _round((a["probability"] or 0.0) - (b["probability"] or 0.0))}
              for b, a in zip(baseline, tracked)]
    return {
        "prompt_tokens": list(res.prompt_tokens),
        "baseline_top": baseline,
        "intervened_top": probs(res.intervened),
        "shifts": shifts,
        "baseline_text": res.baseline_text,
        "intervened_text": res.generated_text,
    }


def _intervene(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    from circuits_core.interventions import InterventionRequest, NeuronIntervention

    fn = _need(inv, "intervene")
    mode = args["mode"]
    value = float(args["value"] or 0.0)
    if mode in ("set", "scale") and args["value"] is None:
        raise ToolRefused(f"mode {mode} needs a value")
    change = NeuronIntervention(layer=inv.layer, index=inv.neuron, mode=mode, value=value,
                                include_generated=bool(args["include_generated"]))
    res = fn(InterventionRequest(prompt=args["prompt"], interventions=(change,), raw=True,
                                 top_k=5, generate_tokens=int(args["generate_tokens"])))
    result = _intervention_result(res)
    result["intervention"] = change.describe()
    top = result["shifts"][0] if result["shifts"] else None
    summary = f"{change.describe()}: "
    if top:
        summary += f"top token {top['token']!r} {top['before']} -> {top['after']}"
    if result["intervened_text"] != result["baseline_text"]:
        summary += f"; generation changed: {result['baseline_text']!r} -> {result['intervened_text']!r}"
    elif result["baseline_text"]:
        summary += "; generation unchanged"
    return ToolOutcome(summary=summary, result=result)


def _patch(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    """Activation patching of the one neuron: its value at the source prompt's last token is
    written into the target prompt's last token, and the target's prediction compared."""
    from circuits_core.interventions import InterventionRequest, NeuronIntervention

    fn = _need(inv, "intervene")
    source, target = read_activations(inv, [args["source_prompt"], args["target_prompt"]])
    src_value = source["activations"][-1]
    tgt_value = target["activations"][-1]
    change = NeuronIntervention(layer=inv.layer, index=inv.neuron, mode="set", value=float(src_value or 0.0),
                                positions=(-1,))
    res = fn(InterventionRequest(prompt=args["target_prompt"], interventions=(change,), raw=True, top_k=5))
    result = _intervention_result(res)
    result.update({"source_activation": src_value, "target_activation": tgt_value,
                   "source_token": source["tokens"][-1], "target_token": target["tokens"][-1]})
    top = result["shifts"][0] if result["shifts"] else None
    summary = (f"patched {src_value} (from {source['tokens'][-1]!r}) over {tgt_value} at {target['tokens'][-1]!r}"
               + (f"; top token {top['token']!r} {top['before']} -> {top['after']}" if top else ""))
    answer = result["baseline_top"][0]["token"] if result["baseline_top"] else ""
    result["relp_patch"] = _relp_patch(inv, clean=args["target_prompt"], corrupt=args["source_prompt"], answer=answer)
    if "noising" in result["relp_patch"]:
        rp = result["relp_patch"]
        summary += (f"; {rp['metric']}: noising {rp['noising']}, denoising {rp['denoising']}, "
                    f"RelP predicted {rp['predicted']}")
    return ToolOutcome(summary=summary, result=result)


def _relp_patch(inv: Investigation, *, clean: str, corrupt: str, answer: str = "") -> dict[str, Any]:
    """The attribution engine's activation patching (issue 20) of this neuron at the last token,
    with RelP's first-order prediction; {"skipped": why} when the engine has none or the prompts
    differ in length. The metric is the logit difference of the two prompts' top answers, or
    logit(``answer``) (the clean prompt's top token) when both predict the same token."""
    fn = getattr(inv.sources.engine, "patch", None)
    if not callable(fn):
        return {"skipped": "the engine has no Patch operation"}
    from circuits_core.patching import PatchNeuron, PatchRequest

    neuron = (PatchNeuron(layer=inv.layer, index=inv.neuron, position=-1),)
    try:
        try:
            res = fn(PatchRequest(clean=clean, corrupt=corrupt, raw=True, neurons=neuron))
        except CircuitsError as exc:
            if not answer or "both predict" not in str(exc):
                raise
            res = fn(PatchRequest(clean=clean, corrupt=corrupt, raw=True, neurons=neuron, target_tokens=(answer,)))
    except CircuitsError as exc:
        return {"skipped": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    (effect,) = res.neurons
    return {"metric": res.metric, "clean_metric": _round(res.clean_metric), "corrupt_metric": _round(res.corrupt_metric),
            "noising": _round(effect.noising), "denoising": _round(effect.denoising),
            "predicted": _round(effect.predicted), "relp": _round(effect.relp)}


def _attribute(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    from circuits_core.tracing import TraceRequest

    fn = _need(inv, "trace")
    graph = fn(TraceRequest(prompt=args["prompt"], raw=True, tau=float(args["tau"])))
    neurons = [u for u in graph.units if u.kind == "neuron"]
    ranked = sorted(neurons, key=lambda u: -abs(u.attribution or 0.0))
    mine = [u for u in neurons if (u.layer, u.index) == (inv.layer, inv.neuron)]
    ours = []
    for u in mine:
        rank = next(i for i, r in enumerate(ranked) if r is u) + 1
        ours.append({"position": u.position, "token": graph.prompt_tokens[u.position] if u.position is not None
                     and 0 <= u.position < len(graph.prompt_tokens) else "",
                     "activation": _round(u.activation), "attribution": _round(u.attribution), "rank": rank})
    edges_in: list[dict[str, Any]] = []
    edges_out: list[dict[str, Any]] = []
    logit_tokens = {(u.layer, u.index): u.token for u in graph.units if u.kind == "logit"}
    edges = graph.edges
    for e in (edges.rows() if hasattr(edges, "rows") else edges):
        if (e.tgt_layer, e.tgt_index) == (inv.layer, inv.neuron):
            edges_in.append({"from": f"L{e.src_layer}/N{e.src_index}" if e.src_layer >= 0 else f"emb {e.src_index}",
                             "weight": _round(e.weight)})
        elif (e.src_layer, e.src_index) == (inv.layer, inv.neuron):
            key = (e.tgt_layer, e.tgt_index)
            edges_out.append({"to": f"logit {logit_tokens[key]!r}" if key in logit_tokens else f"L{key[0]}/N{key[1]}",
                              "weight": _round(e.weight)})
    edges_in.sort(key=lambda r: -abs(r["weight"] or 0))
    edges_out.sort(key=lambda r: -abs(r["weight"] or 0))
    logits = [{"token": u.token, "probability": _round(u.probability)} for u in graph.units if u.kind == "logit"]
    result = {"in_graph": bool(ours), "nodes": ours, "graph_neurons": len(neurons), "prompt_tokens": list(graph.prompt_tokens),
              "top_edges_in": edges_in[:8], "top_edges_out": edges_out[:8], "logits": logits[:5],
              "top_neurons": [{"unit": f"L{u.layer}/N{u.index}", "position": u.position, "attribution": _round(u.attribution)}
                              for u in ranked[:8]]}
    if ours:
        best = min(ours, key=lambda r: r["rank"])
        summary = (f"in the graph at {len(ours)} position(s); best rank {best['rank']}/{len(neurons)} "
                   f"(attribution {best['attribution']} at {best['token']!r})")
    else:
        summary = f"not in the graph ({len(neurons)} neurons selected)"
    return ToolOutcome(summary=summary, result=result)


# -- hypotheses and predictions -------------------------------------------------------------
def _hypothesis(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    t = inv.transcript
    hid = args["id"] or f"H{len(t.hypotheses) + 1}"
    old = t.hypothesis(hid)
    if old is None and args["statement"] is None:
        raise ToolRefused(f"no hypothesis {hid}: give a statement to create it")
    notes = old.notes if old else ()
    if args["note"]:
        notes = (*notes, args["note"])
    h = Hypothesis(id=hid, statement=args["statement"] or old.statement, status=args["status"] or (old.status if old else "open"),
                   step=old.step if old else inv.step, notes=notes)
    t.put_hypothesis(h)
    return ToolOutcome(summary=f"{hid} [{h.status}]: {h.statement}", result={"id": hid, "status": h.status})


def _threshold(inv: Investigation, given: float | None) -> tuple[float, str]:
    if given is not None:
        return given, "set by the agent"
    ref = inv.transcript.reference_activation()
    if ref is not None and ref > 0:
        return round(0.5 * ref, 6), f"half the largest activation measured so far ({ref:g})"
    ex = inv.sources.exemplars
    if ex is not None and ex.has(inv.layer, inv.neuron):
        top = ex.stats(inv.layer, inv.neuron).maximum
        if top > 0:
            return round(0.5 * top, 6), f"half the exemplar maximum ({top:g})"
    raise ToolRefused("no reference activation yet: run some prompts first or give a threshold")


def _predict(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    t = inv.transcript
    if t.hypothesis(args["hypothesis_id"]) is None:
        raise ToolRefused(f"no hypothesis {args['hypothesis_id']}: register it first with the hypothesis tool")
    fire, quiet = args["fires_on"], args["silent_on"]
    total = len(fire) + len(quiet)
    if total == 0:
        raise ToolRefused("no predictions given")
    if total > inv.limits.max_predictions:
        raise ToolRefused(f"{total} predictions, over the limit of {inv.limits.max_predictions}")
    threshold, why = _threshold(inv, args["threshold"])
    pid = f"P{len(t.predictions) + 1}"
    items = tuple(PredictionItem(prompt=p, fires=True) for p in fire) + tuple(PredictionItem(prompt=p, fires=False) for p in quiet)
    t.put_prediction(Prediction(id=pid, hypothesis_id=args["hypothesis_id"], threshold=threshold, threshold_source=why,
                                items=items, registered_step=inv.step))
    return ToolOutcome(summary=f"{pid} registered for {args['hypothesis_id']}: {len(fire)} fire / {len(quiet)} silent, "
                               f"threshold {threshold:g} ({why})",
                       result={"prediction_id": pid, "threshold": threshold, "threshold_source": why})


def _test(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    t = inv.transcript
    pred = t.prediction(args["prediction_id"])
    if pred is None:
        raise ToolRefused(f"no prediction {args['prediction_id']}")
    if pred.tested:
        raise ToolRefused(f"{pred.id} was already tested at step {pred.tested_step}; register a new prediction")
    rows = read_activations(inv, [item.prompt for item in pred.items])
    items = []
    for item, row in zip(pred.items, rows):
        measured = row["max_activation"]
        fired = measured is not None and measured >= pred.threshold
        items.append(PredictionItem(prompt=item.prompt, fires=item.fires, measured=measured, token=row["max_token"],
                                    position=row["max_position"], came_true=fired == item.fires))
    done = Prediction(id=pred.id, hypothesis_id=pred.hypothesis_id, threshold=pred.threshold,
                      threshold_source=pred.threshold_source, items=tuple(items), registered_step=pred.registered_step,
                      tested_step=inv.step)
    t.put_prediction(done)
    correct, total = t.prediction_score()
    best = max((r["max_activation"] for r in rows if r["max_activation"] is not None), default=None)
    return ToolOutcome(
        summary=f"{pred.id}: {done.correct}/{len(items)} came true (all tests: {correct}/{total})",
        result={"prediction_id": pred.id, "correct": done.correct, "total": len(items),
                "score_all_tests": [correct, total], "max_activation": best, "prompts": rows,
                "items": [{"prompt": i.prompt, "predicted_fires": i.fires, "measured": i.measured,
                           "token": i.token, "came_true": i.came_true} for i in items]},
    )


def _finish(inv: Investigation, args: dict[str, Any]) -> ToolOutcome:
    from circuits_labeler.scientist.transcript import FinalAnswer, grounded_confidence

    t = inv.transcript
    correct, total = t.prediction_score()
    confidence = grounded_confidence(args["confidence"], correct, total)
    hid = args["hypothesis_id"] or ""
    if hid and t.hypothesis(hid) is None:
        raise ToolRefused(f"no hypothesis {hid}")
    t.final = FinalAnswer(label=args["label"], description=args["description"], confidence_stated=args["confidence"],
                          confidence=confidence, hypothesis_id=hid, predictions_correct=correct,
                          predictions_total=total, step=inv.step)
    return ToolOutcome(summary=f"final label {args['label']!r}, confidence {confidence} "
                               f"(stated {args['confidence']}; predictions {correct}/{total})",
                       result={"label": args["label"], "confidence": confidence}, finish=True)


def build_registry(limits: ToolLimits = ToolLimits()) -> dict[str, Tool]:
    """Every tool by name."""
    lim = limits
    tools = [
        Tool(name="atlas_info", description="The neuron's atlas record: labels and scores, cluster, most frequent "
             "upstream and downstream neighbours. Says when no atlas is available.",
             params=(Param(name="neighbours", kind="integer", required=False, default=8, minimum=1, maximum=30,
                           description="How many neighbours per side."),), run=_atlas_info),
        Tool(name="exemplars", description="Top-activating corpus contexts of the neuron ([[token]] marks where it "
             "fired) and its activation statistics. Says when no exemplar file is available.",
             params=(Param(name="count", kind="integer", required=False, default=10, minimum=1,
                           maximum=lim.max_exemplars),), run=_exemplars),
        Tool(name="projections", description="Tokens the neuron's output promotes / suppresses through the unembedding, "
             "and vocabulary tokens whose embeddings drive it most.",
             params=(Param(name="top_k", kind="integer", required=False, default=10, minimum=1, maximum=30),),
             run=_projections),
        Tool(name="run_prompts", description="Run the model on prompts you write and return the neuron's activation "
             "at every token.", params=(_prompts(lim),), run=_run_prompts),
        Tool(name="intervene", description="Ablate (zero / mean) or steer (set / scale) the neuron at every prompt "
             "position and compare the next-token prediction and a greedy continuation with the clean model.",
             params=(_prompt(lim), Param(name="mode", kind="string", choices=("zero", "mean", "set", "scale")),
                     Param(name="value", kind="number", required=False, minimum=-1000, maximum=1000,
                           description="Value for set, factor for scale."),
                     Param(name="generate_tokens", kind="integer", required=False, default=8, minimum=0,
                           maximum=lim.max_generate_tokens),
                     Param(name="include_generated", kind="boolean", required=False, default=False,
                           description="Also intervene on the generated tokens.")), run=_intervene),
        Tool(name="patch", description="Activation patching between a prompt pair: the neuron's value at the source "
             "prompt's last token replaces its value at the target prompt's last token; returns both values, the "
             "target's prediction before and after, and (prompts of equal token length) the logit-difference effect "
             "in both directions with RelP's prediction of it.",
             params=(_prompt(lim, "source_prompt", "Prompt the value is taken from."),
                     _prompt(lim, "target_prompt", "Prompt the value is written into.")), run=_patch),
        Tool(name="attribute", description="Trace a RelP attribution graph of the prompt's next-token prediction and "
             "report whether and where the neuron appears, its attribution and rank, and its strongest edges.",
             params=(_prompt(lim), Param(name="tau", kind="number", required=False, default=0.005, minimum=0.0,
                                         maximum=1.0, description="Node threshold.")), run=_attribute),
        Tool(name="hypothesis", description="Register a hypothesis (statement) or update one (id with status / note).",
             params=(Param(name="id", kind="string", required=False, max_chars=16),
                     Param(name="statement", kind="string", required=False, max_chars=500),
                     Param(name="status", kind="string", required=False, choices=("open", "supported", "refuted")),
                     Param(name="note", kind="string", required=False, max_chars=500)), run=_hypothesis),
        Tool(name="predict", description="Pre-register predictions for a hypothesis BEFORE testing them: prompts on "
             "which the neuron will fire and prompts on which it will stay silent. 'Fires' means the largest "
             "activation over the prompt's tokens reaches the threshold (default: half the largest activation "
             "measured so far).",
             params=(Param(name="hypothesis_id", kind="string", max_chars=16),
                     Param(name="fires_on", kind="array", items=Param(name="p", kind="string", max_chars=lim.max_prompt_chars),
                           max_items=lim.max_predictions),
                     Param(name="silent_on", kind="array", items=Param(name="p", kind="string", max_chars=lim.max_prompt_chars),
                           max_items=lim.max_predictions),
                     Param(name="threshold", kind="number", required=False, minimum=0.0, maximum=1e6)), run=_predict),
        Tool(name="test_prediction", description="Run a registered prediction set and score it.",
             params=(Param(name="prediction_id", kind="string", max_chars=16),), run=_test),
        Tool(name="finish", description="End the investigation with the final label (a few words), a description, "
             "and your confidence (low / medium / high; capped by how many predictions came true).",
             params=(Param(name="label", kind="string", max_chars=120),
                     Param(name="description", kind="string", max_chars=2000),
                     Param(name="confidence", kind="string", choices=CONFIDENCES),
                     Param(name="hypothesis_id", kind="string", required=False, max_chars=16)), run=_finish),
    ]
    return {t.name: t for t in tools}


def result_text(outcome: ToolOutcome, *, max_chars: int = 6000) -> str:
    """The tool result as sent to the LLM: summary and JSON, cut to ``max_chars``."""
    text = outcome.summary + "\n" + json.dumps(outcome.result, default=list)
    return text if len(text) <= max_chars else text[: max_chars - 20] + " ...(truncated)"


__all__ = ["CircuitsError", "Investigation", "Sources", "Tool", "ToolLimits", "ToolOutcome", "ToolRefused",
           "build_registry", "read_activations", "result_text"]
