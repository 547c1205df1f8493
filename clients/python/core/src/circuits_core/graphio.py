"""Graph files: one reader and one writer for every on-disk format.

Formats by file name: ``*.json`` / ``*.json.gz`` (legacy viewer JSON, relp-spec §E) and
``*.pb`` / ``*.pb.gz`` (the compact format batch workers write: a serialized
``circuits.v1.Graph``, optionally gzip-compressed). Writes are atomic (temp file + rename), so a
killed writer never leaves a half file under the final name.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from circuits_core.errors import CorruptInput, InvalidArgument
from circuits_core.schemas import Graph, load_legacy, save_legacy

GRAPH_SUFFIXES = (".json", ".json.gz", ".pb", ".pb.gz")


def graph_format(path: str | Path) -> str:
    """'json' or 'pb' from the file name; raises InvalidArgument for other names."""
    name = Path(path).name
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith((".pb", ".pb.gz")):
        return "pb"
    raise InvalidArgument(f"{path}: not a graph file (expected one of {', '.join(GRAPH_SUFFIXES)})")


def is_graph_file(path: str | Path) -> bool:
    """A graph file by its name (hidden files and a folder's graph-metadata.json index are not)."""
    name = Path(path).name
    return name.endswith(GRAPH_SUFFIXES) and not name.startswith(".") and name != "graph-metadata.json"


def read_graph_proto(path: str | Path):
    """Read a compact graph file as a ``circuits.v1.Graph`` message (fast path for aggregation)."""
    from circuits_core._proto.circuits.v1 import graph_pb2
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: no such file") from None
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        msg = graph_pb2.Graph()
        msg.ParseFromString(raw)
    except (OSError, EOFError, zlib.error, DecodeError, RecursionError) as exc:
        raise CorruptInput(f"{path}: not a valid compact graph ({' '.join(str(exc).split())[:200]})") from None
    return msg


def read_graph(path: str | Path) -> Graph:
    """Read any graph file into a domain Graph; corrupt files raise CorruptInput naming the file."""
    if graph_format(path) == "json":
        return Graph.load(path)
    from circuits_core import wire

    try:
        return wire.graph_from_proto(read_graph_proto(path))
    except CorruptInput:
        raise
    except InvalidArgument as exc:
        raise CorruptInput(f"{path}: {exc}") from None


def write_graph(graph: Graph, path: str | Path) -> Path:
    """Write a graph in the format its name asks for, atomically; return the path."""
    path = Path(path)
    if graph_format(path) == "json":
        return save_legacy(graph.to_legacy(), path)
    from circuits_core import wire

    payload = wire.graph_to_proto(graph).SerializeToString()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path
