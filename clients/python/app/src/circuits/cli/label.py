"""`circuits label --config label_config.yaml`: two-pass progressive LLM labelling of neurons.

Pass 1 (output) runs late -> early, pass 2 (input) early -> late, then (with exemplars) every
label is scored on held-out contexts; each step has its own progress bar.
Answers are cached as they arrive, so an interrupted run resumes where it stopped when started
again with the same config (nothing is paid twice). Exit 0 when the run finished or stopped at
the budget / --max-units (the last line says which), 2 on errors.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (labeling section; model section for projections)")
    parser.add_argument(
        "--passes", default="", help="comma-separated passes to run: output,input (default: labeling.passes)"
    )
    parser.add_argument("--max-units", type=int, default=0, help="stop after this many newly paid labels (0 = no limit)")
    parser.add_argument("--retry-failed", action="store_true", help="ask again for neurons whose answer was malformed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    score = parser.add_mutually_exclusive_group()
    score.add_argument("--score", dest="score", action="store_true", default=None,
                       help="score every label on held-out exemplars (needs labeling.exemplars_path; "
                            "default: labeling.score, on where exemplars exist)")
    score.add_argument("--no-score", dest="score", action="store_false", help="do not score labels")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from circuits_core.config import load_config
    from circuits_core.errors import FailedPrecondition, InvalidArgument

    from circuits.extras import require

    build_labeler = require("circuits_labeler.build", what="`circuits label`").build_labeler

    if args.max_units < 0:
        raise InvalidArgument("--max-units must be >= 0")
    config = load_config(args.config)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] or list(config.labeling.passes)
    disable = args.no_progress

    projection_bar: list = []

    def projection_progress(done: int, total: int) -> None:
        if not projection_bar:
            projection_bar.append(tqdm(total=total, desc="output projections", unit="layer", disable=disable))
        projection_bar[0].update(done - projection_bar[0].n)

    labeler = build_labeler(config, projection_progress=projection_progress)
    if projection_bar:
        projection_bar[0].close()
    bars: dict[str, tqdm] = {}

    def on_progress(p) -> None:
        if not p.label_pass:
            return
        bar = bars.get(p.label_pass)
        if bar is None:
            for other in bars.values():
                other.close()
            order = {"output": "late->early", "input": "early->late"}.get(p.label_pass, "held-out contexts")
            bar = bars[p.label_pass] = tqdm(total=p.total, desc=f"pass {p.label_pass} ({order})", unit="neuron",
                                            disable=disable)
        bar.update(p.done - bar.n)
        bar.set_postfix(layer=p.layer, cached=p.cached, failed=p.failed, tokens=p.input_tokens + p.output_tokens,
                        usd=f"{p.spend_usd:.4f}", refresh=False)

    try:
        final = labeler.run(passes=passes, max_units=args.max_units,
                            retry_failed=True if args.retry_failed else None, on_progress=on_progress,
                            score=args.score)
    finally:
        for bar in bars.values():
            bar.close()
        labeler.cache.close()
    if final.state == "failed":
        raise FailedPrecondition(final.message)
    print(
        f"{final.state}: {final.message}; requests={final.requests} retries={final.retries} "
        f"labels -> {config.resolve(config.labeling.labels_path)}",
        file=sys.stdout,
    )
    return 0
