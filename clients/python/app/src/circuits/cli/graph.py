"""`circuits graph PROMPT`: trace one prompt into a RelP attribution graph (legacy viewer JSON).

Writes ``<output-dir>/relp-<slug>.json`` (never over an existing file: the next free
``relp-<slug>-2.json``, ... unless ``--overwrite``), adds it to ``<output-dir>/graph-metadata.json``
(so the folder can be served as is by circuit-tracer's local server or ``circuits view DIR``) and
prints one summary line: node and edge counts (and what max-nodes did), the prompt form used, the
traced logits with their probabilities, and the output path. Notes on the targets, and a hint when
the top traced logit is weak, follow on stderr.

The trace flags are generated from :class:`~circuits_core.tracing.TraceRequest` (its field comments
are their help). :func:`trace_request` turns them into the one request that is traced, in
process or with ``--remote`` on an attribution server: both paths get the same object, and both
record what they decided (prompt form, targets, pruning) in the graph metadata the summary reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from circuits.backends import LocalModel, open_tracer
from circuits.cli._remote import add_remote_arguments, remote_from_args
from circuits_core.config import SMALL_MODEL
from circuits_core.errors import InvalidArgument, Unavailable
from circuits_core.fieldargs import add_field_arguments, field_values
from circuits_core.memory import EnginePlacement
from circuits_core.tracing import TraceRequest

if TYPE_CHECKING:
    from circuits_core.schemas import Graph

#: File formats `circuits graph --format` writes (circuits_core.graphio owns them).
GRAPH_FORMATS = ("json", "json.gz", "pb", "pb.gz")

#: The in-process MLP rule unless --mlp-rule says otherwise (a server traces with its own).
_MLP_RULE_DEFAULT = "relp"
#: Below this probability the top traced logit is "weak" and the summary is followed by a hint.
WEAK_LOGIT_P = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_field_arguments(parser, TraceRequest)
    parser.add_argument("--output-dir", default="graphs",
                        help="directory for the graph file relp-<slug>.json and its graph-metadata.json index, relative "
                             "to the working directory (default: %(default)s)")
    parser.add_argument("--format", default="json", choices=GRAPH_FORMATS,
                        help="graph file format: json (viewer JSON, listed in graph-metadata.json for circuit-tracer's "
                             "server), json.gz, or the compact framed protobuf pb / pb.gz (several times smaller, "
                             "for big graphs; `circuits view DIR` serves all four) (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing relp-<slug>.json (default: write relp-<slug>-2.json, -3, ... instead)")
    parser.add_argument("--labels", default=None, metavar="FILE",
                        help="fill node labels (clerp) from a label file (JSONL/JSON: layer, neuron, label)")
    parser.add_argument("--neurondb", action="store_true",
                        help="fill node labels from the PostgreSQL neuron database (PG_HOST, PG_PORT, PG_USER, "
                             "PG_PASSWORD, PG_DATABASE)")
    engine = parser.add_argument_group("in-process engine (ignored with --remote: the server has its own)")
    engine.add_argument("--model", default=SMALL_MODEL, help="hub id or local checkpoint directory (default: %(default)s)")
    engine.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 (default: %(default)s)")
    engine.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    engine.add_argument("--mlp-rule", default=_MLP_RULE_DEFAULT, choices=("relp", "stop_grad_gate", "none"),
                        help="MLP backward rule (default: %(default)s)")
    engine.add_argument("--edge-chunk-size", type=int, default=16,
                        help="targets per batched VJP; lowered automatically to fit memory (default: %(default)s)")
    add_field_arguments(engine, EnginePlacement)
    add_remote_arguments(parser, service="attribution", instead_of="tracing in-process")


def trace_request(args: argparse.Namespace) -> TraceRequest:
    """The request the `circuits graph` flags ask for, whether it is traced in process or remotely.

    The slug becomes the file stem ``relp-<slugified --slug or prompt>``.
    """
    from circuits_core.schemas import slugify

    values = field_values(args, TraceRequest)
    prompt = values.pop("prompt")
    if isinstance(prompt, str) and prompt.strip():
        values["slug"] = "relp-" + slugify(values.get("slug") or prompt)
    return TraceRequest(prompt=prompt, **values)


def _validate(args: argparse.Namespace) -> None:
    if args.labels and args.neurondb:
        raise InvalidArgument("--labels and --neurondb cannot be combined; pick one label source")
    if args.labels and not Path(args.labels).is_file():
        raise InvalidArgument(f"--labels: no such file {args.labels}")
    if args.edge_chunk_size < 1:
        raise InvalidArgument(f"--edge-chunk-size must be >= 1, got {args.edge_chunk_size}")
    if args.remote and args.mlp_rule != _MLP_RULE_DEFAULT:
        raise InvalidArgument("--mlp-rule cannot be changed with --remote (the server traces with its own rule)")
    placement = placement_from_args(args)
    if args.remote and placement != EnginePlacement():
        raise InvalidArgument("--memory-budget / --device-map cannot be used with --remote (the server has its own)")


def placement_from_args(args: argparse.Namespace) -> EnginePlacement:
    """The in-process engine's placement flags (--memory-budget, --device-map, ...) as one value."""
    return EnginePlacement(**field_values(args, EnginePlacement))


