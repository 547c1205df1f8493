"""Write deploy/helm/circuits/values.schema.json (the chart's values schema).

The schema is generated so every component block gets the same common keys from one list while
staying closed with plain ``additionalProperties: false`` (a shared ``$ref`` plus
``unevaluatedProperties`` works too, but Helm then reports one wrong type as a dozen errors).
Run after changing the chart's values; tests/deploy fails when the committed file drifts.

    .venv/bin/python scripts/gen_chart_schema.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "circuits" / "values.schema.json"

STRING: dict[str, Any] = {"type": "string"}
NON_EMPTY: dict[str, Any] = {"type": "string", "minLength": 1}
ABSOLUTE_PATH: dict[str, Any] = {"type": "string", "pattern": "^/"}
BOOLEAN: dict[str, Any] = {"type": "boolean"}
STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
FREE_OBJECT: dict[str, Any] = {"type": "object", "description": "validated by Kubernetes"}
OBJECT_LIST: dict[str, Any] = {"type": "array", "items": {"type": "object"}}
STRING_LIST: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
SHA256: dict[str, Any] = {"type": "string", "pattern": "^([0-9a-fA-F]{64})?$"}


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{name}"}


def integer(minimum: int | None = None, maximum: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [schema, {"type": "null"}]}


def closed(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties, **extra}
    if required:
        schema["required"] = required
    return schema


PORT = integer(1, 65535)

DEFINITIONS: dict[str, Any] = {
    "quantity": {"type": ["string", "number"], "description": 'a Kubernetes quantity ("4", "32Gi", "500m")'},
    "image": closed(
        {"repository": NON_EMPTY, "tag": STRING, "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}},
        ["repository", "tag", "pullPolicy"],
    ),
    "resources": closed(
        {
            "requests": {"type": "object", "additionalProperties": ref("quantity")},
            "limits": {"type": "object", "additionalProperties": ref("quantity")},
        }
    ),
    "envVar": closed(
        {"name": NON_EMPTY, "value": STRING, "valueFrom": FREE_OBJECT}, ["name"], description="a Kubernetes EnvVar"
    ),
    "service": closed(
        {
            "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
            "port": PORT,
            # Helm drops keys set to null, so metricsPort cannot be required.
            "metricsPort": {**nullable(PORT), "description": "null or absent = no metrics port"},
            "annotations": STRING_MAP,
        },
        ["type", "port"],
    ),
    "probe": closed(
        {
            "enabled": BOOLEAN,
            "initialDelaySeconds": integer(0),
            "periodSeconds": integer(1),
            "timeoutSeconds": integer(1),
            "failureThreshold": integer(1),
        },
        ["enabled", "initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"],
    ),
    "probes": closed(
        {"startup": ref("probe"), "liveness": ref("probe"), "readiness": ref("probe")},
        ["startup", "liveness", "readiness"],
    ),
    "intOrPercent": nullable({"oneOf": [integer(0), {"type": "string", "pattern": "^[0-9]+%$"}]}),
    "pdb": closed(
        {"enabled": BOOLEAN, "minAvailable": ref("intOrPercent"), "maxUnavailable": ref("intOrPercent")},
        ["enabled"],
        description="rendered only when replicaCount > 1; maxUnavailable wins over minAvailable",
    ),
    "secretRef": closed(
        {"secretName": STRING, "secretKey": NON_EMPTY},
        ["secretName", "secretKey"],
        description='a key of an existing Secret; secretName "" = not used',
    ),
    "gpu": closed({"count": integer(0), "resourceName": NON_EMPTY}, ["count", "resourceName"]),
    "accessModes": {
        "type": "array",
        "minItems": 1,
        "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
    },
    "modelCache": closed(
        {
            "type": {"enum": ["emptyDir", "pvc", "existingClaim"]},
            "mountPath": ABSOLUTE_PATH,
            "size": ref("quantity"),
            "storageClass": STRING,
            "accessModes": ref("accessModes"),
            "existingClaim": STRING,
            "sizeLimit": ref("quantity"),
        },
        ["type", "mountPath"],
    ),
}

#: The keys every component block has (values.yaml documents them).
COMMON_COMPONENT_KEYS: dict[str, Any] = {
    "enabled": BOOLEAN,
    "image": ref("image"),
    "replicaCount": integer(0),
    "resources": ref("resources"),
    "env": {"type": "array", "items": ref("envVar")},
    "extraArgs": STRING_LIST,
    "service": ref("service"),
    "probes": ref("probes"),
    "nodeSelector": STRING_MAP,
    "tolerations": OBJECT_LIST,
    "affinity": FREE_OBJECT,
    "podSecurityContext": FREE_OBJECT,
    "securityContext": FREE_OBJECT,
    "podAnnotations": STRING_MAP,
    "podLabels": STRING_MAP,
    "pdb": ref("pdb"),
    "extraVolumes": OBJECT_LIST,
    "extraVolumeMounts": OBJECT_LIST,
}


def component(description: str, specific: dict[str, Any]) -> dict[str, Any]:
    return closed({**COMMON_COMPONENT_KEYS, **specific}, list(COMMON_COMPONENT_KEYS), description=description)


def build_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "circuits chart values (generated by scripts/gen_chart_schema.py)",
        "type": "object",
        "additionalProperties": False,
        "$defs": DEFINITIONS,
        "properties": {
            "nameOverride": STRING,
            "fullnameOverride": STRING,
            "global": closed(
                {
                    "imageRegistry": STRING,
                    "imagePullSecrets": STRING_LIST,
                    "podSecurityContext": FREE_OBJECT,
                    "securityContext": FREE_OBJECT,
                    "tmpSizeLimit": ref("quantity"),
                    "tls": closed({"secretName": STRING, "mutual": BOOLEAN}),
                    "auth": closed({"tokensSecret": STRING, "clientToken": ref("secretRef")}),
                }
            ),
            "serviceAccount": closed(
                {"create": BOOLEAN, "name": STRING, "annotations": STRING_MAP, "automountServiceAccountToken": BOOLEAN}
            ),
            "networkPolicy": closed(
                {
                    "enabled": BOOLEAN,
                    "clientPeers": OBJECT_LIST,
                    "metricsPeers": OBJECT_LIST,
                    "externalEgress": closed(
                        {
                            "enabled": BOOLEAN,
                            "cidr": NON_EMPTY,
                            "except": STRING_LIST,
                            "ports": {"type": "array", "items": PORT},
                        }
                    ),
                }
            ),
            "serviceMonitor": closed(
                {"enabled": BOOLEAN, "interval": STRING, "scrapeTimeout": STRING, "labels": STRING_MAP}
            ),
            "attribution": component(
                "AttributionService Deployment on GPUs, plus the optional batch Indexed Job",
                {
                    "model": NON_EMPTY,
                    "dtype": {"enum": ["float32", "bfloat16", "float16", "float64"]},
                    "maxBatch": integer(1, 256),
                    "batchWindowMs": {"type": "number", "minimum": 0, "maximum": 10000},
                    "gpu": ref("gpu"),
                    "modelCache": ref("modelCache"),
                    "hfToken": ref("secretRef"),
                    "batch": closed(
                        {
                            "enabled": BOOLEAN,
                            "shards": integer(1),
                            "parallelism": integer(1),
                            "backoffLimitPerIndex": integer(0),
                            "maxFailedIndexes": integer(0),
                            "activeDeadlineSeconds": nullable(integer(1)),
                            "ttlSecondsAfterFinished": nullable(integer(0)),
                            "prompts": closed(
                                {
                                    "url": STRING,
                                    "sha256": SHA256,
                                    "existingClaim": STRING,
                                    "configMap": STRING,
                                    "fileName": NON_EMPTY,
                                }
                            ),
                            "aggregatorAddress": STRING,
                            "batchSize": integer(1, 256),
                            "output": closed({"existingClaim": STRING, "mountPath": ABSOLUTE_PATH}),
                            "extraArgs": STRING_LIST,
                            "resources": ref("resources"),
                        }
                    ),
                },
            ),
            "aggregator": component(
                "AggregatorService StatefulSet, one shard per pod",
                {
                    "persistence": closed(
                        {
                            "mountPath": ABSOLUTE_PATH,
                            "size": ref("quantity"),
                            "storageClass": STRING,
                            "accessModes": ref("accessModes"),
                        }
                    ),
                    "stateFile": NON_EMPTY,
                },
            ),
            "labeler": component(
                "LabelerService Deployment (Anthropic or an OpenAI-compatible server)",
                {
                    "llm": closed({"backend": {"enum": ["anthropic", "openai"]}, "model": STRING, "baseUrl": STRING}),
                    "anthropicApiKey": ref("secretRef"),
                    "openaiApiKey": ref("secretRef"),
                    "config": {
                        "type": "object",
                        "description": "extra keys of the labeling: config section (validated by circuits_core.config)",
                    },
                    "workDir": closed({"mountPath": ABSOLUTE_PATH, "sizeLimit": ref("quantity")}),
                },
            ),
            "atlas": component(
                "AtlasService Deployment serving atlas.duckdb read-only",
                {
                    "processes": integer(1, 64),
                    "data": closed(
                        {
                            "url": STRING,
                            "sha256": SHA256,
                            "indexUrl": STRING,
                            "indexSha256": SHA256,
                            "existingClaim": STRING,
                            "fileName": NON_EMPTY,
                            "mountPath": ABSOLUTE_PATH,
                            "sizeLimit": ref("quantity"),
                        }
                    ),
                },
            ),
            "gateway": component(
                "optional Envoy gateway: HTTP/JSON, gRPC-Web and gRPC in front of the atlas",
                {
                    "routes": closed({"atlas": BOOLEAN, "attribution": BOOLEAN, "labeler": BOOLEAN}),
                    "corsOrigins": {"type": "array", "items": {"type": "string", "pattern": "^(\\*|[a-z][a-z0-9+.-]*://.+)$"}},
                    "requestTimeoutSeconds": {"type": "number", "exclusiveMinimum": 0},
                    "adminPort": PORT,
                    "descriptorSet": closed({"existingConfigMap": STRING, "key": NON_EMPTY}, ["key"]),
                },
            ),
            "vllm": component(
                "optional in-cluster vLLM (OpenAI-compatible) for the labeler",
                {
                    "model": NON_EMPTY,
                    "servedModelName": STRING,
                    "gpu": ref("gpu"),
                    "modelCache": ref("modelCache"),
                    "hfToken": ref("secretRef"),
                    "shmSize": ref("quantity"),
                },
            ),
        },
    }


def render() -> str:
    return json.dumps(build_schema(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed schema is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if SCHEMA_PATH.read_text(encoding="utf-8") != text:
            print(f"{SCHEMA_PATH} is stale: run scripts/gen_chart_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
