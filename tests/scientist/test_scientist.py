"""The neuron scientist end to end: `circuits investigate` with the scripted stand-in LLM on a tiny
model whose planted neuron fires on one token, plus every way a run can end badly.

Independent checks: the planted neuron's activation is ``silu(c) * c`` on its token (c = the
normed private channel) and exactly 0 elsewhere, so the measured per-token activations, the
prediction score and the final label can be checked against what was planted; ablation results
are compared with a direct forward pass with the neuron zeroed by a hook written here.
"""

from __future__ import annotations

import json

import pytest
import torch
from scientist_support import ALL_TOOLS, FILLERS, KEY, LAYER, NEURON, PROBES, TOKEN, investigate, run_agent

from circuits.cli import main
from circuits_labeler.scientist.params import ArgumentErrors, Param, validate_arguments
from circuits_labeler.scientist.report import render_report
from circuits_labeler.scientist.tools import ToolLimits, build_registry
from circuits_labeler.scientist.transcript import load_transcript, measured_confidence, save_transcript
from circuits_labeler.testing import ScriptedScientist, StandInLLMServer, StandInReply

def expected_activation(model, tokenizer) -> float:
    """silu(c) * c for the planted channel of the token: its activation read here by a hook on down_proj."""
    ids = tokenizer(f"the {TOKEN}")["input_ids"]
    seen = {}

    def hook(_module, args) -> None:
        seen["x"] = args[0][0, :, NEURON].detach().clone()

    handle = model.model.layers[LAYER].mlp.down_proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return float(seen["x"][-1])


def test_cli_investigation_through_every_tool_reaches_the_planted_token(planted, exemplar_file, atlas_file, tmp_path, capsys):
    model, tokenizer, checkpoint = planted
    atlas = tmp_path / "atlas.duckdb"
    atlas.write_bytes(atlas_file.read_bytes())
    with StandInLLMServer(responder=ScriptedScientist(probes=PROBES, fillers=FILLERS)) as server:
        code, out, err = investigate(["--model", str(checkpoint), "--atlas", str(atlas), "--exemplars", str(exemplar_file),
                                      "--write-atlas", "--max-steps", "20"], server, tmp_path, capsys)
        requests = server.requests
    assert code == 0, err
    folder = tmp_path / "reports" / f"L{LAYER}_N{NEURON}"
    t = load_transcript(folder / "transcript.json")
    assert t.status == "finished" and t.final is not None
    assert t.final.label == f"fires on the token {TOKEN}"
    # every tool ran successfully at least once
    assert {e.tool for e in t.experiments if e.ok} == ALL_TOOLS, [(e.tool, e.error) for e in t.experiments if not e.ok]
    assert all(r.auth == "present" and r.tools for r in requests)
    # pre-registered predictions: registered before the test that scored them, all came true
    (pred,) = t.predictions
    assert pred.registered_step < pred.tested_step and pred.correct == len(pred.items) == 8
    assert t.final.confidence == "high" == measured_confidence(8, 8)
    # measured activations are the planted ones: silu(c)*c on the token, exactly 0 elsewhere
    want = expected_activation(model, tokenizer)
    run = next(e for e in t.experiments if e.tool == "run_prompts")
    for row in run.result["prompts"]:
        for tok, value in zip(row["tokens"], row["activations"]):
            assert value == pytest.approx(want if tok == TOKEN else 0.0, abs=1e-3)
    # exemplars: every top context of the planted neuron is centred on the token
    ex = next(e for e in t.experiments if e.tool == "exemplars")
    assert ex.result["contexts"] and all(c["token"] == TOKEN for c in ex.result["contexts"])
    # the atlas tool saw the atlas's own (stale) label, and the scientist's label was written back
    atlas_exp = next(e for e in t.experiments if e.tool == "atlas_info")
    assert "enzyme catalysis" in atlas_exp.result["labels"][0]["text"]
    from circuits_atlas.database import CircuitDatabase

    db = CircuitDatabase(atlas, read_only=True)
    try:
        labels = {lab.source: lab.text for lab in db.get_unit(LAYER, NEURON).labels}
    finally:
        db.close()
    assert labels["scientist"] == t.final.label and "progressive_output" in labels
    # projections: the input projection finds the planted token first
    proj = next(e for e in t.experiments if e.tool == "projections")
    assert proj.result["input_drivers"][0]["token"] == TOKEN
    # attribution: the neuron is in the graph of a prompt ending in its token, at that token
    attr = next(e for e in t.experiments if e.tool == "attribute")
    assert attr.result["in_graph"] and attr.result["nodes"][0]["token"] == TOKEN
    assert attr.result["top_edges_in"] and attr.result["top_edges_out"]
    # patching: the engine's RelP patching ran beside the intervention (same-length prompts)
    rp = next(e for e in t.experiments if e.tool == "patch").result["relp_patch"]
    assert {"metric", "noising", "denoising", "predicted"} <= set(rp), rp
    # report and summary line
    html = (folder / "report.html").read_text()
    assert f"fires on the token {TOKEN}" in html and "8/8" in html and "<script" not in html
    assert out.startswith("finished: the agent called finish; label 'fires on the token cat' (confidence high")


