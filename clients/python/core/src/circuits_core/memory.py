"""The memory model of one trace, and the plan that keeps a trace within a memory budget.

``docs/memory.md`` explains every term; this module is the same model as code. With ``T`` prompt
tokens, ``L`` layers, ``D`` = d_model, ``F`` = d_mlp, ``H`` query heads, ``K`` key/value heads,
``d_h`` head dim, ``b`` bytes per element of the model dtype and ``a`` of the accumulation dtype
(float32 for 16-bit models), one trace holds, besides the weights:

* node pass (one forward with its graph, one backward): the frozen RMS factors ``2·L·T·D·a``;
  the frozen attention patterns ``L·H·T²·s`` when stored (``s`` = a or b), or their inputs
  ``L·T·(H+K)·d_h·b`` when recomputed per layer; the frozen MLP constants ``c·L·T·F·b``
  (c = 2 for the half rule); the neuron scores and activations ``L·T·F·(a+b)``; transients of
  one layer.
* edge pass (one forward, then one batched backward per chunk of targets): the RMS factors and
  patterns again (no MLP constants: direct effects never cross an MLP), and per chunk of ``C``
  targets the cotangents ``≈ c_e·C·T·D·a``.

:func:`plan_trace` picks, for a budget, how patterns are kept (``full`` / ``model`` dtype /
``recompute`` in blocks of query rows) and the edge chunk size. No torch: the CLI and docs use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from circuits_core.errors import InvalidArgument, ResourceExhausted

PATTERN_STORAGE = ("full", "model", "recompute")

#: Cotangent tensors of width D alive per target while a chunk's batched backward runs
#: (residual gradient, attention branch in and out, norm output, value gradient, ...),
#: calibrated on SmolLM2 (benchmarks/long_trace_bench.py) and rounded up.
EDGE_COTANGENTS_PER_TARGET = 3
#: Live [T, F] gradients of the layer being differentiated in the node pass (grad at the
#: neurons, the gate and up branches, the score), rounded up.
NODE_LAYER_TRANSIENTS = 5
#: Fixed allowance for everything else a trace allocates (index tensors, small buffers).
FIXED_OVERHEAD = 8 << 20
#: Smallest block of query rows a recomputed pattern is evaluated in.
MIN_PATTERN_BLOCK = 16

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Bytes from ``4GiB``, ``4GB``, ``4g``, ``512MiB``, ``1.5G`` or a plain number of bytes.

    Binary and decimal prefixes are both read as powers of 1024 (memory is sized that way).
    Raises InvalidArgument naming ``what`` for anything else.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidArgument(f"{what} must be >= 0, got {text}")
        return text
    match = _SIZE.match(str(text))
    if not match or (match.group(3) and not match.group(2)):
        raise InvalidArgument(f"{what}: cannot read {str(text)!r} as a size (e.g. 4GiB, 512MiB, 3.5G)")
    value = float(match.group(1)) * 1024 ** _UNITS[match.group(2).lower()]
    return int(value)


def format_size(n: float) -> str:
    """``3.2 GiB``-style text for a byte count."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if abs(n) >= 1024**power:
            return f"{n / 1024**power:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """What the memory model needs to know about a model."""

    layers: int
    d_model: int
    d_mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    #: Bytes per element of the model dtype (2 for bf16, 4 for float32, 8 for float64).
    dtype_bytes: int
    #: Bytes per element of a stored pattern when kept "full" (eager: model dtype; sdpa: accumulation dtype).
    full_pattern_bytes: int = 0
    #: MLP rule (relp keeps two [T, F] constants per layer, stop_grad_gate one, none three).
    mlp_rule: str = "relp"

    @property
    def acc_bytes(self) -> int:
        return max(4, self.dtype_bytes)

    @classmethod
    def from_config(cls, config: Any, *, dtype_bytes: int, mlp_rule: str = "relp", eager: bool = False) -> ModelShape:
        """From a transformers config (read by attribute; no transformers import here)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        return cls(
            layers=int(text.num_hidden_layers), d_model=int(text.hidden_size), d_mlp=int(text.intermediate_size),
            heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
            vocab=int(text.vocab_size), dtype_bytes=dtype_bytes,
            full_pattern_bytes=dtype_bytes if eager else max(4, dtype_bytes), mlp_rule=mlp_rule,
        )

    def pattern_bytes(self, T: int, storage: str) -> int:
        """Bytes of one layer's frozen attention pattern as kept for the backward."""
        if storage == "recompute":
            return T * (self.heads + self.kv_heads) * self.head_dim * self.dtype_bytes
        element = self.dtype_bytes if storage == "model" else (self.full_pattern_bytes or self.acc_bytes)
        return self.heads * T * T * element

    def pattern_transient(self, T: int, storage: str, block: int | None, chunk: int = 1) -> int:
        """Bytes alive while one layer's pattern is (re)computed: scores, mask, softmax of one block."""
        rows = T if storage != "recompute" or not block else min(T, block)
        probs = 3 * self.heads * rows * T * self.acc_bytes
        if storage == "recompute":
            probs += chunk * self.heads * T * self.head_dim * self.acc_bytes  # one block's A^T @ grad
        return probs


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryEstimate:
    """Peak working memory (bytes, beyond the weights) of the two passes, term by term."""

    node_terms: Mapping[str, int]
    edge_terms: Mapping[str, int]

    @property
    def node_peak(self) -> int:
        return sum(self.node_terms.values())

    @property
    def edge_peak(self) -> int:
        return sum(self.edge_terms.values())

    @property
    def peak(self) -> int:
        return max(self.node_peak, self.edge_peak)


