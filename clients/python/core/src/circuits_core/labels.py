"""Neuron label files (the one owner of the format) and the PostgreSQL neuron database.

One record type (:class:`LabelRecord`) and one file format serve every consumer: the labeler
writes its labels in it, ``circuits graph --labels``, ``build-db`` (the atlas) and the labeler's
resume read it, and external label sets ("goodfire"-style) are imported through it. A label file
is JSONL (one object per line) or a JSON list; :func:`iter_label_file` is its only reader, so every
consumer accepts and rejects the same files. Each object names a neuron (``layer`` and ``neuron``;
``index`` or the seed's ``feature_metadata`` also work) and carries at least one text: an output
label (``label``/``output_label``/``function_label`` or the seed's ``labels[0]``), an
``input_label`` (an input-pass-only neuron) or a ``description``. Unknown keys are ignored.

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
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from circuits_core.config import LabelingSection, env_setting
from circuits_core.errors import CorruptInput, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from circuits_core.files import atomic_writer

UnitKey = tuple[int, int]
#: Score fields of each label pass (``output_score_detection`` ...) and their kinds.
SCORE_FIELDS: tuple[tuple[str, type], ...] = (("detection", float), ("simulation", float), ("contexts", int), ("positives", int))
POLARITIES = {"positive": 1, "pos": 1, "+": 1, "negative": -1, "neg": -1, "-": -1, "": 0, "none": 0}


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelRecord:
    """One neuron's labels, from any source (a label file line, the labeler, neurondb).

    ``label`` is the output (function) label, ``input_label`` what triggers the neuron; the
    ``output_*``/``input_*`` fields, ``passes`` and ``model`` are what the progressive labeler
    records, ``max_activation``..``output_norm`` what exemplar-based label sets carry.
    """

    layer: int
    neuron: int
    label: str
    description: str = ""
    source: str = ""
    input_label: str = ""
    #: 1 (fires positively), -1 (negative activations), 0 (unsigned).
    polarity: int = 0
    confidence: str = ""
    output_label: str = ""
    output_type: str = ""
    input_type: str = ""
    input_description: str = ""
    input_confidence: str = ""
    passes: tuple[str, ...] = ()
    appearance_count: int = 0
    model: str = ""
    max_activation: float | None = None
    num_exemplars: int | None = None
    feature_id: int | None = None
    output_norm: float | None = None
    #: Label scores per pass (the labeler's scorer: detection = balanced accuracy, simulation =
    #: correlation; contexts/positives = what they were measured on); None when not scored.
    output_score_detection: float | None = None
    output_score_simulation: float | None = None
    output_score_contexts: int | None = None
    output_score_positives: int | None = None
    input_score_detection: float | None = None
    input_score_simulation: float | None = None
    input_score_contexts: int | None = None
    input_score_positives: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.passes, tuple):
            object.__setattr__(self, "passes", tuple(self.passes))

    @property
    def key(self) -> UnitKey:
        return (self.layer, self.neuron)

    def to_json(self) -> dict[str, Any]:
        """The file form: ``layer``, ``neuron``, ``label`` always, other fields when set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            # a score of 0 is a measurement, not an empty field
            if f.name in ("layer", "neuron", "label") or value not in ("", 0, (), None) or (
                "_score_" in f.name and value is not None
            ):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


_TEXT_FIELDS = ("label", "description", "source", "input_label", "confidence", "output_label", "output_type",
                "input_type", "input_description", "input_confidence", "model", "function_label")  # fmt: skip
_UNIT_NUMBER = re.compile(r"^[LN]?([0-9]+)$")


