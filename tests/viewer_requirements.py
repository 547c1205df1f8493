"""What circuit-tracer's and Neuronpedia's graph viewers require of a graph file.

Written for our tests from their documented models, not copied from their code:
- circuit-tracer's pydantic ``Model`` (frontend/graph_models.py): metadata {slug, scan,
  transcoder_list: list[str], prompt_tokens: list[str], prompt, node_threshold: float | None},
  qParams {pinnedIds: list[str], supernodes: list[list[str]], linkType, clickedId, sg_pos: str}
  (all required), nodes [{node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str,
  jsNodeId: str, clerp: str, token_prob: float, is_target_logit: bool, influence/activation:
  float | None}], links: list[dict]; and what its frontend reads: a logit's token between the
  clerp's double quotes and its probability after ``(p=``, ``influence`` as a cumulative share
  (keep ``<= node_threshold``), ``graph-metadata.json`` entries with slug/scan/prompt/node_threshold.
- Neuronpedia's upload: its JSON schema, ``scan`` and ``slug`` matching ``[a-zA-Z0-9_.-]+``, a
  ``.json`` file name and a size of at least 1024 bytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "neuronpedia-graph-schema.json").read_text())
NP_ID = re.compile(r"^[a-zA-Z0-9_.-]+$")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_float(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def circuit_tracer_problems(graph: Mapping[str, Any]) -> list[str]:
    """Every way ``graph`` breaks circuit-tracer's graph model or its frontend's reading of it."""
    problems: list[str] = []
    meta, q = graph.get("metadata"), graph.get("qParams")
    if not isinstance(meta, Mapping):
        return ["metadata missing"]
    for key in ("slug", "scan", "prompt"):
        if not isinstance(meta.get(key), str):
            problems.append(f"metadata.{key} must be a string")
    for key in ("transcoder_list", "prompt_tokens"):
        if not _is_str_list(meta.get(key)):
            problems.append(f"metadata.{key} must be a list of strings")
    threshold = meta.get("node_threshold")
    if threshold is not None and not (_is_float(threshold) and 0 < threshold <= 1):
        problems.append(f"metadata.node_threshold must be a fraction in (0, 1], got {threshold!r}")
    if not isinstance(q, Mapping):
        problems.append("qParams missing")
    else:
        if not _is_str_list(q.get("pinnedIds")):
            problems.append("qParams.pinnedIds must be a list of strings")
        sn = q.get("supernodes")
        if not (isinstance(sn, list) and all(_is_str_list(s) for s in sn)):
            problems.append("qParams.supernodes must be a list of lists of strings")
        for key in ("linkType", "clickedId", "sg_pos"):
            if not isinstance(q.get(key), str):
                problems.append(f"qParams.{key} must be a string")
    nodes, links = graph.get("nodes"), graph.get("links")
    if not isinstance(nodes, list) or not isinstance(links, list) or not all(isinstance(link, Mapping) for link in links):
        return problems + ["nodes and links must be lists (links of objects)"]
    ids = set()
    shares = []
    for n, node in enumerate(nodes):
        where = f"nodes[{n}]"
        for key in ("node_id", "layer", "feature_type", "jsNodeId", "clerp"):
            if not isinstance(node.get(key), str):
                problems.append(f"{where}.{key} must be a string")
        for key in ("feature", "ctx_idx"):
            if not _is_int(node.get(key)):
                problems.append(f"{where}.{key} must be an integer")
        for key in ("influence", "activation"):
            if node.get(key) is not None and not _is_float(node[key]):
                problems.append(f"{where}.{key} must be a number or null")
        if "token_prob" in node and not _is_float(node["token_prob"]):
            problems.append(f"{where}.token_prob must be a number")
        if "is_target_logit" in node and not isinstance(node["is_target_logit"], bool):
            problems.append(f"{where}.is_target_logit must be a boolean")
        ids.add(node.get("node_id"))
        ftype = node.get("feature_type")
        clerp = node.get("clerp") if isinstance(node.get("clerp"), str) else ""
        if ftype == "logit":
            # frontend: logitToken = clerp.split('"')[1]; logitPct = +clerp.split('(p=')[1].split(')')[0]
            if clerp.count('"') < 2 or "(p=" not in clerp:
                problems.append(f"{where}: logit clerp {clerp!r} has no quoted token or (p=...)")
        elif ftype != "embedding" and node.get("influence") is not None:
            value = node["influence"]
            if not (_is_float(value) and 0 <= value <= 1):
                problems.append(f"{where}.influence {value!r} is not a cumulative share in [0, 1]")
            else:
                shares.append(value)
    for n, link in enumerate(links):
        if link.get("source") not in ids or link.get("target") not in ids or not _is_float(link.get("weight")):
            problems.append(f"links[{n}] must join two nodes with a numeric weight")
    return problems


def cumulative_share_problems(graph: Mapping[str, Any]) -> list[str]:
    """``influence`` must read as circuit-tracer's cumulative share: rank r's value is the running
    total of the influence of ranks <= r over the total, so the values, sorted, rise from the
    strongest node's share to 1 and differences are the nodes' own (non-negative) shares."""
    values = sorted(n["influence"] for n in graph["nodes"] if n.get("feature_type") != "logit" and n.get("influence") is not None)
    if not values:
        return []
    problems = []
    if not math.isclose(values[-1], 1.0, abs_tol=1e-9):
        problems.append(f"largest influence share is {values[-1]}, not 1")
    if values[0] <= 0:
        problems.append("the most influential node has a zero share")
    return problems


def neuronpedia_upload_problems(graph: Mapping[str, Any], *, file_name: str = "graph.json", size: int | None = None) -> list[str]:
    """Every reason Neuronpedia's upload (signed-put + save-to-db) would refuse the file."""
    problems = [f"schema: {'/'.join(map(str, e.absolute_path)) or 'root'}: {e.message}"
                for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(graph)]
    meta = graph.get("metadata") or {}
    for key in ("scan", "slug"):
        value = meta.get(key)
        if not isinstance(value, str) or not NP_ID.match(value):
            problems.append(f"metadata.{key} {value!r} must match [a-zA-Z0-9_.-]+")
    if not file_name.endswith(".json"):
        problems.append(f"file name {file_name!r} must end in .json")
    if size is not None and size < 1024:
        problems.append(f"file has {size} bytes; the upload needs at least 1024")
    return problems


def graph_index_problems(index: Mapping[str, Any], folder: Path) -> list[str]:
    """circuit-tracer's index.html: {"graphs": [{slug, scan, prompt, node_threshold, ...}]}, each
    slug served as graph_data/<slug>.json."""
    graphs = index.get("graphs")
    if not isinstance(graphs, list) or not graphs:
        return ["graph-metadata.json needs a non-empty 'graphs' list"]
    problems = []
    for g in graphs:
        for key in ("slug", "scan", "prompt"):
            if not isinstance(g.get(key), str):
                problems.append(f"entry {g.get('slug')!r}: {key} must be a string")
        if not _is_float(g.get("node_threshold")):
            problems.append(f"entry {g.get('slug')!r}: node_threshold must be a number (the page's pruning default)")
        if not (folder / f"{g.get('slug')}.json").is_file():
            problems.append(f"entry {g.get('slug')!r}: no file {g.get('slug')}.json beside the index")
    return problems


def viewer_problems(graph: Mapping[str, Any]) -> list[str]:
    """All of the above that apply to one graph dict."""
    return circuit_tracer_problems(graph) + cumulative_share_problems(graph) + neuronpedia_upload_problems(graph)
