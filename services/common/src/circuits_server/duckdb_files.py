"""The one way any circuits service opens a DuckDB file: locked down before the file is queried.

Every connection :func:`open_duckdb` returns has

* external access disabled (``enable_external_access=false``): SQL cannot read or write files,
  attach databases or load extensions, except the database's own files and the paths the caller
  names in ``allowed_paths`` (a build's Parquet inputs, its output file);
* no extension auto-install or auto-load; the only extension ever loaded is the full-text search
  (``fts``) shipped in the ``duckdb-extension-fts`` wheel, loaded from that package's folder
  before access is switched off, and only when ``fts=True``;
* its configuration locked (``lock_configuration=true``): no later statement can change any
  setting (external access cannot be switched back on in a running database in any case).

A crafted file whose macros or views call ``read_text('/etc/passwd')`` therefore fails with a
permission error instead of returning the file. Callers still verify that a file holds the
schema they expect (the atlas checks its full catalog, :func:`catalog_fingerprint`).

Used for atlases (serve, query, build, re-cluster), aggregator state, labeler evidence and any
future exemplar or connectivity file. ``duckdb`` is imported on first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from circuits_core.errors import FailedPrecondition, InvalidArgument, echo

#: Schema of the full-text index the fts extension creates for table ``neurons``.
FTS_SCHEMA = "fts_main_neurons"

# Files DuckDB keeps beside an attached database file (write-ahead log and its checkpoint stages).
_SIDE_FILES = (".wal", ".wal.checkpoint", ".wal.recovery")


def fts_extension_path(version: str) -> Path:
    """Path of the shipped fts extension for a DuckDB version string such as ``v1.5.5``."""
    spec = importlib.util.find_spec("duckdb_extension_fts")
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition("full-text search needs the duckdb-extension-fts package (pip install duckdb-extension-fts)")
    path = Path(next(iter(spec.submodule_search_locations))) / "extensions" / version / "fts.duckdb_extension"
    if not path.exists():
        raise FailedPrecondition(f"duckdb-extension-fts has no build for DuckDB {version} (expected {path})")
    return path


def fts_loaded(con: Any) -> bool:
    """Whether the fts extension is loaded in this connection's database instance."""
    # duckdb_extensions() lists the extension folder, which a locked connection may not read; the
    # extension's built-in functions live in the system catalog, where a file cannot add any.
    row = con.execute(
        "SELECT count(*) FROM duckdb_functions() WHERE database_name = 'system' AND function_name = 'create_fts_index'"
    ).fetchone()
    return bool(row and row[0])


def _load_fts(con: Any) -> None:
    if fts_loaded(con):
        return
    version = con.execute("PRAGMA version").fetchone()[0]
    path = fts_extension_path(version)
    # LOAD takes a literal, not a parameter; the path comes from the installed package, not a user.
    con.execute(f"LOAD '{str(path).replace(chr(39), chr(39) * 2)}'")


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def open_duckdb(
    path: str | Path,
    *,
    read_only: bool,
    what: str = "DuckDB file",
    fts: bool = False,
    allowed_paths: Sequence[str | Path] = (),
    attach_options: str = "",
    memory_limit: str | None = None,
    threads: int | None = None,
    lock_configuration: bool = True,
) -> Any:
    """A locked-down connection to ``path`` (``":memory:"`` for a throwaway database).

    ``fts`` loads the shipped full-text search extension first. ``allowed_paths``: files SQL may
    still read (e.g. ``read_parquet`` inputs of a build). ``attach_options`` (writable files only,
    e.g. ``"ROW_GROUP_SIZE 16384"``) opens the file through ``ATTACH`` with those storage options,
    which a plain connect cannot set. ``lock_configuration=False`` only for a connection that
    builds a full-text index (the extension's ``create_fts_index`` changes a setting itself); external
    access stays off either way (DuckDB cannot switch it back on in a running database). Errors
    opening the file raise InvalidArgument naming it and ``what`` it was meant to be.
    """
    import duckdb

    config: dict[str, Any] = {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
    }
    if memory_limit:
        config["memory_limit"] = memory_limit
    if threads:
        config["threads"] = int(threads)
    target = str(path)
    in_memory = target == ":memory:"
    attach = bool(attach_options) and not in_memory
    if attach and read_only:
        raise InvalidArgument("attach_options need a writable file")
    con = None
    try:
        con = duckdb.connect(":memory:" if attach else target, read_only=read_only and not in_memory, config=config)
        external, locked = con.execute(
            "SELECT current_setting('enable_external_access'), current_setting('lock_configuration')"
        ).fetchone()
        # DuckDB shares one database instance per file within a process: a second open of a file
        # finds the instance already locked down by the first.
        if external:
            if fts:
                _load_fts(con)
            allowed = [str(Path(p).resolve()) for p in allowed_paths]
            directories: list[str] = []
            if attach:
                resolved = str(Path(target).resolve())
                allowed += [resolved, *(resolved + suffix for suffix in _SIDE_FILES)]
                # Spill files of an in-memory connection would land in ./.tmp; keep them beside the output.
                directories.append(resolved + ".tmp/")
                con.execute(f"SET temp_directory = {_sql_literal(resolved + '.tmp')}")
            if allowed:
                con.execute("SET allowed_paths = ?", [allowed])
            if directories:
                con.execute("SET allowed_directories = ?", [directories])
            con.execute("SET enable_external_access = false")
        elif fts and not fts_loaded(con):
            raise FailedPrecondition(f"{echo(target, quote=False)}: already open in this process without full-text search")
        if lock_configuration and not locked:
            con.execute("SET lock_configuration = true")
        if attach:
            con.execute(f"ATTACH {_sql_literal(str(Path(target).resolve()))} AS atlas ({attach_options})")
            con.execute("USE atlas")
    except duckdb.IOException as exc:
        _close_quietly(con)
        raise InvalidArgument(f"{echo(target, quote=False)}: cannot open {what} ({_first_line(exc)})") from None
    except duckdb.Error as exc:
        _close_quietly(con)
        raise InvalidArgument(f"{echo(target, quote=False)}: not a readable {what} ({_first_line(exc)})") from None
    return con