def _unit_number(value: Any, key: str, where: str) -> int:
    if isinstance(value, str):
        match = _UNIT_NUMBER.match(value.strip())
        if match:
            return int(match.group(1))
    elif isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise CorruptInput(f"{where}: field '{key}' must be >= 0")
        return value
    raise CorruptInput(f"{where}: field '{key}' must be an integer")


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CorruptInput(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _number(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise CorruptInput(f"{where}: field '{key}' must be {'an integer' if kind is int else 'a number'} or null")
    return kind(value)


def _polarity(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise CorruptInput(f"{where}: polarity must be positive/negative or 1/-1")
    if isinstance(value, int) and value in (-1, 0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in POLARITIES:
        return POLARITIES[value.strip().lower()]
    raise CorruptInput(f"{where}: polarity must be positive/negative or 1/-1, got {value!r}")


def _seed_label(obj: Mapping[str, Any], where: str) -> dict[str, str]:
    """Label, description and source of the seed's ``labels: [{"label"|"text", ...}]`` form."""
    labels = obj.get("labels")
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], Mapping):
        return {}
    first = labels[0]
    meta = first.get("metadata") if isinstance(first.get("metadata"), Mapping) else {}
    parsed = meta.get("parsed_response") if isinstance(meta.get("parsed_response"), Mapping) else {}
    where = f"{where}: labels[0]"
    return {
        "label": _text(first, "label", where) or _text(first, "text", where),
        "description": _text(first, "description", where) or _text(parsed, "description", where),
        "source": _text(first, "source", where),
    }


def record_from_mapping(obj: Any, *, where: str, default_source: str = "file") -> LabelRecord:
    """Validate one label object (see the module docstring); errors name ``where`` and the field."""
    if not isinstance(obj, Mapping):
        raise CorruptInput(f"{where}: expected a JSON object, got {type(obj).__name__}")
    meta = obj.get("feature_metadata") if isinstance(obj.get("feature_metadata"), Mapping) else {}
    layer = obj.get("layer", meta.get("layer"))
    neuron = obj.get("neuron", obj.get("index", meta.get("neuron", meta.get("index"))))
    text = {key: _text(obj, key, where) for key in _TEXT_FIELDS}
    seed = _seed_label(obj, where)
    label = text["label"] or text["output_label"] or text["function_label"] or seed.get("label", "")
    description = text["description"] or seed.get("description", "")
    input_label = text["input_label"] or text["input_description"]
    if not (label or description or input_label):
        raise CorruptInput(f"{where}: needs a 'label', an 'input_label' or a 'description'")
    passes = obj.get("passes", ())
    if passes is None:
        passes = ()
    if not isinstance(passes, list | tuple) or not all(isinstance(p, str) for p in passes):
        raise CorruptInput(f"{where}: field 'passes' must be a list of strings")
    appearance_count = _number(obj, "appearance_count", int, where) or 0
    return LabelRecord(
        layer=_unit_number(layer, "layer", where),
        neuron=_unit_number(neuron, "neuron", where),
        label=label or description,
        description=description,
        source=text["source"] or seed.get("source", "") or default_source,
        input_label=input_label,
        polarity=_polarity(obj.get("polarity", 0), where),
        confidence=text["confidence"],
        output_label=text["output_label"],
        output_type=text["output_type"],
        input_type=text["input_type"],
        input_description=text["input_description"],
        input_confidence=text["input_confidence"],
        passes=tuple(passes),
        appearance_count=appearance_count,
        model=text["model"],
        max_activation=_number(obj, "max_activation", float, where) if "max_activation" in obj else _number(meta, "max_activation", float, where),
        num_exemplars=_number(obj, "num_exemplars", int, where) if "num_exemplars" in obj else _number(meta, "num_exemplars", int, where),
        feature_id=_number(obj, "feature_id", int, where),
        output_norm=_number(obj, "output_norm", float, where),
        **{f"{p}_score_{k}": _number(obj, f"{p}_score_{k}", kind, where)
           for p in ("output", "input") for k, kind in SCORE_FIELDS},
    )  # fmt: skip


def iter_label_file(path: str | Path, *, default_source: str = "file") -> Iterator[LabelRecord]:
    """Records of a JSONL or JSON-list label file, in file order.

    A missing file raises InvalidArgument; unreadable bytes, a line that is not JSON or an entry
    that is not a valid label raise CorruptInput naming the file and line (or list entry).
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: label file not found") from None
    except OSError as exc:
        raise CorruptInput(f"{path}: cannot read label file ({exc.strerror or exc})") from None
    with handle:
        try:
            head = handle.read(4096).lstrip()
            handle.seek(0)
            if head.startswith(b"["):
                try:
                    items = json.loads(handle.read().decode("utf-8"))
                except UnicodeDecodeError:
                    raise CorruptInput(f"{path}: label file is not UTF-8 text") from None
                except (ValueError, RecursionError) as exc:
                    raise CorruptInput(f"{path}: invalid JSON at line {getattr(exc, 'lineno', '?')}") from None
                if not isinstance(items, list):
                    raise CorruptInput(f"{path}: a JSON label file must hold a list of objects")
                for n, obj in enumerate(items):
                    yield record_from_mapping(obj, where=f"{path}: entry {n}", default_source=default_source)
                return
            for line_no, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise CorruptInput(f"{path}:{line_no}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError):
                    raise CorruptInput(f"{path}:{line_no}: not a JSON object") from None
                yield record_from_mapping(obj, where=f"{path}:{line_no}", default_source=default_source)
        except OSError as exc:
            raise CorruptInput(f"{path}: cannot read label file ({exc.strerror or exc})") from None


def read_label_file(path: str | Path, *, default_source: str = "file") -> dict[UnitKey, LabelRecord]:
    """Labels by ``(layer, neuron)``; a later line for the same neuron replaces an earlier one."""
    return {r.key: r for r in iter_label_file(path, default_source=default_source)}


def write_label_file(records: Iterable[LabelRecord], path: str | Path) -> Path:
    """Write records as JSONL atomically (temp file + fsync + rename); return the path."""
    path = Path(path)
    with atomic_writer(path, text=True) as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
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
