"""Neuron labels from outside the LLM labeler: label files and a PostgreSQL neuron database.

One record type (:class:`LabelRecord`) and one file format serve every consumer: the labeler
writes its labels in it, ``build-db`` and ``circuits graph`` read it, and external label sets
("goodfire"-style) are imported through it. A label file is JSONL (one object per line) or a JSON
list, each object ``{"layer", "neuron", "label", "description", "source", ...}``.

The neurondb source reads per-neuron, per-polarity descriptions (as Transluce publishes for
Llama-3.1-8B-Instruct) from PostgreSQL with psycopg 3. Expected table (``circuits neurondb
import --create`` makes it)::

    CREATE TABLE neuron_descriptions (
        layer       integer  NOT NULL,
        neuron      integer  NOT NULL,
        polarity    smallint NOT NULL DEFAULT 1,   -- 1 positive, -1 negative, 0 unsigned
        description text     NOT NULL,
        source      text     NOT NULL DEFAULT 'neurondb',
        PRIMARY KEY (layer, neuron, polarity)
    );
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from circuits_core.config import LabelingSection, env_setting
from circuits_core.errors import CorruptInput, FailedPrecondition, InvalidArgument, NotFound, Unavailable

UnitKey = tuple[int, int]
POLARITIES = {"positive": 1, "pos": 1, "+": 1, "negative": -1, "neg": -1, "-": -1, "": 0, "none": 0}


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelRecord:
    """One label of one neuron, from any source."""

    layer: int
    neuron: int
    label: str
    description: str = ""
    source: str = ""
    input_label: str = ""
    #: 1 (fires positively), -1 (negative activations), 0 (unsigned).
    polarity: int = 0
    confidence: str = ""

    @property
    def key(self) -> UnitKey:
        return (self.layer, self.neuron)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in ("", 0) or k in ("layer", "neuron", "label")}


def _polarity(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise CorruptInput(f"{where}: polarity must be positive/negative or 1/-1")
    if isinstance(value, int) and value in (-1, 0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in POLARITIES:
        return POLARITIES[value.strip().lower()]
    raise CorruptInput(f"{where}: polarity must be positive/negative or 1/-1, got {value!r}")


def record_from_mapping(obj: Any, *, where: str, default_source: str = "file") -> LabelRecord:
    """Validate one label object; errors name ``where`` and the field."""
    if not isinstance(obj, Mapping):
        raise CorruptInput(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("layer", "neuron"):
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CorruptInput(f"{where}: field '{key}' must be an integer")
        if value < 0:
            raise CorruptInput(f"{where}: field '{key}' must be >= 0")
    label = obj.get("label", obj.get("output_label", ""))
    description = obj.get("description", "")
    if not isinstance(label, str) or not isinstance(description, str):
        raise CorruptInput(f"{where}: 'label' and 'description' must be strings")
    if not label and not description:
        raise CorruptInput(f"{where}: needs a 'label' or a 'description'")
    input_label = obj.get("input_label", "")
    return LabelRecord(
        layer=obj["layer"],
        neuron=obj["neuron"],
        label=label or description,
        description=description,
        source=str(obj.get("source") or default_source),
        input_label=input_label if isinstance(input_label, str) else "",
        polarity=_polarity(obj.get("polarity", 0), where),
        confidence=str(obj.get("confidence", "") or ""),
    )


def iter_label_file(path: str | Path, *, default_source: str = "file") -> Iterator[LabelRecord]:
    """Records of a JSONL or JSON-list label file; malformed entries raise CorruptInput with the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: label file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptInput(f"{path}: cannot read label file ({exc})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorruptInput(f"{path}: invalid JSON at line {exc.lineno}") from None
        for n, obj in enumerate(items):
            yield record_from_mapping(obj, where=f"{path}: entry {n}", default_source=default_source)
        return
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise CorruptInput(f"{path}:{line_no}: not a JSON object") from None
        yield record_from_mapping(obj, where=f"{path}:{line_no}", default_source=default_source)


def read_label_file(path: str | Path, *, default_source: str = "file") -> dict[UnitKey, LabelRecord]:
    """Labels by ``(layer, neuron)``; a later line for the same neuron replaces an earlier one."""
    return {r.key: r for r in iter_label_file(path, default_source=default_source)}


def write_label_file(records: Iterable[LabelRecord], path: str | Path) -> Path:
    """Write records as JSONL atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------
# PostgreSQL neuron database
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class PgSettings:
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str = ""
    database: str = "postgres"
    table: str = "neuron_descriptions"
    connect_timeout: int = 5
    statement_timeout_ms: int = 30_000

    def __repr__(self) -> str:  # never show the password
        return f"PgSettings(host={self.host!r}, port={self.port}, user={self.user!r}, database={self.database!r})"

    @classmethod
    def from_config(cls, section: LabelingSection | None = None) -> PgSettings:
        """Config values first, PG_HOST/PG_PORT/PG_USER/PG_PASSWORD/PG_DATABASE for the gaps."""
        s = section or LabelingSection()
        port = s.pg_port or env_setting("PG_PORT", "5432")
        try:
            port = int(port)
        except ValueError:
            raise InvalidArgument(f"PG_PORT must be an integer, got {port!r}") from None
        return cls(
            host=s.pg_host or env_setting("PG_HOST", "127.0.0.1"),
            port=port,
            user=s.pg_user or env_setting("PG_USER", "postgres"),
            password=s.pg_password or env_setting("PG_PASSWORD", ""),
            database=s.pg_database or env_setting("PG_DATABASE", "postgres"),
            table=s.pg_table,
        )


class NeuronDB:
    """Reads and loads neuron descriptions in PostgreSQL (psycopg 3)."""

    def __init__(self, settings: PgSettings) -> None:
        if not settings.table.replace("_", "").replace(".", "").isalnum():
            raise InvalidArgument(f"neurondb table name {settings.table!r} is not a plain identifier")
        self.settings = settings
        self._conn: Any = None

    # -- connection ----------------------------------------------------------------------
    def connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        import psycopg

        s = self.settings
        try:
            self._conn = psycopg.connect(
                host=s.host, port=s.port, user=s.user, password=s.password, dbname=s.database,
                connect_timeout=s.connect_timeout,
                options=f"-c statement_timeout={int(s.statement_timeout_ms)}",
            )
        except psycopg.OperationalError as exc:
            reason = _short_pg_reason(str(exc))
            raise Unavailable(
                f"cannot connect to the neuron database at {s.host}:{s.port} (db {s.database!r}, user {s.user!r}): {reason}"
            ) from None
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> NeuronDB:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _table(self) -> Any:
        from psycopg import sql

        return sql.Identifier(*self.settings.table.split("."))

    # -- schema and import ---------------------------------------------------------------
    def create_table(self) -> None:
        from psycopg import sql

        conn = self.connect()
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    " layer integer NOT NULL, neuron integer NOT NULL,"
                    " polarity smallint NOT NULL DEFAULT 1, description text NOT NULL,"
                    " source text NOT NULL DEFAULT 'neurondb', PRIMARY KEY (layer, neuron, polarity))"
                ).format(self._table())
            )

    def import_records(self, records: Iterable[LabelRecord]) -> int:
        """Upsert descriptions in one transaction (COPY into a temp table, then merge)."""
        from psycopg import errors, sql

        conn = self.connect()
        n = 0
        try:
            with conn.transaction():
                conn.execute(
                    "CREATE TEMP TABLE _import (layer integer, neuron integer, polarity smallint,"
                    " description text, source text) ON COMMIT DROP"
                )
                with conn.cursor().copy("COPY _import FROM STDIN") as copy:
                    for r in records:
                        copy.write_row((r.layer, r.neuron, r.polarity or 1, r.description or r.label, r.source or "neurondb"))
                        n += 1
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (layer, neuron, polarity, description, source)"
                        " SELECT DISTINCT ON (layer, neuron, polarity) layer, neuron, polarity, description, source"
                        " FROM _import ON CONFLICT (layer, neuron, polarity)"
                        " DO UPDATE SET description = EXCLUDED.description, source = EXCLUDED.source"
                    ).format(self._table())
                )
        except errors.UndefinedTable:
            raise NotFound(self._missing_table()) from None
        return n

    def _missing_table(self) -> str:
        return (
            f"table {self.settings.table!r} does not exist in database {self.settings.database!r}; "
            "create it with `circuits neurondb import FILE --create`"
        )

    # -- queries -------------------------------------------------------------------------
    def fetch(self, units: Iterable[UnitKey], *, batch_size: int = 50_000) -> dict[UnitKey, list[LabelRecord]]:
        """Descriptions for the given neurons (all polarities), in batched array queries."""
        from psycopg import errors, sql

        keys = sorted(set(units))
        conn = self.connect()
        out: dict[UnitKey, list[LabelRecord]] = {}
        query = sql.SQL(
            "SELECT t.layer, t.neuron, t.polarity, t.description, t.source FROM {} t"
            " JOIN unnest(%s::int[], %s::int[]) AS k(layer, neuron)"
            " ON t.layer = k.layer AND t.neuron = k.neuron ORDER BY t.layer, t.neuron, t.polarity DESC"
        ).format(self._table())
        try:
            with conn.cursor() as cur:
                for start in range(0, len(keys), batch_size):
                    chunk = keys[start : start + batch_size]
                    cur.execute(query, ([k[0] for k in chunk], [k[1] for k in chunk]))
                    for layer, neuron, polarity, description, source in cur.fetchall():
                        out.setdefault((layer, neuron), []).append(
                            LabelRecord(layer=layer, neuron=neuron, label=description, description=description,
                                        source=source or "neurondb", polarity=polarity)
                        )
            conn.rollback()
        except errors.UndefinedTable:
            conn.rollback()
            raise NotFound(self._missing_table()) from None
        except errors.QueryCanceled:
            conn.rollback()
            raise Unavailable("neuron database query timed out") from None
        return out

    def labels_for(self, units: Iterable[UnitKey]) -> dict[UnitKey, LabelRecord]:
        """One label per neuron: the positive-polarity description, else the first one."""
        return {key: records[0] for key, records in self.fetch(units).items()}


def _short_pg_reason(message: str) -> str:
    text = " ".join(message.split())
    for marker in ("password authentication failed", "Connection refused", "timeout expired",
                   "does not exist", "no pg_hba.conf entry", "could not translate host name"):
        if marker in text:
            return marker
    return text[:160]


# ------------------------------------------------------------------------------------------
# Choosing the source from the config
# ------------------------------------------------------------------------------------------
class FileLabelSource:
    def __init__(self, path: str | Path, *, default_source: str = "file") -> None:
        self.records = read_label_file(path, default_source=default_source)

    def labels_for(self, units: Iterable[UnitKey]) -> dict[UnitKey, LabelRecord]:
        return {k: self.records[k] for k in set(units) if k in self.records}


def label_source_from_config(section: LabelingSection, *, base_dir: str | Path = ".") -> Any | None:
    """The configured external label source (``labels_for(units) -> {key: LabelRecord}``), or None.

    method ``neurondb`` -> PostgreSQL; ``file``/``goodfire`` -> ``labels_file``; ``progressive``
    -> the labeler's own output file (``labels_path``) when it exists; ``none`` -> None.
    """
    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(base_dir) / path

    if section.method == "neurondb":
        return NeuronDB(PgSettings.from_config(section))
    if section.method in ("file", "goodfire"):
        if not section.labels_file:
            raise InvalidArgument(f"labeling.labels_file must be set for labeling.method: {section.method}")
        return FileLabelSource(resolve(section.labels_file), default_source=section.method)
    if section.method == "progressive":
        path = resolve(section.labels_path)
        return FileLabelSource(path, default_source="progressive_output") if path.exists() else None
    if section.method == "none":
        return None
    raise FailedPrecondition(f"unknown labeling.method {section.method!r}")
