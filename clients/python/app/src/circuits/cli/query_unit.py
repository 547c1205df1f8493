"""`circuits query --unit L/N`: one unit of the atlas with its weight-based connectivity.

Shows the unit's labels and cluster, its output projection (tokens it promotes / suppresses), its
input projection (tokens that activate it), its strongest weight-graph edges (excitatory and
inhibitory, upstream and downstream) and its most frequent aggregated RelP edges. Works on a local
atlas file or through ``--remote`` (the :class:`~circuits_core.capabilities.AtlasQueries` of
:func:`circuits.backends.open_atlas`: GetUnit, GetUnitProjections, GetWeightEdges, GetEdgesForUnit).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict
from typing import Any

from contextlib import closing

from circuits.backends import open_atlas
from circuits.cli._remote import remote_from_args
from circuits_core.errors import FailedPrecondition, InvalidArgument, NotFound

_UNIT = re.compile(r"^\s*L?(\d+)\s*[/:]\s*N?(\d+)\s*$", re.IGNORECASE)


def parse_unit(text: str) -> tuple[int, int]:
    """``L29/N1234``, ``29/1234`` or ``29:1234`` -> (29, 1234)."""
    match = _UNIT.match(text or "")
    if not match:
        raise InvalidArgument(f"--unit {text!r}: expected L/N such as L29/N1234 or 29/1234")
    return int(match.group(1)), int(match.group(2))


def _optional(fn: Any) -> tuple[Any, str]:
    """(answer, "") or (None, why) when the atlas lacks the tables / the row."""
    try:
        return fn(), ""
    except (FailedPrecondition, NotFound) as exc:
        return None, str(exc)


def run_unit(args: argparse.Namespace) -> int:
    layer, index = parse_unit(args.unit)
    remote = remote_from_args(args)
    if remote is not None and args.args:
        raise InvalidArgument("with --remote and --unit give no positional arguments")
    if remote is None and len(args.args) != 1:
        raise InvalidArgument("give the atlas file with --unit (or --remote HOST:PORT)")
    with closing(open_atlas(remote=remote, path=args.args[0] if args.args else "", what="`circuits query --unit`")) as atlas:
        unit = atlas.get_unit(layer, index)
        limit = (min(args.limit, 10) if not args.json else args.limit) or 10
        projections, why_proj = _optional(lambda: atlas.get_unit_projections(layer, index))
        weights, why_weights = _optional(lambda: atlas.get_weight_edges(layer, index, "both", limit))
        edges = atlas.get_edges_for_unit(layer, index, "both", limit)
    if unit is None:
        # Not among the atlas's neurons (never in a graph) but the weights may still know it.
        if projections is None and not weights and not edges:
            raise NotFound(f"unit L{layer}/N{index} is not in the atlas")
        from circuits_core.schemas import Unit

        unit = Unit(layer=layer, index=index)
    if args.json:
        print(json.dumps(_jsonable({
            "unit_id": unit.unit_id, "layer": layer, "neuron": index, "label": unit.label,
            "input_label": unit.input_label, "cluster": unit.cluster, "appearance_count": unit.appearance_count,
            "projections": asdict(projections) if projections else None,
            "weight_edges": [asdict(e) for e in weights] if weights is not None else None,
            "edges": [{"src": f"L{e.src_layer}/N{e.src_index}", "tgt": f"L{e.tgt_layer}/N{e.tgt_index}",
                       "count": e.count, "mean_weight": e.weight} for e in edges],
        }), ensure_ascii=False))
        return 0
    print(f"{unit.unit_id}  cluster {unit.cluster or '-'}  seen in {unit.appearance_count} graphs")
    if unit.label:
        print(f"  label:       {unit.label}")
    if unit.input_label:
        print(f"  input label: {unit.input_label}")
    if projections is None:
        print(f"  projections: none ({why_proj})")
    else:
        if math.isfinite(projections.output_norm):
            print(f"  output norm {projections.output_norm:.4f}, max |logit effect| {projections.logit_effect:.4f}")
        for name, tokens in (("promotes", projections.promotes), ("suppresses", projections.suppresses),
                             ("input tokens", projections.input_tokens)):
            if tokens:
                shown = ", ".join(f"{t.token!r} {t.weight:+.3f}" for t in tokens[:limit])
                print(f"  {name + ':':<13} {shown}")
    if weights is None:
        print(f"  weight edges: none ({why_weights})")
    else:
        for direction, pick in (("upstream", lambda e: e.tgt_layer == layer and e.tgt_neuron == index),
                                ("downstream", lambda e: e.src_layer == layer and e.src_neuron == index)):
            for polarity, name in ((1, "excitatory"), (-1, "inhibitory")):
                rows = [e for e in weights if pick(e) and e.polarity == polarity]
                if rows:
                    other = (lambda e: f"L{e.src_layer}/N{e.src_neuron}") if direction == "upstream" else (
                        lambda e: f"L{e.tgt_layer}/N{e.tgt_neuron}")
                    shown = ", ".join(f"{other(e)} {e.strength:+.3f}" for e in rows[:limit])
                    print(f"  weight {direction} {name}: {shown}")
    if edges:
        down = [e for e in edges if e.src_layer == layer and e.src_index == index]
        up = [e for e in edges if e.tgt_layer == layer and e.tgt_index == index]
        if up:
            print("  RelP upstream:   " + ", ".join(f"L{e.src_layer}/N{e.src_index} x{e.count} {e.weight:+.3f}" for e in up[:limit]))
        if down:
            print("  RelP downstream: " + ", ".join(f"L{e.tgt_layer}/N{e.tgt_index} x{e.count} {e.weight:+.3f}" for e in down[:limit]))
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
