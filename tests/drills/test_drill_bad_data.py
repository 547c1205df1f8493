"""Drill (issue 25 item 4): bad data never reaches the statistics.

A real aggregator server (port 0, auth tokens) holds a counted corpus; the drill sends, through
the raw Ingest stream: NaN / +-Inf activations, attributions and probabilities, an infinite edge
weight, graphs of another model, another stated shape, neurons beyond the recorded width, and a
re-sent graph_id with different content. Every bad graph must be refused with INVALID_ARGUMENT
(the conflict acknowledged in ``conflict_graph_ids``, not as a duplicate) and the statistics and
the export must stay exactly what the good corpus gives.
"""

from __future__ import annotations

import math

import grpc
import pytest
from drill_support import record_drill

from circuits_core import wire
from circuits_core._proto.circuits.v1 import aggregator_pb2_grpc
from circuits_core.schemas import Edge, Graph, GraphMetadata, Unit


def _graph(gid: str, *, model: str = "drill-model", dims: tuple[int, int] | None = (4, 64), neuron: int = 3,
           weight: float = 0.5) -> Graph:  # fmt: skip
    units = (
        Unit(layer=0, index=neuron, position=0, activation=1.0, attribution=0.5),
        Unit(layer=2, index=9, position=1, activation=2.0, attribution=-0.5),
        Unit(layer=4, index=11, position=1, kind="logit", token="x", probability=0.25),
    )
    edges = (
        Edge(src_layer=0, src_index=neuron, src_position=0, tgt_layer=2, tgt_index=9, tgt_position=1, weight=weight),
        Edge(src_layer=2, src_index=9, src_position=1, tgt_layer=4, tgt_index=11, tgt_position=1, weight=0.125),
    )
    extra = {"generation_settings": {"num_layers": dims[0], "d_mlp": dims[1]}} if dims else {}
    return Graph(units=units, edges=edges, prompt="p", prompt_tokens=("a", "b"), model=model, graph_id=gid,
                 metadata=GraphMetadata(extra=extra))  # fmt: skip


@pytest.fixture
def aggregator(tmp_path):
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_aggregator import AggregateStore
    from circuits_aggregator.server import AggregatorServerSettings, build_server
    from circuits_aggregator.stream import BatchPolicy
    from circuits_server.serving import ServerSettings

    store = AggregateStore(tmp_path / "state.duckdb")
    server = build_server(AggregatorServerSettings(server=ServerSettings(port=0), batch=BatchPolicy(max_graphs=4, max_delay_s=0.005)),
                          store=store).start()  # fmt: skip
    server.set_serving(True)
    client = AggregatorClient(server.address)
    try:
        yield store, server, client
    finally:
        client.close()
        server.stop(0.5)


def _bad_messages() -> dict[str, object]:
    bad: dict[str, object] = {}
    for field in ("activation", "attribution", "probability"):
        for name, value in (("NaN", math.nan), ("+Inf", math.inf), ("-Inf", -math.inf)):
            msg = wire.graph_to_proto(_graph(f"bad-{field}-{name}"))
            setattr(msg.units[2 if field == "probability" else 0], field, value)
            bad[f"{field} {name}"] = msg
    msg = wire.graph_to_proto(_graph("bad-weight"))
    msg.edges.weight[0] = math.inf
    bad["edge weight +Inf"] = msg
    bad["another model"] = wire.graph_to_proto(_graph("bad-model", model="another-model"))
    bad["another width"] = wire.graph_to_proto(_graph("bad-width", dims=(4, 128)))
    bad["another depth"] = wire.graph_to_proto(_graph("bad-depth", dims=(8, 64)))
    bad["neuron beyond the width"] = wire.graph_to_proto(_graph("bad-neuron", dims=None, neuron=64))
    return bad


def test_drill_bad_data_is_refused(aggregator, tmp_path) -> None:
    store, server, client = aggregator
    good = [_graph(f"good-{i}", neuron=i) for i in range(8)]
    client.ingest(good)
    before = store.stats()
    stub = aggregator_pb2_grpc.AggregatorServiceStub(grpc.insecure_channel(server.address))
    wrong: list[str] = []
    for why, msg in _bad_messages().items():
        try:
            list(stub.Ingest(iter([msg]), timeout=10))
            wrong.append(f"{why}: accepted")
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                wrong.append(f"{why}: {exc.code().name}")
    # A re-sent graph_id with other content: a conflict, reported distinctly, never counted.
    report = client.ingest([_graph("good-3", neuron=3, weight=-9.0)])
    if report.conflict_graph_ids != ("good-3",) or report.duplicates != 0:
        wrong.append(f"conflict reported as {report}")
    same = client.ingest([good[3]])
    if same.duplicates != 1 or same.conflict_graph_ids:
        wrong.append(f"true duplicate reported as {same}")
    after = store.stats()
    if after != before:
        wrong.append(f"statistics moved: {before} -> {after}")
    edges = {(e.src_layer, e.src_index, e.tgt_layer, e.tgt_index): (e.count, e.weight_sum) for e in client.get_edges()}
    if edges != {(0, i, 2, 9): (1, 0.5) for i in range(8)}:
        wrong.append(f"edges differ: {edges}")
    units = store.unit_table().to_pylist()
    if not all(math.isfinite(r[c]) for r in units for c in ("act_sum", "attr_sum", "act_sq_sum", "attr_sq_sum")):
        wrong.append("a non-finite unit statistic")
    n_bad = len(_bad_messages()) + 1
    record_drill("bad data: non-finite/model/shape/conflict", requests=n_bad, errors=len(wrong),
                 note=f"{n_bad - len(wrong)}/{n_bad} refused or reported as conflict")  # fmt: skip
    assert wrong == []
