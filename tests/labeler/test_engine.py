"""The progressive engine against the stand-in LLM server through the real SDKs."""

from __future__ import annotations

import json
import logging

import pytest

from circuits_core.errors import Unauthenticated
from circuits_labeler.build import build_labeler
from labeler_support import NEURONS, NUM_LAYERS, SECRET_KEY, evidence_edges


def run(config, **kwargs):
    labeler = build_labeler(config)
    try:
        return labeler, labeler.run(**kwargs)
    finally:
        labeler.cache.close()


def read_labels(config):
    path = config.resolve(config.labeling.labels_path)
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_input_qualifiers(output_labelled: set[tuple[int, int]]) -> set[tuple[int, int]]:
    upstream: dict[tuple[int, int], set] = {}
    for sl, sn, tl, tn, _c, _w in evidence_edges():
        upstream.setdefault((tl, tn), set()).add((sl, sn))
    return {k for k, ups in upstream.items() if k[1] != 7 and len(ups & output_labelled) >= 2}


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
def test_pass_order_and_labels(standin, make_config, backend):
    config = make_config(standin, backend=backend, concurrency=3)
    _, final = run(config)
    assert final.state == "done" and final.failed == 0
    seen = [(r.label_pass, r.unit) for r in standin.requests]
    passes = [p for p, _ in seen]
    n_out = passes.count("output")
    assert passes == ["output"] * n_out + ["input"] * (len(passes) - n_out)  # pass 1 entirely before pass 2
    out_layers = [u[0] for p, u in seen if p == "output"]
    in_layers = [u[0] for p, u in seen if p == "input"]
    assert out_layers == sorted(out_layers, reverse=True)  # late -> early
    assert in_layers == sorted(in_layers)  # early -> late
    candidates = {(l, n) for l in range(NUM_LAYERS) for n in range(NEURONS) if n != 7}
    assert {u for p, u in seen if p == "output"} == candidates
    assert {u for p, u in seen if p == "input"} == expected_input_qualifiers(candidates)
    assert len(seen) == len(set(seen))  # nobody asked twice
    assert all(r.api == backend and r.model == "stand-in-model" for r in standin.requests)

    records = {(r["layer"], r["neuron"]): r for r in read_labels(config)}
    assert set(records) == candidates
    r = records[(2, 4)]
    assert r["label"] == r["output_label"] == "output L2/N4" and r["input_label"] == "input L2/N4"
    assert r["output_type"] == "semantic" and r["input_type"] == "context" and r["source"] == "progressive_output"
    assert r["passes"] == ["output", "input"] and r["appearance_count"] == 14
    assert final.input_tokens > 0 and final.output_tokens > 0 and final.spend_usd > 0


def test_earlier_layers_see_downstream_labels(standin, make_config):
    run(make_config(standin))
    prompt = next(r.prompt for r in standin.requests if r.unit == (1, 2) and r.label_pass == "output")
    assert 'ACTIVATES L2/N2 "output L2/N2"' in prompt and 'INHIBITS L2/N5 "output L2/N5"' in prompt
    prompt = next(r.prompt for r in standin.requests if r.unit == (2, 4) and r.label_pass == "input")
    assert 'EXCITED by L1/N4 "output L1/N4"; fires on: input L1/N4' in prompt
    assert "Its output function: output L2/N4" in prompt


def test_qualification_thresholds(standin, make_config):
    # Downstream effects are 0.2 + 0.01 n (layers 0-2); the random model's logit effects are ~0.005.
    config = make_config(standin, min_effect=0.15, min_appearances=12)
    run(config)
    out = {r.unit for r in standin.answered(label_pass="output")}
    assert out == {(l, n) for l in range(NUM_LAYERS - 1) for n in range(2, 7)}
    assert {r.unit for r in standin.answered(label_pass="input")} == {
        k for k in expected_input_qualifiers(out) if k[1] >= 2
    }


