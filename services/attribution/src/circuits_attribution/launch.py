"""Batch attribution on Kubernetes: an Indexed Job whose pods each run one worker shard.

:func:`job_manifest` builds the Job (``completionMode: Indexed``, ``completions = parallelism =
shards``, ``backoffLimitPerIndex``; the shard index comes from ``JOB_COMPLETION_INDEX``, which
Kubernetes sets in every pod of an Indexed Job). :func:`create_job` submits it with the official
``kubernetes`` client; :func:`watch_job` follows ``status.succeeded/failed/active`` until the Job
completes or fails. The API object is injected (tests point it at an emulated API server).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from circuits_core.errors import CircuitsError, FailedPrecondition, InvalidArgument, NotFound, Unavailable

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
WORKER_MODULE = "circuits_attribution.worker"


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchSettings:
    """A batch attribution run. Field comments are the CLI help."""

    #: Container image with circuits-attribution installed.
    image: str
    #: Prompts JSONL path as the pods see it (on the mounted volume or in the image).
    prompts: str
    #: Number of shards (= Job completions = pods).
    shards: int
    #: GPUs per pod (nvidia.com/gpu); 0 runs on CPU.
    gpus: int = 1
    #: Aggregator HOST:PORT the workers stream graphs to (empty: files only).
    aggregator: str = ""
    #: Kubernetes namespace.
    namespace: str = "default"
    #: Job name.
    name: str = "circuits-attribution"
    #: Model id or checkpoint path in the pod.
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    #: Model dtype.
    dtype: str = "bfloat16"
    #: Graph output directory in the pod (on the mounted volume).
    output_dir: str = "/data/graphs"
    #: PersistentVolumeClaim mounted at mount_path (empty: none).
    volume_claim: str = ""
    #: Where the claim is mounted.
    mount_path: str = "/data"
    #: Pods running at once (0 = all shards).
    parallelism: int = 0
    #: Retries of one shard before it counts as failed.
    backoff_limit_per_index: int = 3
    #: Failed shards tolerated before the whole Job fails (-1 = no limit).
    max_failed_indexes: int = -1
    #: Extra worker flags (e.g. --k 10 --tau 0.01).
    worker_args: tuple[str, ...] = ()
    #: Container CPU and memory requests.
    cpu: str = "4"
    memory: str = "32Gi"
    #: Service account for the pods (empty: namespace default).
    service_account: str = ""

    def __post_init__(self) -> None:
        if not self.image:
            raise InvalidArgument("--image is required")
        if not self.prompts:
            raise InvalidArgument("--prompts is required")
        if self.shards < 1:
            raise InvalidArgument(f"--shards must be >= 1, got {self.shards}")
        if self.gpus < 0:
            raise InvalidArgument(f"--gpus must be >= 0, got {self.gpus}")
        if self.parallelism < 0:
            raise InvalidArgument(f"--parallelism must be >= 0, got {self.parallelism}")
        if self.backoff_limit_per_index < 0:
            raise InvalidArgument(f"--backoff-limit-per-index must be >= 0, got {self.backoff_limit_per_index}")
        for label, value in (("--name", self.name), ("--namespace", self.namespace)):
            if len(value) > 63 or not _NAME.match(value):
                raise InvalidArgument(f"{label} {value!r} is not a valid Kubernetes name (lowercase letters, digits, '-')")
        if self.aggregator and ":" not in self.aggregator:
            raise InvalidArgument(f"--aggregator must be HOST:PORT, got {self.aggregator!r}")


def worker_command(settings: LaunchSettings) -> list[str]:
    """The container command of every pod (the shard index comes from JOB_COMPLETION_INDEX)."""
    command = [
        "python", "-m", WORKER_MODULE,
        "--prompts", settings.prompts,
        "--shard-count", str(settings.shards),
        "--output-dir", settings.output_dir,
        "--model", settings.model,
        "--dtype", settings.dtype,
        "--device", "cuda" if settings.gpus else "cpu",
        "--no-progress",
    ]
    if settings.aggregator:
        command += ["--aggregator", settings.aggregator]
    return command + list(settings.worker_args)


def job_manifest(settings: LaunchSettings) -> dict[str, Any]:
    """The Indexed Job as a plain manifest (what --dry-run prints and create_job submits)."""
    labels = {
        "app.kubernetes.io/name": "circuits",
        "app.kubernetes.io/component": "attribution-worker",
        "app.kubernetes.io/instance": settings.name,
        "app.kubernetes.io/managed-by": "circuits-launch",
    }
    limits: dict[str, Any] = {}
    if settings.gpus:
        limits["nvidia.com/gpu"] = str(settings.gpus)
    container: dict[str, Any] = {
        "name": "worker",
        "image": settings.image,
        "command": worker_command(settings),
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": {"requests": {"cpu": settings.cpu, "memory": settings.memory}, **({"limits": limits} if limits else {})},
    }
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.volume_claim:
        container["volumeMounts"] = [{"name": "data", "mountPath": settings.mount_path}]
        pod_spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": settings.volume_claim}}]
    if settings.gpus:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": settings.shards,
        "parallelism": settings.parallelism or settings.shards,
        "backoffLimitPerIndex": settings.backoff_limit_per_index,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if settings.max_failed_indexes >= 0:
        spec["maxFailedIndexes"] = settings.max_failed_indexes
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": settings.name, "namespace": settings.namespace, "labels": labels},
        "spec": spec,
    }


def batch_api(*, kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A BatchV1Api from the in-cluster config or a kubeconfig (~/.kube/config by default)."""
    from kubernetes import client, config

    try:
        if kubeconfig is None and context is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        else:
            config.load_kube_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, FileNotFoundError) as exc:
        raise FailedPrecondition(f"no Kubernetes configuration found ({exc}); pass --kubeconfig") from None
    return client.BatchV1Api()