def test_ablation_matches_a_direct_forward_with_the_neuron_zeroed(planted, engine, scripted, tmp_path):
    model, tokenizer, _ = planted
    t, _ = run_agent(engine, scripted, tmp_path, max_steps=20)
    ablation = next(e for e in t.experiments if e.tool == "intervene" and e.arguments["mode"] == "zero")
    prompt = ablation.arguments["prompt"]
    ids = [tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(prompt.split())

    def probs(zero: bool) -> torch.Tensor:
        handle = model.model.layers[LAYER].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args: (args[0].index_fill(-1, torch.tensor([NEURON]), 0.0),)) if zero else None
        try:
            with torch.no_grad():
                return torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        finally:
            if handle:
                handle.remove()

    clean, ablated = probs(False), probs(True)
    for shift in ablation.result["shifts"]:
        tid = tokenizer.convert_tokens_to_ids(shift["token"])
        assert shift["before"] == pytest.approx(float(clean[tid]), abs=1e-4)
        assert shift["after"] == pytest.approx(float(ablated[tid]), abs=1e-4)


def test_openai_function_calling_runs_the_same_investigation(engine, scripted, tmp_path):
    t, requests = run_agent(engine, scripted, tmp_path, api="openai", max_steps=20)
    assert t.status == "finished" and t.final.label == f"fires on the token {TOKEN}"
    assert {r.api for r in requests} == {"openai"} and {e.tool for e in t.experiments if e.ok} == ALL_TOOLS - {"atlas_info", "exemplars"}


def test_malformed_and_unknown_tool_calls_are_refused_and_the_run_goes_on(engine, tmp_path):
    long_prompt = "cat " * 200
    responder = ScriptedScientist(probes=PROBES, fillers=FILLERS, preamble=[
        StandInReply(tool_calls=(("no_such_tool", {}),)),
        StandInReply(tool_calls=(("run_prompts", "{not json"),)),
        StandInReply(tool_calls=(("run_prompts", {"prompts": [long_prompt], "extra": 1}),)),
        StandInReply(tool_calls=(("intervene", {"prompt": "the cat", "mode": "explode", "generate_tokens": 10_000}),)),
        StandInReply(tool_calls=(("test_prediction", {"prediction_id": "P9"}),)),
        StandInReply(tool_calls=(("run_prompts", {"prompts": ["cat " * 90]}),)),  # longer than the model's 64 positions
    ])
    t, _ = run_agent(engine, responder, tmp_path, max_steps=30)
    assert t.status == "finished" and t.final.label == f"fires on the token {TOKEN}"
    bad = [e for e in t.experiments[:6]]
    assert not any(e.ok for e in bad) and all(e.result == {} for e in bad)
    assert "unknown tool 'no_such_tool'" in bad[0].error
    assert "arguments must be a JSON object" in bad[1].error
    assert "over the limit of 400" in bad[2].error and "extra: unknown argument" in bad[2].error
    assert "mode: must be one of" in bad[3].error and "generate_tokens: must be <= 24" in bad[3].error
    assert "no prediction P9" in bad[4].error
    assert bad[5].error == "InvalidArgument: prompt is 91 tokens, longer than the model's context of 64 tokens"
    html = render_report(t)
    assert "unknown tool" in html and "refused" in html


def test_budget_exhaustion_ends_cleanly_with_a_report_that_says_why(engine, scripted, tmp_path):
    t, requests = run_agent(engine, scripted, tmp_path, max_steps=20, max_spend_usd=0.02, input_price_per_mtok=3.0,
                            output_price_per_mtok=15.0)
    assert t.status == "stopped" and t.stop_reason.startswith("budget exhausted") and t.final is None
    assert t.usage.spend_usd >= 0.02 and len(requests) == t.steps < 20
    saved = load_transcript(tmp_path / "t.json")
    assert saved.status == "stopped" and saved.stop_reason == t.stop_reason
    html = render_report(saved)
    assert "budget exhausted" in html and "No final label" in html


def test_an_llm_that_never_stops_hits_the_step_limit(engine, tmp_path):
    t, requests = run_agent(engine, lambda _r: StandInReply(tool_calls=(("run_prompts", {"prompts": ["the cat"]}),)),
                            tmp_path, max_steps=4)
    assert t.status == "stopped" and "step limit reached (4" in t.stop_reason and len(requests) == 4
    assert len(t.experiments) == 4 and all(e.ok for e in t.experiments)


