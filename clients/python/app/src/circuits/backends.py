"""The one place the app picks an engine: in process (a service package) or a server (the SDK).

Each function returns an object of one of the small interfaces in :mod:`circuits_core.capabilities`;
the command that asked for it runs the same code whichever it got. In process needs the optional
part (``pip install 'circuits[attribution]'`` / ``[atlas]``): without it the command ends with the
one-line :mod:`circuits.extras` error. The SDK clients are part of the base install.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuits.extras import require
from circuits_core.config import SMALL_MODEL

if TYPE_CHECKING:
    from circuits_core.capabilities import AtlasQueries, Intervener, Patcher, Tracer
    from circuits_core.tracing import TraceRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class Remote:
    """A server to use instead of an in-process engine."""

    #: HOST:PORT of the server.
    address: str
    #: Bearer token (empty: none).
    token: str = field(default="", repr=False)
    #: CA certificate (PEM) to verify the server over TLS (empty: plaintext).
    tls_ca_file: str = ""
    #: Seconds one call may take (None: the client's default).
    timeout: float | None = None

    def client_options(self) -> dict[str, Any]:
        return {"token": self.token, "tls_ca_file": self.tls_ca_file}


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalModel:
    """The model an in-process attribution engine loads, and its engine settings."""

    #: Hub id or local checkpoint directory.
    name: str = SMALL_MODEL
    #: float32 | bfloat16 | float16 | float64
    dtype: str = "float32"
    #: cpu | cuda | cuda:N
    device: str = "cpu"
    #: RelPConfig engine settings (mlp_rule, edge_chunk_size, progress, ...).
    engine: tuple[tuple[str, Any], ...] = ()


def _attribution(remote: Remote | None, model: LocalModel, *, what: str, check: TraceRequest | None = None) -> Any:
    if remote is not None:
        from circuits_sdk.attribution import DEFAULT_TRACE_TIMEOUT, AttributionClient

        return AttributionClient(remote.address, timeout=remote.timeout or DEFAULT_TRACE_TIMEOUT, **remote.client_options())
    models = require("circuits_attribution.models", what=what)
    return models.load_engine(model.name, dtype=model.dtype, device=model.device, check=check, **dict(model.engine))


def open_tracer(
    *, remote: Remote | None, model: LocalModel = LocalModel(), what: str = "tracing", check: TraceRequest | None = None
) -> Tracer:
    """An attribution server's client, or the RelP engine on ``model`` loaded in this process.

    ``check``: in process, this request's target tokens are checked with the tokenizer before the
    weights load (a server checks them when the request arrives)."""
    return _attribution(remote, model, what=what, check=check)


def open_intervener(*, remote: Remote | None, model: LocalModel = LocalModel(), what: str = "interventions") -> Intervener:
    """An attribution server's client, or the model loaded in this process."""
    return _attribution(remote, model, what=what)


def open_patcher(*, remote: Remote | None, model: LocalModel = LocalModel(), what: str = "activation patching") -> Patcher:
    """An attribution server's client, or the model loaded in this process."""
    return _attribution(remote, model, what=what)


def open_atlas(*, remote: Remote | None, path: str | Path = "", what: str = "atlas queries") -> AtlasQueries:
    """An atlas server's client, or the atlas file at ``path`` opened read-only in this process."""
    if remote is not None:
        from circuits_sdk.atlas import AtlasClient

        return AtlasClient(remote.address, **({"timeout": remote.timeout} if remote.timeout else {}), **remote.client_options())
    database = require("circuits_atlas.database", what=what)
    return database.CircuitDatabase(path, read_only=True)
