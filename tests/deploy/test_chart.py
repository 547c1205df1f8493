"""Acceptance tests of the umbrella chart deploy/helm/circuits.

For the default values and every ci/*.yaml value set: `helm lint --strict`, `helm template`,
`kubernetes-validate --strict` on every rendered manifest, and assertions on the rendered
objects (gRPC probes, GPU requests, secrets referenced not inlined, hardened security contexts,
Services that select real pods, container args the service CLIs accept, ...).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "circuits"
KUBERNETES_VERSION = "1.33.0"
CIRCUITS_SERVICES = ("attribution", "aggregator", "labeler", "atlas")
SECRET_LIKE = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*(spec.get("initContainers", []) if init else []), *spec["containers"]]


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


# --------------------------------------------------------------------------- lint / render / validate


def test_there_are_at_least_three_ci_value_sets() -> None:
    names = {p.stem for p in (CHART / "ci").glob("*.yaml")}
    assert {"gpu-attribution-only", "full-pipeline-vllm", "atlas-only"} <= names


@pytest.mark.parametrize("values_file", [None, *sorted((CHART / "ci").glob("*.yaml"))], ids=lambda p: p.stem if p else "default")
def test_helm_lint_strict(helm: str, values_file: Path | None) -> None:
    args = [helm, "lint", "--strict", str(CHART)]
    if values_file:
        args += ["-f", str(values_file)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ERROR]" not in result.stdout and "[WARNING]" not in result.stdout, result.stdout


def test_every_manifest_passes_kubernetes_validate_strict(rendered, tmp_path: Path) -> None:
    name, chart = rendered
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(chart.text)
    cli = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(cli), "--strict", "--quiet", "--kubernetes-version", KUBERNETES_VERSION, str(manifest)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ERROR" not in output, output
    # The only kind without a built-in schema is the prometheus-operator CRD, checked below.
    for line in output.splitlines():
        assert "ServiceMonitor" in line, line


def test_kubernetes_validate_catches_a_wrong_field(rendered, tmp_path: Path) -> None:
    """The validation above can fail: an unknown probe field is rejected."""
    name, chart = rendered
    broken = chart.text.replace("failureThreshold:", "failureThresh:", 1)
    assert broken != chart.text
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(broken)
    cli = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(cli), "--strict", "--quiet", "--kubernetes-version", KUBERNETES_VERSION, str(manifest)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "failureThresh" in result.stdout + result.stderr


def test_service_monitors_are_well_formed(rendered) -> None:
    _, chart = rendered
    services = chart.of_kind("Service")
    for monitor in chart.of_kind("ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        port = monitor["spec"]["endpoints"][0]["port"]
        matched = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
        assert matched, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        assert all(port in {p["name"] for p in s["spec"]["ports"]} for s in matched)


# --------------------------------------------------------------------------- rendered objects


def test_circuits_servers_use_native_grpc_probes_on_their_grpc_port(rendered) -> None:
    _, chart = rendered
    servers = [w for w in chart.workloads() if component(w) in CIRCUITS_SERVICES]
    assert servers, "value set renders no circuits server"
    for workload in servers:
        (container,) = pod_spec(workload)["containers"]
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": grpc_port, "service": ""}, (workload["metadata"]["name"], probe)


def test_attribution_startup_probe_allows_slow_model_loading(rendered) -> None:
    _, chart = rendered
    for workload in chart.of_kind("Deployment"):
        if component(workload) == "attribution":
            probe = pod_spec(workload)["containers"][0]["startupProbe"]
            budget = probe["initialDelaySeconds"] + probe["periodSeconds"] * probe["failureThreshold"]
            assert budget >= 15 * 60, f"startup budget {budget}s is too short for loading a large model"


def test_gpu_workloads_request_and_limit_their_gpus(rendered, values_for) -> None:
    name, chart = rendered
    values = values_for(name)
    expected = {"attribution": values["attribution"]["gpu"]["count"], "vllm": values["vllm"]["gpu"]["count"]}
    expected["attribution-batch"] = expected["attribution"]
    seen = set()
    for workload in chart.workloads():
        comp = component(workload)
        if comp not in expected:
            assert not any("nvidia.com/gpu" in str(c.get("resources")) for c in containers(workload)), comp
            continue
        seen.add(comp)
        resources = pod_spec(workload)["containers"][0]["resources"]
        if expected[comp] == 0:  # gpu.count 0: a CPU-only workload requests no GPU at all
            assert "nvidia.com/gpu" not in str(resources), comp
            continue
        assert resources["requests"]["nvidia.com/gpu"] == expected[comp] >= 1
        assert resources["limits"]["nvidia.com/gpu"] == expected[comp]
    if values["attribution"]["enabled"]:
        assert "attribution" in seen


def test_secrets_are_referenced_never_inlined(rendered) -> None:
    _, chart = rendered
    assert not chart.of_kind("Secret"), "the chart must not create Secrets (keys come from existing ones)"
    for workload in chart.workloads():
        for container in containers(workload):
            for env in container.get("env", []):
                if not any(word in env["name"] for word in SECRET_LIKE):
                    continue
                if env["name"] == "OPENAI_API_KEY" and env.get("value") == "not-used":
                    continue  # the in-cluster vLLM runs without a key
                assert "value" not in env, f"{env['name']} inlined in {workload['metadata']['name']}"
                assert set(env["valueFrom"]) == {"secretKeyRef"}, env


def test_named_secrets_reach_the_right_containers(render_chart) -> None:
    chart = render_chart(CHART / "ci" / "gpu-attribution-only.yaml")
    deployment = chart.get("Deployment", "demo-circuits-attribution")
    env = {e["name"]: e for e in pod_spec(deployment)["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    default = render_chart()
    labeler = default.get("Deployment", "demo-circuits-labeler")
    env = {e["name"]: e for e in pod_spec(labeler)["containers"][0]["env"]}
    assert env["ANTHROPIC_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "circuits-anthropic", "key": "api-key"}


def test_every_container_runs_non_root_on_a_read_only_root_filesystem(rendered) -> None:
    _, chart = rendered
    for workload in chart.workloads():
        pod_security = pod_spec(workload)["securityContext"]
        assert pod_security["runAsNonRoot"] is True
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts_everywhere = True
        for container in containers(workload):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, container["name"]
            assert security["allowPrivilegeEscalation"] is False, container["name"]
            assert security["runAsNonRoot"] is True, container["name"]
            assert security["capabilities"]["drop"] == ["ALL"], container["name"]
            mounts_everywhere &= any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", []))
        assert mounts_everywhere, f"{workload['metadata']['name']}: every container needs a writable /tmp"
        assert pod_spec(workload)["automountServiceAccountToken"] is False


def test_services_select_pods_and_target_named_ports(rendered) -> None:
    _, chart = rendered
    for service in chart.of_kind("Service"):
        selector = service["spec"]["selector"]
        targets = [w for w in chart.workloads() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"Service {service['metadata']['name']} selects no pod"
        for workload in targets:
            assert workload["kind"] != "Job", "batch pods must not be Service endpoints"
            port_names = {p["name"] for c in pod_spec(workload)["containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in port_names, (service["metadata"]["name"], port)


def test_pod_disruption_budgets_exactly_where_replicas_exceed_one(rendered) -> None:
    _, chart = rendered
    budgets = {component(p): p for p in chart.of_kind("PodDisruptionBudget")}
    for workload in chart.workloads():
        if workload["kind"] == "Job":
            continue
        comp = component(workload)
        if workload["spec"]["replicas"] > 1:
            assert comp in budgets, f"{comp} runs {workload['spec']['replicas']} pods without a PDB"
            selector = budgets[comp]["spec"]["selector"]["matchLabels"]
            assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        else:
            assert comp not in budgets, f"{comp} has one pod: a PDB would block node drains"


def test_every_pod_is_isolated_by_a_network_policy(rendered) -> None:
    _, chart = rendered
    policies = chart.of_kind("NetworkPolicy")
    for workload in chart.workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, workload["metadata"]["name"]
        assert set(covering[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_vllm_is_reachable_only_from_the_labeler(render_chart) -> None:
    chart = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml")
    policy = chart.get("NetworkPolicy", "demo-circuits-vllm")
    from_labeler, from_metrics = policy["spec"]["ingress"]
    assert from_labeler["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "circuits", "app.kubernetes.io/instance": "demo", "app.kubernetes.io/component": "labeler"}}}]  # fmt: skip
    assert from_metrics["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    aggregator = chart.get("NetworkPolicy", "demo-circuits-aggregator")
    assert not any("ipBlock" in str(rule) for rule in aggregator["spec"]["egress"]), "the aggregator never leaves the cluster"


def test_aggregator_statefulset_has_a_claim_per_shard_and_ordinal_shard_index(render_chart) -> None:
    chart = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml")
    stateful = chart.get("StatefulSet", "demo-circuits-aggregator")
    assert stateful["spec"]["replicas"] == 4
    assert stateful["spec"]["serviceName"] == "demo-circuits-aggregator-headless"
    assert chart.get("Service", "demo-circuits-aggregator-headless")["spec"]["clusterIP"] == "None"
    (claim,) = stateful["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    container = pod_spec(stateful)["containers"][0]
    args = container["args"]
    assert args[args.index("--shard-index") + 1] == "$(SHARD_INDEX)"
    assert args[args.index("--shard-count") + 1] == "4"
    env = {e["name"]: e for e in container["env"]}
    assert env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert any(m["name"] == claim["metadata"]["name"] for m in container["volumeMounts"])


def test_batch_job_is_indexed_over_shards_and_feeds_every_aggregator_shard(render_chart) -> None:
    chart = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml")
    job = chart.get("Job", "demo-circuits-attribution-batch")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 8 and job["spec"]["parallelism"] == 8
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    shards = env["CIRCUITS_AGGREGATOR"].split(",")
    assert shards == [f"demo-circuits-aggregator-{i}.demo-circuits-aggregator-headless.circuits.svc:50051" for i in range(4)]
    assert env["CIRCUITS_SHARD_COUNT"] == "8"
    (init,) = spec["initContainers"]
    assert "https://example.org/prompts/prompts.jsonl" in init["args"]
    assert env["CIRCUITS_PROMPTS"] in init["args"], "the worker reads the file the initContainer wrote"


def test_attribution_batching_values_reach_the_service_and_the_workers(render_chart) -> None:
    plain = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml")
    service_args = pod_spec(plain.get("Deployment", "demo-circuits-attribution"))["containers"][0]["args"]
    worker_args = pod_spec(plain.get("Job", "demo-circuits-attribution-batch"))["containers"][0]["args"]
    assert "--max-batch" not in service_args and "--batch-size" not in worker_args  # defaults: no batching
    batched = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml", extra=[
        "--set", "attribution.maxBatch=8", "--set", "attribution.batchWindowMs=25",
        "--set", "attribution.batch.batchSize=4"])  # fmt: skip
    service_args = pod_spec(batched.get("Deployment", "demo-circuits-attribution"))["containers"][0]["args"]
    worker_args = pod_spec(batched.get("Job", "demo-circuits-attribution-batch"))["containers"][0]["args"]
    assert service_args[service_args.index("--max-batch") + 1] == "8"
    assert service_args[service_args.index("--batch-window-ms") + 1] == "25"
    assert worker_args[worker_args.index("--batch-size") + 1] == "4"


def test_atlas_opens_its_file_read_only_and_fetches_it_when_given_a_url(render_chart) -> None:
    fetched = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml").get("Deployment", "demo-circuits-atlas")
    (init,) = pod_spec(fetched)["initContainers"]
    assert init["args"][:4] == ["--url", "https://example.org/atlas/atlas.duckdb", "--dest", "/data/atlas.duckdb"]
    main = pod_spec(fetched)["containers"][0]
    assert main["args"][main["args"].index("--duckdb") + 1] == "/data/atlas.duckdb"
    assert {"name": "atlas-data", "mountPath": "/data", "readOnly": True} in main["volumeMounts"]

    assert "--processes" not in main["args"]  # one process unless asked

    # the neighbour index beside it (build-db writes atlas.duckdb.neighbours), when its URL is given
    indexed = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml",
                           extra=["--set", "atlas.data.indexUrl=https://example.org/atlas/atlas.duckdb.neighbours"])
    atlas_init, index_init = pod_spec(indexed.get("Deployment", "demo-circuits-atlas"))["initContainers"]
    assert atlas_init["args"][:4] == init["args"][:4]
    assert index_init["args"][:4] == ["--url", "https://example.org/atlas/atlas.duckdb.neighbours",
                                      "--dest", "/data/atlas.duckdb.neighbours"]  # fmt: skip

    claimed = render_chart(CHART / "ci" / "atlas-only.yaml").get("Deployment", "demo-circuits-atlas")
    args = pod_spec(claimed)["containers"][0]["args"]
    assert args[args.index("--processes") + 1] == "2"  # atlas.processes (SO_REUSEPORT, read-only)
    assert "initContainers" not in pod_spec(claimed)
    volume = next(v for v in pod_spec(claimed)["volumes"] if v["name"] == "atlas-data")
    assert volume["persistentVolumeClaim"] == {"claimName": "atlas-rox", "readOnly": True}


def test_labeler_uses_the_in_cluster_vllm_when_enabled(render_chart) -> None:
    chart = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml")
    config = yaml.safe_load(chart.get("ConfigMap", "demo-circuits-labeler")["data"]["labeler.yaml"])
    assert config["labeling"]["backend"] == "openai"
    assert config["labeling"]["base_url"] == "http://demo-circuits-vllm:8000/v1"
    assert config["labeling"]["model"] == "qwen3-32b"
    vllm = chart.get("Deployment", "demo-circuits-vllm")
    args = pod_spec(vllm)["containers"][0]["args"]
    assert args[args.index("--served-model-name") + 1] == "qwen3-32b"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"


def test_labeler_investigates_on_the_release_attribution_service(render_chart) -> None:
    chart = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml")
    args = pod_spec(chart.get("Deployment", "demo-circuits-labeler"))["containers"][0]["args"]
    assert args[args.index("--attribution") + 1] == "demo-circuits-attribution:50051"
    assert args[args.index("--reports") + 1].endswith("/investigations")  # in the writable workDir
    policy = chart.get("NetworkPolicy", "demo-circuits-labeler")
    to_attribution = [r for r in policy["spec"]["egress"] if any(
        p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "attribution"
        for p in r.get("to", []))]  # fmt: skip
    assert to_attribution and to_attribution[0]["ports"] == [{"protocol": "TCP", "port": 50051}]
    alone = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml", extra=["--set", "attribution.enabled=false"])
    args = pod_spec(alone.get("Deployment", "demo-circuits-labeler"))["containers"][0]["args"]
    assert "--attribution" not in args


def test_labeler_config_is_accepted_by_the_circuits_config_loader(rendered) -> None:
    from circuits_core.config import config_from_mapping

    _, chart = rendered
    for config_map in chart.of_kind("ConfigMap"):
        if component(config_map) == "labeler":
            config = config_from_mapping(yaml.safe_load(config_map["data"]["labeler.yaml"]), source="labeler.yaml")
            assert config.labeling.api_key_env in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")


def _service_parser(service: str):
    try:
        module = importlib.import_module(f"circuits_{service}.__main__")
    except ModuleNotFoundError:
        pytest.skip(f"circuits_{service}.__main__ is not written yet")
    for name in ("build_parser", "parser"):
        if callable(getattr(module, name, None)):
            return getattr(module, name)()
    pytest.skip(f"circuits_{service}.__main__ exposes no build_parser()/parser()")


@pytest.mark.parametrize("service", CIRCUITS_SERVICES)
def test_container_args_are_accepted_by_the_service_cli(rendered, service: str) -> None:
    """The chart passes only flags the service's own argparse parser knows."""
    _, chart = rendered
    servers = [w for w in chart.workloads() if component(w) == service]
    if not servers:
        pytest.skip(f"{service} is disabled in this value set")
    parser = _service_parser(service)
    for workload in servers:
        args = pod_spec(workload)["containers"][0]["args"]
        assert args[:2] == ["serve", service]
        argv = [a.replace("$(SHARD_INDEX)", "0") for a in args[2:]]
        try:
            parsed = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"circuits serve {service} rejects the chart's args {argv}")
        assert parsed.host == "0.0.0.0", "a pod must listen on all interfaces"


