"""Batch attribution on Kubernetes (an Indexed Job) or Slurm (an array job): one worker per shard.

Kubernetes: :func:`job_manifest` builds the Job (``completionMode: Indexed``, ``completions = parallelism =
shards``, ``backoffLimitPerIndex``; the shard index comes from ``JOB_COMPLETION_INDEX``, which
Kubernetes sets in every pod of an Indexed Job). :func:`create_job` submits it with the official
``kubernetes`` client; :func:`watch_job` follows ``status.succeeded/failed/active`` until the Job
completes or fails. The API object is injected (tests point it at an emulated API server).

Slurm: :func:`sbatch_script` writes an sbatch array job (``--array=0-<shards-1>``) whose task
``$SLURM_ARRAY_TASK_ID`` runs the same worker on that shard; :func:`submit_sbatch` submits it and
:func:`watch_slurm_job` follows its tasks with ``squeue``/``scontrol`` until all have ended.
Workers are resumable either way: a resubmitted array skips the prompts its shards finished.
"""

from __future__ import annotations

import re
import shlex
import subprocess
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


def worker_arguments(
    *, prompts: str, shards: int, output_dir: str, model: str, dtype: str, gpus: int, aggregator: str,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The worker flags both launchers pass (the shard index comes from each one's environment)."""
    arguments = [
        "--prompts", prompts,
        "--shard-count", str(shards),
        "--output-dir", output_dir,
        "--model", model,
        "--dtype", dtype,
        "--device", "cuda" if gpus else "cpu",
        "--no-progress",
    ]
    if aggregator:
        arguments += ["--aggregator", aggregator]
    return arguments + list(extra)


def worker_command(settings: LaunchSettings) -> list[str]:
    """The container command of every pod (the shard index comes from JOB_COMPLETION_INDEX)."""
    return ["python", "-m", WORKER_MODULE, *worker_arguments(
        prompts=settings.prompts, shards=settings.shards, output_dir=settings.output_dir, model=settings.model,
        dtype=settings.dtype, gpus=settings.gpus, aggregator=settings.aggregator, extra=settings.worker_args,
    )]


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


# -- Slurm -------------------------------------------------------------------------------------------
_SLURM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$|^\d+$")


@dataclass(frozen=True, slots=True, kw_only=True)
class SlurmSettings:
    """A batch attribution run as a Slurm array job. Field comments are the CLI help."""

    #: Prompts JSONL path on the cluster's shared filesystem.
    prompts: str
    #: Number of shards (= array tasks).
    shards: int
    #: Graph output directory (shared filesystem): <graph_id>.pb.gz files and the resume ledgers.
    output_dir: str = "graphs"
    #: Model id or checkpoint path as the compute nodes see it.
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    #: Model dtype.
    dtype: str = "bfloat16"
    #: GPUs per task (--gres=gpu:N unless gres is given); 0 runs on CPU.
    gpus: int = 1
    #: Aggregator HOST:PORT[,HOST:PORT...] the workers stream graphs to (empty: files only).
    aggregator: str = ""
    #: Job name.
    name: str = "circuits-attribution"
    #: Array tasks running at once (0 = no limit).
    parallelism: int = 0
    #: Extra worker flags (e.g. --k 10 --tau 0.01).
    worker_args: tuple[str, ...] = ()
    #: Slurm partition (--partition); empty: the cluster's default.
    partition: str = ""
    #: Generic resources per task (--gres, e.g. gpu:a100:1); empty: gpu:<gpus> when gpus > 0.
    gres: str = ""
    #: Time limit per task (--time, e.g. 04:00:00 or 1-00:00:00); empty: the partition's default.
    time: str = ""
    #: Memory per node (--mem, e.g. 32G); empty: the partition's default.
    mem: str = ""
    #: CPUs per task (--cpus-per-task); 0: the partition's default.
    cpus_per_task: int = 0
    #: Further sbatch options, one per entry (e.g. --account=lab, --qos=long).
    sbatch_args: tuple[str, ...] = ()
    #: Python that runs the worker on the compute nodes (an environment with circuits-attribution).
    python: str = "python3"
    #: Directory of the per-task logs (%x-%A_%a.out); empty: <output_dir>/_logs.
    log_dir: str = ""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise InvalidArgument("--prompts is required")
        if self.shards < 1:
            raise InvalidArgument(f"--shards must be >= 1, got {self.shards}")
        if self.gpus < 0:
            raise InvalidArgument(f"--gpus must be >= 0, got {self.gpus}")
        if self.parallelism < 0:
            raise InvalidArgument(f"--parallelism must be >= 0, got {self.parallelism}")
        if self.cpus_per_task < 0:
            raise InvalidArgument(f"--cpus-per-task must be >= 0, got {self.cpus_per_task}")
        if not _SLURM_NAME.match(self.name):
            raise InvalidArgument(f"--name {self.name!r}: use letters, digits, '.', '_' and '-'")
        if self.time and not _SLURM_TIME.match(self.time):
            raise InvalidArgument(f"--time {self.time!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
        for label, value in (("--partition", self.partition), ("--gres", self.gres), ("--mem", self.mem)):
            if any(c.isspace() for c in value):
                raise InvalidArgument(f"{label} {value!r} must not contain spaces")
        for option in self.sbatch_args:
            if not option.startswith("--") or "\n" in option:
                raise InvalidArgument(f"--sbatch-arg {option!r}: give one long sbatch option, e.g. --account=lab")
        if self.aggregator and any(":" not in a for a in self.aggregator.split(",")):
            raise InvalidArgument(f"--aggregator must be HOST:PORT[,HOST:PORT...], got {self.aggregator!r}")


def sbatch_directives(settings: SlurmSettings) -> list[str]:
    """The ``#SBATCH`` options of the array job, in order."""
    log_dir = settings.log_dir or f"{settings.output_dir.rstrip('/')}/_logs"
    array = f"0-{settings.shards - 1}" + (f"%{settings.parallelism}" if settings.parallelism else "")
    options = [f"--job-name={settings.name}", f"--array={array}", f"--output={log_dir}/%x-%A_%a.out"]
    if settings.partition:
        options.append(f"--partition={settings.partition}")
    gres = settings.gres or (f"gpu:{settings.gpus}" if settings.gpus else "")
    if gres:
        options.append(f"--gres={gres}")
    if settings.time:
        options.append(f"--time={settings.time}")
    if settings.mem:
        options.append(f"--mem={settings.mem}")
    if settings.cpus_per_task:
        options.append(f"--cpus-per-task={settings.cpus_per_task}")
    return options + list(settings.sbatch_args)


def sbatch_script(settings: SlurmSettings) -> str:
    """The sbatch script: one array task per shard, each running the worker on its shard."""
    command = [settings.python, "-m", WORKER_MODULE, *worker_arguments(
        prompts=settings.prompts, shards=settings.shards, output_dir=settings.output_dir, model=settings.model,
        dtype=settings.dtype, gpus=settings.gpus, aggregator=settings.aggregator, extra=settings.worker_args,
    )]
    log_dir = settings.log_dir or f"{settings.output_dir.rstrip('/')}/_logs"
    lines = [
        "#!/bin/bash",
        f"# circuits batch attribution: {settings.shards} shard(s) of {settings.prompts} as a Slurm array job.",
        "# Written by `circuits launch --slurm`; submit with `sbatch <this file>`. Resubmitting resumes:",
        "# each shard skips the prompts recorded in <output-dir>/_progress.",
        *(f"#SBATCH {option}" for option in sbatch_directives(settings)),
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(log_dir)}",
        "export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}",
        'echo "circuits shard ${SLURM_ARRAY_TASK_ID} of ' + str(settings.shards) + ' on $(hostname)"',
        "exec " + shlex.join(command) + ' --shard-index "${SLURM_ARRAY_TASK_ID}"',
        "",
    ]
    return "\n".join(lines)


def write_sbatch_script(settings: SlurmSettings, path: str) -> str:
    """Write the script (mode 0755) and create its log folder, which Slurm needs before a task
    starts (it opens --output first); return the path."""
    import os

    os.makedirs(settings.log_dir or os.path.join(settings.output_dir, "_logs"), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(sbatch_script(settings))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def submit_sbatch(script: str, *, sbatch: str = "sbatch") -> str:
    """Submit a script file with ``sbatch --parsable``; return the job id."""
    try:
        result = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise FailedPrecondition(f"{sbatch} not found: is this a Slurm login node? (or pass --sbatch PATH)") from None
    if result.returncode != 0:
        raise FailedPrecondition(f"sbatch refused {script}: {' '.join(result.stderr.split())[:300]}")
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise Unavailable(f"sbatch gave no job id: {result.stdout.strip()[:200]}")
    return job_id


@dataclass(frozen=True, slots=True, kw_only=True)
class SlurmProgress:
    """States of the array tasks of one job."""

    job_id: str
    shards: int
    pending: int = 0
    running: int = 0
    completed: int = 0
    #: task index -> final state for tasks that ended otherwise (FAILED, CANCELLED, TIMEOUT, ...).
    failed: tuple[tuple[int, str], ...] = ()

    @property
    def done(self) -> bool:
        return self.completed + len(self.failed) >= self.shards

    @property
    def ok(self) -> bool:
        return self.completed == self.shards and not self.failed

    def line(self) -> str:
        bad = "; failed shards " + ", ".join(f"{i} ({state})" for i, state in self.failed) if self.failed else ""
        state = "complete" if self.ok else "FAILED" if self.done else "running"
        return (f"job {self.job_id}: {self.completed}/{self.shards} shards completed, {self.running} running, "
                f"{self.pending} pending{bad} - {state}")


_TASK = re.compile(r"ArrayTaskId=(\d+)\b.*?JobState=(\S+).*?ExitCode=(\d+):(\d+)")


def slurm_progress(job_id: str, shards: int, *, scontrol: str = "scontrol") -> SlurmProgress:
    """Task states from ``scontrol -o show job`` (one line per array task; finished tasks stay
    listed for the controller's MinJobAge)."""
    result = subprocess.run([scontrol, "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise Unavailable(f"scontrol show job {job_id}: {' '.join(result.stderr.split())[:200]}")
    states: dict[int, tuple[str, int]] = {}
    for line in result.stdout.splitlines():
        match = _TASK.search(line)
        if match:
            states[int(match.group(1))] = (match.group(2), int(match.group(3)))
    counts = {"PENDING": 0, "RUNNING": 0, "COMPLETED": 0}
    failed = []
    for index in range(shards):
        state, code = states.get(index, ("PENDING", 0))
        if state == "COMPLETED" and code == 0:
            counts["COMPLETED"] += 1
        elif state in ("PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED"):
            counts["PENDING"] += 1
        elif state in ("RUNNING", "COMPLETING"):
            counts["RUNNING"] += 1
        else:
            failed.append((index, state))
    return SlurmProgress(job_id=job_id, shards=shards, pending=counts["PENDING"], running=counts["RUNNING"],
                         completed=counts["COMPLETED"], failed=tuple(failed))


def watch_slurm_job(
    job_id: str,
    *,
    shards: int,
    poll_seconds: float = 5.0,
    timeout: float | None = None,
    on_progress: Callable[[SlurmProgress], None] | None = None,
    scontrol: str = "scontrol",
    sleep: Callable[[float], None] = time.sleep,
) -> SlurmProgress:
    """Poll the array's tasks until every one has ended (or ``timeout`` passes); report each change."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last: SlurmProgress | None = None
    while True:
        progress = slurm_progress(job_id, shards, scontrol=scontrol)
        if progress != last and on_progress is not None:
            on_progress(progress)
        last = progress
        if progress.done or (deadline is not None and time.monotonic() >= deadline):
            return progress
        sleep(poll_seconds)
