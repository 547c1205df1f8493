"""Every workload of the Helm chart as pods under `podman kube play` (`bash scripts/images.sh kube`).

Renders deploy/helm/circuits with ci/cpu-podman.yaml (the locally built images, CPU, the small
model) and runs each workload's pod template as a Pod, the way the Kubernetes controllers would
create it, on a private podman network:

  Deployment   -> one Pod ``<name>-0``
  StatefulSet  -> Pods ``<name>-<i>`` labelled ``apps.kubernetes.io/pod-index: i``, hostname and
                  subdomain set, each volumeClaimTemplate as the claim ``<template>-<name>-<i>``
  Indexed Job  -> Pods ``<name>-<i>`` annotated ``batch.kubernetes.io/job-completion-index: i`` with
                  ``JOB_COMPLETION_INDEX`` in every container's env

The chart's args, env, mounts, resources and security contexts are used as rendered. What podman
4.3 lacks is supplied as Kubernetes would, never by changing the chart:
  - ``$(VAR)`` in command/args is expanded from the container's env (podman leaves it literal);
  - the ``metadata.namespace`` fieldRef, refused by podman, becomes the namespace's name;
  - Service DNS names resolve through hostAliases to the pods' addresses (there is no cluster DNS);
  - Secrets are created in podman's own form (a JSON map of base64 values);
  - podman ignores grpc probes: the same standard health check is made here, from the container;
  - podman 4.3 publishes every containerPort on the host (Kubernetes does not): ports are left
    out of the Pods (pods reach each other by address, as in a cluster);
  - podman 4.3 limits annotation values to 63 characters (Kubernetes limits only keys): longer
    values, such as the labeler's checksum/config, are left out (they only trigger rollouts).

Steps, each printed as ``ok|FAIL <step> (<seconds>s) <detail>``:
  aggregator StatefulSet shards SERVING; the batch Job's shards finish (graph files on the claim,
  streamed into the shards: every prompt exactly once, each shard counting what it owns); the shard
  exports merged and built into an atlas on the atlas claim; the atlas Deployment SERVING and its
  Stats equal to the export; the gateway Deployment ready (its /readyz) and answering HTTP/JSON
  like the atlas answers gRPC; the labeler Deployment SERVING; the attribution Deployment SERVING
  and tracing; every server stopped with SIGTERM exits 0.

Run with the workspace Python (PyYAML): ``.venv/bin/python deploy/podman/kube_play.py [--tag dev]``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHART = REPO / "deploy" / "helm" / "circuits"
VALUES = CHART / "ci" / "cpu-podman.yaml"
RELEASE = "demo"
NAMESPACE = "circuits"
UID = 10001
PROMPTS = [
    "The capital of France is",
    "The opposite of hot is",
    "Two plus two equals",
    "The color of the sky is",
    "The first month of the year is",
    "A baby cat is called a",
]
READY_PY = """
import urllib.request
try:
    print(urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=3).status)
except Exception as exc:
    print(getattr(exc, "code", exc))
