"""The investigation's HTML report, rendered from its transcript (one self-contained file, no script).

Sections: the verdict (final label, description, confidence and the prediction score it rests
on, or why the run stopped), the sources, hypotheses, pre-registered predictions with what each
measured, then every experiment with its inputs and results: activations as highlighted text
(token background = activation / largest activation of the report), intervention and patching
effects as before/after probability bars, exemplars, projections and graph positions as tables.
All text from the model or the LLM is escaped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from circuits_labeler.scientist.transcript import Experiment, Transcript

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1d232a;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dde3}
.muted{color:#667}.verdict{background:#f3f7fb;border:1px solid #c9d8e8;border-radius:6px;padding:12px 16px}
.verdict.stopped{background:#fff6ec;border-color:#f0c99a}
.label{font-size:19px;font-weight:600}.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;
font-weight:600;margin-left:6px}.high{background:#cdeccf}.medium{background:#fbe7a8}.low{background:#f6c9c5}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #dde2e8;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f7f9}.exp{border:1px solid #dde2e8;border-radius:6px;margin:10px 0;padding:8px 12px}
.exp.err{border-color:#e8a9a3;background:#fff8f7}.exp h3{font-size:14px;margin:0 0 4px}
pre{background:#f7f8fa;padding:6px 8px;overflow-x:auto;font-size:12px;margin:4px 0;white-space:pre-wrap}
.toks{font-family:ui-monospace,monospace;font-size:13px;line-height:1.9;margin:2px 0}
.tok{padding:1px 1px;margin-right:2px;border-radius:2px;white-space:pre}.tok.sp{color:#99a}
.ok{color:#17803d;font-weight:600}.bad{color:#b42318;font-weight:600}
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else _e(value)


def _scale(transcript: Transcript) -> float:
    best = 0.0
    for exp in transcript.experiments:
        for row in exp.result.get("prompts", []) if exp.ok else []:
            for v in row.get("activations", []):
                if isinstance(v, (int, float)):
                    best = max(best, abs(v))
    return best or 1.0


def highlighted(row: Mapping[str, Any], scale: float) -> str:
    """One prompt's tokens, each shaded by its activation (orange positive, blue negative)."""
    special = set(row.get("special_positions", []))
    parts = []
    for p, (tok, v) in enumerate(zip(row.get("tokens", []), row.get("activations", []))):
        v = v or 0.0
        alpha = min(1.0, abs(v) / scale)
        color = f"rgba(255,140,0,{alpha:.2f})" if v >= 0 else f"rgba(40,110,255,{alpha:.2f})"
        cls = "tok sp" if p in special else "tok"
        parts.append(f'<span class="{cls}" style="background:{color}" title="{_e(tok)}: {v:.4g}" '
                     f'data-activation="{v:.6g}">{_e(tok)}</span>')
    return f'<div class="toks">{"".join(parts)}</div>'


