"""What circuit-tracer's and Neuronpedia's graph viewers need from the fields of our graph JSON.

- ``metadata.scan`` is the viewer's model id. Neuronpedia's upload accepts only
  ``[a-zA-Z0-9_.-]+`` and looks the id up among its models, so the models we support map to the
  ids Neuronpedia uses for them (its ``np_model_to_hf.json``); any other model gets a sanitized
  id from its name. The hub id stays in ``metadata.model``.
- ``metadata.slug`` follows the same rule (and names the file circuit-tracer's server fetches).
- Logit ``clerp``: both viewers take the token from between the first pair of double quotes
  and the probability from ``(p=...)``: circuit-tracer writes ``Output " Paris" (p=0.773)``.
"""

from __future__ import annotations

import math
import re
import unicodedata

# Neuronpedia model ids of the hub models we support (from Neuronpedia's np_model_to_hf.json).
NEURONPEDIA_MODEL_IDS: dict[str, str] = {
    "meta-llama/llama-3.1-8b": "llama3.1-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama3.1-8b-it",
    "meta-llama/meta-llama-3.1-8b": "llama3.1-8b",
    "meta-llama/meta-llama-3.1-8b-instruct": "llama3.1-8b-it",
    "qwen/qwen3-32b": "qwen3-32b",
    "allenai/olmo-3-1025-7b": "olmo-3-1025-7b",
    "allenai/olmo-3-1125-32b": "olmo-3-1125-32b",
}

SCAN_PATTERN = re.compile(r"^[a-zA-Z0-9_.-]+$")
_LOGIT_CLERP = re.compile(r'^Output "(?P<token>.*)" \(p=(?P<p>[-+0-9.eE]+|nan|inf)\)$', re.DOTALL)
_OLD_LOGIT_CLERP = re.compile(r"^(?P<token>.*) \(p=(?P<p>[-+0-9.eE]+|nan|inf)\)$", re.DOTALL)


def scan_id(model: str) -> str:
    """The viewer model id for ``model`` (hub id, local path or an id that is already valid).

    ``scan_id("meta-llama/Llama-3.1-8B-Instruct") == "llama3.1-8b-it"``;
    ``scan_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m-instruct"`` (not on
    Neuronpedia); a valid id is returned unchanged, so the mapping is idempotent.
    """
    name = model.strip()
    known = NEURONPEDIA_MODEL_IDS.get(name.lower().rstrip("/"))
    if known:
        return known
    if SCAN_PATTERN.match(name):
        return name
    last = name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^a-z0-9_.-]+", "-", last.lower()).strip("-.")
    return cleaned or "model"


def slug_id(slug: str) -> str:
    """A graph slug Neuronpedia accepts: ``slug`` itself when valid, else an ASCII slug of it."""
    if SCAN_PATTERN.match(slug):
        return slug
    ascii_text = unicodedata.normalize("NFKD", slug).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", ascii_text).strip("-.") or "graph"


def logit_clerp(token: str, probability: float | None) -> str:
    """circuit-tracer's logit label: ``Output " Paris" (p=0.773)``."""
    p = probability if probability is not None else float("nan")
    return f'Output "{token}" (p={p:.3f})'


def parse_logit_clerp(clerp: str) -> tuple[str, float | None]:
    """Token and probability from a logit clerp, in circuit-tracer's form or our older
    ``" Paris (p=0.7725)"`` form; a clerp in neither form is returned as the token."""
    match = _LOGIT_CLERP.match(clerp) or _OLD_LOGIT_CLERP.match(clerp)
    if not match:
        return clerp, None
    p = float(match.group("p"))
    return match.group("token"), p if math.isfinite(p) else None