def test_rerun_is_served_from_cache(standin, make_config):
    config = make_config(standin)
    _, first = run(config)
    labels_before = read_labels(config)
    n_requests = len(standin.requests)
    _, second = run(config)
    assert len(standin.requests) == n_requests  # zero new requests
    assert second.state == "done" and second.requests == 0 and second.input_tokens == 0
    assert second.cached == second.done and read_labels(config) == labels_before


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
def test_retries_on_429_5xx_and_timeout(standin, make_config, backend):
    standin.hang_seconds = 1.0
    standin.fail_next("429", "500", "503", "timeout")
    config = make_config(standin, backend=backend, concurrency=1, request_timeout=0.3)
    _, final = run(config)
    assert final.state == "done" and final.failed == 0 and final.retries == 4
    assert [r.status for r in standin.requests[:4]] == [429, 500, 503, 0]
    assert standin.requests[4].unit == standin.requests[0].unit  # the same neuron, retried to success
    assert final.requests == len(standin.requests)


def test_exhausted_retries_fail_one_neuron_only(standin, make_config):
    standin.fault_for = lambda r: "500" if r.unit == (2, 3) else None
    config = make_config(standin, max_retries=2)
    _, final = run(config, passes=["output"])
    assert final.state == "done" and final.failed == 1
    assert sum(1 for r in standin.requests if r.unit == (2, 3)) == 3
    assert (2, 3) not in {(r["layer"], r["neuron"]) for r in read_labels(config)}
    standin.fault_for = None
    standin.reset()
    _, again = run(config, passes=["output"])  # transport failures are not cached: asked again
    # ...and the two neurons driving L2/N3 now see its label, so their prompts changed too;
    # layer 0's prompts are unchanged (same labels in layer 1) and come from the cache.
    assert sorted(r.unit for r in standin.requests) == [(1, 0), (1, 3), (2, 3)] and again.failed == 0


def test_malformed_answers_are_reasked_then_marked_failed(standin, make_config):
    standin.fail_next("malformed")
    standin.fault_for = lambda r: "malformed" if r.unit == (1, 1) and r.label_pass == "output" else None
    config = make_config(standin, concurrency=1, malformed_retries=2)
    _, final = run(config, passes=["output"])
    assert final.state == "done" and final.failed == 1
    first = standin.requests[0].unit
    asked_first = [r for r in standin.requests if r.unit == first]
    assert len(asked_first) == 2 and len(asked_first[1].messages) == 3  # answer + correction turn
    assert "could not be used" in asked_first[1].messages[2]["content"]
    assert sum(1 for r in standin.requests if r.unit == (1, 1)) == 3
    labels = {(r["layer"], r["neuron"]) for r in read_labels(config)}
    assert first in labels and (1, 1) not in labels
    cache = [json.loads(l) for l in config.resolve("cache.jsonl").read_text().splitlines()]
    failed = [c for c in cache if c["status"] == "failed"]
    assert [(c["layer"], c["neuron"], c["attempts"]) for c in failed] == [(1, 1, 3)]
    # A rerun keeps the failure (no new spend) unless asked to retry failed answers.
    standin.reset()
    _, again = run(config, passes=["output"])
    assert standin.requests == [] and again.failed == 1
    standin.fault_for = None
    _, retried = run(config, passes=["output"], retry_failed=True)
    # L1/N1 is asked again; its new label changes the prompts of the two neurons driving it.
    assert sorted(r.unit for r in standin.requests) == [(0, 1), (0, 6), (1, 1)] and retried.failed == 0


def test_budget_stops_cleanly_and_resume_pays_only_the_rest(standin, make_config):
    config = make_config(standin, concurrency=2, max_tokens_total=2500)
    _, stopped = run(config)
    assert stopped.state == "budget_exhausted" and "budget reached" in stopped.message
    first = {(r.label_pass, r.unit) for r in standin.answered()}
    assert 0 < len(first) < 20
    # in-flight requests finish, nothing else is dispatched: overshoot is bounded by concurrency
    assert stopped.input_tokens + stopped.output_tokens < 2500 + 2 * 600
    assert len(read_labels(config)) == len({u for _, u in first})
    standin.reset()
    _, done = run(make_config(standin, concurrency=2))
    assert done.state == "done"
    second = {(r.label_pass, r.unit) for r in standin.requests}
    assert not (first & second)  # nothing paid twice
    assert done.cached == len([k for k in first if k[0] == "input"]) or done.label_pass == "input"


