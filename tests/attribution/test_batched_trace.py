"""Batched, concurrent attribution (issue 19 item 2; issue 25 item 3, engine side).

* ``trace_many`` traces prompts of different lengths in one left-padded batch; each graph has the
  same units and edges as the prompt's single trace, with weights equal to float64 rounding
  (differential test: two paths that must agree are compared), also on a model split over a
  device map (cpu + disk offload);
* linearization patches one model *instance*: transformers' global attention table is never
  changed, two models (and replicas of one) trace at the same time from two threads with the
  results of serial traces, and one instance cannot be linearized twice at once;
* ``should_stop`` is obeyed inside every phase of a trace (decoder-layer forwards of the node and
  edge passes, attention backwards, edge chunks, graph building), and the engine is clean after.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter

import pytest
import torch
from circuits_core.errors import Cancelled, InvalidArgument
from circuits_core.tracing import TraceRequest

from circuits_attribution.linearize import RELP_ATTENTION, Linearization

PROMPTS = ("the capital of france is", "the dog is", "red blue green red blue green red", "paris")


def _edge_map(graph) -> dict[tuple, float]:
    return {
        (e.src_layer, e.src_index, e.src_position, e.tgt_layer, e.tgt_index, e.tgt_position): e.weight
        for e in graph.edges
    }


def _unit_map(graph) -> dict[tuple, tuple]:
    return {(u.kind, u.layer, u.index, u.position): (u.activation or 0.0, u.attribution or 0.0) for u in graph.units}


def assert_same_graph(batched, alone, *, rel: float = 1e-9) -> None:
    assert batched.prompt == alone.prompt and batched.graph_id == alone.graph_id
    units_b, units_a = _unit_map(batched), _unit_map(alone)
    assert units_b.keys() == units_a.keys()
    for key, value in units_a.items():
        assert units_b[key] == pytest.approx(value, rel=rel, abs=1e-12), key
    edges_b, edges_a = _edge_map(batched), _edge_map(alone)
    assert edges_b.keys() == edges_a.keys()
    assert len(edges_a) > 0
    for key, weight in edges_a.items():
        assert edges_b[key] == pytest.approx(weight, rel=rel, abs=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batched_graphs_equal_single_traces(arch, make_attributor) -> None:
    attributor = make_attributor(arch, dtype="float64", tau=0.005, k=3)
    requests = [TraceRequest(prompt=p, raw=True, k=3, tau=0.005) for p in PROMPTS]
    alone = [attributor.trace(request) for request in requests]
    batched = attributor.trace_many(requests)
    assert attributor.last_timings.batch_size == len(requests)
    assert len({len(attributor.encode_prompt(p, raw=True)) for p in PROMPTS}) > 1  # really left-padded
    for graph_b, graph_a in zip(batched, alone):
        assert_same_graph(graph_b, graph_a)


def test_batched_graphs_with_recomputed_patterns_and_a_budget_equal_single_traces(make_attributor) -> None:
    """The batch pass keeps the memory plan too: patterns recomputed per layer in blocks, a small
    memory budget and each chunk's causal cone leave every graph equal to its single trace."""
    attributor = make_attributor("llama", dtype="float64", tau=0.005, k=3, pattern_storage="recompute",
                                 memory_budget="64MiB")
    requests = [TraceRequest(prompt=p, raw=True, k=3, tau=0.005, target_position=-2) for p in PROMPTS[:3]]
    alone = [attributor.trace(request) for request in requests]
    batched = attributor.trace_many(requests)
    assert attributor.last_timings.plan is not None and attributor.last_timings.plan.edge_patterns == "recompute"
    for graph_b, graph_a in zip(batched, alone):
        assert_same_graph(graph_b, graph_a)


def test_one_bad_request_does_not_fail_its_batch(make_attributor) -> None:
    attributor = make_attributor("llama", dtype="float64", tau=0.01)
    vocab = attributor.vocab_size()
    requests = [
        TraceRequest(prompt="the dog is", raw=True),
        TraceRequest(prompt="the capital of france is", raw=True, k=vocab + 1),
        TraceRequest(prompt="paris", raw=True, target_position=7),
    ]
    outcomes = attributor.trace_many(requests)
    assert isinstance(outcomes[1], InvalidArgument) and "larger than the vocabulary" in str(outcomes[1])
    assert isinstance(outcomes[2], InvalidArgument) and "outside the prompt" in str(outcomes[2])
    assert_same_graph(outcomes[0], attributor.trace(requests[0]))
    with pytest.raises(InvalidArgument, match="larger than the vocabulary"):  # refused, not clamped
        attributor.trace(requests[1])


