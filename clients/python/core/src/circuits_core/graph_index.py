"""``graph-metadata.json``: the index of a folder of graph JSON files (owner of that format).

circuit-tracer's local server and its ``index.html`` first load ``data/graph-metadata.json``,
``{"graphs": [{slug, scan, prompt, prompt_tokens, transcoder_list, node_threshold}, ...]}``, then
``graph_data/<slug>.json``. Keeping this index beside our ``<slug>.json`` files lets that server
(and ``circuits view DIR``) serve the folder as it is.

Updates are read-modify-write under an exclusive lock on a sidecar lock file and replace the
index atomically (temp file, fsync, rename), so concurrent writers lose no entry and a killed
writer leaves the previous index intact. An unreadable index is rebuilt from the graph files.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from circuits_core.errors import CorruptInput
from circuits_core.files import atomic_writer

INDEX_NAME = "graph-metadata.json"
ENTRY_KEYS = ("slug", "scan", "prompt", "prompt_tokens", "transcoder_list", "node_threshold")


def index_entry(legacy: Mapping[str, Any]) -> dict[str, Any]:
    """The index entry of one graph (its legacy JSON): the metadata fields circuit-tracer lists."""
    meta = legacy.get("metadata") if isinstance(legacy, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("slug"), str) or not meta["slug"]:
        raise CorruptInput("graph index: a graph needs metadata.slug")
    entry = {key: meta[key] for key in ENTRY_KEYS if key in meta}
    entry.setdefault("transcoder_list", [])
    return entry


def read_graph_index(folder: str | Path) -> list[dict[str, Any]]:
    """The entries of ``folder/graph-metadata.json`` ([] when there is none)."""
    path = Path(folder) / INDEX_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    return _parse(raw, path)


def _parse(raw: bytes, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptInput(f"{path}: not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    graphs = data.get("graphs") if isinstance(data, Mapping) else None
    if not isinstance(graphs, list) or not all(isinstance(g, Mapping) and isinstance(g.get("slug"), str) for g in graphs):
        raise CorruptInput(f"{path}: expected {{\"graphs\": [{{\"slug\": ...}}, ...]}}")
    return [dict(g) for g in graphs]


def update_graph_index(folder: str | Path, entry: Mapping[str, Any]) -> Path:
    """Add or replace (by slug) ``entry`` in ``folder/graph-metadata.json``; return the index path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / INDEX_NAME
    with _locked(folder):
        try:
            graphs = read_graph_index(folder)
        except CorruptInput:
            graphs = _entries_from_files(folder)
        graphs = [g for g in graphs if g.get("slug") != entry["slug"]]
        graphs.append(dict(entry))
        _write_atomic(path, {"graphs": graphs})
    return path


def rebuild_graph_index(folder: str | Path) -> Path:
    """Write ``folder/graph-metadata.json`` afresh from the graph JSON files in ``folder``."""
    folder = Path(folder)
    with _locked(folder):
        path = folder / INDEX_NAME
        _write_atomic(path, {"graphs": _entries_from_files(folder)})
    return path


def _entries_from_files(folder: Path) -> list[dict[str, Any]]:
    from circuits_core.graphio import read_viewer_json

    entries: dict[str, dict[str, Any]] = {}
    for file in sorted(folder.glob("*.json")):
        if file.name == INDEX_NAME or file.name.startswith("."):
            continue
        try:
            entry = index_entry(read_viewer_json(file))
        except (CorruptInput, ValueError):
            continue
        # circuit-tracer fetches graph_data/<slug>.json: list only files it can find that way.
        if file.name == f"{entry['slug']}.json":
            entries[entry["slug"]] = entry
    return list(entries.values())


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
        yield
        return
    with open(folder / f".{INDEX_NAME}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_writer(path, text=True) as fh:
        json.dump(data, fh, ensure_ascii=False, indent=2, allow_nan=False)
