"""`circuits graph PROMPT`: trace one prompt into a RelP attribution graph (legacy viewer JSON).

Writes ``<output-dir>/relp-<slug>.json``, adds it to ``<output-dir>/graph-metadata.json`` (so the
folder can be served as is by circuit-tracer's local server or ``circuits view DIR``) and prints
one summary line: node and edge counts, the traced logits with their probabilities, and the
output path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuits_core.config import SMALL_MODEL
from circuits.cli._remote import add_remote_auth_arguments, remote_auth
from circuits_core.errors import InvalidArgument, Unavailable
from circuits_core.tracing import TraceSpec

if TYPE_CHECKING:
    from circuits_core.schemas import Graph


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user prompt to trace")
    parser.add_argument("--model", default=SMALL_MODEL, help="hub id or local checkpoint directory (default: %(default)s)")
    parser.add_argument("--k", type=int, default=5, help="number of top logits combined into the metric (default: %(default)s)")
    parser.add_argument("--tau", type=float, default=0.005, help="node threshold: keep |RelP| >= tau*|m| (default: %(default)s)")
    parser.add_argument("--target-tokens", nargs="+", default=None, metavar="TOKEN",
                        help="trace the sum of these tokens' logits instead of the top k")
    parser.add_argument("--contrastive", nargs=2, default=None, metavar=("POS", "NEG"),
                        help="trace logit(POS) - logit(NEG)")
    parser.add_argument("--raw", action="store_true", help="tokenize the prompt as is (no chat template)")
    parser.add_argument("--answer-prefix", default="", help="partial assistant answer appended to the prompt")
    parser.add_argument("--target-position", type=int, default=None,
                        help="token position whose logits are traced (default: last; negative counts from the end)")
    parser.add_argument("--max-nodes", type=int, default=500,
                        help="above this many selected neurons, neuron edges are skipped (default: %(default)s)")
    parser.add_argument("--mlp-rule", default="relp", choices=("relp", "stop_grad_gate", "none"),
                        help="MLP backward rule (default: %(default)s)")
    parser.add_argument("--slug", default=None, help="file slug (default: from the prompt)")
    parser.add_argument("--output-dir", default="graphs", help="directory for the graph file (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument("--edge-chunk-size", type=int, default=16,
                        help="targets per batched VJP; lowered automatically to fit memory (default: %(default)s)")
    parser.add_argument("--labels", default=None, metavar="FILE",
                        help="fill node labels (clerp) from a label file (JSONL/JSON: layer, neuron, label)")
    parser.add_argument("--neurondb", action="store_true",
                        help="fill node labels from the PostgreSQL neuron database (PG_HOST, PG_PORT, PG_USER, "
                             "PG_PASSWORD, PG_DATABASE)")
    parser.add_argument("--remote", default=None, metavar="HOST:PORT",
                        help="trace on a remote attribution service instead of in-process")
    add_remote_auth_arguments(parser)


def _validate(args: argparse.Namespace) -> None:
    if not args.prompt or not args.prompt.strip():
        raise InvalidArgument("prompt is empty")
    if args.contrastive is not None and args.target_tokens:
        raise InvalidArgument("--contrastive and --target-tokens cannot be combined; pick one target mode")
    if args.k < 1:
        raise InvalidArgument(f"--k must be >= 1, got {args.k}")
    if args.tau < 0:
        raise InvalidArgument(f"--tau must be >= 0, got {args.tau}")
    if args.max_nodes < 0:
        raise InvalidArgument(f"--max-nodes must be >= 0, got {args.max_nodes}")
    if args.labels and args.neurondb:
        raise InvalidArgument("--labels and --neurondb cannot be combined; pick one label source")
    if args.labels and not Path(args.labels).is_file():
        raise InvalidArgument(f"--labels: no such file {args.labels}")
    if args.edge_chunk_size < 1:
        raise InvalidArgument(f"--edge-chunk-size must be >= 1, got {args.edge_chunk_size}")


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument(f"device {device!r} requested but no CUDA GPU is available")
    try:
        torch.device(device)
    except RuntimeError:
        raise InvalidArgument(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None


def _apply_labels(graph, args: argparse.Namespace):
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
    return graph.with_labels({k: r.label for k, r in labels.items()})


def run(args: argparse.Namespace) -> int:
    _validate(args)
    from tqdm.auto import tqdm

    from circuits_core.schemas import slugify

    slug = slugify(args.slug) if args.slug else slugify(args.prompt)
    output = Path(args.output_dir) / f"relp-{slug}.json"
    if args.remote:

        graph = _apply_labels(trace_remote(args), args)
        write_graph_json(graph, output)
        _print_summary(graph, output)
        return 0

    from circuits_attribution import RelPAttributor, RelPConfig, load_model
    from circuits_attribution.models import resolve_dtype

    _check_device(args.device)
    resolve_dtype(args.dtype)

    with tqdm(total=3, desc="graph", unit="step", file=sys.stderr, leave=False) as bar:
        bar.set_postfix_str("loading model")
        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        bar.update(1)
        config = RelPConfig(
            k=args.k,
            tau=args.tau,
            target_tokens=tuple(args.target_tokens or ()),
            contrastive=tuple(args.contrastive) if args.contrastive else None,
            target_position=args.target_position,
            raw=args.raw,
            answer_prefix=args.answer_prefix,
            max_nodes=args.max_nodes,
            mlp_rule=args.mlp_rule,
            edge_chunk_size=args.edge_chunk_size,
            model_name=args.model,
        )
        attributor = RelPAttributor(loaded.model, loaded.tokenizer, config)
        bar.set_postfix_str("tracing")
        graph = attributor.trace(args.prompt, progress=True, slug=f"relp-{slug}")
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
    from circuits_core.schemas import save_legacy

    legacy = graph.to_legacy()
    save_legacy(legacy, output)
    update_graph_index(output.parent, index_entry(legacy))
    return output


def _print_summary(graph, output: Path) -> None:
    logits = ", ".join(f"{u.token!r} p={u.probability:.3f}" for u in graph.logits)
    exceeded = " (nodes exceeded max-nodes: neuron edges skipped)" if graph.metadata.nodes_exceeded else ""
    print(
        f"{len(graph.neurons)} nodes, {len(graph.edges)} edges{exceeded}; "
        f"top logits: {logits}; m={graph.metadata.metric_value:.4g}; wrote {output}"
    )


# -- `circuits graph --remote HOST:PORT` -----------------------------------------------------------
def trace_spec_from_args(args: argparse.Namespace) -> TraceSpec:
    """The TraceSpec the `circuits graph` flags ask for (names as in cli/graph.py)."""

    def arg(*names: str, default: Any = None) -> Any:
        for name in names:
            value = getattr(args, name, None)
            if value is not None:
                return value
        return default

    target_tokens = arg("target_tokens", "targets", default=()) or ()
    if isinstance(target_tokens, str):
        target_tokens = (target_tokens,)
    contrastive = arg("contrastive")
    return TraceSpec(
        prompt=arg("prompt", default=""),
        k=int(arg("k", "top_k", default=0) or 0),
        target_tokens=tuple(target_tokens),
        contrastive=tuple(contrastive) if contrastive else None,
        raw=bool(arg("raw", default=False)),
        answer_prefix=arg("answer_prefix", default="") or "",
        target_position=arg("target_position"),
        tau=arg("tau", "node_threshold"),
        max_nodes=arg("max_nodes"),
        slug=arg("slug", default="") or "",
    )


def trace_remote(args: argparse.Namespace) -> Graph:
    """Trace ``args.prompt`` on the server at ``args.remote`` with the `circuits graph` flags.

    The returned graph is what the in-process engine would produce for the same flags (only
    ``metadata.create_time_ms`` differs), so `circuits graph` writes it the same way.
    """
    import dataclasses

    from circuits_core.schemas import slugify

    target = getattr(args, "remote", "") or ""
    if not target:
        raise InvalidArgument("--remote needs HOST:PORT of an attribution server")
    if getattr(args, "mlp_rule", "relp") not in (None, "relp"):
        raise InvalidArgument("--mlp-rule cannot be changed with --remote (the server traces with its own rule)")
    spec = trace_spec_from_args(args)
    # Same slug as the in-process path of `circuits graph`.
    spec = dataclasses.replace(spec, slug="relp-" + slugify(spec.slug or spec.prompt))
    from circuits_sdk.attribution import DEFAULT_TRACE_TIMEOUT, AttributionClient

    with AttributionClient(target, **remote_auth(args)) as client:
        try:
            return client.trace(spec, timeout=getattr(args, "timeout", None) or DEFAULT_TRACE_TIMEOUT)
        except Unavailable as exc:
            raise Unavailable(f"attribution server {target} is unavailable: {exc}") from None
