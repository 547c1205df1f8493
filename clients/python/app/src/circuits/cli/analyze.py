"""`circuits analyze`: graph -> labels -> clusters -> top paths -> LLM write-up -> report folder.

    circuits analyze "The capital of France is"              # one prompt, traced in-process
    circuits analyze --config configs/knowledge_circuits.yaml  # every prompt of a config
    circuits analyze --graph graphs/existing.json             # an existing graph

Each analysis writes report.md, report.html (interactive viewer), graph.json (labels,
clusters, qParams.supernodes) and summary.json into its folder: ``--output`` for one prompt or
graph, ``--output/<slug>`` for several (default ``<output.dir>/reports/<slug>``: without --config
``output/reports/<slug>/`` under the working directory; a config's relative paths resolve against
the config file's folder). Works without an LLM key: the analysis section then says it was skipped.
Neuron labels come from --labels, --atlas or the config's labeling section, never from a file that
happens to lie in the working directory.

Trace settings: a flag (generated from TraceSettings) wins over the config's ``graphs:`` section,
which wins over TraceSettings' defaults; a ``graphs.prompts_file`` line may set its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

from circuits.cli._remote import add_remote_arguments, remote_from_args
from circuits_core.fieldargs import add_field_arguments, field_values
from circuits_core.tracing import TraceSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="prompt to trace and analyse")
    parser.add_argument("--config", default=None, help="YAML config (model, graphs.prompts, labeling, output)")
    parser.add_argument("--graph", action="append", default=[], metavar="FILE",
                        help="analyse an existing graph file instead of tracing (repeatable)")
    parser.add_argument("--output", "-o", default=None,
                        help="report folder (several prompts: one subfolder each); default <output.dir>/reports/<slug>: "
                             "output/reports/<slug>/ in the working directory, or relative to the config file's folder "
                             "with --config")
    trace = parser.add_argument_group("trace settings")
    add_field_arguments(trace, TraceSettings, default_help=lambda name, default: f"default: config graphs.{name}, else {default}")
    engine = parser.add_argument_group("in-process engine (ignored with --remote)")
    engine.add_argument("--model", default=None, help="model id or checkpoint directory (default: config model.name)")
    engine.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | float64 (default: config model.dtype)")
    engine.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: config model.device)")
    add_remote_arguments(parser, service="attribution", instead_of="tracing in-process (default: config graphs.remote)")
    parser.add_argument("--atlas", default=None, help="DuckDB atlas to take neuron labels from (default: labeling.atlas_path)")
    parser.add_argument("--labels", default=None, help="label file (JSONL/JSON) to take neuron labels from")
    parser.add_argument("--paths", type=int, default=5, help="number of top paths to report (default: %(default)s)")
    parser.add_argument("--path-mode", choices=("product", "sum"), default="product",
                        help="path score: product of input shares, or sum of |weights| (default: %(default)s)")
    parser.add_argument("--no-llm", action="store_true", help="skip the LLM write-up")
    parser.add_argument("--backend", choices=("anthropic", "openai"), default=None, help="LLM API (default: labeling.backend)")
    parser.add_argument("--llm-model", default=None, help="LLM model name (default: labeling.model)")
    parser.add_argument("--base-url", default=None, help="LLM base URL (default: labeling.base_url)")


def _jobs(args: argparse.Namespace, config: Any, settings: TraceSettings) -> list[tuple[str, Any]]:
    """[(kind, item)]: ("graph", path) or ("prompt", (TraceRequest, folder name))."""
    from circuits_core.errors import InvalidArgument
    from circuits_core.schemas import slugify
    from circuits_core.tracing import parse_prompt_line

    def prompt_job(request: Any, name: str = "") -> tuple[str, Any]:
        return ("prompt", (request, name or "relp-" + slugify(request.prompt)))

    jobs: list[tuple[str, Any]] = [("graph", path) for path in args.graph]
    if args.prompt is not None:
        jobs.append(prompt_job(settings.request(args.prompt)))
    if not jobs and args.config:
        jobs += [prompt_job(settings.request(prompt)) for prompt in config.graphs.prompts]
        if config.graphs.prompts_file:
            path = config.resolve(config.graphs.prompts_file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                raise InvalidArgument(f"graphs.prompts_file {path}: cannot read") from None
            for n, line in enumerate(lines, 1):
                if line.strip():
                    item = parse_prompt_line(line, where=f"{path}:{n}", defaults=settings)
                    jobs.append(prompt_job(item.request, "" if item.prompt_id is None else str(item.prompt_id)))
    if not jobs:
        raise InvalidArgument("nothing to analyse: give a PROMPT, --graph FILE, or --config with graphs.prompts")
    return jobs


def run(args: argparse.Namespace) -> int:
    from circuits import analysis
    from circuits.backends import LocalModel, open_atlas, open_tracer
    from circuits_core.config import Config, load_config
    from circuits_core.errors import InvalidArgument
    from circuits_core.graphio import read_graph
    from circuits_core.schemas import slugify

    config = load_config(args.config) if args.config else Config()
    if args.paths < 0:
        raise InvalidArgument(f"--paths must be >= 0, got {args.paths}")
    settings = config.graphs.updated(**field_values(args, TraceSettings))
    jobs = _jobs(args, config, settings)

    labeling = config.labeling
    overrides = {"backend": args.backend, "model": args.llm_model, "base_url": args.base_url}
    labeling = dataclasses.replace(labeling, **{k: v for k, v in overrides.items() if v is not None})
    if args.labels:
        labeling = dataclasses.replace(labeling, method="file", labels_file=str(Path(args.labels).resolve()))
    elif not args.config and labeling.method == "progressive":
        # Without a config the labeler's default output file (labels.jsonl) is not a label source:
        # a file that happens to lie in the working directory must not label a report silently.
        labeling = dataclasses.replace(labeling, method="none")
        stray = Path(config.labeling.labels_path)
        if stray.is_file():
            print(f"note: {stray} is not used for labels; pass --labels {stray} to label neurons from it", file=sys.stderr)
    atlas_path = args.atlas if args.atlas is not None else (str(config.resolve(labeling.atlas_path)) if labeling.atlas_path else "")
    analysis_settings = analysis.AnalysisSettings(
        n_paths=args.paths, path_mode=args.path_mode, use_llm=not args.no_llm, llm=labeling, base_dir=config.base_dir
    )
    remote = remote_from_args(args, default_address=config.graphs.remote)
    several = len(jobs) > 1
    model = LocalModel(
        name=args.model or config.model.name, dtype=args.dtype or config.model.dtype, device=args.device or config.model.device,
        engine=(("progress", not several),),  # one prompt: the trace's bar; several: the bar over prompts
    )

    root = Path(args.output) if args.output else config.resolve(config.output.dir) / "reports"
    index = []
    from tqdm.auto import tqdm

    with ExitStack() as stack:
        setup_warnings: list[str] = []
        atlas = stack.enter_context(closing(open_atlas(remote=None, path=atlas_path, what="atlas labels"))) if atlas_path else None
        label_sources = analysis.configured_label_sources(
            labeling, stack=stack, base_dir=config.base_dir, atlas=atlas, warn=setup_warnings.append
        )
        tracer = None
        for kind, item in tqdm(jobs, desc="analyze", unit="graph", file=sys.stderr, disable=not several):
            if kind == "graph":
                graph = read_graph(item)
                name = Path(str(item)).name.split(".")[0]
            else:
                request, name = item
                if tracer is None:
                    tracer = stack.enter_context(closing(open_tracer(remote=remote, model=model, what="`circuits analyze`")))
                graph = tracer.trace(request)
            out_dir = (root / slugify(name)) if several or not args.output else root
            result = analysis.analyze_graph(graph, label_sources=label_sources, settings=analysis_settings)
            result = dataclasses.replace(result, warnings=(*setup_warnings, *result.warnings))
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
    if several:
        root.mkdir(parents=True, exist_ok=True)
        (root / "index.json").write_text(json.dumps({"reports": index}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0
