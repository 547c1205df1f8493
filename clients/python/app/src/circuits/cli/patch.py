"""`circuits patch --clean PROMPT --corrupt PROMPT`: activation patching with RelP's prediction beside it.

    circuits patch --clean "The capital of France is" --corrupt "The capital of Germany is"
    circuits patch --clean ... --corrupt ... --graph graphs/relp-france.json --top 20
    circuits patch --clean ... --corrupt ... --neurons 12:345 20:7:-1 --target-tokens " Paris" " Berlin"

Runs both prompts; for each neuron (and for the whole set) replaces its activation in one run by
its value from the other run -- noising (clean run, corrupt value) and denoising (corrupt run, clean
value) -- and reports the change of the metric, by default the logit difference of the two prompts'
top answers. Beside each effect: the neuron's RelP and the first-order RelP prediction of the
noising effect, and the Spearman rank correlation of predictions and measured effects. Neurons
default to the top ``--top`` of ``--graph`` (a graph of the clean prompt), or of the clean prompt's
RelP scores when no graph is given.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from contextlib import closing

from circuits.backends import LocalModel, open_patcher
from circuits.cli._remote import add_remote_arguments, remote_from_args
from circuits_core.config import SMALL_MODEL
from circuits_core.errors import InvalidArgument
from circuits_core.fieldargs import field_docs
from circuits_core.patching import DEFAULT_TOP, PatchRequest


EXAMPLES = """examples:
  circuits patch --raw --clean "The capital of France is" --corrupt "The capital of Germany is"
  circuits patch --raw --clean "The capital of France is" --corrupt "The capital of Germany is" \\
      --graph graphs/relp-france.json --top 50 --json patch.json
  circuits patch --raw --clean ... --corrupt ... --neurons 29:1042:-1 25:1120 --target-tokens " Paris" " Berlin"
noising = m(clean run, neuron from corrupt) - m(clean); denoising = m(corrupt run, neuron from clean) - m(corrupt);
predicted = RelP first-order estimate of noising (docs/connectivity.md)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    docs = field_docs(PatchRequest)
    parser.add_argument("--clean", required=True, help=docs["clean"])
    parser.add_argument("--corrupt", required=True, help=docs["corrupt"])
    parser.add_argument("--graph", default=None, metavar="FILE",
                        help="graph of the clean prompt; its top --top neurons (by |RelP|, at their positions) are patched")
    parser.add_argument("--neurons", nargs="+", default=None, metavar="L:N[:POS]", help=docs["neurons"])
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"{docs['top']} (default: %(default)s)")
    parser.add_argument("--target-tokens", nargs="+", default=None, metavar="TOKEN", help=docs["target_tokens"])
    parser.add_argument("--raw", action="store_true", help=docs["raw"])
    parser.add_argument("--answer-prefix", default="", help=docs["answer_prefix"])
    parser.add_argument("--model", default=SMALL_MODEL, help="hub id or local checkpoint directory (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument("--show", type=int, default=20, help="neurons listed in the table (default: %(default)s)")
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="also write the full result as JSON")
    add_remote_arguments(parser, service="attribution", instead_of="loading --model in-process (the server's model)")
    parser.add_argument("--timeout", type=float, default=600.0, help="remote call timeout in seconds (default: %(default)s)")


