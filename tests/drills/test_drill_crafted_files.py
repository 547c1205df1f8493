"""CRAFTED FILES: a DuckDB file can carry SQL (macros, views). The services must never run it.

The attack (issue 25, item 2): replace the atlas's full-text macro ``fts_main_neurons.tokenize``
by one that reads a local file, and rewrite the full-text tables so that each byte of that file
comes back as the BM25 score of one unit. Any read-token client then reads the file through
``SearchUnits``. The drill builds exactly that file and checks that

* the atlas server refuses to start on it (exit 2, one ``error:`` line naming the changed macro),
  and the in-process reader refuses it too;
* even a connection that skipped the schema check could not read the file: every connection of
  ``circuits_server.duckdb_files.open_duckdb`` has external access off and its settings locked;
* aggregator state and labeler evidence files holding views/macros are refused as well.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from circuits_core.errors import CorruptInput, FailedPrecondition
from drill_support import record_drill

SECRET = "drill-secret-7f3a"
ROWS: list[str] = []


def _plant_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "private" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    secret.chmod(0o600)
    return secret


def craft_exfiltrating_atlas(atlas: Path, out: Path, secret: Path) -> tuple[Path, dict[str, int]]:
    """A copy of ``atlas`` whose search returns byte j of ``secret`` as the score of unit j.

    Returns the file and the unit_id -> byte position map the attacker uses to decode scores."""
    import duckdb

    shutil.copy(atlas, out)
    con = duckdb.connect(str(out))  # the attacker's own tools: a plain, unrestricted DuckDB
    try:
        units = [r[0] for r in con.execute("SELECT unit_id FROM neurons ORDER BY unit_id LIMIT 64").fetchall()]
        n = len(SECRET)
        assert len(units) >= n
        literal = str(secret).replace("'", "''")
        # tokenize(query) -> the terms 'k<j>b<bit>' for every set bit of every byte of the secret.
        con.execute(f"""
            CREATE OR REPLACE MACRO fts_main_neurons.tokenize(s) AS (
                SELECT list('k' || j || 'b' || b)
                FROM (SELECT c, unnest(range(length(c))) AS j FROM (SELECT content AS c FROM read_text('{literal}'))),
                     range(8) AS r(b)
                WHERE (ascii(substr(c, j + 1, 1)) >> b) & 1 = 1)
        """)  # fmt: skip
        con.execute("DELETE FROM fts_main_neurons.dict")
        con.execute("DELETE FROM fts_main_neurons.docs")
        con.execute("DELETE FROM search_postings")
        for j in range(n):
            con.execute("INSERT INTO fts_main_neurons.docs VALUES (?, ?, 1)", [j, units[j]])
            for b in range(8):
                termid = j * 8 + b
                con.execute("INSERT INTO fts_main_neurons.dict VALUES (?, ?, 1)", [termid, f"k{j}b{b}"])
                con.execute("INSERT INTO search_postings VALUES (?, ?, ?)", [termid, j, float(1 << b)])
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return out, {units[j]: j for j in range(len(SECRET))}


def decode(hits, positions: dict[str, int]) -> str:
    chars = {positions[h.unit.unit_id]: chr(int(h.score)) for h in hits if h.unit.unit_id in positions}
    return "".join(chars.get(j, "?") for j in range(len(positions)))


def test_crafted_atlas_macro_cannot_read_files(small_atlas, tmp_path) -> None:
    from circuits_atlas.database import CircuitDatabase
    from circuits_server.duckdb_files import open_duckdb

    secret = _plant_secret(tmp_path)
    crafted, positions = craft_exfiltrating_atlas(small_atlas, tmp_path / "crafted.duckdb", secret)

    # 1. The in-process reader refuses the file, naming what differs.
    leaked = ""
    try:
        with CircuitDatabase(crafted) as db:  # on the code of issue 25 this opens ...
            leaked = decode(db.search("anything", 100), positions)  # ... and this returns the secret
    except FailedPrecondition as exc:
        message = str(exc)
    else:
        message = ""
    assert SECRET not in leaked, "a crafted atlas read a local file through SearchUnits"
    assert "refusing to open" in message and "fts_main_neurons.tokenize" in message, message
    assert "\n" not in message

    # 2. The server refuses to start: exit 2 and one error line.
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "circuits_atlas", "--duckdb", str(crafted), "--port", "0", "--insecure"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refusing to open" in lines[0], proc.stderr[-2000:]
    assert SECRET not in proc.stdout + proc.stderr

    # 3. Defence in depth: even if the check were skipped, the locked-down connection runs the
    #    macro without file access, and no statement can switch access back on.
    import duckdb

    con = open_duckdb(crafted, read_only=True, what="atlas", fts=True)
    try:
        with pytest.raises(duckdb.PermissionException, match="disabled by configuration"):
            con.execute("SELECT fts_main_neurons.tokenize('x')").fetchall()
        for statement in ("SET enable_external_access = true", "SET lock_configuration = false",
                          "SET autoload_known_extensions = true", "INSTALL httpfs", "LOAD httpfs"):  # fmt: skip
            with pytest.raises(duckdb.Error):
                con.execute(statement)
        with pytest.raises(duckdb.PermissionException):
            con.execute("SELECT * FROM read_text(?)", [str(secret)]).fetchall()
    finally:
        con.close()
    ROWS.append("atlas")
    record_drill("crafted atlas: file-reading macro refused", requests=3, errors=0,
                 note=f"server exit 2 in {time.perf_counter() - started:.1f}s; macro has no file access")  # fmt: skip


def test_untouched_atlas_still_opens_and_records_its_schema_hash(small_atlas) -> None:
    from circuits_atlas.database import CircuitDatabase
    from circuits_atlas.schema import schema_fingerprint

    with CircuitDatabase(small_atlas) as db:
        assert db.search("enzyme", 3)
        assert db.stats().metadata["schema_sha256"] == schema_fingerprint()


@pytest.mark.parametrize("change", [
    "CREATE VIEW extra AS SELECT 1 AS x",
    "CREATE MACRO main.tokenize(s) AS s",
    "CREATE TABLE extra (x INTEGER)",
    "ALTER TABLE neurons ADD COLUMN note VARCHAR DEFAULT 'x'",
    "DROP INDEX idx_neurons_label",
])  # fmt: skip
def test_any_schema_change_is_refused(small_atlas, tmp_path, change) -> None:
    import duckdb
    from circuits_atlas.database import CircuitDatabase

    path = tmp_path / "changed.duckdb"
    shutil.copy(small_atlas, path)
    con = duckdb.connect(str(path))
    con.execute(change)
    con.close()
    with pytest.raises(FailedPrecondition, match="refusing to open"):
        CircuitDatabase(path)


def test_aggregator_state_and_labeler_evidence_with_code_are_refused(small_atlas, tmp_path) -> None:
    import duckdb
    from circuits_aggregator import AggregateStore
    from circuits_labeler.evidence import DuckDBEvidence

    secret = _plant_secret(tmp_path)
    state = tmp_path / "state.duckdb"
    AggregateStore(state).close()
    con = duckdb.connect(str(state))
    con.execute(f"CREATE VIEW leak AS SELECT content FROM read_text('{secret}')")
    con.close()
    with pytest.raises(FailedPrecondition, match="holds a view"):
        AggregateStore(state)

    evidence = tmp_path / "evidence.duckdb"
    con = duckdb.connect(str(evidence))
    con.execute("CREATE TABLE edges (src_layer INT, src_neuron INT, tgt_layer INT, tgt_neuron INT, count INT, "
                "weight_sum DOUBLE)")  # fmt: skip
    con.execute("INSERT INTO edges VALUES (0, 1, 1, 2, 3, 0.5)")
    con.execute(f"CREATE VIEW neurons AS SELECT 0 AS layer, 1 AS neuron, content AS description "
                f"FROM read_text('{secret}')")  # fmt: skip
    con.close()
    with pytest.raises(CorruptInput, match="must be tables, not views"):
        DuckDBEvidence(evidence)
    ROWS.append("state+evidence")
    record_drill("crafted state/evidence files refused", requests=2, errors=0, note="views/macros in data files")
