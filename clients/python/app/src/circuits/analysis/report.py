"""The report folder of an analysis: summary.json, report.md, report.html (with the viewer), graph.json."""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from circuits.analysis.labels import UNLABELLED, display_unit
from circuits.analysis.paths import predicted_logit
from circuits.analysis.pipeline import AnalysisResult


def _num(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summary_dict(result: AnalysisResult) -> dict[str, Any]:
    """The machine-readable summary written to summary.json."""
    g = result.graph
    by_id = {u.node_id: u for u in g.units}
    source_counts = Counter(result.label_sources.values())
    predicted = predicted_logit(g)
    return {
        "schema": "circuits.analysis/1",
        "prompt": g.prompt,
        "model": g.model or g.metadata.scan,
        "graph_id": g.graph_id,
        "prompt_tokens": list(g.prompt_tokens),
        "metric_value": _num(g.metadata.metric_value),
        "nodes_exceeded": g.metadata.nodes_exceeded,
        "logits": [{"node_id": u.node_id, "token": u.token, "token_id": u.index, "probability": _num(u.probability)} for u in g.logits],
        "predicted": predicted.node_id if predicted else None,
        "counts": {
            "neurons": len(g.neurons),
            "embeddings": sum(1 for u in g.units if u.kind == "embedding"),
            "logits": len(g.logits),
            "edges": len(g.edges),
            "clusters": len(result.clusters),
            "clustered_neurons": sum(len(c.node_ids) for c in result.clusters),
        },
        "labels": {"by_source": dict(sorted(source_counts.items())), "unlabelled": source_counts.get(UNLABELLED, 0)},
        "neurons": [
            {
                "node_id": u.node_id, "layer": u.layer, "neuron": u.index, "position": u.position, "token": u.token,
                "label": u.label, "input_label": u.input_label, "label_source": result.label_sources.get(u.node_id, UNLABELLED),
                "cluster": u.cluster or None, "attribution": _num(u.attribution), "activation": _num(u.activation),
            }
            for u in g.neurons
        ],
        "clusters": [
            {
                "cluster_id": c.cluster_id, "name": c.name, "size": len(c.node_ids), "mean_layer": c.mean_layer,
                "layers": list(c.layers), "total_abs_attribution": c.total_abs_attribution,
                "positions": [{"position": p, "token": t, "count": n} for p, t, n in c.positions],
                "node_ids": list(c.node_ids),
            }
            for c in result.clusters
        ],
        "paths": {
            "mode": result.path_mode,
            "target": predicted.node_id if predicted else None,
            "paths": [
                {
                    "score": p.score, "sign": p.sign, "node_ids": list(p.node_ids), "weights": list(p.weights),
                    "clusters": [by_id[n].cluster or None for n in p.node_ids],
                }
                for p in result.paths
            ],
        },
        "analysis": dataclasses.asdict(result.analysis),
        "warnings": list(result.warnings),
        "files": {"graph": "graph.json", "report_md": "report.md", "report_html": "report.html", "summary": "summary.json"},
    }


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "↵")


