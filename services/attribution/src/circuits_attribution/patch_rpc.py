"""The Patch RPC handler: decode -> run on an exclusively held engine -> encode.

Patching installs hooks on the engine's model modules, so the engine is held exclusively (the
same way as Intervene, :mod:`circuits_attribution.intervene_rpc`).
"""

from __future__ import annotations

from typing import Any

from circuits_core import wire

from circuits_attribution.intervene_rpc import _run_exclusive
from circuits_attribution.patching import run_patch


def handle_patch(runner: Any, request: Any, context: Any) -> Any:
    """Serve ``circuits.v1.PatchRequest`` -> ``circuits.v1.PatchResponse``; domain errors (bad
    neurons, prompts of different lengths, same answers) go to the shared error interceptor."""
    spec = wire.patch_request_from_proto(request)
    result = _run_exclusive(runner, lambda engine: run_patch(engine, spec), lambda: not context.is_active())
    return wire.patch_result_to_proto(result)