@dataclass(frozen=True, slots=True, kw_only=True)
class TracePlan:
    """How one trace keeps within its budget (None: no budget, the fastest plan)."""

    tokens: int
    budget: int | None
    node_patterns: str
    edge_patterns: str
    #: Query rows per block of a recomputed pattern (0: the whole prompt at once).
    pattern_block: int
    edge_chunk_size: int
    estimate: MemoryEstimate = field(repr=False)

    def describe(self) -> str:
        budget = "no budget" if self.budget is None else f"budget {format_size(self.budget)}"
        block = f", blocks of {self.pattern_block} query rows" if self.pattern_block else ""
        return (
            f"T={self.tokens}, {budget}: node pass patterns {self.node_patterns}, edge pass patterns "
            f"{self.edge_patterns}{block}, edge chunks of {self.edge_chunk_size}; estimated peak "
            f"{format_size(self.estimate.node_peak)} (nodes), {format_size(self.estimate.edge_peak)} (edges)"
        )


def _mlp_constants(shape: ModelShape) -> int:
    return {"relp": 2, "stop_grad_gate": 1}.get(shape.mlp_rule, 3)


def node_pass_terms(shape: ModelShape, T: int, *, storage: str, block: int | None) -> dict[str, int]:
    """Bytes the node pass holds at its peak (the start of its backward), term by term."""
    L, D, F, a, b = shape.layers, shape.d_model, shape.d_mlp, shape.acc_bytes, shape.dtype_bytes
    return {
        "rms factors": 2 * L * T * D * a,
        "attention patterns": L * shape.pattern_bytes(T, storage),
        "mlp constants": _mlp_constants(shape) * L * T * F * b,
        "neuron scores + activations": L * T * F * (a + b),
        "layer transients": NODE_LAYER_TRANSIENTS * T * F * a + shape.pattern_transient(T, storage, block),
        "logits + fixed": 2 * shape.vocab * a + FIXED_OVERHEAD,
    }


