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