def catalog_entries(con: Any, database: str | None = None) -> list[tuple[str, str, str, str]]:
    """Every user object of one attached database (default: the current one), sorted:
    ``(kind, schema, name, definition)`` for schemas, tables, views, macros, indexes, sequences
    and types. Definitions are DuckDB's own ``sql`` / macro text, so two files with equal entries
    behave the same way whatever their data."""
    db = database or con.execute("SELECT current_database()").fetchone()[0]
    rows = con.execute(
        """
        SELECT 'schema', schema_name, schema_name, coalesce(sql, '') FROM duckdb_schemas()
            WHERE database_name = $db AND NOT internal
        UNION ALL SELECT 'table', schema_name, table_name, coalesce(sql, '') FROM duckdb_tables()
            WHERE database_name = $db
        UNION ALL SELECT 'view', schema_name, view_name, coalesce(sql, '') FROM duckdb_views()
            WHERE database_name = $db AND NOT internal
        UNION ALL SELECT 'macro', schema_name, function_name,
                         function_type || '(' || array_to_string(parameters, ',') || ') ' || coalesce(macro_definition, '')
            FROM duckdb_functions() WHERE database_name = $db AND NOT internal
        UNION ALL SELECT 'index', schema_name, index_name, coalesce(sql, '') FROM duckdb_indexes()
            WHERE database_name = $db
        UNION ALL SELECT 'sequence', schema_name, sequence_name, coalesce(sql, '') FROM duckdb_sequences()
            WHERE database_name = $db
        UNION ALL SELECT 'type', schema_name, type_name, coalesce(logical_type, '') FROM duckdb_types()
            WHERE database_name = $db AND NOT internal
        """,
        {"db": db},
    ).fetchall()
    return sorted((str(k), str(s), str(n), str(d)) for k, s, n, d in rows)


def refuse_code_objects(con: Any, path: str | Path, *, what: str) -> None:
    """Raise FailedPrecondition when the current database holds views, macros, sequences or
    types: data files of the services (aggregator state, evidence, exemplars) hold tables only,
    so a file that brings its own SQL code was not written by circuits."""
    found = [(k, s, n) for k, s, n, _d in catalog_entries(con) if k in ("view", "macro", "sequence", "type")]
    if found:
        kind, schema, name = found[0]
        raise FailedPrecondition(
            f"{echo(str(path), quote=False)}: refusing to open {what}: it holds a {kind} ({echo(schema + '.' + name)}); "
            "circuits writes tables only"
        )


def catalog_fingerprint(entries: Sequence[tuple[str, str, str, str]]) -> str:
    """sha256 over catalog entries (see :func:`catalog_entries`)."""
    digest = hashlib.sha256()
    for entry in entries:
        for part in entry:
            digest.update(part.encode("utf-8"))
            digest.update(b"\x1f")
        digest.update(b"\x1e")
    return digest.hexdigest()


def catalog_difference(have: Sequence[tuple[str, str, str, str]], want: Sequence[tuple[str, str, str, str]]) -> str:
    """A short description of the first difference between two catalogs ('' when equal)."""
    have_by = {(k, s, n): d for k, s, n, d in have}
    want_by = {(k, s, n): d for k, s, n, d in want}
    for key in sorted(have_by.keys() - want_by.keys()):
        return f"unexpected {key[0]} {key[1]}.{key[2]}"
    for key in sorted(want_by.keys() - have_by.keys()):
        return f"missing {key[0]} {key[1]}.{key[2]}"
    for key in sorted(have_by):
        if have_by[key] != want_by[key]:
            return f"{key[0]} {key[1]}.{key[2]} has a different definition"
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _close_quietly(con: Any) -> None:
    if con is not None:
        try:
            con.close()
        except Exception:  # noqa: BLE001 - the original error matters
            pass