def edge_pass_terms(
    shape: ModelShape, T: int, *, storage: str, block: int | None, chunk: int, neurons: int = 500
) -> dict[str, int]:
    """Bytes the edge pass holds while one chunk of ``chunk`` targets is differentiated, term by term."""
    L, D, a = shape.layers, shape.d_model, shape.acc_bytes
    sources = neurons + T
    return {
        "rms factors": 2 * L * T * D * a,
        "attention patterns": L * shape.pattern_bytes(T, storage),
        "chunk cotangents": EDGE_COTANGENTS_PER_TARGET * chunk * T * D * a,
        "pattern transients": shape.pattern_transient(T, storage, block, chunk),
        "edge rows + fixed": 4 * chunk * sources * a + neurons * D * a + FIXED_OVERHEAD,
    }


def estimate(
    shape: ModelShape, T: int, *, node_patterns: str = "full", edge_patterns: str = "full",
    block: int | None = None, chunk: int = 16, neurons: int = 500,
) -> MemoryEstimate:
    """The memory model for one plan (see :func:`node_pass_terms`, :func:`edge_pass_terms`)."""
    return MemoryEstimate(
        node_terms=node_pass_terms(shape, T, storage=node_patterns, block=block),
        edge_terms=edge_pass_terms(shape, T, storage=edge_patterns, block=block, chunk=chunk, neurons=neurons),
    )


def _storages(shape: ModelShape) -> list[str]:
    storages = ["full"]
    if (shape.full_pattern_bytes or shape.acc_bytes) > shape.dtype_bytes:
        storages.append("model")
    storages.append("recompute")
    return storages


