"""`circuits up` / circuits_server.localstack: real service processes, health checks, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuits_core.errors import FailedPrecondition, InvalidArgument
from circuits_server.localstack import LocalStack, LocalStackSettings, health_status

CIRCUITS = Path(sys.executable).with_name("circuits")
#: The labeler starts without calling its LLM, but refuses to start without a key.
LABELER_ENV = {"ANTHROPIC_API_KEY": "test-key-not-used"}


def test_unknown_services_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown service"):
        LocalStack(LocalStackSettings(state_dir=tmp_path, only=("labeler", "vllm")))


def test_labeler_is_pointed_at_the_stacks_attribution_server(tmp_path: Path) -> None:
    settings = LocalStackSettings(state_dir=tmp_path, only=("labeler", "attribution"), ports={"attribution": 50991})
    (proc,) = LocalStack(settings)._plan("labeler")
    assert proc.argv[proc.argv.index("--attribution") + 1] == f"{settings.host}:50991"
    assert proc.argv[proc.argv.index("--reports") + 1] == str(tmp_path / "investigations")
    (alone,) = LocalStack(LocalStackSettings(state_dir=tmp_path / "b", only=("labeler",)))._plan("labeler")
    assert "--attribution" not in alone.argv


def test_labeler_process_serves_health_and_stops_cleanly(tmp_path: Path) -> None:
    settings = LocalStackSettings(state_dir=tmp_path, only=("labeler",), ports={"labeler": 0}, env=LABELER_ENV,
                                  startup_timeout=60)  # fmt: skip
    events: list[tuple[str, str]] = []
    with LocalStack(settings, on_event=lambda p: events.append((p.name, p.state))) as stack:
        proc = stack.status["labeler"]
        assert proc.state == "serving", proc.detail + proc.log_tail()
        address = stack.address("labeler")
        assert health_status(address) == "SERVING"
        # wired like the chart: the generated config and the standard flags
        assert proc.argv[proc.argv.index("--config") + 1] == str(tmp_path / "labeler.yaml")
        assert "--metrics-port" in proc.argv and "--host" in proc.argv
        assert proc.metrics_port and proc.metrics_port != proc.port
    assert events == [("labeler", "starting"), ("labeler", "serving"), ("labeler", "stopped")]
    assert proc.process.returncode == 0, proc.log_tail()
    assert health_status(address, timeout=0.5) == "UNREACHABLE"


def test_a_crashing_service_is_reported_with_its_log(tmp_path: Path) -> None:
    crash = tmp_path / "crash.sh"
    crash.write_text("#!/bin/sh\necho 'error: boom at start' >&2\nexit 3\n")
    crash.chmod(0o755)
    settings = LocalStackSettings(state_dir=tmp_path, only=("labeler",), ports={"labeler": 0}, python=str(crash))
    with LocalStack(settings) as stack:
        proc = stack.status["labeler"]
        assert proc.state == "failed"
        assert "exited with code 3" in proc.detail
        assert "error: boom at start" in proc.log_tail()
        with pytest.raises(FailedPrecondition, match="labeler is failed"):
            stack.address("labeler")


def test_services_without_a_package_or_input_are_reported_not_fatal(tmp_path: Path, monkeypatch) -> None:
    import circuits_server.localstack as localstack

    real = localstack.package_missing
    monkeypatch.setattr(localstack, "package_missing", lambda s: "not written yet" if s == "attribution" else real(s))
    settings = LocalStackSettings(state_dir=tmp_path, only=("attribution", "atlas"), ports={"atlas": 0})
    with LocalStack(settings) as stack:
        assert stack.status["attribution"].state == "unavailable"
        assert stack.status["attribution"].detail == "not written yet"
        assert stack.status["atlas"].state == "unavailable"
        assert "no atlas file" in stack.status["atlas"].detail


def test_circuits_up_prints_addresses_and_stops_on_sigterm(tmp_path: Path) -> None:
    command = [str(CIRCUITS), "up", "--only", "labeler", "--free-ports", "--state-dir", str(tmp_path)]
    env = {**os.environ, **LABELER_ENV}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as up:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops them" in line:
                break
        serving = [ln for ln in lines if "SERVING" in ln and ln.startswith("labeler")]
        assert serving, "".join(lines)
        address = serving[0].split()[2]
        assert health_status(address) == "SERVING"
        up.send_signal(signal.SIGTERM)
        rest, _ = up.communicate(timeout=60)
    assert up.returncode == 0, "".join(lines) + rest
    assert "labeler        STOPPED" in rest
    assert health_status(address, timeout=0.5) == "UNREACHABLE"


def test_circuits_up_rejects_an_unknown_service() -> None:
    result = subprocess.run([str(CIRCUITS), "up", "--only", "atlas,vllm"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --only: unknown service(s) vllm; choose from attribution, aggregator, labeler, atlas"


# -- ports that something else holds -------------------------------------------------------------
def _health_server():
    """A gRPC server on a free port answering health checks with SERVING (another instance, as far
    as a health check can tell)."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server.start()
    return server, port


