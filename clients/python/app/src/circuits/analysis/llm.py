"""The LLM write-up of an analysed graph: the prompt it gets, and the call (Anthropic or any
OpenAI-compatible server); never raises for a missing key or an LLM failure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from circuits.analysis.clusters import ClusterInfo
from circuits.analysis.labels import display_unit
from circuits.analysis.paths import CircuitPath
from circuits_core.config import LabelingSection, env_setting
from circuits_core.schemas import Graph


@dataclass(frozen=True, slots=True, kw_only=True)
class LLMAnalysis:
    """``status``: ok | skipped | failed; ``text`` is the analysis when ok, ``reason`` otherwise."""

    status: Literal["ok", "skipped", "failed"]
    text: str = ""
    reason: str = ""
    backend: str = ""
    model: str = ""
    prompt_chars: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


SYSTEM_PROMPT = (
    "You are an interpretability researcher. You explain neuron-level attribution graphs "
    "(RelP) of language models: which groups of MLP neurons carry information from the input "
    "tokens to the predicted token. Be concrete and brief, cite clusters (C…) and neurons "
    "(L{layer}/N{index}), and say plainly when labels are missing or evidence is weak."
)


def analysis_prompt(graph: Graph, clusters: Sequence[ClusterInfo], paths: Sequence[CircuitPath], *, members_per_cluster: int = 6) -> str:
    """The user message sent to the LLM: tokens, logits, clusters with their top members, paths."""
    by_id = {u.node_id: u for u in graph.units}
    lines = [f"Model: {graph.model or graph.metadata.scan}", f"Prompt: {graph.prompt!r}", "", "Tokens (position: token):"]
    lines += [f"  {p}: {t!r}" for p, t in enumerate(graph.prompt_tokens)]
    lines += ["", "Traced output logits:"]
    lines += [f"  {u.token!r} p={u.probability if u.probability is not None else float('nan'):.4f}" for u in graph.logits]
    n_unlabelled = sum(1 for u in graph.neurons if not u.label)
    lines += ["", f"{len(graph.neurons)} neurons in the graph ({n_unlabelled} unlabelled), {len(graph.edge_table)} edges.",
              "", "Clusters (Infomap on |edge weight|, sorted by mean layer):"]
    for c in clusters:
        members = sorted((by_id[n] for n in c.node_ids), key=lambda u: -abs(u.attribution or 0.0))
        where = ", ".join(f"{t!r}@{p}×{n}" for p, t, n in c.positions[:4])
        lines.append(f"- {c.name}: {len(c.node_ids)} neurons, mean layer {c.mean_layer:.1f}, "
                     f"Σ|attribution| {c.total_abs_attribution:.3g}, positions {where}")
        for u in members[:members_per_cluster]:
            lines.append(f"    {display_unit(u)} attribution={u.attribution or 0.0:+.3g}")
    if not clusters:
        lines.append("  (no clusters: the graph has no neuron-to-neuron edges)")
    lines += ["", "Strongest paths from input tokens to the predicted token (score = product of each edge's share of its target's input):"]
    for n, p in enumerate(paths, 1):
        chain = " -> ".join(display_unit(by_id[i]) for i in p.node_ids)
        lines.append(f"  {n}. score={p.score:.3g} sign={'+' if p.sign > 0 else '-'}: {chain}")
    if not paths:
        lines.append("  (none found)")
    lines += [
        "",
        "Write a short analysis in Markdown with these sections:",
        "1. Summary — what the circuit computes, in 2-4 sentences.",
        "2. Clusters — one bullet per cluster: its apparent role.",
        "3. Main paths — how information flows from the input tokens to the prediction.",
        "4. Caveats — missing labels, weak evidence.",
    ]
    return "\n".join(lines)


def _api_key(labeling: LabelingSection, base_dir: str) -> str:
    if labeling.api_key_file:
        path = Path(labeling.api_key_file).expanduser()
        if not path.is_absolute():
            path = Path(base_dir) / path
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""
    return env_setting(labeling.api_key_env).strip() if labeling.api_key_env else ""


def llm_analysis(
    graph: Graph,
    clusters: Sequence[ClusterInfo],
    paths: Sequence[CircuitPath],
    labeling: LabelingSection,
    *,
    base_dir: str = ".",
    enabled: bool = True,
) -> LLMAnalysis:
    """Ask the configured LLM for a write-up; never raises for missing keys or LLM errors.

    Skipped (with the reason) when disabled or when neither an API key nor a base_url is set; a
    base_url without a key (a local vLLM server) is called with a placeholder key.
    """
    prompt = analysis_prompt(graph, clusters, paths)
    common = {"backend": labeling.backend, "model": labeling.model, "prompt_chars": len(prompt)}
    if not enabled:
        return LLMAnalysis(status="skipped", reason="LLM analysis disabled (--no-llm)", **common)
    key = _api_key(labeling, base_dir)
    if not key and not labeling.base_url:
        where = f"file {labeling.api_key_file}" if labeling.api_key_file else f"${labeling.api_key_env}"
        return LLMAnalysis(status="skipped", reason=f"no LLM API key ({where} is not set)", **common)
    key = key or "EMPTY"
    try:
        if labeling.backend == "anthropic":
            import anthropic

            client = anthropic.Anthropic(
                api_key=key, base_url=labeling.base_url or None,
                max_retries=labeling.max_retries, timeout=labeling.request_timeout,
            )
            msg = client.messages.create(
                model=labeling.model, max_tokens=labeling.max_answer_tokens, system=SYSTEM_PROMPT,
                messages=[{"role": "user", "content": prompt}],
            )
            text = "".join(getattr(block, "text", "") for block in msg.content).strip()
            usage = getattr(msg, "usage", None)
            tokens_in = int(getattr(usage, "input_tokens", 0) or 0)
            tokens_out = int(getattr(usage, "output_tokens", 0) or 0)
        else:
            import openai

            client = openai.OpenAI(
                api_key=key, base_url=labeling.base_url or None,
                max_retries=labeling.max_retries, timeout=labeling.request_timeout,
            )
            resp = client.chat.completions.create(
                model=labeling.model, max_tokens=labeling.max_answer_tokens,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            )
            text = (resp.choices[0].message.content or "").strip() if resp.choices else ""
            usage = getattr(resp, "usage", None)
            tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0)
            tokens_out = int(getattr(usage, "completion_tokens", 0) or 0)
    except Exception as exc:  # noqa: BLE001 - any SDK/network error becomes a "failed" section
        first = (str(exc).splitlines() or [""])[0][:300]
        return LLMAnalysis(status="failed", reason=f"{type(exc).__name__}: {first}", **common)
    if not text:
        return LLMAnalysis(status="failed", reason="the LLM returned an empty answer", **common)
    return LLMAnalysis(status="ok", text=text, input_tokens=tokens_in, output_tokens=tokens_out, **common)