def _api_error(exc: Any, action: str) -> CircuitsError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", "") or str(exc)
    if status == 409:
        return FailedPrecondition(f"{action}: the Job already exists (pick another --name or delete it)")
    if status == 404:
        return NotFound(f"{action}: not found ({reason})")
    if status in (401, 403):
        return FailedPrecondition(f"{action}: not allowed ({reason})")
    if status is not None and 400 <= status < 500:
        return InvalidArgument(f"{action}: rejected by the API server ({status} {reason})")
    return Unavailable(f"{action}: Kubernetes API unreachable or failing ({status or ''} {reason})".replace("  ", " "))


def create_job(api: Any, manifest: dict[str, Any]) -> Any:
    """Submit the Job; API errors become CircuitsErrors with one line."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    namespace = manifest["metadata"]["namespace"]
    try:
        return api.create_namespaced_job(namespace, manifest)
    except ApiException as exc:
        raise _api_error(exc, f"creating Job {namespace}/{manifest['metadata']['name']}") from None
    except HTTPError as exc:
        raise Unavailable(f"creating Job: Kubernetes API unreachable ({exc})") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobProgress:
    """Counters of an Indexed Job from its status."""

    shards: int
    succeeded: int = 0
    failed: int = 0
    active: int = 0
    complete: bool = False
    failed_job: bool = False
    failed_indexes: str = ""
    message: str = ""

    @property
    def done(self) -> bool:
        return self.complete or self.failed_job

    def line(self) -> str:
        state = "complete" if self.complete else "FAILED" if self.failed_job else "running"
        extra = f"; failed shards {self.failed_indexes}" if self.failed_indexes else ""
        reason = f" ({self.message})" if self.message else ""
        return (f"{self.succeeded}/{self.shards} shards succeeded, {self.active} active, "
                f"{self.failed} failed pods{extra} - {state}{reason}")


def job_progress(job: Any, shards: int) -> JobProgress:
    """Progress from a V1Job (conditions Complete/Failed decide the end)."""
    status = job.status
    if status is None:
        return JobProgress(shards=shards)
    complete = failed = False
    message = ""
    for condition in status.conditions or ():
        if str(condition.status) != "True":
            continue
        if condition.type in ("Complete", "SuccessCriteriaMet"):
            complete = True
        elif condition.type in ("Failed", "FailureTarget"):
            failed = True
            message = condition.message or condition.reason or ""
    succeeded = int(status.succeeded or 0)
    return JobProgress(
        shards=shards,
        succeeded=succeeded,
        failed=int(status.failed or 0),
        active=int(status.active or 0),
        complete=complete or (succeeded >= shards and not failed),
        failed_job=failed,
        failed_indexes=status.failed_indexes or "",
        message=message,
    )


def watch_job(
    api: Any,
    name: str,
    namespace: str,
    *,
    shards: int,
    poll_seconds: float = 5.0,
    timeout: float | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> JobProgress:
    """Poll the Job's status until it completes or fails (or ``timeout`` passes); report each change."""
    from kubernetes.client.exceptions import ApiException

    deadline = None if timeout is None else time.monotonic() + timeout
    last: JobProgress | None = None
    while True:
        try:
            job = api.read_namespaced_job_status(name, namespace)
        except ApiException as exc:
            raise _api_error(exc, f"reading Job {namespace}/{name}") from None
        progress = job_progress(job, shards)
        if progress != last and on_progress is not None:
            on_progress(progress)
        last = progress
        if progress.done:
            return progress
        if deadline is not None and time.monotonic() >= deadline:
            return progress
        sleep(poll_seconds)