def report_markdown(result: AnalysisResult) -> str:
    g = result.graph
    s = summary_dict(result)
    by_id = {u.node_id: u for u in g.units}
    out = [f"# Circuit analysis: {g.prompt!r}", ""]
    out.append(f"- model: `{s['model']}`")
    out.append(f"- graph: {s['counts']['neurons']} neurons, {s['counts']['edges']} edges, "
               f"{s['counts']['clusters']} clusters ({s['counts']['clustered_neurons']} neurons clustered)")
    out.append("- traced logits: " + ", ".join(f"`{u.token!r}` p={u.probability or 0:.3f}" for u in g.logits))
    out.append("- labels: " + ", ".join(f"{k}: {v}" for k, v in s["labels"]["by_source"].items()))
    if g.metadata.nodes_exceeded:
        out.append("- note: more nodes than max_nodes were selected, so only edges into logits were computed")
    out += ["", "## Analysis", ""]
    a = result.analysis
    if a.status == "ok":
        out += [a.text, "", f"_written by {a.backend} `{a.model}`_"]
    else:
        out.append(f"_LLM analysis {a.status}: {a.reason}_")
    out += ["", "## Clusters", "", "| cluster | neurons | layers | main positions | top members |", "|---|---|---|---|---|"]
    for c in result.clusters:
        members = sorted((by_id[n] for n in c.node_ids), key=lambda u: -abs(u.attribution or 0.0))[:4]
        tops = "; ".join(f"L{u.layer}/N{u.index} {u.label or UNLABELLED}" for u in members)
        where = ", ".join(f"{t!r}@{p}" for p, t, _ in c.positions[:3])
        out.append(f"| {c.name} | {len(c.node_ids)} | L{c.layers[0]}–L{c.layers[1]} | {_md_cell(where)} | {_md_cell(tops)} |")
    if not result.clusters:
        out.append("| – | 0 | – | – | no neuron-to-neuron edges |")
    out += ["", f"## Top paths to the predicted token ({result.path_mode})", ""]
    for n, p in enumerate(result.paths, 1):
        chain = " → ".join(display_unit(by_id[i]) for i in p.node_ids)
        out.append(f"{n}. score {p.score:.3g} ({'excitatory' if p.sign > 0 else 'inhibitory'}): {_md_cell(chain)}")
    if not result.paths:
        out.append("_no path from an input token to the predicted token_")
    if result.warnings:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in result.warnings]
    out += ["", "Files: `graph.json` (labels, clusters, qParams.supernodes), `summary.json`, `report.html` (interactive viewer).", ""]
    return "\n".join(out)


def report_html_section(result: AnalysisResult) -> str:
    """The report body placed under the viewer in report.html (all text escaped)."""
    g = result.graph
    by_id = {u.node_id: u for u in g.units}
    e = html.escape
    a = result.analysis
    parts = ['<section class="cv-report" id="report">', "<h2>Analysis</h2>"]
    if a.status == "ok":
        parts.append(f'<div class="cv-analysis" id="analysis-text">{e(a.text)}</div>')
        parts.append(f"<p><em>written by {e(a.backend)} <code>{e(a.model)}</code></em></p>")
    else:
        parts.append(f'<p id="analysis-status"><em>LLM analysis {e(a.status)}: {e(a.reason)}</em></p>')
    parts.append("<h2>Clusters</h2><table><tr><th>cluster</th><th>neurons</th><th>layers</th><th>main positions</th><th>top members</th></tr>")
    for c in result.clusters:
        members = sorted((by_id[n] for n in c.node_ids), key=lambda u: -abs(u.attribution or 0.0))[:4]
        tops = "<br>".join(e(f"L{u.layer}/N{u.index} {u.label or UNLABELLED}") for u in members)
        where = e(", ".join(f"{t!r}@{p}" for p, t, _ in c.positions[:3]))
        parts.append(f"<tr><td>{e(c.name)}</td><td>{len(c.node_ids)}</td><td>L{c.layers[0]}–L{c.layers[1]}</td><td>{where}</td><td>{tops}</td></tr>")
    parts.append("</table>")
    parts.append(f"<h2>Top paths to the predicted token ({e(result.path_mode)})</h2><ol>")
    for p in result.paths:
        chain = " → ".join(display_unit(by_id[i]) for i in p.node_ids)
        parts.append(f"<li>score {p.score:.3g} ({'excitatory' if p.sign > 0 else 'inhibitory'}): {e(chain)}</li>")
    parts.append("</ol>")
    if result.warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{e(w)}</li>" for w in result.warnings) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def write_report(result: AnalysisResult, out_dir: str | Path) -> dict[str, Path]:
    """Write graph.json, summary.json, report.md and report.html into ``out_dir``; return the paths."""
    from circuits.viewer import write_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "graph": result.graph.save(out / "graph.json"),
        "summary": out / "summary.json",
        "report_md": out / "report.md",
        "report_html": out / "report.html",
    }
    _write_text(paths["summary"], json.dumps(summary_dict(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    _write_text(paths["report_md"], report_markdown(result))
    write_page(result.graph, paths["report_html"], title=f"circuits analysis · {result.graph.prompt}",
               extra_html=report_html_section(result))
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