def test_batch_worker_args_are_accepted_by_the_worker_cli(render_chart) -> None:
    try:
        from circuits_attribution.worker import build_parser
    except ModuleNotFoundError:
        pytest.skip("circuits_attribution.worker is not written yet")
    job = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml").get("Job", "demo-circuits-attribution-batch")
    container = pod_spec(job)["containers"][0]
    assert container["command"] == ["circuits-attribution", "worker"]
    env = {e["name"]: e.get("value") for e in container["env"]} | {"JOB_COMPLETION_INDEX": "5"}
    argv = [env.get(a[2:-1], a) if a.startswith("$(") else a for a in container["args"]]
    try:
        parsed = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"the batch worker rejects the chart's args {argv}")
    assert (parsed.shard_index, parsed.shard_count, parsed.device) == (5, 8, "cuda")
    assert str(parsed.prompts) == "/prompts/prompts.jsonl" and parsed.no_files


# --------------------------------------------------------------------------- values schema


def test_schema_is_generated_from_the_script() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_chart_schema.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("atlas.colour=red", "additional properties 'colour' not allowed"),
        ("attribution.image.colour=red", "additional properties 'colour' not allowed"),
        ("unknownTopLevel=1", "additional properties 'unknownTopLevel' not allowed"),
        ("aggregator.replicaCount=two", "got string, want integer"),
        ("attribution.gpu.count=-1", "minimum"),
        ("labeler.llm.backend=gemini", "labeler/llm/backend"),
    ],
)
def test_helm_rejects_bad_values(helm_template, flag: str, message: str) -> None:
    result = helm_template(extra=("--set", flag))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_schema_accepts_every_value_set_and_rejects_unknown_keys_independently(values_for) -> None:
    """The same schema checked by the jsonschema library, not only by helm."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for name in ("default", "gpu-attribution-only", "full-pipeline-vllm", "atlas-only"):
        values = values_for(name)
        # Helm removes keys set to null before validating.
        values = json.loads(json.dumps(values), object_hook=lambda d: {k: v for k, v in d.items() if v is not None})
        errors = list(validator.iter_errors(values))
        assert not errors, (name, [e.message for e in errors])
        for comp in ("attribution", "aggregator", "labeler", "atlas", "vllm", "gateway"):
            assert not validator.is_valid({**values, comp: {**values[comp], "replicas": 2}}), comp


def test_components_share_one_shape() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    common = set(schema["properties"]["aggregator"]["required"])
    assert {"enabled", "image", "replicaCount", "resources", "env", "service", "probes", "nodeSelector",
            "tolerations", "affinity", "podSecurityContext", "securityContext", "extraArgs"} <= common  # fmt: skip
    for comp in ("attribution", "aggregator", "labeler", "atlas", "vllm", "gateway"):
        assert common <= set(values[comp]), f"{comp} lacks {common - set(values[comp])}"
        assert set(schema["properties"][comp]["required"]) == common


def test_missing_required_inputs_fail_with_a_clear_message(helm_template) -> None:
    result = helm_template(extra=("--set", "atlas.data.existingClaim="))
    assert result.returncode != 0 and "atlas.data: set url" in result.stderr
    result = helm_template(extra=("--set", "attribution.batch.enabled=true"))
    assert result.returncode != 0 and "attribution.batch.prompts: set url, existingClaim or configMap" in result.stderr


# --------------------------------------------------------------------------- fetch initContainer script


def test_fetch_script_downloads_verifies_and_keeps_a_good_file(tmp_path: Path) -> None:
    import hashlib

    source = tmp_path / "atlas-source.duckdb"
    source.write_bytes(b"atlas bytes" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "data" / "atlas.duckdb"
    script = CHART / "files" / "fetch.py"

    def fetch(sha: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), "--url", source.as_uri(), "--dest", str(dest), "--sha256", sha],
            capture_output=True,
            text=True,
            timeout=60,
        )

    bad = fetch("0" * 64)
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr and not dest.exists()
    good = fetch(digest)
    assert good.returncode == 0 and dest.read_bytes() == source.read_bytes()
    again = fetch(digest)
    assert again.returncode == 0 and "already present" in again.stdout


def test_servers_run_tls_and_token_auth_from_existing_secrets(render_chart) -> None:
    plain = render_chart()
    for workload in plain.workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if "--port" in container.get("args", []):
                assert "--insecure" in container["args"], workload["metadata"]["name"]
    chart = render_chart(extra=("--set", "global.tls.secretName=circuits-tls", "--set", "global.tls.mutual=true",
                                "--set", "global.auth.tokensSecret=circuits-tokens",
                                "--set", "global.auth.clientToken.secretName=circuits-client-token"))
    servers = 0
    for workload in chart.workloads():
        pod = workload["spec"]["template"]["spec"]
        for container in pod["containers"]:
            args = container.get("args", [])
            if "--port" not in args:
                continue
            servers += 1
            assert "--insecure" not in args
            assert args[args.index("--tls-cert") + 1] == "/etc/circuits/tls/tls.crt"
            assert args[args.index("--tls-client-ca") + 1] == "/etc/circuits/tls/ca.crt"
            assert args[args.index("--auth-tokens-file") + 1] == "/etc/circuits/auth/tokens"
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts["tls"]["readOnly"] and mounts["auth-tokens"]["readOnly"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        if "tls" in volumes:
            assert volumes["tls"]["secret"]["secretName"] == "circuits-tls"
            assert volumes["auth-tokens"]["secret"]["secretName"] == "circuits-tokens"
            assert volumes["auth-tokens"]["secret"]["defaultMode"] == volumes["tls"]["secret"]["defaultMode"] == 0o440
    assert servers >= 3
    assert not chart.of_kind("Secret")  # referenced, never inlined


def _mounted_file(workload: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file ``path`` in the first container of ``workload``: the Secret
    volume mounted above it, and the key projected to it (the file name when the volume has no items)."""
    pod = pod_spec(workload)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in pod["containers"][0]["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "secret" in volumes[mount["name"]]:
            assert mount.get("readOnly") is True, mount
            secret = volumes[mount["name"]]["secret"]
            name = path[len(prefix):]
            keys = {item["path"]: item["key"] for item in secret.get("items", [])}
            assert not keys or name in keys, (path, keys)
            return secret["secretName"], keys.get(name, name)
    raise AssertionError(f"{path} is not in a Secret volume of {workload['metadata']['name']}")


def test_labeler_calls_attribution_with_the_release_tls_and_token(render_chart, helm_template) -> None:
    """The labeler's client of attribution (Investigate) gets the CA, the client certificate under
    mutual TLS and the client token, each a file of the right mounted Secret; none without them."""
    from circuits_labeler.__main__ import build_parser

    def labeler(*flags: str) -> tuple[dict[str, Any], Any]:
        values = [f for flag in flags for f in ("--set", flag)]
        chart = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml", extra=values)
        workload = chart.get("Deployment", "demo-circuits-labeler")
        args = pod_spec(workload)["containers"][0]["args"]
        return workload, build_parser().parse_args(args[2:])

    workload, plain = labeler()
    assert plain.attribution == "demo-circuits-attribution:50051"
    assert (plain.attribution_tls_ca, plain.attribution_tls_cert, plain.attribution_tls_key,
            plain.attribution_token_file) == ("", "", "", "")  # fmt: skip
    assert {v["name"] for v in pod_spec(workload)["volumes"]}.isdisjoint({"tls", "auth-tokens", "client-token"})

    workload, tls = labeler("global.tls.secretName=circuits-tls")
    assert _mounted_file(workload, tls.attribution_tls_ca) == ("circuits-tls", "ca.crt")
    assert (tls.attribution_tls_cert, tls.attribution_tls_key, tls.attribution_token_file) == ("", "", "")

    workload, full = labeler("global.tls.secretName=circuits-tls", "global.tls.mutual=true",
                             "global.auth.tokensSecret=circuits-tokens",
                             "global.auth.clientToken.secretName=labeler-token",
                             "global.auth.clientToken.secretKey=bearer")  # fmt: skip
    assert _mounted_file(workload, full.attribution_tls_ca) == ("circuits-tls", "ca.crt")
    assert _mounted_file(workload, full.attribution_tls_cert) == ("circuits-tls", "tls.crt")
    assert _mounted_file(workload, full.attribution_tls_key) == ("circuits-tls", "tls.key")
    assert _mounted_file(workload, full.attribution_token_file) == ("labeler-token", "bearer")
    client_token = {v["name"]: v for v in pod_spec(workload)["volumes"]}["client-token"]
    assert client_token["secret"]["defaultMode"] == 0o440
    # the labeler's own server side is unchanged: it serves TLS and checks the release's tokens
    assert full.tls_cert == "/etc/circuits/tls/tls.crt" and full.auth_tokens_file == "/etc/circuits/auth/tokens"

    # Without attribution there is no client, hence no client credentials (and none required).
    workload, alone = labeler("attribution.enabled=false", "global.tls.secretName=circuits-tls",
                              "global.auth.tokensSecret=circuits-tokens")  # fmt: skip
    assert not alone.attribution and not alone.attribution_tls_ca and not alone.attribution_token_file
    assert "client-token" not in {v["name"] for v in pod_spec(workload)["volumes"]}

    # Tokens on but no token for the labeler to present: refused at render time, naming the value.
    result = helm_template(CHART / "ci" / "full-pipeline-vllm.yaml", extra=("--set", "global.auth.tokensSecret=circuits-tokens"))
    assert result.returncode != 0 and "global.auth.clientToken.secretName is required" in result.stderr


def test_batch_workers_call_the_aggregator_with_the_release_tls_and_token(render_chart, helm_template) -> None:
    """The batch workers' aggregator client (Ingest) gets the same CA, client pair and client token
    as the labeler's, each a file of the right mounted Secret, and none without them."""
    from circuits_attribution.worker import build_parser

    def worker(*flags: str) -> tuple[dict[str, Any], Any]:
        values = [f for flag in flags for f in ("--set", flag)]
        job = render_chart(CHART / "ci" / "full-pipeline-vllm.yaml", extra=values).get("Job", "demo-circuits-attribution-batch")
        container = pod_spec(job)["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]} | {"JOB_COMPLETION_INDEX": "0"}
        argv = [env.get(a[2:-1], a) if a.startswith("$(") else a for a in container["args"]]
        return job, build_parser().parse_args(argv)

    job, plain = worker()
    assert plain.aggregator and (plain.aggregator_tls_ca, plain.aggregator_tls_cert, plain.aggregator_tls_key,
                                 plain.aggregator_token_file) == ("", "", "", "")  # fmt: skip
    assert "client-token" not in {v["name"] for v in pod_spec(job)["volumes"]}

    job, full = worker("global.tls.secretName=circuits-tls", "global.tls.mutual=true",
                       "global.auth.tokensSecret=circuits-tokens", "global.auth.clientToken.secretName=worker-token")
    assert _mounted_file(job, full.aggregator_tls_ca) == ("circuits-tls", "ca.crt")
    assert _mounted_file(job, full.aggregator_tls_cert) == ("circuits-tls", "tls.crt")
    assert _mounted_file(job, full.aggregator_tls_key) == ("circuits-tls", "tls.key")
    assert _mounted_file(job, full.aggregator_token_file) == ("worker-token", "token")

    job, tls_only = worker("global.tls.secretName=circuits-tls")
    assert _mounted_file(job, tls_only.aggregator_tls_ca) == ("circuits-tls", "ca.crt")
    assert (tls_only.aggregator_tls_cert, tls_only.aggregator_token_file) == ("", "")

    # tokens on, no client token: refused at render time even with the labeler off
    result = helm_template(CHART / "ci" / "full-pipeline-vllm.yaml",
                           extra=("--set", "global.auth.tokensSecret=circuits-tokens", "--set", "labeler.enabled=false"))
    assert result.returncode != 0 and "global.auth.clientToken.secretName is required" in result.stderr
    assert "batch workers" in result.stderr
