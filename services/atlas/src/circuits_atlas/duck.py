"""DuckDB connections for the atlas: no network, full-text search from the bundled extension.

The ``fts`` extension comes from the ``duckdb-extension-fts`` wheel (a ``fts.duckdb_extension``
file per DuckDB version inside the package); it is LOADed from that file directly, so nothing is
installed into ``~/.duckdb`` and nothing is downloaded. Auto-install/auto-load of known extensions
is switched off so a missing extension fails fast instead of reaching for the network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from circuits_core.errors import FailedPrecondition, InvalidArgument

FTS_SCHEMA = "fts_main_neurons"


def fts_extension_path(version: str) -> Path:
    """Path of the bundled fts extension for a DuckDB version string such as ``v1.5.5``."""
    spec = importlib.util.find_spec("duckdb_extension_fts")
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition("full-text search needs the duckdb-extension-fts package (pip install duckdb-extension-fts)")
    path = Path(next(iter(spec.submodule_search_locations))) / "extensions" / version / "fts.duckdb_extension"
    if not path.exists():
        raise FailedPrecondition(f"duckdb-extension-fts has no build for DuckDB {version} (expected {path})")
    return path


def load_fts(con: Any) -> None:
    """LOAD the bundled fts extension into a connection's database instance (idempotent)."""
    loaded = con.execute("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'fts'").fetchone()
    if loaded and loaded[0]:
        return
    version = con.execute("PRAGMA version").fetchone()[0]
    path = fts_extension_path(version)
    # LOAD takes a literal, not a parameter; the path comes from the installed package, not a user.
    con.execute(f"LOAD '{str(path).replace(chr(39), chr(39) * 2)}'")


def connect(
    path: str | Path,
    *,
    read_only: bool,
    memory_limit: str | None = None,
    threads: int | None = None,
    row_group_size: int | None = None,
) -> Any:
    """Open an atlas DuckDB file with network-free settings.

    ``row_group_size`` (writable files only) sets the storage row-group size of a new file: the
    atlas uses small row groups so a neighbour lookup scans few rows after zone-map pruning."""
    import duckdb

    config: dict[str, Any] = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    if memory_limit:
        config["memory_limit"] = memory_limit
    if threads:
        config["threads"] = int(threads)
    try:
        if row_group_size and not read_only:
            con = duckdb.connect(":memory:", config=config)
            # ATTACH takes a literal; the path is the operator's output file, quoted here.
            literal = str(path).replace("'", "''")
            con.execute(f"ATTACH '{literal}' AS atlas (ROW_GROUP_SIZE {int(row_group_size)})")
            con.execute("USE atlas")
            return con
        return duckdb.connect(str(path), read_only=read_only, config=config)
    except duckdb.IOException as exc:
        raise InvalidArgument(f"{path}: cannot open atlas ({str(exc).splitlines()[0]})") from None
    except duckdb.Error as exc:
        raise InvalidArgument(f"{path}: not a DuckDB atlas ({str(exc).splitlines()[0]})") from None
