"""`circuits analyze`: graph -> labels -> clusters -> top paths -> LLM write-up -> report folder.

    circuits analyze "The capital of France is"              # one prompt, traced in-process
    circuits analyze --config configs/knowledge_circuits.yaml  # every prompt of a config
    circuits analyze --graph graphs/existing.json             # an existing graph

Each analysis writes report.md, report.html (interactive viewer), graph.json (labels,
clusters, qParams.supernodes) and summary.json into its folder: ``--output`` for one prompt or
graph, ``--output/<slug>`` for several (default ``<output.dir>/reports``). Works without an
LLM key: the analysis section then says it was skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from circuits.cli._remote import add_remote_auth_arguments, remote_auth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="prompt to trace and analyse")
    parser.add_argument("--config", default=None, help="YAML config (model, graphs.prompts, labeling, output)")
    parser.add_argument("--graph", action="append", default=[], metavar="FILE",
                        help="analyse an existing graph file instead of tracing (repeatable)")
    parser.add_argument("--output", "-o", default=None,
                        help="report folder (several prompts: one subfolder each); default <output.dir>/reports[/<slug>]")
    parser.add_argument("--model", default=None, help="model id or checkpoint directory (default: config model.name)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | float64")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N")
    parser.add_argument("--k", type=int, default=None, help="top logits in the metric (default: config graphs.k)")
    parser.add_argument("--tau", type=float, default=None, help="node threshold (default: config graphs.tau)")
    parser.add_argument("--max-nodes", type=int, default=None, help="node cap (default: config graphs.max_nodes)")
    parser.add_argument("--target-tokens", nargs="+", default=None, metavar="TOKEN", help="trace these tokens' logits")
    parser.add_argument("--raw", action="store_true", default=None, help="no chat template")
    parser.add_argument("--answer-prefix", default=None, help="partial assistant answer appended to the prompt")
    parser.add_argument("--remote", default=None, metavar="HOST:PORT", help="trace on an attribution service")
    add_remote_auth_arguments(parser)
    parser.add_argument("--atlas", default=None, help="DuckDB atlas to take neuron labels from (default: labeling.atlas_path)")
    parser.add_argument("--labels", default=None, help="label file (JSONL/JSON) to take neuron labels from")
    parser.add_argument("--paths", type=int, default=5, help="number of top paths to report (default: %(default)s)")
    parser.add_argument("--path-mode", choices=("product", "sum"), default="product",
                        help="path score: product of input shares, or sum of |weights| (default: %(default)s)")
    parser.add_argument("--no-llm", action="store_true", help="skip the LLM write-up")
    parser.add_argument("--backend", choices=("anthropic", "openai"), default=None, help="LLM API (default: labeling.backend)")
    parser.add_argument("--llm-model", default=None, help="LLM model name (default: labeling.model)")
    parser.add_argument("--base-url", default=None, help="LLM base URL (default: labeling.base_url)")


def _jobs(args: argparse.Namespace, config) -> list[tuple[str, object]]:
    """[(kind, item)]: ("graph", path) or ("prompt", (prompt, target_tokens, slug))."""
    from circuits_core.errors import CorruptInput, InvalidArgument

    jobs: list[tuple[str, object]] = []
    for path in args.graph:
        jobs.append(("graph", path))
    if args.prompt is not None:
        if not args.prompt.strip():
            raise InvalidArgument("prompt is empty")
        jobs.append(("prompt", (args.prompt, (), "")))
    if not jobs and args.config:
        for prompt in config.graphs.prompts:
            jobs.append(("prompt", (prompt, (), "")))
        if config.graphs.prompts_file:
            path = config.resolve(config.graphs.prompts_file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError:
                raise InvalidArgument(f"graphs.prompts_file {path}: cannot read") from None
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise CorruptInput(f"{path}:{n}: not a JSON object") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise CorruptInput(f"{path}:{n}: expected an object with a 'prompt' string")
                jobs.append(("prompt", (obj["prompt"], tuple(obj.get("target_tokens") or ()), str(obj.get("id", "")))))
    if not jobs:
        raise InvalidArgument("nothing to analyse: give a PROMPT, --graph FILE, or --config with graphs.prompts")
    return jobs


def run(args: argparse.Namespace) -> int:
    from circuits import analysis
    from circuits_core.config import Config, load_config
    from circuits_core.errors import InvalidArgument
    from circuits_core.graphio import read_graph
    from circuits_core.schemas import slugify

    config = load_config(args.config) if args.config else Config()
    if args.paths < 0:
        raise InvalidArgument(f"--paths must be >= 0, got {args.paths}")
    jobs = _jobs(args, config)

    labeling = config.labeling
    overrides = {"backend": args.backend, "model": args.llm_model, "base_url": args.base_url}
    labeling = dataclasses.replace(labeling, **{k: v for k, v in overrides.items() if v is not None})
    if args.labels:
        labeling = dataclasses.replace(labeling, method="file", labels_file=str(Path(args.labels).resolve()))
    atlas = args.atlas if args.atlas is not None else (str(config.resolve(labeling.atlas_path)) if labeling.atlas_path else "")
    label_settings = analysis.LabelSettings(atlas_path=atlas, labeling=labeling, base_dir=config.base_dir)
    trace = analysis.TraceSettings.from_config(
        config, model=args.model, dtype=args.dtype, device=args.device, k=args.k, tau=args.tau,
        max_nodes=args.max_nodes, raw=args.raw, answer_prefix=args.answer_prefix,
        target_tokens=tuple(args.target_tokens) if args.target_tokens else None, remote=args.remote,
        **(remote_auth(args) if args.remote else {}),
    )
    source = analysis.GraphSource(trace)

    if args.output:
        root = Path(args.output)
    else:
        root = config.resolve(config.output.dir) / "reports"
    several = len(jobs) > 1
    index = []
    from tqdm.auto import tqdm

    try:
        for kind, item in tqdm(jobs, desc="analyze", unit="graph", file=sys.stderr, disable=not several):
            if kind == "graph":
                graph = read_graph(item)
                name = Path(str(item)).name.split(".")[0]
            else:
                prompt, targets, slug = item
                graph = source.trace(prompt, target_tokens=targets)
                name = slug or ("relp-" + slugify(prompt))
            out_dir = (root / slugify(name)) if several or not args.output else root
            result = analysis.analyze_graph(
                graph, labels=label_settings, n_paths=args.paths, path_mode=args.path_mode, use_llm=not args.no_llm,
            )
            files = analysis.write_report(result, out_dir)
            for warning in result.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            s = analysis.summary_dict(result)
            llm = result.analysis.status + ("" if result.analysis.status == "ok" else f" ({result.analysis.reason})")
            print(
                f"{s['counts']['neurons']} neurons, {s['counts']['edges']} edges, {s['counts']['clusters']} clusters, "
                f"{s['labels']['unlabelled']} unlabelled; LLM analysis {llm}; wrote {files['report_html']}",
                flush=True,
            )
            index.append({"prompt": graph.prompt, "folder": str(out_dir), "clusters": s["counts"]["clusters"],
                          "neurons": s["counts"]["neurons"], "analysis": result.analysis.status})
    finally:
        source.close()
    if several:
        root.mkdir(parents=True, exist_ok=True)
        (root / "index.json").write_text(json.dumps({"reports": index}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0
