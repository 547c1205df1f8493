"""`circuits query`: search the atlas by label text, or show one unit, locally or through the atlas server.

    circuits query atlas.duckdb "enzyme"
    circuits query --remote localhost:50054 "enzyme" --limit 10 --json
    circuits query atlas.duckdb --unit L29/N1234      # label, projections, weight and RelP edges
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing
from typing import Any

from circuits.backends import open_atlas
from circuits.cli._remote import add_remote_arguments, remote_from_args
from circuits_core.errors import InvalidArgument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="[ATLAS] TEXT", help="atlas file (unless --remote) and search text")
    parser.add_argument("--unit", metavar="L/N",
                        help="show one unit (e.g. L29/N1234 or 29/1234): labels, cluster, output/input projections, "
                             "weight-graph and aggregated RelP edges")
    add_remote_arguments(parser, service="atlas", instead_of="opening a local atlas file")
    parser.add_argument("--limit", type=int, default=20, help="most results (default 20)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--min-score", type=float, default=0.0,
                        help="only units with a label whose detection score is at least this (0-1; default: no filter)")


def _hit_json(hit: Any) -> dict[str, Any]:
    u = hit.unit
    return {
        "unit_id": u.unit_id, "layer": u.layer, "neuron": u.index, "score": hit.score, "label": u.label,
        "input_label": u.input_label, "appearance_count": u.appearance_count, "cluster": u.cluster,
        "labels": [
            {"text": l.text, "source": l.source, "score_detection": l.score_detection,
             "score_simulation": l.score_simulation, "score_contexts": l.score_contexts,
             "score_positives": l.score_positives}
            for l in u.labels
        ],
    }  # fmt: skip


def _no_labels_note(atlas: Any) -> str | None:
    """Why a search cannot match anything, when the atlas holds no labels at all (else None)."""
    stats = atlas.stats()
    if str(stats.metadata.get("labeled_neurons", "")).strip() != "0":
        return None
    return (f"the atlas holds 0 labels ({stats.neurons} neurons), and the search reads labels: label the neurons "
            "(`circuits label`) and rebuild it with `circuits build-db --labels labels.jsonl`")


def _label_scores(unit: Any) -> str:
    """'det/sim' of the best-scored label ('-' when none is scored)."""
    scored = [l for l in unit.labels if l.score_detection is not None or l.score_simulation is not None]
    if not scored:
        return "-"
    best = max(scored, key=lambda l: -1.0 if l.score_detection is None else l.score_detection)

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    return f"{fmt(best.score_detection)}/{fmt(best.score_simulation)}"


def run(args: argparse.Namespace) -> int:
    if args.unit is not None:
        from circuits.cli.query_unit import run_unit

        return run_unit(args)
    remote = remote_from_args(args)
    if remote is not None and len(args.args) != 1:
        raise InvalidArgument("with --remote give only the search text")
    if remote is None and len(args.args) != 2:
        raise InvalidArgument("give the atlas file and the search text (or --remote HOST:PORT TEXT)")
    *path, text = args.args
    with closing(open_atlas(remote=remote, path=path[0] if path else "", what="`circuits query`")) as atlas:
        hits = atlas.search(text, args.limit, min_score=args.min_score)
        unlabeled = _no_labels_note(atlas) if not hits else None
    if args.json:
        for hit in hits:
            print(json.dumps(_hit_json(hit), ensure_ascii=False))
        if unlabeled:
            print(f"note: {unlabeled}", file=sys.stderr)
        return 0
    if not hits:
        print(f"no matching units: {unlabeled}" if unlabeled else "no matching units")
        return 0
    print(f"{'#':>3}  {'unit':<12} {'score':>7} {'seen':>6} {'cluster':<9} {'det/sim':<9} label")
    for rank, hit in enumerate(hits, 1):
        u = hit.unit
        label = " ".join(u.label.split())
        label = label if len(label) <= 80 else label[:77] + "..."
        print(f"{rank:>3}  {u.unit_id:<12} {hit.score:>7.3f} {u.appearance_count:>6} {u.cluster or '-':<9} "
              f"{_label_scores(u):<9} {label}")
    return 0
