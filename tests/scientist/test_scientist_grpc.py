"""The neuron scientist over gRPC: the model on a real attribution server (GetActivations,
Intervene, Trace through the SDK client; `circuits investigate --remote`), and the labeler
server's Investigate RPC streaming progress events to the real client."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from scientist_support import ALL_TOOLS, FILLERS, KEY, LAYER, NEURON, PROBES, TOKEN, investigate

from circuits_attribution.server import AttributionSettings, build_server
from circuits_core.activations import ActivationRequest
from circuits_core.config import LabelingSection
from circuits_core.errors import FailedPrecondition, InvalidArgument
from circuits_labeler.llm import AnthropicBackend
from circuits_labeler.scientist.transcript import load_transcript
from circuits_labeler.testing import ScriptedScientist, StandInLLMServer
from circuits_sdk.attribution import AttributionClient
from circuits_sdk.labeler import LabelerClient
from circuits_server.serving import ServerSettings


@contextmanager
def attribution_server(engine):
    server = build_server(AttributionSettings(server=ServerSettings(port=0, grace_seconds=1), model="planted"), engine).start()
    try:
        yield server
    finally:
        server.stop(0.5)


@contextmanager
def investigating_labeler(engine, tmp_path, **labeling):
    """A real labeler server whose Investigate runs the scripted scientist on ``engine`` (here an
    attribution client) against a stand-in Anthropic server; ``labeling``: more LabelingSection fields."""
    from circuits_labeler.scientist.service import Investigations
    from circuits_labeler.server import build_server as build_labeler_server
    from circuits_labeler.service import LabelerService

    with StandInLLMServer(responder=ScriptedScientist(probes=PROBES, fillers=FILLERS)) as llm:
        investigations = Investigations(
            engine=engine, labeling=LabelingSection(model="stand-in", base_url=llm.base_url, **labeling),
            reports_dir=tmp_path / "reports", model_name="planted",
            backend_factory=lambda: AnthropicBackend(model="stand-in", api_key=KEY, base_url=llm.base_url))
        # the labeler's progressive labelling is not used by Investigate
        server = build_labeler_server(ServerSettings(port=0), service=LabelerService(None, investigations=investigations)).start()  # type: ignore[arg-type]
        server.set_serving(True)
        try:
            yield server
        finally:
            server.stop(0.5)


def test_get_activations_over_grpc_equals_in_process(engine):
    request = ActivationRequest(prompts=("the cat is big", "red moon"), neurons=((LAYER, NEURON), (0, 3)))
    local = engine.activations(request)
    with attribution_server(engine) as server, AttributionClient(server.address) as client:
        remote = client.activations(request)
        with pytest.raises(InvalidArgument, match="out of range"):
            client.activations(ActivationRequest(prompts=("the cat",), neurons=((LAYER, 10_000),)))
    assert remote == local
    cat = local.prompts[0]
    assert cat.tokens[cat.max_over_text(0)[1]] == TOKEN and cat.special_positions == (0,)


def test_cli_remote_investigation(engine, tmp_path, capsys):
    with attribution_server(engine) as server, StandInLLMServer(
            responder=ScriptedScientist(probes=PROBES, fillers=FILLERS)) as llm:
        code, out, err = investigate(["--remote", server.address, "--max-steps", "20"], llm, tmp_path, capsys)
    assert code == 0, err
    t = load_transcript(tmp_path / "reports" / f"L{LAYER}_N{NEURON}" / "transcript.json")
    assert t.final.label == f"fires on the token {TOKEN}" and t.final.confidence == "high"
    assert t.sources["model.activations"] == "available" and t.sources["projections"].startswith("missing")
    ok = {e.tool for e in t.experiments if e.ok}
    assert ok == ALL_TOOLS - {"atlas_info", "exemplars", "projections"}
    assert t.model.startswith(server.address)


def test_labeler_investigate_rpc_streams_progress(engine, tmp_path):
    with attribution_server(engine) as attr, AttributionClient(attr.address) as client, investigating_labeler(
            client, tmp_path, input_price_per_mtok=3.0, output_price_per_mtok=15.0) as server:
        with LabelerClient(server.address) as labeler:
            events = list(labeler.investigate(LAYER, NEURON, max_steps=20))
            with pytest.raises(FailedPrecondition, match="investigated before"):
                list(labeler.investigate(LAYER, NEURON))
            with pytest.raises(InvalidArgument, match="max_steps"):
                list(labeler.investigate(LAYER, NEURON, max_steps=100_000))
            stopped = list(labeler.investigate(LAYER, NEURON + 1, max_steps=2))
    final = events[-1]
    assert final.kind == "finished" and final.label == f"fires on the token {TOKEN}" and final.confidence == "high"
    assert (final.predictions_correct, final.predictions_total) == (8, 8) and final.spend_usd > 0
    assert final.report_path.endswith("report.html") and (tmp_path / "reports" / f"L{LAYER}_N{NEURON}" / "report.html").exists()
    tools = {e.tool for e in events if e.kind == "tool" and e.ok}
    assert tools == ALL_TOOLS - {"atlas_info", "exemplars", "projections"}
    assert [e.step for e in events if e.kind == "step"] == list(range(1, final.step + 1))
    assert stopped[-1].kind == "stopped" and "step limit" in stopped[-1].message and stopped[-1].status == "stopped"


def test_labeler_without_attribution_refuses_investigate():
    from circuits_labeler.server import build_server as build_labeler_server
    from circuits_labeler.service import LabelerService

    server = build_labeler_server(ServerSettings(port=0), service=LabelerService(None)).start()  # type: ignore[arg-type]
    server.set_serving(True)
    try:
        with LabelerClient(server.address) as labeler, pytest.raises(FailedPrecondition, match="--attribution"):
            list(labeler.investigate(1, 2))
    finally:
        server.stop(0.5)


def test_labeler_server_takes_the_attribution_flags():
    from circuits_labeler.__main__ import build_parser

    args = build_parser().parse_args(["--config", "c.yaml", "--attribution", "localhost:50051", "--reports", "out"])
    assert (args.attribution, args.reports) == ("localhost:50051", "out")


WRITE_TOKEN = "labeler-write-token-0123456789"
READ_TOKEN = "labeler-read-token-0123456789"


def test_labeler_flags_reach_a_tls_and_token_attribution_server(engine, pki, tmp_path):
    """`circuits serve labeler --attribution ... --attribution-tls-ca/-cert/-key --attribution-token-file`
    (what the chart passes with global.tls + global.auth) builds a client that gets through a
    mutual-TLS, token-checking attribution server, and Investigate runs on it; without the token,
    with a read-only token or without the CA the same server refuses it."""
    import os

    from circuits_core.errors import PermissionDenied, Unauthenticated, Unavailable
    from circuits_labeler.__main__ import attribution_client_from_args, build_parser

    tokens = tmp_path / "tokens"
    tokens.write_text(f"{WRITE_TOKEN} write\n{READ_TOKEN} read\n")
    os.chmod(tokens, 0o600)
    for name, token in (("write", WRITE_TOKEN), ("read", READ_TOKEN)):
        (tmp_path / name).write_text(token + "\n")
    secure = ServerSettings(port=0, grace_seconds=1, tls_cert_file=str(pki["server.pem"]),
                            tls_key_file=str(pki["server.key"]), tls_client_ca_file=str(pki["ca.pem"]),
                            auth_tokens_file=str(tokens))  # fmt: skip
    attr = build_server(AttributionSettings(server=secure, model="planted"), engine).start()
    tls = ["--attribution-tls-ca", str(pki["ca.pem"]), "--attribution-tls-cert", str(pki["client.pem"]),
           "--attribution-tls-key", str(pki["client.key"])]  # fmt: skip

    def client(*flags: str):
        argv = ["--config", "unused.yaml", "--attribution", f"localhost:{attr.port}", *flags]
        return attribution_client_from_args(build_parser().parse_args(argv))

    probe = ActivationRequest(prompts=("the cat",), neurons=((LAYER, NEURON),))
    try:
        for flags, error in ((tls, Unauthenticated),
                             ([*tls, "--attribution-token-file", str(tmp_path / "read")], PermissionDenied),
                             (["--attribution-token-file", str(tmp_path / "write")], Unavailable)):  # plaintext to TLS
            with client(*flags) as refused, pytest.raises(error):
                refused.activations(probe, timeout=10)
        with client(*tls, "--attribution-token-file", str(tmp_path / "write")) as engine_client:
            assert engine_client.activations(probe) == engine.activations(probe)
            with investigating_labeler(engine_client, tmp_path) as labeler, LabelerClient(labeler.address) as labeler_client:
                events = list(labeler_client.investigate(LAYER, NEURON, max_steps=20))
    finally:
        attr.stop(0.5)
    final = events[-1]
    assert final.kind == "finished" and final.label == f"fires on the token {TOKEN}", final
    assert {e.tool for e in events if e.kind == "tool" and e.ok} == ALL_TOOLS - {"atlas_info", "exemplars", "projections"}


@pytest.mark.parametrize(("flags", "message"), [
    (["--attribution-token-file", "/nonexistent/token"], "cannot read --attribution-token-file /nonexistent/token"),
    (["--attribution-tls-cert", "c.pem"], "--attribution-tls-cert and --attribution-tls-key go together"),
    (["--attribution-token-file", "EMPTY"], "is empty"),
    (["--attribution-token-file", "TOKENS"], "must hold one token"),
])
def test_labeler_attribution_credential_errors_are_one_line(flags, message, tmp_path, capsys):
    from circuits_labeler.__main__ import main

    (tmp_path / "EMPTY").write_text("\n")
    (tmp_path / "TOKENS").write_text(f"{WRITE_TOKEN} write\n")  # the server's tokens file, not a token
    flags = [str(tmp_path / f) if f in ("EMPTY", "TOKENS") else f for f in flags]
    assert main(["--config", str(tmp_path / "missing.yaml"), "--insecure", "--attribution", "localhost:1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert WRITE_TOKEN not in err
    assert main(["--config", str(tmp_path / "missing.yaml"), "--insecure", *flags]) == 2  # and without --attribution
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
