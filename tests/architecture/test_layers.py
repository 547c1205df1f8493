"""The workspace's layers hold: import-linter contracts, light imports, and an SDK-only install.

The SDK-only install is simulated in a subprocess whose import system refuses the service
packages, the server library and their heavy dependencies (as if only ``pip install circuits``
had run): the gRPC clients still work against a real server, and every in-process command ends
with one ``error:`` line naming the pip extra to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: What an SDK-only install lacks: the service packages, the server library, their heavy deps.
NOT_INSTALLED = (
    "circuits_attribution", "circuits_aggregator", "circuits_labeler", "circuits_atlas", "circuits_server",
    "torch", "transformers", "accelerate", "safetensors", "gguf", "duckdb", "pyarrow", "infomap",
    "anthropic", "openai", "psycopg", "prometheus_client", "grpc_reflection", "kubernetes", "matplotlib", "numba",
)

_BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys
    _BLOCKED = {NOT_INSTALLED!r}

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
    """
)


def _sdk_only(code: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )


def test_import_linter_contracts_hold() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is part of the dev extra"
    result = subprocess.run([lint, "--no-cache"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module", ["circuits", "circuits.client", "circuits_sdk", "circuits_core", "circuits.cli"])
def test_light_modules_load_no_heavy_or_server_code(module: str) -> None:
    code = f"""
    import sys, json, importlib
    importlib.import_module({module!r})
    heavy = ("torch", "duckdb", "transformers", "prometheus_client", "anthropic", "openai", "infomap", "pyarrow",
             "numba", "circuits_server", "circuits_attribution", "circuits_aggregator", "circuits_labeler", "circuits_atlas")
    print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set(heavy))))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_sdk_only_install_clients_work_against_a_real_server(tmp_path: Path) -> None:
    from circuits_aggregator.server import AggregatorServerSettings, build_server
    from circuits_aggregator.store import AggregateStore

    store = AggregateStore(tmp_path / "state.duckdb")
    server = build_server(AggregatorServerSettings(), store=store).start()
    server.set_serving(True)
    try:
        result = _sdk_only(
            f"""
            import json, sys
            from circuits import Graph, Unit, Edge
            from circuits.client import AggregatorClient
            units = (Unit(layer=0, index=1, position=0, activation=1.0, attribution=0.5),
                     Unit(layer=1, index=2, position=0, activation=2.0, attribution=0.25))
            graph = Graph(graph_id="sdk-only-1", model="tiny", prompt="hi", prompt_tokens=("hi",), units=units,
                          edges=(Edge(src_layer=0, src_index=1, src_position=0, tgt_layer=1, tgt_index=2,
                                      tgt_position=0, weight=0.75),))
            with AggregatorClient({server.address!r}) as client:
                report = client.ingest([graph])
                stats = client.stats()
            blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "duckdb", "circuits_server"))
            print(json.dumps({{"graphs": stats.graphs_processed, "blocked_loaded": blocked}}))
            """
        )
    finally:
        server.stop(0)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer == {"graphs": 1, "blocked_loaded": []}


class EchoEngine:
    """A stand-in attribution engine (the AttributionEngine contract): one unit per prompt."""

    replicas_trace_concurrently = True

    def trace(self, request, *, should_stop):
        from circuits_core.schemas import Graph, GraphMetadata, Unit

        return Graph(model="echo", prompt=request.prompt, prompt_tokens=(request.prompt,), graph_id=f"echo-{request.k}",
                     units=(Unit(layer=0, index=request.k, position=0, activation=1.0, attribution=request.tau),),
                     metadata=GraphMetadata(slug=request.slug, metric_value=1.0))

    def intervene(self, request, *, should_stop):
        raise NotImplementedError

    def model_info(self):
        from circuits_core.tracing import ModelInfo

        return ModelInfo(model="echo")

    def replicate(self):
        return self


def test_sdk_only_install_circuits_graph_remote_works(tmp_path: Path) -> None:
    """With only the SDK, `circuits graph --remote` traces on the server (no engine, no torch here)."""
    from circuits_server.serving import ServerSettings
    from circuits_attribution.server import AttributionSettings, build_server

    server = build_server(AttributionSettings(server=ServerSettings(port=0)), EchoEngine()).start()
    try:
        result = _sdk_only(
            f"""
            import json, sys
            from circuits.cli import main
            code = main(["graph", "hi there", "--k", "3", "--remote", {server.address!r}, "--output-dir", {str(tmp_path)!r}])
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "circuits_attribution", "circuits_server"))
            print(json.dumps({{"code": code, "loaded": loaded}}))
            """
        )
    finally:
        server.stop(0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"code": 0, "loaded": []}
    data = json.loads((tmp_path / "relp-hi-there.json").read_text())
    assert [n["feature"] for n in data["nodes"]] == [3]  # the request's k reached the engine


#: Each in-process command, with the extra its one-line error must name.
IN_PROCESS_COMMANDS = [
    (["graph", "hi"], "attribution"),
    (["validate", "g.json"], "attribution"),
    (["intervene", "hi", "--neuron", "1:2=zero"], "attribution"),
    (["analyze", "hi", "--no-llm"], "attribution"),
    (["analyze", "--graph", "g.json", "--no-llm"], "atlas"),
    (["launch", "--image", "x", "--prompts", "p.jsonl", "--shards", "1", "--dry-run"], "attribution"),
    (["aggregate", "graphs"], "aggregator"),
    (["cluster", "--duckdb", "atlas.duckdb"], "atlas"),
    (["build-db", "--export", "export", "--output", "atlas.duckdb"], "atlas"),
    (["query", "atlas.duckdb", "enzyme"], "atlas"),
    (["serve", "atlas", "--duckdb", "atlas.duckdb"], "atlas"),
    (["up"], "serve"),
]


@pytest.mark.parametrize(("argv", "extra"), IN_PROCESS_COMMANDS, ids=[" ".join(a[:1]) for a, _ in IN_PROCESS_COMMANDS])
def test_sdk_only_install_in_process_commands_name_the_extra(argv: list[str], extra: str, tmp_path: Path) -> None:
    (tmp_path / "graphs").mkdir()
    from circuits_core.graphio import write_graph
    from circuits_core.schemas import Graph, Unit

    write_graph(Graph(model="tiny", prompt="hi", prompt_tokens=("hi",),
                      units=(Unit(layer=0, index=1, position=0, activation=1.0, attribution=0.5),)), tmp_path / "g.json")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    result = _sdk_only(
        f"""
        import os, sys
        os.chdir({str(tmp_path)!r})
        from circuits.cli import main
        sys.exit(main({argv!r}))
        """
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert f"pip install 'circuits[{extra}]'" in lines[0]


def test_duckdb_files_are_opened_only_through_the_locked_down_opener() -> None:
    """Every DuckDB database the code opens goes through circuits_server.duckdb_files.open_duckdb
    (external access off, configuration locked, no extension auto-loading)."""
    import re

    opener = REPO / "services" / "common" / "src" / "circuits_server" / "duckdb_files.py"
    pattern = re.compile(r"duckdb\s*\.\s*connect\s*\(|from\s+duckdb\s+import\s+[^\n]*\bconnect\b")
    offenders = []
    for root in ("clients", "services", "benchmarks", "scripts"):
        for path in (REPO / root).rglob("*.py"):
            if path == opener or "/_proto/" in str(path):
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            offenders += [f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}" for m in pattern.finditer(text)]
    assert offenders == [], f"open DuckDB files with circuits_server.duckdb_files.open_duckdb: {offenders}"
    assert pattern.search(opener.read_text(encoding="utf-8"))  # the check itself can see a call
