"""Domain <-> protobuf conversion speed for a large graph (10,000 units, 100,000 edges).

Prints seconds for encode, serialize, parse and decode, and the ratio of the whole round trip to
a baseline in the same process: the legacy JSON path (to_legacy + json.dumps/loads + from_legacy).
A second line times the edge columns alone (a graph with few units and the same edges), which
is what the columnar EdgeTable makes cheap.

    .venv/bin/python benchmarks/proto_bench.py [--units 10000] [--edges 100000] [--repeat 3]
    .venv/bin/python benchmarks/proto_bench.py --smoke      # tiny sizes (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import random
import time

from circuits import Edge, Graph, GraphMetadata, Unit
from circuits_core import wire
from circuits_core._proto.circuits.v1 import graph_pb2


def make_graph(n_units: int, n_edges: int, seed: int = 0) -> Graph:
    rng = random.Random(seed)
    units = [
        Unit(layer=i % 32, index=i, position=i % 50, activation=rng.gauss(0, 1), attribution=rng.gauss(0, 1))
        for i in range(n_units)
    ]
    edges = []
    for _ in range(n_edges):
        s, t = rng.randrange(n_units), rng.randrange(n_units)
        a, b = units[s], units[t]
        edges.append(
            Edge(
                src_layer=a.layer, src_index=a.index, src_position=a.position,
                tgt_layer=b.layer, tgt_index=b.index, tgt_position=b.position,
                weight=rng.gauss(0, 1), raw_weight=rng.gauss(0, 1),
            )
        )
    return Graph(units=units, edges=edges, prompt="bench", prompt_tokens=["t"] * 50,
                 metadata=GraphMetadata(slug="bench", scan="bench"))


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--edges", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (checks the script runs)")
    args = parser.parse_args()
    if args.smoke:
        args.units, args.edges, args.repeat = 200, 2_000, 1
    graph = make_graph(args.units, args.edges)

    t_encode, msg = best_of(args.repeat, lambda: wire.graph_to_proto(graph))
    t_ser, blob = best_of(args.repeat, msg.SerializeToString)

    def parse():
        m = graph_pb2.Graph()
        m.ParseFromString(blob)
        return m

    t_parse, parsed = best_of(args.repeat, parse)
    t_decode, decoded = best_of(args.repeat, lambda: wire.graph_from_proto(parsed))
    assert decoded == graph, "round trip changed the graph"
    proto_total = t_encode + t_ser + t_parse + t_decode

    t_json, text = best_of(args.repeat, lambda: json.dumps(graph.to_legacy()))
    t_json_back, back = best_of(args.repeat, lambda: Graph.from_legacy(json.loads(text)))
    json_total = t_json + t_json_back

    print(f"graph: {args.units:,} units, {args.edges:,} edges; protobuf message {len(blob) / 1e6:.1f} MB, "
          f"legacy JSON {len(text) / 1e6:.1f} MB")
    print(f"protobuf encode {t_encode:.3f}s  serialize {t_ser:.3f}s  parse {t_parse:.3f}s  decode {t_decode:.3f}s")
    print(f"protobuf round trip (domain -> bytes -> domain): {proto_total:.3f}s")
    print(f"baseline legacy JSON round trip:                 {json_total:.3f}s")
    print(f"ratio JSON / protobuf: {json_total / proto_total:.1f}x")

    few_units = make_graph(max(args.units // 100, 10), args.edges, seed=1)
    blob_few = wire.graph_to_proto(few_units).SerializeToString()
    parsed_few = graph_pb2.Graph()
    parsed_few.ParseFromString(blob_few)
    t_enc_few, _ = best_of(args.repeat, lambda: wire.graph_to_proto(few_units))
    t_dec_few, back_few = best_of(args.repeat, lambda: wire.graph_from_proto(parsed_few))
    assert back_few == few_units, "round trip changed the graph"
    print(f"edge columns ({len(few_units.units):,} units, {args.edges:,} edges): encode {t_enc_few:.4f}s  "
          f"decode {t_dec_few:.4f}s  ({args.edges / t_dec_few / 1e6:.1f} M edges/s decoded)")


if __name__ == "__main__":
    main()
