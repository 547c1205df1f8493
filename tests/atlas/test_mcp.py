"""`circuits mcp`: an MCP client session (the mcp SDK's client) lists the tools and calls each.

The server runs as a subprocess, as an agent starts it: over stdio on the atlas file (and a real
attribution server on a tiny random Llama for trace_prompt), over stdio against a remote atlas
server, and over streamable HTTP. Every answer is checked against the atlas read directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from circuits.atlas_tools import MAX_TEXT, AtlasTools
from circuits_atlas import CircuitDatabase
from circuits_atlas.server import AtlasSettings, build_server
from circuits_core.errors import InvalidArgument, NotFound
from circuits_server.localstack import free_port
from circuits_server.serving import ServerSettings

mcp = pytest.importorskip("mcp", reason="the mcp SDK is not installed (pip install 'circuits[mcp]')")
from mcp import Client, StdioServerParameters  # noqa: E402

PROMPT = "the capital of france is"
ATLAS_TOOLS = {"search_units", "unit_card", "unit_neighbours", "cluster_members", "atlas_stats"}


def mcp_command(*args: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "circuits.cli", "mcp", *args])


async def call(client: Client, name: str, arguments: dict[str, Any]) -> tuple[bool, Any]:
    """(is_error, parsed JSON answer or the error text)."""
    result = await client.call_tool(name, arguments)
    text = result.content[0].text if result.content else ""
    if result.is_error:
        return True, text
    assert result.structured_content == json.loads(text)
    assert "\n" not in text, "answers are compact JSON"
    return False, result.structured_content


@pytest.fixture(scope="module")
def attribution_server():
    """A real attribution server on a tiny random Llama (the RelP engine, port 0)."""
    from circuits_attribution import RelPAttributor, RelPConfig
    from circuits_attribution.server import AttributionSettings
    from circuits_attribution.server import build_server as build_attribution_server
    from circuits_attribution.testing import build_model, build_tokenizer

    engine = RelPAttributor(build_model("llama"), build_tokenizer(), RelPConfig(tau=0.005))
    server = build_attribution_server(AttributionSettings(server=ServerSettings(port=0), model="tiny-llama"), engine).start()
    yield server
    server.stop(0.5)


@pytest.fixture(scope="module")
def atlas_server(planted_atlas: Path):
    server = build_server(AtlasSettings(duckdb_path=str(planted_atlas), server=ServerSettings(port=0))).start()
    server.set_serving(True)
    yield server
    server.stop(grace=1)


def check_session(session_factory, planted_atlas: Path, *, attribution: str = "") -> None:
    async def main() -> None:
        async with session_factory() as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == ATLAS_TOOLS | ({"trace_prompt"} if attribution else set())
            assert tools["unit_card"].input_schema["properties"]["layer"]["minimum"] == 0
            assert all(t.annotations and t.annotations.read_only_hint for t in tools.values())
            with CircuitDatabase(planted_atlas) as db:
                # search_units: the same units, order and scores as the atlas itself.
                error, answer = await call(client, "search_units", {"text": "capital cities", "limit": 5})
                assert not error
                hits = db.search("capital cities", 5)
                assert [u["unit"] for u in answer["units"]] == [h.unit.unit_id for h in hits]
                assert [u["score"] for u in answer["units"]] == [pytest.approx(h.score, rel=1e-3) for h in hits]
                assert answer["count"] == 5 and answer["units"][0]["label"] == hits[0].unit.label

                # unit_card: labels, statistics, cluster and degree from the atlas file.
                error, card = await call(client, "unit_card", {"layer": 1, "neuron": 52})
                assert not error
                truth = db.get_unit_card(1, 52)
                assert card["unit"] == "L1/N52" and card["label"] == truth.unit.label
                assert card["activation"]["observations"] == truth.stats.observation_count
                assert card["activation"]["mean_activation"] == pytest.approx(truth.stats.mean_activation)
                assert card["cluster"]["path"] == truth.cluster.cluster_path == truth.unit.cluster
                assert card["edges"] == {"downstream": truth.downstream_edges, "upstream": truth.upstream_edges}
                assert card["edges"]["downstream"] == len(db.get_edges_for_unit(1, 52, "downstream", 1000))

                # unit_neighbours: the atlas edges, most frequent first, each labelled.
                error, near = await call(client, "unit_neighbours", {"layer": 1, "neuron": 52, "limit": 3})
                assert not error
                edges = db.get_edges_for_unit(1, 52, "both", 3)
                down = [e for e in edges if (e.src_layer, e.src_index) == (1, 52)]
                up = [e for e in edges if (e.tgt_layer, e.tgt_index) == (1, 52)]
                assert [n["unit"] for n in near["downstream"]] == [f"L{e.tgt_layer}/N{e.tgt_index}" for e in down]
                assert [n["unit"] for n in near["upstream"]] == [f"L{e.src_layer}/N{e.src_index}" for e in up]
                assert [n["count"] for n in near["downstream"]] == [e.count for e in down]
                assert near["downstream"][0]["label"] == db.get_unit(down[0].tgt_layer, down[0].tgt_index).label
                error, only_up = await call(client, "unit_neighbours", {"layer": 1, "neuron": 52, "direction": "upstream"})
                assert not error and "downstream" not in only_up and only_up["upstream"]

                # cluster_members: the cluster row and its members.
                error, cluster = await call(client, "cluster_members", {"cluster": truth.cluster.cluster_path, "limit": 4})
                assert not error
                members = db.get_cluster(truth.cluster.cluster_path, 4)
                assert cluster["cluster"]["size"] == members.cluster.size
                assert [m["unit"] for m in cluster["members"]] == [u.unit_id for u in members.units]
                assert cluster["truncated"] == (members.cluster.size > 4)

                error, stats = await call(client, "atlas_stats", {})
                assert not error and stats["neurons"] == db.stats().neurons and stats["metadata"]["model"] == "planted-test"

            # Bad arguments are tool errors; the session goes on.
            for name, arguments, fragment in [
                ("unit_card", {"layer": 99, "neuron": 1}, "not in the atlas"),
                ("unit_card", {"layer": -1, "neuron": 1}, "greater than or equal to 0"),
                ("unit_card", {"layer": "three", "neuron": 1}, "layer"),
                ("search_units", {"text": "enzyme", "limit": 5000}, "less than or equal to 50"),
                ("search_units", {"text": "   "}, "search text is empty"),
                ("unit_neighbours", {"layer": 0, "neuron": 10, "direction": "sideways"}, "direction"),
                ("cluster_members", {"cluster": "1; DROP TABLE neurons"}, "cluster must be a number"),
                ("cluster_members", {"cluster": "404"}, "cluster 404 not found"),
                ("no_such_tool", {}, "no_such_tool"),
            ]:
                error, text = await call(client, name, arguments)
                assert error and fragment in text, (name, text)
            error, answer = await call(client, "atlas_stats", {})
            assert not error

            if attribution:
                from circuits.client import AttributionClient

                error, trace = await call(client, "trace_prompt", {"prompt": PROMPT, "top": 5, "k": 2})
                assert not error, trace
                with AttributionClient(attribution) as direct:
                    graph = direct.trace(PROMPT, k=2)
                top = sorted(graph.neurons, key=lambda u: -abs(u.attribution or 0.0))[:5]
                assert [n["unit"] for n in trace["top_neurons"]] == [u.unit_id for u in top]
                assert [n["position"] for n in trace["top_neurons"]] == [u.position for u in top]
                assert trace["neurons_in_graph"] == len(graph.neurons) and len(trace["targets"]) == 2
                assert trace["metric"] == pytest.approx(graph.metadata.metric_value, rel=1e-5)
                with CircuitDatabase(planted_atlas) as db:
                    for item, unit in zip(trace["top_neurons"], top):
                        labelled = db.get_unit(unit.layer, unit.index)
                        assert item.get("label", "") == (labelled.label if labelled else unit.label)
                error, text = await call(client, "trace_prompt", {"prompt": "   "})
                assert error and "prompt is empty" in text, text

    anyio.run(main)


def test_stdio_session_on_the_atlas_file_with_tracing(planted_atlas: Path, attribution_server) -> None:
    params = mcp_command("--atlas", str(planted_atlas), "--attribution", attribution_server.address)
    check_session(lambda: Client(params), planted_atlas, attribution=attribution_server.address)


def test_stdio_session_against_a_remote_atlas_server(planted_atlas: Path, atlas_server) -> None:
    check_session(lambda: Client(mcp_command("--remote", atlas_server.address)), planted_atlas)


def test_streamable_http_session(planted_atlas: Path, tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "mcp.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "circuits.cli", "mcp", "--atlas", str(planted_atlas), "--transport", "http",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        deadline = time.monotonic() + 60

        async def wait_and_check() -> None:
            while True:
                try:
                    async with Client(url) as client:
                        names = {t.name for t in (await client.list_tools()).tools}
                        assert names == ATLAS_TOOLS
                        error, answer = await call(client, "search_units", {"text": "rhyming words", "limit": 3})
                        assert not error and answer["count"] == 3
                        return
                except (OSError, mcp.MCPError, Exception) as exc:  # noqa: BLE001 - server still starting
                    if isinstance(exc, AssertionError) or time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    await anyio.sleep(0.3)

        anyio.run(wait_and_check)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--atlas", "/no/such/atlas.duckdb"], "atlas file not found"),
        ([], "one of the arguments --atlas --remote is required"),
        (["--atlas", "a.duckdb", "--remote", "h:1"], "not allowed with argument"),
        (["--remote", "127.0.0.1:1", "--timeout", "2"], "error: "),
    ],
)
def test_bad_mcp_flags_give_one_error_line(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "circuits.cli", "mcp", *args], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_tools_bound_their_answers(planted_atlas: Path) -> None:
    """Directly on the transport-neutral tools: limits, text cut, errors as domain exceptions."""
    with CircuitDatabase(planted_atlas) as db:
        tools = AtlasTools(db)
        assert set(tools.tools()) == ATLAS_TOOLS
        with pytest.raises(InvalidArgument, match=r"limit must be an integer in \[1, 50\]"):
            tools.search_units("enzyme", 51)
        with pytest.raises(InvalidArgument, match="no attribution endpoint"):
            tools.trace_prompt(PROMPT)
        with pytest.raises(NotFound):
            tools.unit_neighbours(42, 42)
        answer = tools.search_units("enzyme " + "x" * 900, 50)
        assert len(answer["query"]) == MAX_TEXT
        assert len(json.dumps(tools.cluster_members("1", 100))) < 40_000
