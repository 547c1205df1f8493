"""LabelerService through a real gRPC server on port 0 with the real client; the CLI commands."""

from __future__ import annotations

import pytest
import yaml

from circuits.cli import main as cli_main
from circuits_sdk.labeler import LabelerClient
from circuits_core.errors import FailedPrecondition, InvalidArgument
from circuits_server.serving import ServerSettings
from circuits_labeler.build import build_labeler
from circuits_labeler.server import build_server
from circuits_labeler.service import LabelerService


@pytest.fixture()
def service(standin, make_config):
    svc = LabelerService(build_labeler(make_config(standin)))
    yield svc
    svc.labeler.cache.close()


def test_grpc_run_progressive_get_labels_and_label_units(service, standin):
    server = build_server(ServerSettings(port=0), service=service).start()
    server.set_serving(True)
    try:
        with LabelerClient(server.address) as client:
            events = list(client.run_progressive())
            final = events[-1]
            assert final.state == "done" and final.failed == 0
            assert [e.label_pass for e in events if e.state == "pass_done"] == ["output", "input"]
            output_layers = [e.layer for e in events if e.state == "layer_done" and e.label_pass == "output"]
            assert output_layers == [3, 2, 1, 0]
            labels = client.get_labels()
            assert len(labels) == 28 and labels[0].labels[0].source == "progressive_output"
            (unit,) = client.get_labels([(2, 4)])
            assert unit.label == "output L2/N4" and unit.input_label == "input L2/N4"
            n = len(standin.requests)
            units, failures = client.label_units([(3, 0), (3, 7)], label_pass="output")
            assert failures == [] and [u.label for u in units] == ["output L3/N0", "output L3/N7"]
            assert [r.unit for r in standin.requests[n:]] == [(3, 7)]  # (3, 0) came from the cache
            with pytest.raises(InvalidArgument, match="unknown pass"):
                client.label_units([(1, 1)], label_pass="sideways")
            with pytest.raises(InvalidArgument, match="no units"):
                client.label_units([], label_pass="output")
    finally:
        server.stop(grace=0)


def test_one_run_at_a_time(service):
    stream = service.run_progressive()
    next(stream)
    with pytest.raises(FailedPrecondition, match="already in progress"):
        service.label_units([(1, 1)], label_pass="output")
    stream.close()  # cancels: stops dispatching, waits, releases
    service.label_units([(1, 1)], label_pass="output")


def test_cli_label(tmp_path, standin, make_config, capsys):
    config = make_config(standin)
    path = tmp_path / "label.yaml"
    section = {k: getattr(config.labeling, k) for k in ("backend", "model", "base_url", "api_key_file",
               "evidence_path", "projections_path", "min_effect", "retry_base_delay")}
    section["compute_projections"] = False
    path.write_text(yaml.safe_dump({"labeling": section}))
    assert cli_main(["label", "--config", str(path), "--no-progress", "--passes", "output"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("done:") and "labels.jsonl" in out
    assert (tmp_path / "labels.jsonl").is_file() and {r.label_pass for r in standin.requests} == {"output"}


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["label", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"labeling": {"concurrency": "many"}}))
    assert cli_main(["label", "--config", str(bad)]) == 2
    assert "labeling.concurrency" in capsys.readouterr().err


def test_serve_labeler_main_rejects_bad_config(tmp_path, capsys):
    from circuits_labeler.__main__ import main

    assert main(["--config", str(tmp_path / "missing.yaml"), "--port", "0", "--insecure"]) == 2
    assert "config file not found" in capsys.readouterr().err
