"""Write one label back into a built atlas (``circuits investigate --write-atlas``).

The label becomes a ``labels`` row of its own pass (``scientist`` by default) with its source, so
the atlas keeps the labeller's labels beside it and ``get_unit`` / ``get_unit_card`` show both.
A second write for the same neuron and pass replaces the first. The neuron must be in the atlas.
"""

from __future__ import annotations

from pathlib import Path

from circuits_core.errors import InvalidArgument, NotFound


def write_label(path: str | Path, *, layer: int, neuron: int, text: str, description: str = "",
                source: str = "scientist", label_pass: str = "scientist") -> None:
    """Insert or replace the ``label_pass`` label of L{layer}/N{neuron} in the atlas at ``path``."""
    from circuits_server.duckdb_files import open_duckdb

    if not text.strip():
        raise InvalidArgument("the label to write is empty")
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"{path}: atlas not found")
    con = open_duckdb(path, read_only=False, what="atlas", allowed_paths=[path.parent])
    try:
        found = con.execute("SELECT count(*) FROM neurons WHERE layer = ? AND neuron = ?", [layer, neuron]).fetchone()[0]
        if not found:
            raise NotFound(f"L{layer}/N{neuron} is not in the atlas {path}")
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM labels WHERE layer = ? AND neuron = ? AND label_pass = ?", [layer, neuron, label_pass])
        con.execute(
            "INSERT INTO labels (layer, neuron, label_pass, text, description, source) VALUES (?, ?, ?, ?, ?, ?)",
            [layer, neuron, label_pass, text, description or None, source],
        )
        con.execute("COMMIT")
    finally:
        con.close()
