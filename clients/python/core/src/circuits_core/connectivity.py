"""Weight-based connectivity: the request type, the answer types and the output folder (owner module).

``circuits connectivity`` (computation: :mod:`circuits_attribution.connectivity`) writes one folder::

    manifest.json                 model shape, settings, timings (format "circuits.connectivity")
    output_projections.parquet    per neuron: top-k promoted / suppressed tokens of W_U·W_down[:, i]
                                  (the :mod:`circuits_core.projections` file, also read by the labeler)
    input_projections.parquet     per neuron: top-k tokens of silu(W_E W_gate^T) ⊙ (W_E W_up^T)
    weight_edges.parquet          per target neuron: top edges per polarity from all earlier layers
    projection_edges.parquet      (part "similarity") neuron pairs whose output projections agree
    parts/<kind>/layer-NNNN.parquet   finished layers of a run in progress (resume skips them)

Every file is written atomically (temporary name + rename); a layer is done when its part file
exists, so a killed run resumes at the first missing layer. The full schema is in
``docs/connectivity.md``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from circuits_core.errors import CorruptInput, FailedPrecondition, InvalidArgument, NotFound
from circuits_core.projections import TokenWeight

FORMAT = "circuits.connectivity"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

#: Parts of a connectivity run and the final file each one writes.
PART_FILES: dict[str, str] = {
    "output": "output_projections.parquet",
    "input": "input_projections.parquet",
    "weights": "weight_edges.parquet",
    "similarity": "projection_edges.parquet",
}
PARTS: tuple[str, ...] = tuple(PART_FILES)
DEFAULT_PARTS: tuple[str, ...] = ("output", "input", "weights")

INPUT_COLUMNS = ("layer", "neuron", "top_ids", "top_tokens", "top_weights")
WEIGHT_EDGE_COLUMNS = ("src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "polarity", "c_up", "c_gate", "strength")
SIMILARITY_COLUMNS = ("src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "similarity")
#: polarity column values
EXCITATORY = 1
INHIBITORY = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectivitySpec:
    """What ``circuits connectivity`` computes and how. Field comments are the CLI help."""

    #: Parts to compute: output (output projections), input (input projections), weights
    #: (weight-graph edges), similarity (output-projection similarity edges).
    parts: tuple[str, ...] = DEFAULT_PARTS
    #: Tokens kept per neuron in the output and input projections.
    top_k: int = 50
    #: Weight-graph edges kept per polarity per target neuron (over all earlier layers).
    edges_per_polarity: int = 100
    #: Most similar neurons kept per neuron for the similarity edges.
    similarity_k: int = 20
    #: Fold the final norm weight into the output projection (W_U diag(w_norm) W_down[:, i]).
    final_norm: bool = False
    #: Neurons per block (rows of one batched matmul).
    neuron_block: int = 512
    #: Upper bound (MiB) on the score matrix of one block; source layers are grouped to fit it.
    block_memory_mb: int = 256
    #: Compute dtype: float32 | float64 | bfloat16 | float16 (top-k values are stored as float32).
    dtype: str = "float32"

    def __post_init__(self) -> None:
        parts = (self.parts,) if isinstance(self.parts, str) else tuple(self.parts)
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise InvalidArgument(f"connectivity parts must be among {', '.join(PARTS)}, got {', '.join(parts) or 'none'}")
        object.__setattr__(self, "parts", tuple(p for p in PARTS if p in parts))
        for name in ("top_k", "edges_per_polarity", "similarity_k", "neuron_block", "block_memory_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")
        if self.dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise InvalidArgument(f"dtype must be float32, float64, bfloat16 or float16, got {self.dtype!r}")

    def content_settings(self, part: str) -> dict[str, Any]:
        """The settings that determine the content of one part (compared on resume)."""
        common = {"dtype": self.dtype}
        if part == "output":
            return {**common, "top_k": self.top_k, "final_norm": self.final_norm}
        if part == "input":
            return {**common, "top_k": self.top_k}
        if part == "weights":
            return {**common, "edges_per_polarity": self.edges_per_polarity}
        return {**common, "similarity_k": self.similarity_k, "final_norm": self.final_norm}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """What a connectivity folder was computed from."""

    model: str
    num_layers: int
    d_mlp: int
    d_model: int
    vocab_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitProjections:
    """A neuron's weight-only token effects: output projection (promotes / suppresses) and input projection."""

    layer: int
    neuron: int
    output_norm: float = math.nan
    logit_effect: float = math.nan
    promotes: tuple[TokenWeight, ...] = ()
    suppresses: tuple[TokenWeight, ...] = ()
    #: Tokens whose embeddings most activate the neuron (silu(E W_gate^T) ⊙ E W_up^T).
    input_tokens: tuple[TokenWeight, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightEdge:
    """A weight-graph edge from neuron (src_layer, src_neuron) to (tgt_layer, tgt_neuron).

    ``c_up = W_up^t[N]·W_down^l[:, m]``, ``c_gate = W_gate^t[N]·W_down^l[:, m]``; polarity +1
    (both > 0, excitatory) or -1 (both < 0, inhibitory); ``strength = c_up + c_gate`` (= ±(|c_up|+|c_gate|)).
    """

    src_layer: int
    src_neuron: int
    tgt_layer: int
    tgt_neuron: int
    polarity: int
    c_up: float
    c_gate: float
    strength: float


# ------------------------------------------------------------------------------------------
# The folder
# ------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def write_parquet(table: Any, path: str | Path) -> Path:
    """Write a pyarrow table atomically (temporary name + rename)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


class ConnectivityFolder:
    """A connectivity output folder: manifest, per-layer parts of a run in progress, final files."""

    def __init__(self, path: str | Path, manifest: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = dict(manifest)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> ConnectivityFolder:
        """An existing folder; NotFound / CorruptInput when it is missing or not a connectivity folder."""
        path = Path(path)
        if not path.is_dir():
            raise NotFound(f"{path}: connectivity folder not found")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise CorruptInput(f"{path}: not a connectivity folder (no {MANIFEST}; run `circuits connectivity`)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptInput(f"{manifest_path}: unreadable manifest ({exc.__class__.__name__})") from None
        if not isinstance(manifest, Mapping) or manifest.get("format") != FORMAT:
            raise CorruptInput(f"{manifest_path}: not a connectivity manifest (format is not {FORMAT!r})")
        for key in ("model", "num_layers", "d_mlp", "settings"):
            if key not in manifest:
                raise CorruptInput(f"{manifest_path}: missing field {key!r}")
        return cls(path, manifest)

    @classmethod
    def create_or_resume(cls, path: str | Path, shape: ModelShape, spec: ConnectivitySpec) -> ConnectivityFolder:
        """Open ``path`` for writing ``spec``'s parts of ``shape``'s model.

        A new or empty folder gets a fresh manifest. An existing one must hold the same model and,
        for every part asked for again, the same content settings; otherwise FailedPrecondition
        (finished layers are never mixed with layers computed under other settings).
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InvalidArgument(f"{path}: exists and is not a folder")
        if path.is_dir() and (path / MANIFEST).is_file():
            folder = cls.open(path)
            old = folder.manifest
            for key in ("model", "num_layers", "d_mlp", "d_model", "vocab_size"):
                if old.get(key) != getattr(shape, key):
                    raise FailedPrecondition(
                        f"{path}: holds connectivity of another model ({key} {old.get(key)!r}, now {getattr(shape, key)!r}); "
                        "use a new output folder"
                    )
            folder.manifest["settings"] = cls.check_resumable(path, spec)
            folder.save_manifest()
            return folder
        if path.is_dir() and any(p for p in path.iterdir() if not p.name.startswith(".")):
            raise FailedPrecondition(f"{path}: folder is not empty and has no {MANIFEST}; use a new output folder")
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            **asdict(shape),
            "settings": {part: spec.content_settings(part) for part in spec.parts},
            "seconds": {},
        }
        folder = cls(path, manifest)
        folder.save_manifest()
        return folder

    @classmethod
    def check_resumable(cls, path: str | Path, spec: ConnectivitySpec) -> dict[str, Any]:
        """The folder's settings with ``spec``'s parts added; FailedPrecondition when a part in the
        folder was computed with other content settings (checked before any model is loaded)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InvalidArgument(f"{path}: exists and is not a folder")
        if not (path / MANIFEST).is_file():
            if path.is_dir() and any(p for p in path.iterdir() if not p.name.startswith(".")):
                raise FailedPrecondition(f"{path}: folder is not empty and has no {MANIFEST}; use a new output folder")
            return {part: spec.content_settings(part) for part in spec.parts}
        settings = dict(cls.open(path).manifest.get("settings") or {})
        for part in spec.parts:
            wanted = spec.content_settings(part)
            if part in settings and settings[part] != wanted:
                raise FailedPrecondition(
                    f"{path}: part {part!r} was computed with {settings[part]} and cannot be resumed with {wanted}; "
                    "use a new output folder"
                )
            settings[part] = wanted
        return settings

    def save_manifest(self) -> None:
        _atomic_write_bytes(self.path / MANIFEST, (json.dumps(self.manifest, indent=2, sort_keys=True) + "\n").encode())

    # -- shape -----------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return str(self.manifest.get("model", ""))

    @property
    def num_layers(self) -> int:
        return int(self.manifest["num_layers"])

    @property
    def d_mlp(self) -> int:
        return int(self.manifest["d_mlp"])

    # -- parts -----------------------------------------------------------------------------
    def part_path(self, part: str, layer: int) -> Path:
        return self.path / "parts" / part / f"layer-{layer:04d}.parquet"

    def final_path(self, part: str) -> Path:
        if part not in PART_FILES:
            raise InvalidArgument(f"unknown connectivity part {part!r} (one of {', '.join(PARTS)})")
        return self.path / PART_FILES[part]

    def has(self, part: str) -> bool:
        """True when the part's final file exists."""
        return self.final_path(part).is_file()

    def layers_done(self, part: str) -> set[int]:
        """Layers whose part file exists (every layer once the final file exists)."""
        if self.has(part):
            return set(range(self.num_layers))
        folder = self.path / "parts" / part
        done = set()
        if folder.is_dir():
            for p in folder.glob("layer-*.parquet"):
                try:
                    done.add(int(p.stem.split("-", 1)[1]))
                except ValueError:
                    continue
        return done

    def write_part(self, part: str, layer: int, table: Any) -> Path:
        """Store one finished layer of a part (atomically)."""
        if part == "output":
            from circuits_core.projections import write_projection_table

            return write_projection_table(table, self.part_path(part, layer), table.schema.metadata or {})
        return write_parquet(table, self.part_path(part, layer))

    def finish_part(self, part: str, *, metadata: Mapping[bytes, bytes] | None = None, seconds: float | None = None) -> Path:
        """Merge every layer's part file into the final file, then remove the parts."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        missing = sorted(set(range(self.num_layers)) - self.layers_done(part))
        if missing:
            raise FailedPrecondition(f"{self.path}: part {part!r} lacks layers {missing[:5]}{'...' if len(missing) > 5 else ''}")
        final = self.final_path(part)
        if not final.is_file():
            tables = [pq.read_table(self.part_path(part, layer)) for layer in range(self.num_layers)]
            table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
            if part == "similarity":
                # A pair is found from both of its neurons' layers: keep it once.
                keys = ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron"]
                grouped = table.group_by(keys).aggregate([("similarity", "max")])
                table = pa.table({**{k: grouped[k] for k in keys}, "similarity": grouped["similarity_max"]})
            if part in ("weights", "similarity"):
                # Global order for lookups: edges of one target together (zone maps prune the rest).
                keys = [("tgt_layer", "ascending"), ("tgt_neuron", "ascending")]
                if part == "weights":
                    keys += [("polarity", "descending")]
                table = table.sort_by(keys)
            if metadata:
                table = table.replace_schema_metadata(dict(metadata))
            write_parquet(table, final)
        for layer in range(self.num_layers):
            self.part_path(part, layer).unlink(missing_ok=True)
        try:
            self.part_path(part, 0).parent.rmdir()
            (self.path / "parts").rmdir()
        except OSError:
            pass
        if seconds is not None:
            self.manifest.setdefault("seconds", {})[part] = round(seconds, 3)
            self.save_manifest()
        return final

    # -- reading ---------------------------------------------------------------------------
    def _read(self, part: str, columns: Iterable[str]) -> Any:
        import pyarrow.parquet as pq

        path = self.final_path(part)
        if not path.is_file():
            hint = "" if part in self.manifest.get("settings", {}) else f" (run `circuits connectivity --parts {part}`)"
            raise NotFound(f"{self.path}: no {PART_FILES[part]}{hint}")
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for broken files
            raise CorruptInput(f"{path}: not a readable Parquet file ({exc.__class__.__name__})") from None
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise CorruptInput(f"{path}: missing column(s) {', '.join(missing)}")
        return table

    def output_projections(self) -> Any:
        """The output projections as a pyarrow Table (:mod:`circuits_core.projections` layout)."""
        from circuits_core.projections import read_projection_table

        if not self.has("output"):
            self._read("output", ())
        return read_projection_table(self.final_path("output"))[0]

    def input_projections(self) -> Any:
        return self._read("input", INPUT_COLUMNS)

    def weight_edges(self) -> Any:
        return self._read("weights", WEIGHT_EDGE_COLUMNS)

    def projection_edges(self) -> Any:
        return self._read("similarity", SIMILARITY_COLUMNS)


def settings_fields() -> tuple[str, ...]:
    """Names of the :class:`ConnectivitySpec` fields (CLI flags are made from them)."""
    return tuple(f.name for f in fields(ConnectivitySpec))