def _apply_labels(graph: Graph, args: argparse.Namespace) -> Graph:
    """Neuron labels from the chosen external source (label file or neurondb), if any."""
    if not (args.labels or args.neurondb):
        return graph
    from circuits_core.labels import FileLabelSource, NeuronDB, PgSettings

    keys = [u.key for u in graph.neurons]
    if args.labels:
        labels = FileLabelSource(args.labels).labels_for(keys)
    else:
        with NeuronDB(PgSettings.from_config()) as db:
            labels = db.labels_for(keys)
    return graph.with_labels(
        {k: r.label for k, r in labels.items() if r.label},
        input_labels={k: r.input_label for k, r in labels.items() if r.input_label},
    )


def run(args: argparse.Namespace) -> int:
    request = trace_request(args)
    _validate(args)
    remote = remote_from_args(args)

    output_dir = Path(args.output_dir)
    slug = request.slug if args.overwrite else free_slug(output_dir, request.slug, suffix=args.format)
    if slug != request.slug:
        request = dataclasses.replace(request, slug=slug)
    output = output_dir / f"{slug}.{args.format}"
    model = LocalModel(
        name=args.model, dtype=args.dtype, device=args.device,
        engine=(("mlp_rule", args.mlp_rule), ("edge_chunk_size", args.edge_chunk_size), ("progress", True),
                *placement_from_args(args).engine_options().items()),
    )
    # In process the tokenizer checks the targets first, then the weights load; the edge pass
    # shows the one progress bar.
    with closing(open_tracer(remote=remote, model=model, what="`circuits graph`", check=request)) as tracer:
        try:
            graph = tracer.trace(request)
        except Unavailable as exc:  # only a server is ever unavailable
            raise Unavailable(f"attribution server {args.remote} is unavailable: {exc}") from None
        graph = _apply_labels(graph, args)
        if args.format == "json":
            write_graph_json(graph, output)
        else:
            write_graph_file(graph, output)
    print(summary_line(graph, output), flush=True)
    for line in trace_notes(graph):
        print(line, file=sys.stderr)
    return 0


def free_slug(folder: Path, slug: str, suffix: str = "json") -> str:
    """``slug`` when ``folder/<slug>.<suffix>`` does not exist, else the first free ``<slug>-2``, ``-3``, ..."""
    if not (folder / f"{slug}.{suffix}").exists():
        return slug
    n = 2
    while (folder / f"{slug}-{n}.{suffix}").exists():
        n += 1
    return f"{slug}-{n}"


def write_graph_json(graph: Graph, output: Path) -> Path:
    """Write the graph's viewer JSON and list it in the folder's graph-metadata.json."""
    from circuits_core.graph_index import index_entry, update_graph_index
    from circuits_core.graphio import write_json

    legacy = graph.to_legacy()
    write_json(legacy, output)
    update_graph_index(output.parent, index_entry(legacy))
    return output


def write_graph_file(graph: Graph, output: Path) -> Path:
    """Write the graph in the format its name asks for (json.gz, pb, pb.gz); no index entry:
    circuit-tracer's server reads only .json, and `circuits view DIR` finds every graph file itself."""
    from circuits_core.graphio import write_graph

    output.parent.mkdir(parents=True, exist_ok=True)
    return write_graph(graph, output)


def _settings(graph: Graph) -> dict:
    return dict(graph.metadata.extra.get("generation_settings", {}) or {})


def summary_line(graph: Graph, output: Path) -> str:
    """One line: nodes and edges (and what max-nodes did), prompt form, traced logits, m, the file."""
    gs = _settings(graph)
    nodes = f"{len(graph.neurons)} nodes"
    pruned = int(gs.get("nodes_pruned", 0) or 0)
    if pruned:
        nodes += (f" (the {len(graph.neurons)} most influential of {gs.get('n_candidate_nodes', '?')} above tau; "
                  f"{pruned} pruned by --max-nodes {gs.get('max_nodes', '?')})")
    edges = f"{len(graph.edge_table)} edges"
    if graph.metadata.nodes_exceeded:
        edges += f" (over --max-nodes {gs.get('max_nodes', '?')}: neuron edges skipped)"
    form = gs.get("prompt_form_reason") or ("raw completion" if gs.get("raw") else "chat template")
    traced = {t.get("token_id"): t for t in gs.get("targets", ()) or ()}
    shown = []
    for u in graph.logits:
        text = f"{u.token!r} p={_probability(u.probability)}"
        target = traced.get(u.index)
        if target and len(target.get("pieces", ())) > 1:
            text += f" (first token of {target['text']!r})"
        shown.append(text)
    value = graph.metadata.metric_value
    m = f"; m={value:.4g}" if value is not None else ""
    return f"{nodes}, {edges}; prompt: {form}; traced logits: {', '.join(shown)}{m}; wrote {output}"


def _probability(p: float | None) -> str:
    if p is None:
        return "?"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.2g}"


def trace_notes(graph: Graph) -> list[str]:
    """``note:`` / ``warning:`` lines about the targets, and a ``hint:`` when the top traced logit is weak."""
    gs = _settings(graph)
    lines = [f"note: {note}" for note in gs.get("target_notes", ()) or ()]
    lines += [f"warning: {warning}" for warning in gs.get("target_warnings", ()) or ()]
    probabilities = [u.probability for u in graph.logits if u.probability is not None]
    top = max(probabilities, default=None)
    if top is not None and top < WEAK_LOGIT_P:
        tries = ["--chat (the chat template)" if gs.get("raw") else "--raw (completion form)",
                 "--answer-prefix TEXT (start the answer)"]
        if not gs.get("targets"):
            tries.append("--target-tokens TOKEN (the answer you expect)")
        lines.append(f"hint: the top traced logit has p={_probability(top)} (< {WEAK_LOGIT_P}), so the model may not be "
                     f"answering in this form: try {', '.join(tries[:-1])} or {tries[-1]}")
    return lines
