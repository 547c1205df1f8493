"""CLI entry point, light imports and the committed-stub drift check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from circuits.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[2]


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert "circuits 0.1.0" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: circuits" in capsys.readouterr().out


def test_unknown_flag_exits_2() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["graph", "--no-such-flag"])
    assert exit_info.value.code == 2


def test_import_circuits_is_light() -> None:
    code = (
        "import sys, circuits, circuits.cli, circuits_core.config, circuits_core.schemas, circuits_core.graphio;"
        "from circuits import Unit, Edge, Graph;"
        "heavy = [m for m in ('torch', 'duckdb', 'anthropic', 'transformers', 'openai') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_committed_stubs_match_the_protos() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def test_drift_check_detects_a_stale_descriptor_set_in_the_chart(tmp_path: Path) -> None:
    """The gateway's descriptor set (stubs folder and the chart's ConfigMap copy) is drift-checked too."""
    import shutil

    stale = tmp_path / "circuits.pb"
    shutil.copyfile(ROOT / "deploy/helm/circuits/files/circuits.pb", stale)
    stale.write_bytes(stale.read_bytes()[:-7])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check", "--chart-descriptor", str(stale)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1 and "circuits.pb" in proc.stderr


def test_descriptor_set_holds_every_service_and_its_http_routes() -> None:
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "clients/python/core/src/circuits_core/_proto/circuits.pb").read_bytes())
    files = {f.name: f for f in fds.file}
    assert "google/rpc/status.proto" in files  # the transcoder's JSON error bodies
    atlas = next(s for s in files["circuits/v1/atlas.proto"].service if s.name == "AtlasService")
    routes = {m.name: m.options.Extensions[annotations_pb2.http].get for m in atlas.method}
    assert routes.items() >= {
        "SearchUnits": "/v1/units:search", "GetUnit": "/v1/units/{layer}/{index}",
        "GetEdgesForUnit": "/v1/units/{layer}/{index}/edges", "GetCluster": "/v1/clusters/{cluster}",
        "Stats": "/v1/atlas/stats", "GetUnitCard": "/v1/units/{layer}/{index}/card",
    }.items()  # fmt: skip


def test_drift_check_detects_a_stale_stub(tmp_path: Path) -> None:
    import shutil

    stubs = tmp_path / "_proto"
    shutil.copytree(ROOT / "clients/python/core/src/circuits_core/_proto", stubs)
    target = stubs / "circuits" / "v1" / "graph_pb2.py"
    target.write_text(target.read_text() + "\n# edited by hand\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check", "--out", str(stubs)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1 and "graph_pb2.py" in proc.stderr