def test_linearization_leaves_the_global_attention_table_alone(make_attributor, make_model) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attributor = make_attributor("llama", dtype="float64")
    other = make_model("qwen3")
    before = dict(ALL_ATTENTION_FUNCTIONS._global_mapping), dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    ids = torch.tensor([[5, 6, 7, 8]])
    reference = other(ids).logits
    with Linearization(attributor.model):
        assert attributor.model.model.layers[0].self_attn.config._attn_implementation == RELP_ATTENTION
        assert other.model.layers[0].self_attn.config._attn_implementation == "eager"
        assert torch.equal(other(ids).logits, reference)  # an unpatched model is unaffected
        with pytest.raises(RuntimeError, match="already linearized"):
            Linearization(attributor.model).__enter__()
    after = dict(ALL_ATTENTION_FUNCTIONS._global_mapping), dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    assert {k: v for k, v in after[0].items() if k != RELP_ATTENTION} == {
        k: v for k, v in before[0].items() if k != RELP_ATTENTION}
    assert after[1] == before[1]
    assert attributor.model.model.layers[0].self_attn.config is attributor.model.config  # restored


def test_two_models_and_two_replicas_trace_concurrently(make_attributor) -> None:
    engines = [make_attributor("llama", dtype="float64"), make_attributor("qwen3", dtype="float64")]
    engines.append(engines[0].replicate())
    assert all(e.replicas_trace_concurrently for e in engines)
    prompts = ["the capital of france is", "the dog is", "red blue green red"]
    serial = [engine.trace(prompt) for engine, prompt in zip(engines, prompts)]

    # Every thread holds its Linearization at the same time: a layer hook waits at a barrier.
    barrier = threading.Barrier(len(engines), timeout=60)
    inside: Counter[int] = Counter()
    lock = threading.Lock()

    def stop_check(number: int):
        def check() -> bool:
            with lock:
                inside[number] += 1
                first = inside[number] == 1
            if first:
                barrier.wait()
            return False
        return check

    results: list = [None] * len(engines)
    errors: list = []

    def run(number: int) -> None:
        try:
            results[number] = engines[number].trace(prompts[number], should_stop=stop_check(number))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for concurrent, alone in zip(results, serial):
        assert concurrent.graph_id == alone.graph_id
        assert _edge_map(concurrent) == _edge_map(alone)


def _stop_sites(attributor, request) -> list[str]:
    """The function that polled should_stop, for every poll of one complete trace."""
    sites: list[str] = []

    def record() -> bool:
        sites.append(f"{sys._getframe(1).f_code.co_name}<{sys._getframe(2).f_code.co_name}")
        return False

    attributor.trace(request, should_stop=record)
    return sites


def test_a_trace_stops_in_every_phase_and_leaves_the_engine_clean(make_attributor) -> None:
    attributor = make_attributor("llama", dtype="float64", tau=0.01)
    request = TraceRequest(prompt="the capital of france is", raw=True, tau=0.01)
    reference = attributor.trace(request)
    sites = _stop_sites(attributor, request)
    # layer forwards (both passes), attention backwards, the phase checks, every edge chunk, graph building
    for phase in ("_stop_check<", "backward<", "<trace_many", "<_edge_pass", "<_build_graph"):
        assert any(phase in site for site in sites), (phase, Counter(sites))
    first_of_each: dict[str, int] = {}
    for number, site in enumerate(sites):
        first_of_each.setdefault(site, number)
    for site, number in first_of_each.items():
        calls = 0

        def stop_at(number=number) -> bool:
            nonlocal calls
            calls += 1
            return calls > number

        with pytest.raises(Cancelled):
            attributor.trace(request, should_stop=stop_at)
        assert calls == number + 1, f"{site}: polled again after it asked to stop"
        # nothing of the stopped trace stays behind: no hooks, no patched forwards or configs
        for layer in attributor.model.model.layers:
            assert not layer._forward_pre_hooks and layer.self_attn.config is attributor.model.config
    again = attributor.trace(request)
    assert again.graph_id == reference.graph_id and _edge_map(again) == _edge_map(reference)


def test_batched_graphs_on_a_device_map_equal_single_traces(offloaded_llama) -> None:
    """The batch path (B = 3, three prompt lengths, left-padded) of a float64 model split over a
    device map (layers on cpu and disk offload, weights streamed in by accelerate's hooks) gives
    each prompt the graph of its single trace on the one-device model."""
    from circuits_attribution import RelPAttributor, RelPConfig

    single, mapped = offloaded_llama({
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
        "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "disk", "lm_head": "disk",
    })  # fmt: skip
    config = RelPConfig(raw=True, model_name="tiny-llama", tau=0.005, k=3)
    one_device = RelPAttributor(single.model, single.tokenizer, config)
    split = RelPAttributor(mapped.model, mapped.tokenizer, config)
    requests = [TraceRequest(prompt=p, raw=True, k=3, tau=0.005) for p in PROMPTS[:3]]
    # three lengths in one left-padded batch (not one batch per length)
    assert split.pads_batches() and len({len(split.encode_prompt(r.prompt, raw=True)) for r in requests}) == 3
    alone = [one_device.trace(request) for request in requests]
    batched = split.trace_many(requests)
    assert split.last_timings.batch_size == len(requests)
    for graph_b, graph_a in zip(batched, alone):
        assert_same_graph(graph_b, graph_a)
    # and the split model's own single trace agrees too (the batch is not compared with itself)
    assert_same_graph(split.trace(requests[1]), alone[1])
