"""`circuits connectivity`: weight-based structure of a model, from its weights alone.

    circuits connectivity --model HuggingFaceTB/SmolLM2-135M-Instruct --output connectivity/
    circuits connectivity --output conn/ --parts weights --edges-per-polarity 50

Writes output projections (tokens each neuron promotes / suppresses), input projections (tokens
whose embeddings activate it), weight-graph edges (top excitatory / inhibitory upstream neurons of
every neuron) and, with ``--parts similarity``, output-projection similarity edges into one folder
(``docs/connectivity.md``). Each layer is stored when done; running the same command again resumes.
``circuits build-db --connectivity DIR`` puts the folder into the atlas.
"""

from __future__ import annotations

import argparse
import sys

from circuits_core.config import SMALL_MODEL
from circuits_core.connectivity import PARTS, ConnectivitySpec
from circuits_core.errors import InvalidArgument
from circuits_core.fieldargs import add_field_arguments, field_values

EXAMPLES = """examples:
  circuits connectivity --model HuggingFaceTB/SmolLM2-135M-Instruct --output connectivity/
  circuits connectivity --output connectivity/ --parts similarity          # add a part to the same folder
  circuits build-db --connectivity connectivity/ --edges-from weight_graph --output weights.duckdb
files and formulas: docs/connectivity.md"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default=SMALL_MODEL, help="hub id or local checkpoint directory (default: %(default)s)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="output folder (created; an existing one from the same model and settings is resumed)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    add_field_arguments(parser, ConnectivitySpec)
    parser.add_argument("--show", type=int, default=3, metavar="N",
                        help="print the top promoted tokens of N neurons of the last layer (default: %(default)s; 0: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    for part in getattr(args, "parts", ()):
        if part not in PARTS:
            raise InvalidArgument(f"--parts: unknown part {part!r} (choose from {', '.join(PARTS)})")
    spec = ConnectivitySpec(**field_values(args, ConnectivitySpec))
    from circuits_core.connectivity_files import ConnectivityFolder

    ConnectivityFolder.check_resumable(args.output, spec)  # fail before loading the model
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgument(f"device {args.device!r} requested but no CUDA GPU is available")
    from circuits_attribution import load_model
    from circuits_attribution.connectivity import compute_connectivity

    loaded = load_model(args.model, dtype=spec.dtype, device=args.device)
    report = compute_connectivity(
        loaded.model, loaded.tokenizer, spec, args.output, model_name=args.model, device=args.device,
        progress=not args.quiet,
    )
    parts = ", ".join(
        f"{part} {report.seconds[part]:.1f} s" + (f" ({report.resumed_layers[part]} layers resumed)" if report.resumed_layers[part] else "")
        for part in spec.parts
    )
    print(f"wrote {report.folder}: {parts}; total {report.total_seconds:.1f} s", file=sys.stderr)
    if args.show and "output" in spec.parts:
        print(format_top_tokens(report.folder, args.show))
    return 0


def format_top_tokens(folder, count: int, *, tokens: int = 8) -> str:
    """The top promoted tokens of the ``count`` last-layer neurons with the largest logit effect."""
    from circuits_core.connectivity_files import ConnectivityFolder

    table = ConnectivityFolder.open(folder).output_projections()
    last = max(table.column("layer").to_pylist())
    rows = [r for r in table.to_pylist() if r["layer"] == last]
    rows.sort(key=lambda r: -r["logit_effect"])
    lines = [f"top promoted tokens of the {min(count, len(rows))} layer-{last} neurons with the largest logit effect:"]
    for r in rows[:count]:
        shown = ", ".join(repr(t) for t in r["promote_tokens"][:tokens])
        lines.append(f"  L{r['layer']}/N{r['neuron']} (max |o| {r['logit_effect']:.3f}): {shown}")
    return "\n".join(lines)
