"""`circuits graph PROMPT`: trace one prompt into a RelP attribution graph (legacy viewer JSON).

Writes ``<output-dir>/relp-<slug>.json``, adds it to ``<output-dir>/graph-metadata.json`` (so the
folder can be served as is by circuit-tracer's local server or ``circuits view DIR``) and prints
one summary line: node and edge counts, the traced logits with their probabilities, and the
output path.

The trace flags are generated from :class:`~circuits_core.tracing.TraceRequest` (its field comments
are their help). :func:`trace_request` turns them into the one request that is traced, in
process or with ``--remote`` on an attribution server: both paths get the same object.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from circuits.backends import LocalModel, open_tracer
from circuits.cli._remote import add_remote_arguments, remote_from_args
from circuits_core.config import SMALL_MODEL
from circuits_core.errors import InvalidArgument, Unavailable
from circuits_core.fieldargs import add_field_arguments, field_values
from circuits_core.tracing import TraceRequest

if TYPE_CHECKING:
    from circuits_core.schemas import Graph

#: The in-process MLP rule unless --mlp-rule says otherwise (a server traces with its own).
_MLP_RULE_DEFAULT = "relp"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_field_arguments(parser, TraceRequest)
    parser.add_argument("--output-dir", default="graphs", help="directory for the graph file (default: %(default)s)")
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
    from tqdm.auto import tqdm

    output = Path(args.output_dir) / f"{request.slug}.json"
    model = LocalModel(
        name=args.model, dtype=args.dtype, device=args.device,
        engine=(("mlp_rule", args.mlp_rule), ("edge_chunk_size", args.edge_chunk_size), ("progress", True)),
    )
    with closing(open_tracer(remote=remote, model=model, what="`circuits graph`")) as tracer:
        # In process the model is loaded now; the edge pass shows its own bar while tracing.
        with tqdm(total=2, desc="graph", unit="step", file=sys.stderr, leave=False, disable=remote is not None) as bar:
            bar.set_postfix_str("tracing")
            try:
                graph = tracer.trace(request)
            except Unavailable as exc:  # only a server is ever unavailable
                raise Unavailable(f"attribution server {args.remote} is unavailable: {exc}") from None
            graph = _apply_labels(graph, args)
            bar.update(1)
            bar.set_postfix_str("writing")
            write_graph_json(graph, output)
            bar.update(1)
    _print_summary(graph, output)
    return 0


def write_graph_json(graph: Graph, output: Path) -> Path:
    """Write the graph's viewer JSON and list it in the folder's graph-metadata.json."""
    from circuits_core.graph_index import index_entry, update_graph_index
    from circuits_core.graphio import write_json

    legacy = graph.to_legacy()
    write_json(legacy, output)
    update_graph_index(output.parent, index_entry(legacy))
    return output


def _print_summary(graph: Graph, output: Path) -> None:
    logits = ", ".join(f"{u.token!r} p={u.probability:.3f}" for u in graph.logits)
    exceeded = " (nodes exceeded max-nodes: neuron edges skipped)" if graph.metadata.nodes_exceeded else ""
    print(
        f"{len(graph.neurons)} nodes, {len(graph.edge_table)} edges{exceeded}; "
        f"top logits: {logits}; m={graph.metadata.metric_value:.4g}; wrote {output}"
    )
