"""`circuits intervene PROMPT --neuron L:N[:POS,...]=MODE ...`: change neurons, compare predictions.

Runs the real model on the prompt (in the model's own prompt form unless ``--raw`` / ``--chat``) with
the neurons changed and prints the baseline and intervened top next tokens (and, with
``--generate N``, both greedy continuations). Without ``--neuron`` it shows the baseline alone. Neuron specs: ``LAYER:INDEX[:POSITIONS]=zero|mean|scale:F|set:V`` where
POSITIONS is a comma list of prompt positions (negative: from the end), ``prompt`` (default: every
prompt position) or ``all`` (also every generated token).
"""

from __future__ import annotations

import argparse
import json
from contextlib import closing

from circuits.backends import LocalModel, open_intervener
from circuits.cli._remote import add_remote_arguments, remote_from_args
from circuits_core.config import SMALL_MODEL
from circuits_core.errors import InvalidArgument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user prompt")
    parser.add_argument("--neuron", action="append", default=[], metavar="L:N[:POS,...]=MODE",
                        help="an intervention, e.g. 12:345=zero, 3:17:4,5=set:1.5, 20:9:-1=scale:2, 7:100:all=mean "
                             "(repeatable; none: show the baseline prediction only)")
    parser.add_argument("--model", default=SMALL_MODEL, help="hub id or local checkpoint directory (default: %(default)s)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--raw", dest="raw", action="store_const", const=True, default=None,
                      help="tokenize the prompt as is (completion form)")
    form.add_argument("--chat", dest="raw", action="store_const", const=False,
                      help="apply the model's chat template (default: the model's own form, as `circuits graph`)")
    parser.add_argument("--answer-prefix", default="", help="partial assistant answer appended to the prompt")
    parser.add_argument("--top-k", type=int, default=10, help="number of top tokens shown (default: %(default)s)")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="greedily generate N tokens with and without the intervention")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--show-tokens", action="store_true", help="print the prompt tokens with their positions")
    add_remote_arguments(parser, service="attribution", instead_of="loading --model in-process (the server's model)")
    parser.add_argument("--timeout", type=float, default=300.0, help="remote call timeout in seconds (default: %(default)s)")


def format_baseline(result) -> str:
    """The baseline prediction alone (no intervention given)."""
    lines = ["interventions: (none): the baseline prediction; add --neuron L:N=MODE to change neurons",
             f"predicting position {result.position} (after {result.prompt_tokens[-1]!r})",
             f"{'baseline':>28}  {'p':>7}"]
    lines += [f"{b.token!r:>28}  {b.probability:7.4f}" for b in result.baseline]
    if result.baseline_text:
        lines.append(f"baseline:   {result.baseline_text!r}")
    return "\n".join(lines)


def format_result(result) -> str:
    """Side-by-side table of baseline and intervened predictions, then the texts."""
    if not result.interventions:
        return format_baseline(result)
    lines = [f"interventions: {', '.join(i.describe() for i in result.interventions) or '(none)'}",
             f"predicting position {result.position} (after {result.prompt_tokens[-1]!r})"]
    lines.append(f"{'baseline':>28}  {'p':>7}  {'p after':>7}  | {'intervened':>28}  {'p':>7}")
    for i in range(max(len(result.baseline), len(result.intervened))):
        left = right = ""
        if i < len(result.baseline):
            b, t = result.baseline[i], result.tracked[i]
            left = f"{b.token!r:>28}  {b.probability:7.4f}  {t.probability:7.4f}"
        if i < len(result.intervened):
            n = result.intervened[i]
            right = f"{n.token!r:>28}  {n.probability:7.4f}"
        lines.append(f"{left:<46}  | {right}")
    if result.baseline_text or result.generated_text:
        lines.append(f"baseline:   {result.baseline_text!r}")
        lines.append(f"intervened: {result.generated_text!r}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from circuits_core.interventions import InterventionRequest, parse_neuron_spec

    if not args.prompt or not args.prompt.strip():
        raise InvalidArgument("prompt is empty")
    if args.top_k < 1:
        raise InvalidArgument(f"--top-k must be >= 1, got {args.top_k}")
    if args.generate < 0:
        raise InvalidArgument(f"--generate must be >= 0, got {args.generate}")
    interventions = [parse_neuron_spec(spec) for spec in args.neuron]

    request = InterventionRequest(prompt=args.prompt, interventions=tuple(interventions), raw=args.raw,
                                  answer_prefix=args.answer_prefix, top_k=args.top_k, generate_tokens=args.generate)
    model = LocalModel(name=args.model, dtype=args.dtype, device=args.device)
    remote = remote_from_args(args, timeout=args.timeout)
    with closing(open_intervener(remote=remote, model=model, what="`circuits intervene`")) as intervener:
        result = intervener.intervene(request)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return 0
    if args.show_tokens:
        print(" ".join(f"{i}:{t!r}" for i, t in enumerate(result.prompt_tokens)))
    print(format_result(result))
    return 0
