"""`circuits launch`: the Indexed Job manifest, and create + watch against an emulated API server
(kmock) through the official kubernetes client."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import yaml

from circuits.cli import build_parser, main
from circuits_core.errors import FailedPrecondition

ARGS = ["launch", "--image", "registry.local/circuits-attribution:0.1", "--prompts", "/data/prompts.jsonl",
        "--shards", "3", "--gpus", "1", "--aggregator", "aggregator:50052", "--namespace", "circuits",
        "--name", "run-1", "--volume-claim", "circuits-data", "--poll", "0.05"]


@pytest.fixture
def k8s():
    """A kmock Kubernetes emulator on a local port, served from a background event loop."""
    kmock = pytest.importorskip("kmock")
    from kubernetes import client

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    async def serve() -> None:
        state["stop"] = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            state["emulator"], state["url"] = emulator, str(server.url).rstrip("/")
            ready.set()
            await state["stop"].wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert ready.wait(10)
    configuration = client.Configuration()
    configuration.host = state["url"]
    api = client.BatchV1Api(client.ApiClient(configuration))
    yield api
    loop.call_soon_threadsafe(state["stop"].set)
    thread.join(10)


def test_dry_run_prints_a_valid_indexed_job(capsys):
    assert main([*ARGS, "--dry-run", "--worker-arg=--k", "--worker-arg=10"]) == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    spec = manifest["spec"]
    assert manifest["kind"] == "Job" and manifest["metadata"] == {**manifest["metadata"], "name": "run-1", "namespace": "circuits"}
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimitPerIndex"] == 3
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by backoffLimitPerIndex
    container = pod["containers"][0]
    assert container["command"][:3] == ["python", "-m", "circuits_attribution.worker"]
    command = " ".join(container["command"])
    for piece in ("--prompts /data/prompts.jsonl", "--shard-count 3", "--aggregator aggregator:50052",
                  "--device cuda", "--k 10"):
        assert piece in command
    assert "--shard-index" not in command  # from JOB_COMPLETION_INDEX
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "circuits-data"
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(manifest, "1.33", strict=True)  # raises on unknown fields / wrong types


def test_worker_flags_in_the_manifest_are_accepted_by_the_worker_parser():
    from circuits_attribution.launch import LaunchSettings, worker_command
    from circuits_attribution.worker import build_parser as worker_parser

    command = worker_command(LaunchSettings(image="i", prompts="/p.jsonl", shards=2, gpus=0, aggregator="a:1"))
    args = worker_parser().parse_args(command[3:])
    assert args.shard_count == 2 and args.device == "cpu" and args.aggregator == "a:1" and args.shard_index is None


def _patch_status(api, status: dict) -> None:
    api.patch_namespaced_job_status("run-1", "circuits", {"status": status})


def _run_cli(api, argv) -> tuple[threading.Thread, dict]:
    from circuits.cli import launch as launch_cli

    result: dict = {}
    args = build_parser().parse_args(argv)
    thread = threading.Thread(target=lambda: result.setdefault("rc", launch_cli.run(args, api=api)), daemon=True)
    thread.start()
    return thread, result


def _wait_created(api) -> None:
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            api.read_namespaced_job("run-1", "circuits")
            return
        except ApiException:
            time.sleep(0.02)
    raise AssertionError("Job was not created")


def test_launch_creates_the_job_and_follows_it_to_completion(k8s, capsys):
    thread, result = _run_cli(k8s, ARGS)
    _wait_created(k8s)
    created = k8s.read_namespaced_job("run-1", "circuits")
    assert created.spec.completion_mode == "Indexed" and created.spec.completions == 3
    assert created.spec.backoff_limit_per_index == 3
    _patch_status(k8s, {"active": 3})
    time.sleep(0.2)
    _patch_status(k8s, {"active": 2, "succeeded": 1})
    time.sleep(0.2)
    assert thread.is_alive()  # still watching
    _patch_status(k8s, {"active": 0, "succeeded": 3, "completedIndexes": "0-2",
                        "conditions": [{"type": "Complete", "status": "True"}]})
    thread.join(10)
    assert result["rc"] == 0
    out = capsys.readouterr().out
    assert "created Job circuits/run-1" in out and "3/3 shards succeeded" in out and "complete" in out


def test_launch_reports_a_failed_job(k8s, capsys):
    thread, result = _run_cli(k8s, ARGS)
    _wait_created(k8s)
    _patch_status(k8s, {"active": 0, "succeeded": 2, "failed": 4, "failedIndexes": "1",
                        "conditions": [{"type": "Failed", "status": "True", "reason": "FailedIndexes",
                                        "message": "Job has failed indexes"}]})
    thread.join(10)
    assert result["rc"] == 1
    assert "failed shards 1" in capsys.readouterr().out


def test_launch_no_wait_and_duplicate_name(k8s):
    from circuits.cli import launch as launch_cli

    args = build_parser().parse_args([*ARGS, "--no-wait"])
    assert launch_cli.run(args, api=k8s) == 0
    with pytest.raises(FailedPrecondition, match="already exists"):
        launch_cli.run(args, api=k8s)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--shards", "0", "--shards must be >= 1"),
    ("--name", "Bad_Name", "not a valid Kubernetes name"),
    ("--aggregator", "nohostport", "HOST:PORT"),
])
def test_bad_flags_are_one_line_errors(capsys, flag, value, message):
    argv = list(ARGS)
    argv[argv.index(flag) + 1] = value
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