def bars(shifts: Sequence[Mapping[str, Any]]) -> str:
    """Before / after probability of the clean model's top tokens as an inline SVG bar chart."""
    if not shifts:
        return ""
    width, row_h, label_w, bar_w = 520, 22, 130, 170
    height = row_h * len(shifts) + 24
    out = [f'<svg class="effect" width="{width}" height="{height}" role="img" aria-label="intervention effect">',
           '<text x="0" y="12" font-size="11" fill="#667">token</text>',
           f'<text x="{label_w}" y="12" font-size="11" fill="#667">clean (grey) vs intervened (colour) probability</text>']
    for i, s in enumerate(shifts):
        y = 20 + i * row_h
        before, after = float(s.get("before") or 0.0), float(s.get("after") or 0.0)
        color = "#2e7d32" if after >= before else "#c62828"
        out.append(f'<text x="0" y="{y + 13}" font-size="12">{_e(repr(s.get("token", "")))}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{bar_w * before:.1f}" height="7" fill="#b0b7bf"/>')
        out.append(f'<rect x="{label_w}" y="{y + 10}" width="{bar_w * after:.1f}" height="7" fill="{color}"/>')
        out.append(f'<text x="{label_w + bar_w + 8}" y="{y + 14}" font-size="11">{before:.3f} → {after:.3f}</text>')
    out.append("</svg>")
    return "".join(out)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return '<p class="muted">(none)</p>'
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_num(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _experiment_body(exp: Experiment, scale: float) -> str:
    r = exp.result
    if not exp.ok:
        return f'<p class="bad">refused: {_e(exp.error)}</p>'
    tool = exp.tool
    if tool in ("run_prompts", "test_prediction"):
        parts = []
        items = {i["prompt"]: i for i in r.get("items", [])}
        for row in r.get("prompts", []):
            item = items.get(row["prompt"])
            mark = ""
            if item is not None:
                mark = (f' — predicted {"fires" if item["predicted_fires"] else "silent"}: '
                        + ('<span class="ok">came true</span>' if item["came_true"] else '<span class="bad">wrong</span>'))
            parts.append(f'<div class="muted">max {_num(row.get("max_activation"))} on {_e(repr(row.get("max_token", "")))}'
                         f'{mark}</div>' + highlighted(row, scale))
        return "".join(parts)
    if tool in ("intervene", "patch"):
        head = ""
        if tool == "patch":
            head = (f'<p>value {_num(r.get("source_activation"))} from {_e(repr(r.get("source_token")))} written over '
                    f'{_num(r.get("target_activation"))} at {_e(repr(r.get("target_token")))}</p>')
            rp = r.get("relp_patch") or {}
            if "noising" in rp:
                head += ("<div>" + _e(rp["metric"]) + ": " + _table([rp], ["clean_metric", "corrupt_metric", "noising",
                                                                      "denoising", "predicted"]) + "</div>")
            elif rp.get("skipped"):
                head += f'<p class="muted">RelP patching skipped: {_e(rp["skipped"])}</p>'
        gen = ""
        if r.get("baseline_text") or r.get("intervened_text"):
            gen = (f'<table><tr><th>clean continuation</th><td>{_e(r.get("baseline_text", ""))}</td></tr>'
                   f'<tr><th>intervened continuation</th><td>{_e(r.get("intervened_text", ""))}</td></tr></table>')
        return head + bars(r.get("shifts", [])) + gen
    if tool == "exemplars":
        ctx = [{"activation": c["activation"], "token": repr(c["token"]), "context": c["text"]} for c in r.get("contexts", [])]
        return f'<p class="muted">stats: {_e(json.dumps(r.get("stats", {})))}</p>' + _table(ctx, ["activation", "token", "context"])
    if tool == "projections":
        return "".join(f"<p><b>{_e(k)}</b>: " + ", ".join(f"{_e(repr(t['token']))} ({_num(t['weight'])})" for t in r.get(k, [])) + "</p>"
                       for k in ("output_promotes", "output_suppresses", "input_drivers"))
    if tool == "attribute":
        return (_table(r.get("nodes", []), ["position", "token", "activation", "attribution", "rank"])
                + '<p class="muted">strongest inputs</p>' + _table(r.get("top_edges_in", []), ["from", "weight"])
                + '<p class="muted">strongest outputs</p>' + _table(r.get("top_edges_out", []), ["to", "weight"]))
    if tool == "atlas_info" and r.get("found"):
        return (_table(r.get("labels", []), ["text", "source", "score_detection", "score_simulation"])
                + f'<p>cluster {_e(r.get("cluster") or "-")}</p>'
                + '<p class="muted">upstream</p>' + _table(r.get("upstream", []), ["unit", "count", "mean_weight"])
                + '<p class="muted">downstream</p>' + _table(r.get("downstream", []), ["unit", "count", "mean_weight"]))
    return f"<pre>{_e(json.dumps(r, indent=1, default=list))}</pre>"


def render_report(transcript: Transcript) -> str:
    """The report as one HTML document."""
    t = transcript
    scale = _scale(t)
    correct, total = t.prediction_score()
    final = t.final
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(t.unit_id)} investigation</title>"
           f"<style>{CSS}</style></head><body>",
           f"<h1>Neuron {_e(t.unit_id)} <span class='muted'>of {_e(t.model)}</span></h1>",
           f"<div class='muted'>LLM {_e(t.llm.get('backend', ''))} {_e(t.llm.get('model', ''))} · {t.steps} steps · "
           f"{len(t.experiments)} experiments · {t.usage.input_tokens + t.usage.output_tokens} tokens · "
           f"${t.usage.spend_usd:.4f} · started {_e(t.started)} · updated {_e(t.updated)}</div>"]
    stopped = t.status != "finished"
    out.append(f"<h2>Verdict</h2><div class='verdict{' stopped' if stopped else ''}' id='verdict'>")
    if final:
        out.append(f"<div class='label' id='final-label'>{_e(final.label)}<span class='badge {final.confidence}'>"
                   f"confidence {final.confidence}</span></div><p>{_e(final.description)}</p>"
                   f"<p class='muted'>Stated confidence {_e(final.confidence_stated)}; grounded in pre-registered "
                   f"predictions: {final.predictions_correct}/{final.predictions_total} came true.</p>")
    else:
        out.append("<div class='label' id='final-label'>No final label</div>")
    out.append(f"<p id='status'><b>Status:</b> {_e(t.status)} — {_e(t.stop_reason or 'in progress')}</p>"
               f"<p>Prediction score: <b id='score'>{correct}/{total}</b></p></div>")
    out.append("<h2>Sources</h2>" + _table([{"source": k, "state": v} for k, v in t.sources.items()], ["source", "state"]))
    out.append("<h2>Hypotheses</h2>" + _table(
        [{"id": h.id, "statement": h.statement, "status": h.status, "step": h.step, "notes": "; ".join(h.notes)}
         for h in t.hypotheses], ["id", "statement", "status", "step", "notes"]))
    out.append("<h2>Pre-registered predictions</h2>")
    if not t.predictions:
        out.append("<p class='muted'>(none)</p>")
    for p in t.predictions:
        state = f"tested at step {p.tested_step}: {p.correct}/{len(p.items)} came true" if p.tested else "not tested"
        out.append(f"<p><b>{_e(p.id)}</b> for {_e(p.hypothesis_id)} (registered step {p.registered_step}; threshold "
                   f"{p.threshold:g}, {_e(p.threshold_source)}) — {state}</p>")
        out.append(_table([{"prompt": i.prompt, "predicted": "fires" if i.fires else "silent", "measured": i.measured,
                            "token": repr(i.token) if i.token else "", "came true": {True: "yes", False: "NO", None: "-"}[i.came_true]}
                           for i in p.items], ["prompt", "predicted", "measured", "token", "came true"]))
    out.append("<h2>Experiments</h2>")
    for exp in t.experiments:
        args = json.dumps(exp.arguments, ensure_ascii=False, default=list)
        out.append(f"<div class='exp{'' if exp.ok else ' err'}' id='{_e(exp.id)}'><h3>{_e(exp.id)} · step {exp.step} · "
                   f"{_e(exp.tool)} <span class='muted'>({exp.seconds:.2f}s)</span></h3>"
                   f"<pre>{_e(args)}</pre>{f'<div>{_e(exp.summary)}</div>' if exp.ok else ''}{_experiment_body(exp, scale)}</div>")
    notes = [m.text for m in t.messages if m.role == "assistant" and m.text]
    out.append("<h2>Agent notes</h2>" + ("".join(f"<p>{_e(n)}</p>" for n in notes) or "<p class='muted'>(none)</p>"))
    out.append("</body></html>")
    return "\n".join(out)


def write_report(transcript: Transcript, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_report(transcript), encoding="utf-8")
    tmp.replace(path)
    return path
