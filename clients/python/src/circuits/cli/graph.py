"""`circuits graph PROMPT`: trace one prompt into a RelP attribution graph (legacy viewer JSON).

Writes ``<output-dir>/relp-<slug>.json`` and prints one summary line: node and edge counts, the
traced logits with their probabilities, and the output path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from circuits.config import SMALL_MODEL
from circuits.cli._remote import add_remote_auth_arguments, remote_auth
from circuits.errors import InvalidArgument


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
    from circuits.labels import FileLabelSource, NeuronDB, PgSettings

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

    from circuits.schemas import slugify

    slug = slugify(args.slug) if args.slug else slugify(args.prompt)
    output = Path(args.output_dir) / f"relp-{slug}.json"
    if args.remote:
        from circuits.client.attribution import trace_remote

        graph = _apply_labels(trace_remote(args), args)
        graph.save(output)
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
        graph.save(output)
        bar.update(1)

    _print_summary(graph, output)
    return 0


def _print_summary(graph, output: Path) -> None:
    logits = ", ".join(f"{u.token!r} p={u.probability:.3f}" for u in graph.logits)
    exceeded = " (nodes exceeded max-nodes: neuron edges skipped)" if graph.metadata.nodes_exceeded else ""
    print(
        f"{len(graph.neurons)} nodes, {len(graph.edges)} edges{exceeded}; "
        f"top logits: {logits}; m={graph.metadata.metric_value:.4g}; wrote {output}"
    )