def _largest_block(fits: Any, T: int) -> int | None:
    """The largest block of query rows (T, then halving down to MIN_PATTERN_BLOCK) for which ``fits(block)``."""
    block = T
    while True:
        if fits(block):
            return block
        if block <= MIN_PATTERN_BLOCK:
            return None
        block = max(MIN_PATTERN_BLOCK, block // 2)


def plan_trace(
    shape: ModelShape, T: int, *, budget: int | None, max_chunk: int = 16, neurons: int = 500,
    node_patterns: str | None = None, edge_patterns: str | None = None,
) -> TracePlan:
    """The plan for a ``T``-token trace within ``budget`` bytes of working memory (None: unlimited).

    Prefers, in order: patterns stored as computed, stored in the model dtype, recomputed in the
    largest block of query rows that fits; for the edge pass, stored patterns while they leave
    room for chunks of at least ``min(max_chunk, 8)`` targets. Explicit ``node_patterns`` /
    ``edge_patterns`` override the choice. Raises ResourceExhausted naming the smallest budget
    that would do when even recomputed patterns and one-target chunks do not fit.
    """
    if T < 1:
        raise InvalidArgument(f"a trace needs at least one token, got T={T}")
    if max_chunk < 1:
        raise InvalidArgument(f"edge chunk size must be >= 1, got {max_chunk}")
    for name, value in (("node_patterns", node_patterns), ("edge_patterns", edge_patterns)):
        if value is not None and value not in PATTERN_STORAGE:
            raise InvalidArgument(f"{name} must be one of {', '.join(PATTERN_STORAGE)}, got {value!r}")
    if budget is None:
        node = node_patterns or "full"
        edge = edge_patterns or "full"
        return TracePlan(
            tokens=T, budget=None, node_patterns=node, edge_patterns=edge, pattern_block=0, edge_chunk_size=max_chunk,
            estimate=estimate(shape, T, node_patterns=node, edge_patterns=edge, chunk=max_chunk, neurons=neurons),
        )

    def node_fits(storage: str, block: int | None) -> bool:
        return sum(node_pass_terms(shape, T, storage=storage, block=block).values()) <= budget

    def edge_chunk(storage: str, block: int | None) -> int:
        """The largest chunk <= max_chunk that fits (0: none)."""
        lo, hi = 0, max_chunk
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if sum(edge_pass_terms(shape, T, storage=storage, block=block, chunk=mid, neurons=neurons).values()) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    node_choice: tuple[str, int | None] | None = None
    for storage in [node_patterns] if node_patterns else _storages(shape):
        if storage == "recompute":
            block = _largest_block(lambda b_: node_fits("recompute", b_), T)
            if block is not None:
                node_choice = (storage, block)
                break
        elif node_fits(storage, None):
            node_choice = (storage, None)
            break

    wanted = min(max_chunk, 8)
    edge_choice: tuple[str, int | None, int] | None = None
    best: tuple[str, int | None, int] | None = None
    for storage in [edge_patterns] if edge_patterns else _storages(shape):
        if storage == "recompute":
            block = _largest_block(lambda b_: edge_chunk("recompute", b_) >= 1, T)
            chunk = edge_chunk(storage, block) if block is not None else 0
        else:
            block, chunk = None, edge_chunk(storage, None)
        if chunk >= 1 and (best is None or chunk > best[2]):
            best = (storage, block, chunk)
        if chunk >= wanted:
            edge_choice = (storage, block, chunk)
            break
    edge_choice = edge_choice or best

    if node_choice is None or edge_choice is None:
        least = estimate(shape, T, node_patterns="recompute", edge_patterns="recompute", block=MIN_PATTERN_BLOCK,
                         chunk=1, neurons=neurons)
        raise ResourceExhausted(
            f"a {T}-token trace needs at least {format_size(least.peak)} of working memory even with recomputed "
            f"attention patterns and one-target edge chunks; the memory budget is {format_size(budget)}"
        )
    block_rows = [b_ for b_ in (node_choice[1], edge_choice[1]) if b_]
    block = min(block_rows) if block_rows else None
    return TracePlan(
        tokens=T, budget=budget, node_patterns=node_choice[0], edge_patterns=edge_choice[0],
        pattern_block=0 if block is None or block >= T else block, edge_chunk_size=edge_choice[2],
        estimate=estimate(shape, T, node_patterns=node_choice[0], edge_patterns=edge_choice[0], block=block,
                          chunk=edge_choice[2], neurons=neurons),
    )


def fitted_growth(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """``(exponent, coefficient)`` of the least-squares fit ``y = c · x^k`` in log-log space."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(points) < 2:
        raise InvalidArgument("a growth fit needs at least two positive points")
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        raise InvalidArgument("a growth fit needs two different x values")
    k = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return k, math.exp(my - k * mx)


@dataclass(frozen=True, slots=True, kw_only=True)
class EnginePlacement:
    """Where an in-process engine puts the model and how much working memory one trace may use.

    The field comments are the help of ``circuits graph``'s, the attribution server's and the batch
    worker's flags (:mod:`circuits_core.fieldargs`); ``circuits_attribution.models.load_engine`` reads them.
    """

    #: Working memory one trace may use beyond the weights, per device (e.g. 4GiB): attention patterns are then kept in the model dtype or recomputed per layer and edge chunks sized to fit (docs/memory.md). Empty: no limit (on a GPU, its free memory).
    memory_budget: str = ""
    #: Spread the model over devices: auto (fill the GPUs in --max-memory order, then offload to CPU memory, then disk), or a JSON object / JSON file mapping module names to devices (0, "cuda:1", "cpu", "disk"). Empty: the whole model on --device.
    device_map: str = ""
    #: Memory per device for --device-map auto, e.g. cuda:0=70GiB,cuda:1=70GiB,cpu=200GiB (each GPU keeps the memory budget, or a fifth, free for the trace).
    max_memory: str = ""
    #: Folder for weights a device map offloads to disk (default: a temporary folder).
    offload_folder: str = ""

    def __post_init__(self) -> None:
        if self.memory_budget:
            parse_size(self.memory_budget, what="--memory-budget")
        if self.max_memory and not self.device_map:
            raise InvalidArgument("--max-memory only applies with --device-map (e.g. --device-map auto)")

    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments of ``load_engine`` these settings give (unset ones left out)."""
        options: dict[str, Any] = {}
        if self.memory_budget:
            options["memory_budget"] = parse_size(self.memory_budget, what="--memory-budget")
        if self.device_map:
            options["device_map"] = self.device_map
        if self.max_memory:
            options["max_memory"] = self.max_memory
        if self.offload_folder:
            options["offload_folder"] = self.offload_folder
        return options
