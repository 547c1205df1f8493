"""How deploy/podman/kube_play.py turns the chart's workloads into the Pods Kubernetes would create.

No podman needed: the conversions are checked on the rendered chart (helm) and on small
manifests. The pods themselves run in tests/deploy/test_images.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "circuits"


@pytest.fixture(scope="module")
def kube_play():
    spec = importlib.util.spec_from_file_location("kube_play", REPO / "deploy" / "podman" / "kube_play.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dollar_parenthesis_expansion_follows_kubernetes(kube_play) -> None:
    env = {"A": "1", "B": "two"}
    assert kube_play.expand("$(A)", env) == "1"
    assert kube_play.expand("x-$(B)-$(A)", env) == "x-two-1"
    assert kube_play.expand("$(MISSING)", env) == "$(MISSING)"  # unknown names stay as written
    assert kube_play.expand("$$(A)", env) == "$(A)"  # $$ escapes
    assert kube_play.expand("$A", env) == "$A"  # only the $(NAME) form


def test_statefulset_pods_get_ordinal_label_claims_and_the_shard_index(kube_play, render_chart) -> None:
    chart = render_chart(CHART / "ci" / "cpu-podman.yaml")
    sts = chart.get("StatefulSet", "demo-circuits-aggregator")
    pods = kube_play.pods_of(sts)
    assert [p["metadata"]["name"] for p in pods] == ["demo-circuits-aggregator-0", "demo-circuits-aggregator-1"]
    for index, pod in enumerate(pods):
        assert pod["metadata"]["labels"]["apps.kubernetes.io/pod-index"] == str(index)
        assert pod["spec"]["subdomain"] == "demo-circuits-aggregator-headless"
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"state": f"state-demo-circuits-aggregator-{index}"}
        container = pod["spec"]["containers"][0]
        args = container["args"]
        assert args[args.index("--shard-index") + 1] == str(index)  # $(SHARD_INDEX) from the label
        assert args[args.index("--shard-count") + 1] == "2"
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_NAMESPACE"] == {"name": "POD_NAMESPACE", "value": "circuits"}
        # The label fieldRef stays: podman resolves it like Kubernetes.
        assert env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
        # Everything else is the chart's: image, security context, mounts.
        template = sts["spec"]["template"]["spec"]["containers"][0]
        assert container["securityContext"] == template["securityContext"]
        assert container["volumeMounts"] == template["volumeMounts"]
        assert container["image"] == "localhost/circuits-aggregator:dev"
        assert "ports" not in container  # podman 4.3 would publish them on the host


def test_indexed_job_pods_get_their_completion_index(kube_play, render_chart) -> None:
    chart = render_chart(CHART / "ci" / "cpu-podman.yaml")
    job = chart.get("Job", "demo-circuits-attribution-batch")
    pods = kube_play.pods_of(job)
    assert len(pods) == job["spec"]["completions"] == 2
    for index, pod in enumerate(pods):
        assert pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index)
        container = pod["spec"]["containers"][0]
        assert container["command"] == ["circuits-attribution", "worker"]
        args = container["args"]
        assert args[args.index("--shard-index") + 1] == str(index)
        assert args[args.index("--model") + 1] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        aggregator = args[args.index("--aggregator") + 1]
        assert aggregator == (
            "demo-circuits-aggregator-0.demo-circuits-aggregator-headless.circuits.svc:50051,"
            "demo-circuits-aggregator-1.demo-circuits-aggregator-headless.circuits.svc:50051"
        )
        assert not any("$(" in a for a in args)
        assert pod["spec"]["restartPolicy"] == "Never"


def test_deployment_becomes_one_pod_and_unknown_kinds_are_refused(kube_play, render_chart) -> None:
    chart = render_chart(CHART / "ci" / "cpu-podman.yaml")
    for name in ("attribution", "labeler", "atlas"):
        (pod,) = kube_play.pods_of(chart.get("Deployment", f"demo-circuits-{name}"))
        assert pod["metadata"]["name"] == f"demo-circuits-{name}-0"
        assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    labeler = kube_play.pods_of(chart.get("Deployment", "demo-circuits-labeler"))[0]
    template = chart.get("Deployment", "demo-circuits-labeler")["spec"]["template"]["metadata"]
    assert len(template["annotations"]["checksum/config"]) == 64  # podman 4.3 refuses values > 63
    assert "checksum/config" not in labeler["metadata"]["annotations"]
    with pytest.raises(kube_play.StepFailed, match="not a workload"):
        kube_play.pods_of({"kind": "Service", "metadata": {"name": "x"}, "spec": {"template": {}}})


def test_host_aliases_group_names_by_address(kube_play) -> None:
    pod = {"spec": {}}
    kube_play.add_host_aliases(pod, {"a.svc": "10.0.0.2", "b.svc": "10.0.0.3", "c.svc": "10.0.0.2"})
    assert pod["spec"]["hostAliases"] == [
        {"ip": "10.0.0.2", "hostnames": ["a.svc", "c.svc"]},
        {"ip": "10.0.0.3", "hostnames": ["b.svc"]},
    ]