def test_circuits_up_refuses_ports_another_instance_holds(tmp_path: Path) -> None:
    other, port = _health_server()
    try:
        assert health_status(f"127.0.0.1:{port}") == "SERVING"
        command = [str(CIRCUITS), "up", "--only", "labeler", "--labeler-port", str(port), "--state-dir", str(tmp_path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **LABELER_ENV})
    finally:
        other.stop(0)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: port {port} (labeler) on 127.0.0.1 is already in use (another `circuits up` or server?): "
                      "stop it, or choose other ports (--labeler-port PORT, or --free-ports)"], result.stderr
    assert "SERVING" not in result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "logs" / "labeler.log").exists()  # nothing was started


def test_a_service_that_loses_its_port_is_not_taken_for_the_other_server(tmp_path: Path, monkeypatch) -> None:
    """The port is taken after the check (a race): the health check reaches the other server, but
    the stack's own process failed to bind, and the stack says so instead of SERVING."""
    import circuits_server.localstack as localstack

    monkeypatch.setattr(localstack, "port_in_use", lambda host, port: False)
    other, port = _health_server()
    try:
        settings = LocalStackSettings(state_dir=tmp_path, only=("labeler",), ports={"labeler": port}, env=LABELER_ENV,
                                      metrics=False, startup_timeout=60)  # fmt: skip
        with LocalStack(settings) as stack:
            proc = stack.status["labeler"]
            assert proc.state == "failed", proc.detail
            assert f"gRPC port {port} on 127.0.0.1 is already in use" in proc.detail
            assert stack.port_conflicts() == [proc]
    finally:
        other.stop(0)


def test_serve_on_a_busy_port_is_one_error_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        command = [str(CIRCUITS), "serve", "aggregator", "--state", str(tmp_path / "agg.duckdb"), "--insecure",
                   "--port", str(port)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        metrics = subprocess.run([*command[:-1], "0", "--metrics-port", str(port)], capture_output=True, text=True,
                                 timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: gRPC port {port} on 127.0.0.1 is already in use (another `circuits serve` "
                                     "or `circuits up`?); choose another with --port PORT (0 = any free port)")
    assert metrics.returncode == 2
    assert metrics.stderr.strip().startswith(f"error: metrics port {port} on 127.0.0.1 is already in use")
    assert "--metrics-port PORT" in metrics.stderr


def test_up_and_serve_help_state_the_default_ports() -> None:
    up = subprocess.run([str(CIRCUITS), "up", "--help"], capture_output=True, text=True, timeout=60).stdout
    serve = subprocess.run([str(CIRCUITS), "serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    atlas = subprocess.run([str(CIRCUITS), "serve", "atlas", "--help"], capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(up.split())
    for service, port in (("attribution", 50051), ("aggregator", 50052), ("labeler", 50053), ("atlas", 50054)):
        assert f"gRPC port of the {service} (default: {port}" in flat
        assert f"{service} :{port}" in " ".join(serve.split())
    assert "HTTP port of the gateway (default: 8080" in flat and "gateway :8080" in " ".join(serve.split())
    assert "gRPC port (default: 50054" in " ".join(atlas.split())