"""
HEALTH_PY = """
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
try:
    with grpc.insecure_channel("127.0.0.1:" + sys.argv[1]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
except grpc.RpcError as exc:
    print(exc.code().name)
"""


class StepFailed(Exception):
    pass


# -- podman --------------------------------------------------------------------------------------
def podman(*args: str, check: bool = True, timeout: float = 600, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise StepFailed(f"podman {' '.join(args[:3])} ... failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-600:]}")
    return result


def container_state(name: str) -> tuple[str, int]:
    out = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name, check=False)
    if out.returncode != 0:
        return "missing", -1
    status, code = out.stdout.split()
    return status, int(code)


def logs(name: str, lines: int = 25) -> str:
    out = podman("logs", name, check=False)
    return "\n".join((out.stdout + out.stderr).splitlines()[-lines:])


def wait_serving(container: str, port: int, timeout: float) -> float:
    started = time.monotonic()
    status = ""
    while time.monotonic() - started < timeout:
        state, code = container_state(container)
        if state not in ("running", "created", "configured"):
            raise StepFailed(f"{container} is {state} (exit {code}):\n{logs(container)}")
        if state == "running":
            out = podman("exec", container, "python", "-c", HEALTH_PY, str(port), check=False)
            status = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
            if status == "SERVING":
                return time.monotonic() - started
        time.sleep(1)
    raise StepFailed(f"{container} not SERVING after {timeout:.0f}s (last: {status or 'no answer'}):\n{logs(container)}")


def wait_exited(container: str, timeout: float) -> int:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        state, code = container_state(container)
        if state in ("exited", "stopped"):
            return code
        time.sleep(2)
    raise StepFailed(f"{container} still running after {timeout:.0f}s:\n{logs(container)}")


def stop_expect_zero(container: str) -> None:
    podman("stop", "--time", "60", container)
    state, code = container_state(container)
    if code != 0:
        raise StepFailed(f"{container} exited {code} after SIGTERM:\n{logs(container)}")


def ip_of_pod(pod: str, network: str) -> str:
    infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}", pod).stdout.strip()
    out = podman("inspect", "--format", "{{json .NetworkSettings.Networks}}", infra).stdout
    return json.loads(out)[network]["IPAddress"]


# -- Kubernetes semantics podman does not have ------------------------------------------------------
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args: known names replaced, $$ -> $, others kept."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(one, text)


def field_value(pod_meta: dict[str, Any], path: str) -> str | None:
    if path == "metadata.name":
        return pod_meta["name"]
    if path == "metadata.namespace":
        return NAMESPACE
    found = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if found:
        return (pod_meta.get(found.group(1)) or {}).get(found.group(2))
    return None


def kubernetes_env(container: dict[str, Any], pod_meta: dict[str, Any]) -> None:
    """Resolve what podman cannot (namespace fieldRef) and expand $(VAR) in command/args."""
    values: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            values[entry["name"]] = expand(str(entry["value"]), values)
        elif "fieldRef" in entry.get("valueFrom", {}):
            path = entry["valueFrom"]["fieldRef"]["fieldPath"]
            resolved = field_value(pod_meta, path)
            if resolved is None:
                raise StepFailed(f"unsupported fieldRef {path}")
            values[entry["name"]] = resolved
            if path == "metadata.namespace":  # podman 4.3 refuses this fieldRef
                entry.pop("valueFrom")
                entry["value"] = resolved
    for key in ("command", "args"):
        if key in container:
            container[key] = [expand(str(a), values) for a in container[key]]


def pods_of(workload: dict[str, Any]) -> list[dict[str, Any]]:
    """The Pods Kubernetes' controller would create for a Deployment, StatefulSet or Indexed Job."""
    kind, name = workload["kind"], workload["metadata"]["name"]
    template = workload["spec"]["template"]
    if kind == "Deployment":
        count = 1  # one replica is enough to run the template
    elif kind == "StatefulSet":
        count = int(workload["spec"]["replicas"])
    elif kind == "Job":
        count = int(workload["spec"]["completions"])
    else:
        raise StepFailed(f"not a workload: {kind}")
    pods = []
    for index in range(count):
        meta = copy.deepcopy(template.get("metadata", {}))
        meta["name"] = f"{name}-{index}"
        meta.setdefault("labels", {})
        meta.setdefault("annotations", {})
        spec = copy.deepcopy(template["spec"])
        if kind == "StatefulSet":
            meta["labels"]["apps.kubernetes.io/pod-index"] = str(index)
            meta["labels"]["statefulset.kubernetes.io/pod-name"] = meta["name"]
            spec["hostname"] = meta["name"]
            spec["subdomain"] = workload["spec"]["serviceName"]
            for claim in workload["spec"].get("volumeClaimTemplates", []):
                spec.setdefault("volumes", []).append(
                    {"name": claim["metadata"]["name"],
                     "persistentVolumeClaim": {"claimName": f"{claim['metadata']['name']}-{name}-{index}"}}
                )
        if kind == "Job":
            meta["annotations"]["batch.kubernetes.io/job-completion-index"] = str(index)
            meta["labels"]["batch.kubernetes.io/job-completion-index"] = str(index)
            for container in spec.get("initContainers", []) + spec["containers"]:
                container["env"] = [
                    {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                    *container.get("env", []),
                ]
        for container in spec.get("initContainers", []) + spec["containers"]:
            kubernetes_env(container, meta)
            container.pop("ports", None)  # podman 4.3 would publish them on the host
        meta["annotations"] = {k: v for k, v in meta["annotations"].items() if len(str(v)) <= 63}
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
    return pods


def add_host_aliases(pod: dict[str, Any], aliases: dict[str, str]) -> None:
    by_ip: dict[str, list[str]] = {}
    for host, ip in aliases.items():
        by_ip.setdefault(ip, []).append(host)
    pod["spec"]["hostAliases"] = [{"ip": ip, "hostnames": sorted(hosts)} for ip, hosts in sorted(by_ip.items())]


# -- the run ----------------------------------------------------------------------------------------
#: The claims and Secret the value set names (made by `prepare`, as they would exist in a cluster).
CLAIMS = ("circuits-model-cache", "circuits-graphs", "circuits-atlas")
SECRETS = ("circuits-anthropic",)


def remove_pods_and_volumes(pods: list[str], volumes: list[str]) -> None:
    volumes = list(volumes)
    for pod in pods:
        # The pods' own volumes too: claims of the StatefulSet, emptyDirs, ConfigMap volumes.
        names = podman("pod", "inspect", "--format", "{{range .Containers}}{{.Name}} {{end}}", pod, check=False)
        for container in names.stdout.split():
            mounts = podman("inspect", "--format",
                            "{{range .Mounts}}{{if eq .Type \"volume\"}}{{.Name}} {{end}}{{end}}", container, check=False)
            volumes += [v for v in mounts.stdout.split() if v not in volumes]
        podman("pod", "rm", "-f", "-t", "0", pod, check=False)
    for volume in volumes:
        podman("volume", "rm", "-f", volume, check=False)


class KubeRun:
    def __init__(self, *, tag: str, helm: str, keep: bool) -> None:
        self.tag = tag
        self.helm = helm
        self.keep = keep
        self.run_id = f"kube{os.getpid()}"
        self.network = f"circuits-{self.run_id}"
        self.work = Path(tempfile.mkdtemp(prefix="circuits-kube.", dir=os.environ.get("TMPDIR", "/var/tmp")))
        self.work.chmod(0o755)  # the clients in the images run as uid 10001 and read files here
        self.rendered: list[dict[str, Any]] = []
        self.pods: list[str] = []
        self.volumes: list[str] = []
        self.secrets: list[str] = []
        self.failed = False
        self.aliases: dict[str, str] = {}
        #: per-pod DNS names of the aggregator shards, in shard order
        self.shard_hosts: list[str] = []

    # helpers
    def name(self, component: str) -> str:
        return f"{RELEASE}-circuits-{component}"

    def workload(self, kind: str, component: str) -> dict[str, Any]:
        for obj in self.rendered:
            if obj["kind"] == kind and obj["metadata"]["name"] == self.name(component):
                return obj
        raise StepFailed(f"no {kind} {self.name(component)} in the rendered chart")

    def play(self, pod: dict[str, Any], *extra_docs: dict[str, Any]) -> str:
        path = self.work / f"{pod['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump_all([*extra_docs, pod], sort_keys=False))
        self.pods.append(pod["metadata"]["name"])  # before playing: a half-started pod is removed too
        for volume in pod["spec"].get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in self.volumes:
                self.volumes.append(claim)  # claims podman creates on first use (StatefulSet state)
        podman("kube", "play", "--network", self.network, str(path))
        return pod["metadata"]["name"]

    def volume(self, name: str, *, source: Path | None = None) -> str:
        podman("volume", "create", name)
        self.volumes.append(name)
        mountpoint = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())
        if source is not None:
            shutil.copytree(source, mountpoint, dirs_exist_ok=True, symlinks=True)
        # What fsGroup 10001 does for a Kubernetes volume (podman does not apply fsGroup).
        for root, dirs, files in os.walk(mountpoint):
            for entry in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                os.chown(entry, UID, UID)
        return str(mountpoint)

    def client(self, image: str, *args: str, mounts: tuple[str, ...] = (), timeout: float = 300) -> str:
        """The smoke client (deploy/podman/smoke_client.py) in IMAGE on the network, with the aliases."""
        hosts = [f"--add-host={h}:{ip}" for h, ip in self.aliases.items()]
        volumes = [f"-v{HERE}:/smoke:ro", *(f"-v{m}" for m in mounts)]
        out = podman("run", "--rm", "--network", self.network, *hosts, *volumes, "--entrypoint", "python",
                     f"localhost/circuits-{image}:{self.tag}", "/smoke/smoke_client.py", *args, timeout=timeout)
        print(out.stdout.rstrip())
        return out.stdout

    def cli(self, image: str, *args: str, mounts: tuple[str, ...] = (), network: str | None = None) -> str:
        volumes = [f"-v{m}" for m in mounts]
        out = podman("run", "--rm", "--network", network or self.network, *volumes,
                     f"localhost/circuits-{image}:{self.tag}", *args, timeout=600)
        print(out.stdout.rstrip())
        return out.stdout

    def step(self, name: str, action) -> bool:
        started = time.monotonic()
        try:
            text = action() or ""
        except (StepFailed, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as exc:
            self.failed = True
            print(f"FAIL {name} ({time.monotonic() - started:.0f}s): {exc}", flush=True)
            return False
        print(f"ok   {name} ({time.monotonic() - started:.0f}s) {text}", flush=True)
        return True

    def cleanup(self) -> None:
        if self.keep:
            print(f"kept {self.work}, pods {self.pods}, volumes {self.volumes}", file=sys.stderr)
            return
        remove_pods_and_volumes(self.pods, self.volumes)
        for secret in self.secrets:
            podman("secret", "rm", secret, check=False)
        podman("network", "rm", "-f", self.network, check=False)
        shutil.rmtree(self.work, ignore_errors=True)

    def remove_leftovers(self) -> str:
        """What an interrupted earlier run left (its pods, the claims and the Secret it made): gone
        before this run creates them again. Only this release's pods and the names this driver uses."""
        pods = [n for n in podman("pod", "ls", "--format", "{{.Name}}", check=False).stdout.split()
                if n.startswith(self.name(""))]
        existing = set(podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split())
        volumes = [v for v in (*CLAIMS, "circuits-prompts") if v in existing]
        volumes += sorted(v for v in existing if v.startswith(f"state-{self.name('aggregator')}-"))
        secrets = [n for n in podman("secret", "ls", "--format", "{{.Name}}", check=False).stdout.split() if n in SECRETS]
        networks = [n for n in podman("network", "ls", "--format", "{{.Name}}", check=False).stdout.split()
                    if re.fullmatch(r"circuits-kube\d+", n) and not Path(f"/proc/{n.removeprefix('circuits-kube')}").exists()]
        remove_pods_and_volumes(pods, volumes)
        for secret in secrets:
            podman("secret", "rm", secret, check=False)
        for network in networks:
            podman("network", "rm", "-f", network, check=False)
        left = [*pods, *volumes, *secrets, *networks]
        return f"removed what an earlier run left: {', '.join(left)}" if left else ""

    # steps
    def render(self) -> str:
        args = [self.helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(VALUES)]
        if self.tag != "dev":
            for component in ("attribution", "aggregator", "labeler", "atlas", "gateway"):
                args += ["--set", f"{component}.image.tag={self.tag}"]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise StepFailed(result.stderr.strip())
        self.rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in self.rendered if o["kind"] in ("Deployment", "StatefulSet", "Job"))
        leftovers = self.remove_leftovers()
        podman("network", "create", self.network)
        return f"{len(self.rendered)} objects; workloads: {', '.join(kinds)}" + (f"; {leftovers}" if leftovers else "")

    def prepare(self) -> str:
        # Claims the value set names (existing claims in a cluster), and the labeler's key Secret.
        host_model = Path(os.environ.get("CIRCUITS_HOME", Path.home() / ".cache" / "circuits")) / "models"
        prepared = (host_model / "HuggingFaceTB--SmolLM2-135M-Instruct" / ".circuits-prepared").is_file()
        cache = Path(self.volume("circuits-model-cache"))
        if prepared:
            shutil.copytree(host_model, cache / "circuits" / "models", dirs_exist_ok=True)
            for root, dirs, files in os.walk(cache):
                for entry in [root, *(os.path.join(root, x) for x in dirs + files)]:
                    os.chown(entry, UID, UID)
                    os.chmod(entry, 0o755 if os.path.isdir(entry) else 0o644)
            how = "host-prepared SmolLM2 copied"
        else:
            podman("run", "--rm", "--network", "none", "-v", "circuits-model-cache:/cache", "--entrypoint", "python",
                   f"localhost/circuits-attribution:{self.tag}", "-m", "circuits_attribution.prepare_model", timeout=900)
            how = "SmolLM2 prepared from the image's bundled GGUF"
        self.volume("circuits-graphs")
        self.volume("circuits-atlas")
        key = {"api-key": base64.b64encode(b"kube-play-test-key").decode()}
        podman("secret", "create", "circuits-anthropic", "-", input=json.dumps(key))
        self.secrets.append("circuits-anthropic")
        return f"volumes circuits-model-cache ({how}), circuits-graphs, circuits-atlas; secret circuits-anthropic"

    def aggregator(self) -> str:
        sts = self.workload("StatefulSet", "aggregator")
        pods = pods_of(sts)
        waited = []
        for pod in pods:
            self.play(pod)
        port = int(sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"])
        for pod in pods:
            waited.append(wait_serving(f"{pod['metadata']['name']}-aggregator", port, 180))
            ip = ip_of_pod(pod["metadata"]["name"], self.network)
            # The headless Service's per-pod DNS name, as the chart's default aggregator address uses it.
            host = f"{pod['metadata']['name']}.{sts['spec']['serviceName']}.{NAMESPACE}.svc"
            self.aliases[host] = ip
            self.shard_hosts.append(host)
        return f"{len(pods)} shards SERVING ({', '.join(f'{w:.0f}s' for w in waited)}), pod-index -> --shard-index"

    def batch_job(self) -> str:
        job = self.workload("Job", "attribution-batch")
        config_map = {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "circuits-prompts"},
            "data": {"prompts.jsonl": "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)},
        }
        (self.work / "prompts.jsonl").write_text(config_map["data"]["prompts.jsonl"])
        names = []
        for pod in pods_of(job):
            add_host_aliases(pod, self.aliases)
            names.append(self.play(pod, config_map))
        codes = [wait_exited(f"{n}-worker", 900) for n in names]
        for name, code in zip(names, codes):
            if code != 0:
                raise StepFailed(f"{name} exited {code}:\n{logs(name + '-worker')}")
        summaries = [next((line for line in logs(f"{n}-worker", 200).splitlines() if line.startswith("shard ")), "?")
                     for n in names]
        graphs = podman("volume", "inspect", "--format", "{{.Mountpoint}}", "circuits-graphs").stdout.strip()
        targets = ",".join(f"{h}:50051" for h in self.shard_hosts)
        self.client("aggregator", "check-shards", "/work/prompts.jsonl", "/graphs", targets,
                    mounts=(f"{self.work}:/work:ro", f"{graphs}:/graphs:ro"))
        return f"{len(names)} shards exit 0 ({'; '.join(summaries)}); every prompt once, shards counted what they own"

    def build_atlas(self) -> str:
        exports = []
        for index, host in enumerate(self.shard_hosts):
            pod = host.split(".")[0]  # <statefulset>-<index>; its claim is state-<statefulset>-<index>
            self.client("aggregator", "export", f"{host}:50051", f"/data/export-{index}")
            state = podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"state-{pod}").stdout.strip()
            exports.append(f"{state}/export-{index}")
        merged = self.work / "merged"
        merged.mkdir()
        os.chown(merged, UID, UID)
        mounts = [f"{e}:/export-{i}:ro" for i, e in enumerate(exports)] + [f"{merged}:/merged"]
        self.cli("aggregator", "aggregate", "--merge", *(f"/export-{i}" for i in range(len(exports))),
                 "--export", "/merged", mounts=tuple(mounts), network="none")
        atlas_volume = podman("volume", "inspect", "--format", "{{.Mountpoint}}", "circuits-atlas").stdout.strip()
        out = self.cli("atlas", "build-db", "--export", "/merged", "--output", "/data/atlas.duckdb", "--no-labels",
                       "--min-edge-count", "1", "--num-trials", "2",
                       mounts=(f"{merged}:/merged:ro", f"{atlas_volume}:/data"), network="none")
        return f"{len(exports)} shard exports merged; {out.strip().splitlines()[-1][:150]}"

    def atlas(self) -> str:
        deployment = self.workload("Deployment", "atlas")
        (pod,) = pods_of(deployment)
        name = self.play(pod)
        waited = wait_serving(f"{name}-atlas", 50051, 180)
        ip = ip_of_pod(name, self.network)
        self.aliases[f"{self.name('atlas')}.{NAMESPACE}.svc"] = ip
        # The headless twin Service the gateway routes to resolves to the same pod.
        self.aliases[f"{self.name('atlas')}-headless.{NAMESPACE}.svc"] = ip
        self.client("atlas", "check-atlas", f"{self.name('atlas')}.{NAMESPACE}.svc:50051", "/merged",
                    mounts=(f"{self.work / 'merged'}:/merged:ro",))
        return f"SERVING after {waited:.0f}s with the atlas claim read-only; Stats = merged export"

    def gateway(self) -> str:
        deployment = self.workload("Deployment", "gateway")
        config_map = next(o for o in self.rendered if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{self.name('gateway')}-descriptors")
        (pod,) = pods_of(deployment)
        add_host_aliases(pod, self.aliases)
        name = self.play(pod, config_map)
        started = time.monotonic()
        status = ""
        while time.monotonic() - started < 120:
            state, code = container_state(f"{name}-gateway")
            if state not in ("running", "created", "configured"):
                raise StepFailed(f"{name}-gateway is {state} (exit {code}):\n{logs(name + '-gateway')}")
            out = podman("exec", f"{name}-gateway", "python", "-c", READY_PY, check=False)
            status = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
            if status == "200":
                break
            time.sleep(1)
        if status != "200":
            raise StepFailed(f"gateway /readyz: {status or 'no answer'}:\n{logs(name + '-gateway')}")
        waited = time.monotonic() - started
        self.aliases[f"{self.name('gateway')}.{NAMESPACE}.svc"] = ip_of_pod(name, self.network)
        self.client("atlas", "http-unit", f"http://{self.name('gateway')}.{NAMESPACE}.svc:8080",
                    f"{self.name('atlas')}.{NAMESPACE}.svc:50051", "/merged", mounts=(f"{self.work / 'merged'}:/merged:ro",))
        stop_expect_zero(f"{name}-gateway")
        return f"/readyz 200 after {waited:.0f}s (atlas healthy through the headless Service); HTTP GetUnit = gRPC; SIGTERM -> exit 0"

    def stop_atlas(self) -> str:
        stop_expect_zero(f"{self.name('atlas')}-0-atlas")
        return "SIGTERM -> exit 0"

    def labeler(self) -> str:
        deployment = self.workload("Deployment", "labeler")
        config_map = next(o for o in self.rendered if o["kind"] == "ConfigMap" and o["metadata"]["name"] == self.name("labeler"))
        (pod,) = pods_of(deployment)
        name = self.play(pod, config_map)
        waited = wait_serving(f"{name}-labeler", 50051, 180)
        stop_expect_zero(f"{name}-labeler")
        return f"SERVING after {waited:.0f}s with the chart's ConfigMap config and key Secret; SIGTERM -> exit 0"

    def attribution(self) -> str:
        deployment = self.workload("Deployment", "attribution")
        (pod,) = pods_of(deployment)
        name = self.play(pod)
        waited = wait_serving(f"{name}-attribution", 50051, 600)
        ip = ip_of_pod(name, self.network)
        self.aliases[f"{self.name('attribution')}.{NAMESPACE}.svc"] = ip
        out_dir = self.work / "traced"
        out_dir.mkdir()
        os.chown(out_dir, UID, UID)
        hosts = [f"--add-host={h}:{a}" for h, a in self.aliases.items()]
        result = podman("run", "--rm", "--network", self.network, *hosts, f"-v{out_dir}:/out",
                        f"localhost/circuits-aggregator:{self.tag}", "graph", PROMPTS[0],
                        "--remote", f"{self.name('attribution')}.{NAMESPACE}.svc:50051", "--tau", "0.02",
                        "--output-dir", "/out")
        print(result.stdout)
        if not any(out_dir.iterdir()):
            raise StepFailed("no graph file written")
        stop_expect_zero(f"{name}-attribution")
        return f"SERVING after {waited:.0f}s from the model-cache claim; traced a prompt; SIGTERM -> exit 0"

    def stop_aggregators(self) -> str:
        for pod in [p for p in self.pods if p.startswith(self.name("aggregator"))]:
            stop_expect_zero(f"{pod}-aggregator")
        return "every shard: SIGTERM -> exit 0"

    def run(self) -> int:
        try:
            if self.step("kube/render", self.render) and self.step("kube/prepare", self.prepare):
                if self.step("kube/aggregator-statefulset", self.aggregator):
                    if self.step("kube/batch-job", self.batch_job):
                        if self.step("kube/build-atlas", self.build_atlas) and self.step("kube/atlas-deployment", self.atlas):
                            self.step("kube/gateway-deployment", self.gateway)
                            self.step("kube/atlas-sigterm", self.stop_atlas)
                    self.step("kube/aggregator-sigterm", self.stop_aggregators)
                self.step("kube/labeler-deployment", self.labeler)
                self.step("kube/attribution-deployment", self.attribution)
        finally:
            self.cleanup()
        print("kube: all workloads ran" if not self.failed else "kube: FAILED", flush=True)
        return 1 if self.failed else 0


def find_helm() -> str | None:
    local = REPO / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="dev", help="image tag (default: dev)")
    parser.add_argument("--keep", action="store_true", help="keep pods, volumes and files for inspection")
    args = parser.parse_args(argv)
    helm = find_helm()
    if helm is None:
        print("FAIL kube/render: helm not found (bash scripts/install_tools.sh installs it)")
        return 1
    return KubeRun(tag=args.tag, helm=helm, keep=args.keep).run()


if __name__ == "__main__":
    sys.exit(main())