def test_an_llm_that_only_talks_is_stopped(engine, tmp_path):
    t, requests = run_agent(engine, lambda _r: "I believe this neuron is about cats.", tmp_path, max_steps=10)
    assert t.status == "stopped" and "without calling a tool" in t.stop_reason and len(requests) == 3
    assert "without calling a tool" in render_report(t)


def test_resume_continues_a_stopped_run_to_the_same_answer(planted, scripted, tmp_path, capsys):
    _, _, checkpoint = planted
    with StandInLLMServer(responder=scripted) as server:
        code, out, _ = investigate(["--model", str(checkpoint), "--max-steps", "4"], server, tmp_path, capsys)
        assert code == 0 and out.startswith("stopped: step limit reached")
        first = load_transcript(tmp_path / "reports" / f"L{LAYER}_N{NEURON}" / "transcript.json")
        assert first.steps == 4 and first.final is None
        code, _, err = investigate(["--model", str(checkpoint)], server, tmp_path, capsys)
        assert code == 2 and "exists: pass --resume" in err
        code, out, _ = investigate(["--model", str(checkpoint), "--max-steps", "20", "--resume"], server, tmp_path, capsys)
        assert code == 0 and out.startswith("finished")
    t = load_transcript(tmp_path / "reports" / f"L{LAYER}_N{NEURON}" / "transcript.json")
    assert t.final.label == f"fires on the token {TOKEN}" and t.steps > 4
    assert [e.id for e in t.experiments[: len(first.experiments)]] == [e.id for e in first.experiments]
    assert t.usage.requests == t.steps and t.usage.input_tokens > first.usage.input_tokens


def test_cli_refuses_bad_input_with_one_line(planted, tmp_path, capsys):
    _, _, checkpoint = planted
    cases = [
        (["investigate", "x/y"], "bad neuron 'x/y'"),
        (["investigate", "1/2", "--max-steps", "0"], "--max-steps must be >= 1"),
        (["investigate", "1/2", "--write-atlas"], "--write-atlas needs --atlas"),
        (["investigate", "1/2", "--atlas", str(tmp_path / "none.duckdb")], "file not found"),
        (["investigate", "1/2", "--resume", "--output", str(tmp_path)], "nothing to resume"),
        (["investigate", "1/2", "--api-key-env", "CIRCUITS_NO_SUCH_KEY", "--output", str(tmp_path)], "no API key"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_params_validate_every_problem_before_anything_runs():
    params = (Param(name="n", kind="integer", minimum=1, maximum=5), Param(name="xs", kind="array", max_items=2,
              items=Param(name="x", kind="string", max_chars=3)), Param(name="flag", kind="boolean", required=False, default=False))
    assert validate_arguments(params, {"n": 2.0, "xs": ["ab"]}) == {"n": 2, "xs": ["ab"], "flag": False}
    with pytest.raises(ArgumentErrors) as info:
        validate_arguments(params, {"n": 9, "xs": ["abcd", "a", "b"], "flag": "yes", "zzz": 1})
    problems = "\n".join(info.value.problems)
    for part in ("zzz: unknown argument", "n: must be <= 5", "xs: 3 items, over the limit of 2",
                 "xs[0]: 4 characters, over the limit of 3", "flag: expected true or false"):
        assert part in problems
    assert build_registry(ToolLimits(max_prompts=3))["run_prompts"].schema()["properties"]["prompts"]["maxItems"] == 3


def test_transcript_round_trips_and_damage_is_named(engine, scripted, tmp_path):
    from circuits_core.errors import CorruptInput

    t, _ = run_agent(engine, scripted, tmp_path, max_steps=20)
    again = load_transcript(save_transcript(t, tmp_path / "copy.json"))
    assert again.final == t.final and again.predictions == t.predictions and len(again.messages) == len(t.messages)
    data = json.loads((tmp_path / "copy.json").read_text())
    data["predictions"][0]["items"][0]["fires"] = "sometimes"
    data["experiments"][0]["bogus"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(CorruptInput, match=r"experiments\[0\]: unknown field\(s\) bogus"):
        load_transcript(tmp_path / "bad.json")
    (tmp_path / "cut.json").write_text((tmp_path / "copy.json").read_text()[:500])
    with pytest.raises(CorruptInput, match="not JSON"):
        load_transcript(tmp_path / "cut.json")


def test_missing_sources_say_so(engine, tmp_path):
    responder = ScriptedScientist(probes=PROBES, fillers=FILLERS)
    t, _ = run_agent(engine, responder, tmp_path, max_steps=20)
    errors = {e.tool: e.error for e in t.experiments if not e.ok}
    assert errors["atlas_info"].startswith("source missing: atlas") and "--atlas" in errors["atlas_info"]
    assert errors["exemplars"].startswith("source missing: exemplars")
    assert t.sources["connectivity"].startswith("not used")