def test_spend_budget(standin, make_config):
    config = make_config(standin, concurrency=1, max_spend_usd=0.01, input_price_per_mtok=3.0, output_price_per_mtok=15.0)
    _, final = run(config)
    assert final.state == "budget_exhausted" and 0.01 <= final.spend_usd < 0.02


def test_max_units(standin, make_config):
    _, final = run(make_config(standin, concurrency=2), max_units=5)
    assert final.state == "stopped" and len(standin.requests) == 5


def test_auth_failure_stops_run_without_crash(standin, make_config):
    standin.fault_for = lambda r: "401"
    _, final = run(make_config(standin))
    assert final.state == "failed" and "HTTP 401" in final.message
    assert len(standin.requests) <= 4  # at most the requests already in flight


def test_missing_key_is_one_line_error(standin, make_config, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(Unauthenticated, match="ANTHROPIC_API_KEY"):
        build_labeler(make_config(standin, api_key_file=""))


def test_api_key_from_env_and_never_logged(standin, make_config, monkeypatch, caplog):
    monkeypatch.setenv("CIRCUITS_TEST_KEY", SECRET_KEY)
    standin.fail_next("429", "500")
    config = make_config(standin, api_key_file="", api_key_env="CIRCUITS_TEST_KEY")
    with caplog.at_level(logging.DEBUG):
        labeler, final = run(config, passes=["output"])
    assert final.state == "done" and all(r.auth == "present" for r in standin.requests)
    assert SECRET_KEY not in caplog.text
    assert SECRET_KEY not in repr(labeler.backend_factory())
    for name in ("cache.jsonl", "labels.jsonl"):
        assert SECRET_KEY not in config.resolve(name).read_text()


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory):
    """A tiny Llama (4 layers, 96 neurons per layer) saved with its tokenizer, loadable by path."""
    from circuits_attribution.testing import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama-projections")
    build_model("llama", seed=3, dtype=__import__("torch").float32).save_pretrained(str(path))
    build_tokenizer().save_pretrained(str(path))
    return path


def _computing_config(standin, make_config, saved_model_dir, tmp_path):
    import dataclasses

    config = make_config(standin, projections_path=str(tmp_path / "computed.parquet"), compute_projections=True,
                         concurrency=1)  # fmt: skip
    return dataclasses.replace(config, model=dataclasses.replace(config.model, name=str(saved_model_dir)))


def test_a_few_units_compute_only_their_layers_and_write_nothing(standin, make_config, saved_model_dir, tmp_path):
    """--max-units 3 labels late-layer units first: only that layer's projections are computed,
    they equal the full computation, and no projections file appears."""
    from circuits_attribution import load_model
    from circuits_labeler.projection import compute_output_projections

    config = _computing_config(standin, make_config, saved_model_dir, tmp_path)
    labeler, final = run(config, max_units=3, passes=["output"])
    assert final.state == "stopped" and len(standin.requests) == 3
    assert labeler.projections.computed_layers == [NUM_LAYERS - 1]
    assert not (tmp_path / "computed.parquet").exists()
    loaded = load_model(str(saved_model_dir))
    full = compute_output_projections(loaded.model, tokenizer=loaded.tokenizer, model_name=str(saved_model_dir),
                                      top_k=config.labeling.projection_top_k)  # fmt: skip
    for layer, neuron in [r.unit for r in standin.requests]:
        assert labeler.projections.get(layer, neuron) == full.get(layer, neuron)
    assert labeler.projections.neurons_per_layer() == 96 == full.neurons_per_layer()


def test_a_complete_run_writes_the_projections_file(standin, make_config, saved_model_dir, tmp_path):
    from circuits_labeler.projection import OutputProjections

    config = _computing_config(standin, make_config, saved_model_dir, tmp_path)
    labeler, final = run(config, passes=["output"])
    assert final.state == "done", final.message
    written = OutputProjections.load(tmp_path / "computed.parquet")
    assert labeler.projections.computed_layers == list(range(NUM_LAYERS))  # every layer has evidence units
    assert len(written) == NUM_LAYERS * 96 and written.get(2, 5) is not None
