"""circuits core: the layer every other package builds on.

Domain types (:mod:`circuits_core.schemas`), the one error root (:mod:`circuits_core.errors`),
one owner module per file format, the request types, the typed configuration, the limits, and the
protobuf conversion (:mod:`circuits_core.wire`, the only module here that touches ``*_pb2``).
Importing it loads no torch, duckdb, LLM SDK or server code.
"""

__version__ = "0.1.0"
