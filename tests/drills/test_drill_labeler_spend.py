"""LABELER SPEND: LabelUnits pays only for units that exist and have evidence (issue 25, item 7).

Through a real labeler gRPC server (port 0) and the real client, with a local stand-in LLM
server counting paid requests:

* a unit outside the model (L5/N999999 in a 4-layer, 8-neuron model) is refused with
  INVALID_ARGUMENT and costs nothing (it used to make an LLM call and cache a label);
* a unit inside the model that the evidence never listed is refused with FAILED_PRECONDITION,
  and labelled only when the request says ``allow_without_evidence``;
* ``max_label_units_per_request`` and ``max_labels_per_window`` per ``label_window_s`` refuse
  with RESOURCE_EXHAUSTED before anything is paid; the window frees up as time passes.
"""

from __future__ import annotations

import pytest
from circuits_core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from drill_support import ENFORCED_LIMITS, record_drill

LAYERS, NEURONS = 4, 8
#: Evidence lists every neuron except neuron 6 of each layer.
EVIDENCE_UNITS = [(layer, n, 5) for layer in range(LAYERS) for n in range(NEURONS) if n != 6]
EDGES = [(layer, n, layer + 1, n, 4, 0.3) for layer in range(LAYERS - 1) for n in range(NEURONS) if n != 6]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def labeler(tmp_path):
    from circuits_core.config import config_from_mapping
    from circuits_core.limits import Limits
    from circuits_labeler.build import build_labeler
    from circuits_labeler.evidence import write_evidence_parquet
    from circuits_labeler.server import build_server
    from circuits_labeler.service import LabelerService
    from circuits_labeler.testing import StandInLLMServer
    from circuits_server.serving import ServerSettings

    key = tmp_path / "key"
    key.write_text("sk-drill-not-a-real-key\n")
    evidence = write_evidence_parquet(tmp_path / "export", edges=EDGES, units=[(l, n, c) for l, n, c in EVIDENCE_UNITS])
    clock = Clock()
    limits = Limits(max_label_units_per_request=4, max_labels_per_window=6, label_window_s=60)
    with StandInLLMServer() as llm:
        config = config_from_mapping({"labeling": {
            "backend": "anthropic", "model": "stand-in", "base_url": llm.base_url, "api_key_file": str(key),
            "evidence_path": str(evidence), "projections_path": "", "num_layers": LAYERS, "neurons_per_layer": NEURONS,
            "cache_path": "cache.jsonl", "labels_path": "labels.jsonl", "min_effect": 0.0, "cache_fsync": False,
            "retry_base_delay": 0.01, "retry_max_delay": 0.05, "request_timeout": 5.0,
        }}, base_dir=str(tmp_path))  # fmt: skip
        service = LabelerService(build_labeler(config), limits=limits, clock=clock)
        server = build_server(ServerSettings(port=0), service=service, limits=limits).start()
        server.set_serving(True)
        try:
            yield server, llm, clock, tmp_path
        finally:
            server.stop(0.5)
            service.labeler.cache.close()


def test_label_units_pays_only_for_real_units_with_evidence(labeler) -> None:
    from circuits_sdk.labeler import LabelerClient

    server, llm, clock, tmp_path = labeler
    with LabelerClient(server.address) as client:
        with pytest.raises(InvalidArgument, match=r"L5/N999999 outside the model \(4 layers x 8 neurons\)"):
            client.label_units([(5, 999999)], label_pass="output")
        with pytest.raises(InvalidArgument, match="L1/N8 outside the model"):
            client.label_units([(1, 2), (1, 8)], label_pass="output")
        with pytest.raises(FailedPrecondition, match="no evidence for unit L2/N6; set allow_without_evidence"):
            client.label_units([(2, 6)], label_pass="output")
        assert len(llm.requests) == 0, "a refused unit reached the LLM"
        cache = tmp_path / "cache.jsonl"
        assert not cache.exists() or "999999" not in cache.read_text()

        units, failures = client.label_units([(2, 6)], label_pass="output", allow_without_evidence=True)
        assert failures == [] and [u.index for u in units] == [6] and len(llm.requests) == 1

        # Per request: 4 at most (repeats count once).
        with pytest.raises(ResourceExhausted, match=r"5 units, over the limit max_label_units_per_request=4"):
            client.label_units([(0, n) for n in range(5)], label_pass="output")
        paid = len(llm.requests)
        units, _ = client.label_units([(0, 0), (0, 0), (0, 1)], label_pass="output")
        assert len(units) == 2 and len(llm.requests) == paid + 2
        # Per window: 6 in 60 s; (2,6), (0,0), (0,1) used 3 of them.
        client.label_units([(0, 2), (0, 3)], label_pass="output")
        with pytest.raises(ResourceExhausted, match=r"max_labels_per_window=6 per 60 s .*5 used\); retry in"):
            client.label_units([(0, 4), (0, 5)], label_pass="output")
        paid = len(llm.requests)
        clock.now += 61  # the window slides on
        client.label_units([(0, 4), (0, 5)], label_pass="output")
        assert len(llm.requests) == paid + 2
    ENFORCED_LIMITS.extend(["max_label_units_per_request", "max_labels_per_window", "label_window_s"])
    record_drill("labeler: no spend on unknown units", requests=9, errors=0,
                 note=f"{len(llm.requests)} paid; outside-model / no-evidence / caps refused unpaid")  # fmt: skip
