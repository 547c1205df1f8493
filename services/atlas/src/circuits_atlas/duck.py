"""DuckDB connections for the atlas: the locked-down opener of ``circuits_server.duckdb_files``.

External access is off and the configuration locked on every atlas connection; full-text search
comes from the shipped ``duckdb-extension-fts`` wheel (loaded from its package folder, never
downloaded). Nothing is installed into ``~/.duckdb``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from circuits_server.duckdb_files import FTS_SCHEMA, open_duckdb

__all__ = ["FTS_SCHEMA", "connect"]


def connect(
    path: str | Path,
    *,
    read_only: bool,
    memory_limit: str | None = None,
    threads: int | None = None,
    row_group_size: int | None = None,
    fts: bool = True,
    allowed_paths: Sequence[str | Path] = (),
    lock_configuration: bool = True,
) -> Any:
    """Open an atlas DuckDB file (see :func:`circuits_server.duckdb_files.open_duckdb`).

    ``row_group_size`` (writable files only) sets the storage row-group size of a new file: the
    atlas uses small row groups so a neighbour lookup scans few rows after zone-map pruning.
    ``allowed_paths``: input files SQL may read (a build's Parquet export). ``lock_configuration``:
    False only for a connection that (re)builds the full-text index."""
    options = f"ROW_GROUP_SIZE {int(row_group_size)}" if row_group_size and not read_only else ""
    return open_duckdb(path, read_only=read_only, what="atlas", fts=fts, allowed_paths=allowed_paths,
                       attach_options=options, memory_limit=memory_limit, threads=threads,
                       lock_configuration=lock_configuration)  # fmt: skip