def neurons_from_graph(path: str, clean: str, top: int, *, raw: bool = False, answer_prefix: str = ""):
    """The graph's top ``top`` neurons by |attribution| (at their positions); its prompt must be
    ``clean``, encoded the same way (raw / answer prefix) so the positions mean the same tokens."""
    from circuits_core.graphio import read_graph
    from circuits_core.patching import PatchNeuron

    if not Path(path).is_file():
        raise InvalidArgument(f"--graph {path}: no such file")
    graph = read_graph(path)
    if graph.prompt.strip() != clean.strip():
        raise InvalidArgument(f"--graph {path} was traced for {graph.prompt!r}, not the --clean prompt {clean!r}")
    settings = dict(graph.metadata.extra.get("generation_settings") or {})
    if "raw" in settings and bool(settings["raw"]) != raw:
        flag = "with --raw" if settings["raw"] else "without --raw"
        raise InvalidArgument(f"--graph {path} was traced {flag}; patch the same way so its token positions match")
    if str(settings.get("answer_prefix") or "") != answer_prefix:
        raise InvalidArgument(f"--graph {path} was traced with answer prefix {settings.get('answer_prefix')!r}; pass the same --answer-prefix")
    neurons = sorted(graph.neurons, key=lambda u: (-abs(u.attribution or 0.0), u.layer, u.index, u.position or 0))
    if not neurons:
        raise InvalidArgument(f"--graph {path} has no neurons to patch")
    return tuple(PatchNeuron(layer=u.layer, index=u.index, position=u.position) for u in neurons[:top])


def _finite(value):
    """JSON-safe copy: NaN / inf become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def format_result(result, *, show: int) -> str:
    def num(value: float) -> str:
        return "     nan" if not math.isfinite(value) else f"{value:+8.3f}"

    lines = [
        f"metric m = {result.metric}: clean {result.clean_metric:+.3f}, corrupt {result.corrupt_metric:+.3f} "
        f"(gap {result.clean_metric - result.corrupt_metric:+.3f})",
        f"{len(result.neurons)} neurons patched; noising = m(clean with corrupt value) - m(clean), "
        "denoising = m(corrupt with clean value) - m(corrupt); predicted = RelP first-order estimate of noising",
        f"  {'neuron':<14} {'RelP':>8} {'predicted':>9} {'noising':>8} {'denoising':>9}",
    ]
    for effect in result.neurons[:show]:
        lines.append(f"  {effect.describe():<14} {num(effect.relp)} {num(effect.predicted):>9} {num(effect.noising)} {num(effect.denoising):>9}")
    if len(result.neurons) > show:
        lines.append(f"  ... {len(result.neurons) - show} more (--show N, --json FILE)")
    lines.append(
        f"whole set: noising {result.set_noising:+.3f} (predicted {result.set_predicted:+.3f}), "
        f"denoising {result.set_denoising:+.3f}"
    )
    lines.append(
        f"rank correlation (Spearman) of predicted vs measured noising over the {result.compared} neurons whose "
        f"activation differs between the prompts: {result.rank_correlation:.3f}; "
        f"of |predicted| vs |measured|: {result.magnitude_rank_correlation:.3f}"
    )
    unchanged = len(result.neurons) - result.compared
    if unchanged:
        lines.append(f"({unchanged} neurons have the same activation in both prompts -- positions before the first "
                     f"differing token {result.first_difference} -- so patching them changes nothing)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from circuits_core.patching import parse_patch_neuron

    if args.graph and args.neurons:
        raise InvalidArgument("--graph and --neurons cannot be combined; pick where the neurons come from")
    if args.top < 1:
        raise InvalidArgument(f"--top must be >= 1, got {args.top}")
    if args.show < 0:
        raise InvalidArgument(f"--show must be >= 0, got {args.show}")
    neurons: tuple = ()
    if args.neurons:
        neurons = tuple(parse_patch_neuron(spec) for spec in args.neurons)
    elif args.graph:
        neurons = neurons_from_graph(args.graph, args.clean, args.top, raw=args.raw, answer_prefix=args.answer_prefix)
    request = PatchRequest(
        clean=args.clean, corrupt=args.corrupt, neurons=neurons, top=args.top,
        target_tokens=tuple(args.target_tokens or ()), raw=args.raw, answer_prefix=args.answer_prefix,
    )
    model = LocalModel(name=args.model, dtype=args.dtype, device=args.device)
    with closing(open_patcher(remote=remote_from_args(args, timeout=args.timeout), model=model, what="`circuits patch`")) as patcher:
        result = patcher.patch(request)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(_finite(asdict(result)), indent=1) + "\n", encoding="utf-8")
    print(format_result(result, show=args.show))
    return 0
