"""The connectivity output folder (owner module): manifest, per-layer parts, final Parquet files.

Layout and columns: :mod:`circuits_core.connectivity` and ``docs/connectivity.md``. Every file is
written atomically (temporary name + rename); a layer is done when its part file exists, so a
killed run resumes at the first missing layer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from circuits_core.connectivity import (
    FORMAT,
    INPUT_COLUMNS,
    MANIFEST,
    PART_FILES,
    PARTS,
    SCHEMA_VERSION,
    SIMILARITY_COLUMNS,
    WEIGHT_EDGE_COLUMNS,
    ConnectivitySpec,
    ModelShape,
)
from circuits_core.errors import CorruptInput, FailedPrecondition, InvalidArgument, NotFound


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
