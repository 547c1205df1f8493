"""The exemplar file (``ex.duckdb``): per-neuron top-activating contexts, random-sample contexts and
activation statistics over a text corpus. This module owns the format: the model pass
(``circuits_attribution.exemplars``) writes it, the labeler reads it, ``circuits exemplars --merge``
combines shard files; nobody else touches its tables.

Every token of the corpus has a unique id ``uid = sequence << 20 | position`` (the corpus is packed
into sequences of ``seq_len`` tokens, see the model pass). Per neuron the file keeps

* the top-``top_k`` tokens by activation under the total order (activation descending, uid
  ascending), each with a window of token ids around it (``context_before`` tokens before,
  ``context_after`` after; -1 pads windows at sequence edges);
* count, sum, sum of squares and minimum of its activation over every token seen;
* its activation at the ``random_samples`` shared random tokens: the tokens with the smallest
  ``splitmix64(uid ^ seed)`` hashes (a bottom-k sample: uniform, deterministic, and the sample of
  a union is the bottom-k of the samples), from which the activation quantiles are estimated.

All three are exactly mergeable: the top-k of a union is the top-k of the parts' top-k, sums add,
and the bottom-k of a union is the bottom-k of the parts' bottom-k. So the file doubles as the
resumable state of a run (checkpoints are this file, written atomically), and shard files of an
Indexed Job merge into exactly what one process would have written (sums up to float rounding).

Tables (``meta`` holds the settings JSON, shard indices, next batch, completeness)::

    meta(key VARCHAR PRIMARY KEY, value VARCHAR)
    tokens(token_id INTEGER, token VARCHAR)                       -- strings of the ids in windows
    neuron_stats(layer INTEGER, neuron INTEGER, act_sum DOUBLE, act_sq_sum DOUBLE, act_min FLOAT,
                 act_max FLOAT, quantiles FLOAT[])                 -- quantiles at meta.quantile_levels
    exemplars(layer INTEGER, neuron INTEGER, rank INTEGER, activation FLOAT, uid BIGINT,
              "window" INTEGER[W])
    samples(rank INTEGER, hash UBIGINT, uid BIGINT, "window" INTEGER[W])
    sample_activations(layer INTEGER, rank INTEGER, activations FLOAT[F])

``duckdb``, ``numpy`` and ``pyarrow`` are imported on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from circuits_core.errors import CorruptInput, FailedPrecondition, InvalidArgument, NotFound
from circuits_core.exemplars import MAX_SEQ_LEN, POSITION_BITS

SCHEMA_VERSION = "1"
FORMAT_NAME = "circuits.exemplars"
#: Quantile levels stored per neuron (estimated from the random sample).
QUANTILE_LEVELS = (0.1, 0.5, 0.9, 0.99)
TABLES = ("meta", "tokens", "neuron_stats", "exemplars", "samples", "sample_activations")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExemplarSettings:
    """What a run computed; two files merge (and a run resumes) only when these agree."""

    model: str
    #: Corpus as the user named it, and a fingerprint of its content (sha256).
    corpus: str
    corpus_fingerprint: str
    text_field: str = "text"
    #: Decoder layers recorded (sorted).
    layers: tuple[int, ...]
    #: Neurons per layer (MLP intermediate size).
    num_neurons: int
    top_k: int = 20
    random_samples: int = 256
    context_before: int = 16
    context_after: int = 4
    seq_len: int = 256
    batch_size: int = 8
    #: Batches of the whole corpus considered (0 = all); shards take batch b when b % shard_count == shard.
    max_batches: int = 0
    seed: int = 0
    shard_count: int = 1

    @property
    def window(self) -> int:
        return self.context_before + 1 + self.context_after

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "layers": list(self.layers)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExemplarSettings:
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise CorruptInput(f"exemplar settings carry unknown keys {sorted(unknown)}")
        data["layers"] = tuple(int(x) for x in data.get("layers", ()))
        return cls(**data)

    def check(self) -> None:
        if not self.layers:
            raise InvalidArgument("no layers to record")
        if self.num_neurons < 1:
            raise InvalidArgument("num_neurons must be >= 1")
        for name in ("top_k", "seq_len", "batch_size", "shard_count"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("random_samples", "context_before", "context_after", "max_batches"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len >= MAX_SEQ_LEN:
            raise InvalidArgument(f"seq_len must be < {MAX_SEQ_LEN}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExemplarState:
    """The whole content of an exemplar file as numpy columns (L = len(layers), K = top_k,
    F = num_neurons, W = window, S <= random_samples)."""

    settings: ExemplarSettings
    #: Shards whose batches this state covers (one for a run's file, all for a merged file).
    shards: tuple[int, ...]
    #: For a single shard: the next global batch index to process; -1 when merged.
    next_batch: int
    complete: bool
    tokens_seen: int
    batches_done: int
    top_act: Any  # float32 [L, K, F], -inf = empty slot
    top_uid: Any  # int64 [L, K, F], -1 = empty slot
    top_window: Any  # int32 [L, K, F, W]
    act_sum: Any  # float64 [L, F]
    act_sq_sum: Any  # float64 [L, F]
    act_min: Any  # float32 [L, F], +inf before any token
    sample_hash: Any  # uint64 [S]
    sample_uid: Any  # int64 [S]
    sample_window: Any  # int32 [S, W]
    sample_act: Any  # float32 [L, S, F]
    #: token id -> string, for every id that occurs in a window.
    vocab: Mapping[int, str] = field(default_factory=dict)

    @classmethod
    def empty(cls, settings: ExemplarSettings, *, shard: int) -> ExemplarState:
        import numpy as np

        settings.check()
        L, K, F, W = len(settings.layers), settings.top_k, settings.num_neurons, settings.window
        return cls(
            settings=settings, shards=(shard,), next_batch=shard, complete=False, tokens_seen=0, batches_done=0,
            top_act=np.full((L, K, F), -np.inf, dtype=np.float32),
            top_uid=np.full((L, K, F), -1, dtype=np.int64),
            top_window=np.full((L, K, F, W), -1, dtype=np.int32),
            act_sum=np.zeros((L, F), dtype=np.float64),
            act_sq_sum=np.zeros((L, F), dtype=np.float64),
            act_min=np.full((L, F), np.inf, dtype=np.float32),
            sample_hash=np.zeros(0, dtype=np.uint64),
            sample_uid=np.zeros(0, dtype=np.int64),
            sample_window=np.zeros((0, W), dtype=np.int32),
            sample_act=np.zeros((L, 0, F), dtype=np.float32),
            vocab={},
        )  # fmt: skip

    def layer_row(self, layer: int) -> int:
        try:
            return self.settings.layers.index(layer)
        except ValueError:
            raise NotFound(f"layer {layer} is not in the exemplar file (layers {list(self.settings.layers)})") from None


# -- hashing ----------------------------------------------------------------------------------------
def sample_hashes(uids: Any, seed: int) -> Any:
    """splitmix64(uid ^ seed) as uint64 (the random-sample order of every token)."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = np.asarray(uids, dtype=np.int64).astype(np.uint64) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uid_of(sequence: Any, position: Any) -> Any:
    import numpy as np

    return (np.asarray(sequence, dtype=np.int64) << POSITION_BITS) | np.asarray(position, dtype=np.int64)


# -- merging ----------------------------------------------------------------------------------------
def order_top(act: Any, uid: Any, k: int) -> Any:
    """Indices along axis 1 of ``act``/``uid`` ([L, N, F]) of the first ``k`` entries under the
    total order (activation descending, uid ascending)."""
    import numpy as np

    by_uid = np.argsort(uid, axis=1, kind="stable")
    act_sorted = np.take_along_axis(act, by_uid, axis=1)
    by_act = np.argsort(-act_sorted, axis=1, kind="stable")
    return np.take_along_axis(by_uid, by_act, axis=1)[:, :k]


def merge_states(states: Sequence[ExemplarState], *, allow_partial: bool = False) -> ExemplarState:
    """One state covering the union of ``states`` (disjoint shards of one run).

    Settings must be equal and shards disjoint (else InvalidArgument: merging would count
    batches twice); unfinished shards are refused unless ``allow_partial``.
    """
    import numpy as np

    if not states:
        raise InvalidArgument("nothing to merge")
    first = states[0].settings
    seen: set[int] = set()
    for state in states:
        if state.settings != first:
            diff = [f.name for f in fields(ExemplarSettings) if getattr(state.settings, f.name) != getattr(first, f.name)]
            raise InvalidArgument(f"exemplar files come from different runs (settings differ: {', '.join(diff)})")
        overlap = seen & set(state.shards)
        if overlap:
            raise InvalidArgument(f"shard(s) {sorted(overlap)} appear in more than one file; merging would count them twice")
        seen |= set(state.shards)
        if not state.complete and not allow_partial:
            raise FailedPrecondition(f"shard(s) {list(state.shards)} are not finished (resume them first)")
    K = first.top_k
    act = np.concatenate([s.top_act for s in states], axis=1)
    uid = np.concatenate([s.top_uid for s in states], axis=1)
    window = np.concatenate([s.top_window for s in states], axis=1)
    order = order_top(act, uid, K)
    top_window = np.take_along_axis(window, order[..., None], axis=1)
    hashes = np.concatenate([s.sample_hash for s in states])
    suids = np.concatenate([s.sample_uid for s in states])
    keep = np.lexsort((suids, hashes))[: first.random_samples]
    vocab: dict[int, str] = {}
    for s in states:
        vocab.update(s.vocab)
    return ExemplarState(
        settings=first,
        shards=tuple(sorted(seen)),
        next_batch=states[0].next_batch if len(states) == 1 else -1,
        complete=all(s.complete for s in states) and seen == set(range(first.shard_count)),
        tokens_seen=sum(s.tokens_seen for s in states),
        batches_done=sum(s.batches_done for s in states),
        top_act=np.take_along_axis(act, order, axis=1),
        top_uid=np.take_along_axis(uid, order, axis=1),
        top_window=top_window,
        act_sum=np.sum([s.act_sum for s in states], axis=0),
        act_sq_sum=np.sum([s.act_sq_sum for s in states], axis=0),
        act_min=np.min([s.act_min for s in states], axis=0),
        sample_hash=hashes[keep],
        sample_uid=suids[keep],
        sample_window=np.concatenate([s.sample_window for s in states])[keep],
        sample_act=np.concatenate([s.sample_act for s in states], axis=1)[:, keep],
        vocab=vocab,
    )


# -- writing ----------------------------------------------------------------------------------------
def _connect(path: Path, *, read_only: bool) -> Any:
    # The one locked-down opener: external access off, no extension loading, settings locked.
    from circuits_server.duckdb_files import open_duckdb

    return open_duckdb(path, read_only=read_only, what="exemplar file", threads=1)


def _fixed_list(values: Any, width: int, value_type: Any) -> Any:
    import pyarrow as pa

    flat = pa.array(values.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def write_state(state: ExemplarState, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (a temporary file beside it, then rename)."""
    import numpy as np
    import pyarrow as pa

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.writing-{os.getpid()}")
    for p in (tmp, tmp.with_name(tmp.name + ".wal")):
        p.unlink(missing_ok=True)
    s = state.settings
    L, K, F = state.top_act.shape
    W = s.window
    meta = {
        "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "settings": s.to_json(),
        "shards": json.dumps(list(state.shards)), "next_batch": str(state.next_batch),
        "complete": "true" if state.complete else "false", "tokens_seen": str(state.tokens_seen),
        "batches_done": str(state.batches_done), "quantile_levels": json.dumps(list(QUANTILE_LEVELS)),
    }  # fmt: skip
    filled = state.top_uid >= 0  # [L, K, F]
    li, ki, fi = np.nonzero(filled)
    exemplars = pa.table({
        "layer": pa.array(np.asarray(s.layers, dtype=np.int32)[li]),
        "neuron": pa.array(fi.astype(np.int32)),
        "rank": pa.array(ki.astype(np.int32)),
        "activation": pa.array(state.top_act[li, ki, fi].astype(np.float32)),
        "uid": pa.array(state.top_uid[li, ki, fi]),
        "window": _fixed_list(state.top_window[li, ki, fi], W, pa.int32()),
    })  # fmt: skip
    quantiles = _quantiles(state)  # [L, F, Q]
    layer_col = np.repeat(np.asarray(s.layers, dtype=np.int32), F)
    stats = pa.table({
        "layer": pa.array(layer_col),
        "neuron": pa.array(np.tile(np.arange(F, dtype=np.int32), L)),
        "act_sum": pa.array(state.act_sum.reshape(-1)),
        "act_sq_sum": pa.array(state.act_sq_sum.reshape(-1)),
        "act_min": pa.array(state.act_min.reshape(-1).astype(np.float32)),
        "act_max": pa.array(state.top_act[:, 0, :].reshape(-1).astype(np.float32)),
        "quantiles": _fixed_list(quantiles.reshape(L * F, -1).astype(np.float32), len(QUANTILE_LEVELS), pa.float32()),
    })  # fmt: skip
    S = state.sample_uid.shape[0]
    samples = pa.table({
        "rank": pa.array(np.arange(S, dtype=np.int32)),
        "hash": pa.array(state.sample_hash.astype(np.uint64)),
        "uid": pa.array(state.sample_uid.astype(np.int64)),
        "window": _fixed_list(state.sample_window.astype(np.int32), W, pa.int32()),
    })  # fmt: skip
    sample_acts = pa.table({
        "layer": pa.array(np.repeat(np.asarray(s.layers, dtype=np.int32), S)),
        "rank": pa.array(np.tile(np.arange(S, dtype=np.int32), L)),
        "activations": _fixed_list(state.sample_act.reshape(L * S, F).astype(np.float32), F, pa.float32()),
    })  # fmt: skip
    ids = sorted(state.vocab)
    tokens = pa.table({"token_id": pa.array(ids, pa.int32()), "token": pa.array([state.vocab[i] for i in ids], pa.string())})
    con = _connect(tmp, read_only=False)
    try:
        con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
        con.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        for name, table in (("tokens", tokens), ("neuron_stats", stats), ("exemplars", exemplars),
                            ("samples", samples), ("sample_activations", sample_acts)):
            con.register("incoming", table)
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM incoming")
            con.unregister("incoming")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(tmp, path)
    tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
    return path


def _quantiles(state: ExemplarState) -> Any:
    import numpy as np

    L, _, F = state.top_act.shape
    if state.sample_act.shape[1] == 0:
        return np.full((L, F, len(QUANTILE_LEVELS)), np.nan, dtype=np.float32)
    q = np.quantile(state.sample_act.astype(np.float64), QUANTILE_LEVELS, axis=1)  # [Q, L, F]
    return np.moveaxis(q, 0, -1)


# -- reading ----------------------------------------------------------------------------------------
def _open_checked(path: Path) -> tuple[Any, dict[str, str]]:
    from circuits_server.duckdb_files import refuse_code_objects

    if not path.is_file():
        raise NotFound(f"{path}: exemplar file not found")
    con = _connect(path, read_only=True)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}
        missing = [t for t in TABLES if t not in tables]
        if missing:
            raise CorruptInput(f"{path}: not an exemplar file (missing table(s) {', '.join(missing)})")
        refuse_code_objects(con, path, what="an exemplar file")
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT_NAME:
            raise CorruptInput(f"{path}: not an exemplar file (meta.format is {meta.get('format')!r})")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise CorruptInput(f"{path}: exemplar schema version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    except BaseException:
        con.close()
        raise
    return con, meta


def _settings(meta: Mapping[str, str], path: Path) -> ExemplarSettings:
    try:
        return ExemplarSettings.from_json(meta["settings"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptInput(f"{path}: unreadable exemplar settings ({exc.__class__.__name__})") from None


def read_state(path: str | Path) -> ExemplarState:
    """The full state of an exemplar file (to resume a run or merge shards)."""
    import numpy as np

    path = Path(path)
    con, meta = _open_checked(path)
    try:
        s = _settings(meta, path)
        state = ExemplarState.empty(s, shard=0)
        L, K, F, W = len(s.layers), s.top_k, s.num_neurons, s.window
        row_of_layer = {layer: i for i, layer in enumerate(s.layers)}
        ex = con.execute("SELECT layer, neuron, rank, activation, uid, \"window\" FROM exemplars").fetch_arrow_table()
        if ex.num_rows:
            li = np.array([row_of_layer[x] for x in ex.column("layer").to_pylist()], dtype=np.int64)
            fi = ex.column("neuron").to_numpy().astype(np.int64)
            ki = ex.column("rank").to_numpy().astype(np.int64)
            if fi.max() >= F or ki.max() >= K:
                raise CorruptInput(f"{path}: exemplar rows outside the recorded shape")
            state.top_act[li, ki, fi] = ex.column("activation").to_numpy()
            state.top_uid[li, ki, fi] = ex.column("uid").to_numpy()
            state.top_window[li, ki, fi] = _list_values(ex.column("window"), W)
        st = con.execute(
            "SELECT layer, neuron, act_sum, act_sq_sum, act_min FROM neuron_stats ORDER BY layer, neuron"
        ).fetch_arrow_table()
        if st.num_rows != L * F:
            raise CorruptInput(f"{path}: neuron_stats has {st.num_rows} rows, expected {L * F}")
        act_sum = st.column("act_sum").to_numpy().reshape(L, F)
        act_sq_sum = st.column("act_sq_sum").to_numpy().reshape(L, F)
        act_min = st.column("act_min").to_numpy().reshape(L, F).astype(np.float32)
        sm = con.execute("SELECT hash, uid, \"window\" FROM samples ORDER BY rank").fetch_arrow_table()
        S = sm.num_rows
        sa = con.execute(
            "SELECT layer, rank, activations FROM sample_activations ORDER BY layer, rank"
        ).fetch_arrow_table()
        if sa.num_rows != L * S:
            raise CorruptInput(f"{path}: sample_activations has {sa.num_rows} rows, expected {L * S}")
        sample_act = _list_values(sa.column("activations"), F).reshape(L, S, F) if S else np.zeros((L, 0, F), np.float32)
        vocab = dict(con.execute("SELECT token_id, token FROM tokens").fetchall())
    finally:
        con.close()
    return replace(
        state,
        shards=tuple(json.loads(meta.get("shards", "[0]"))),
        next_batch=int(meta.get("next_batch", "0")),
        complete=meta.get("complete") == "true",
        tokens_seen=int(meta.get("tokens_seen", "0")),
        batches_done=int(meta.get("batches_done", "0")),
        act_sum=act_sum,
        act_sq_sum=act_sq_sum,
        act_min=act_min,
        sample_hash=sm.column("hash").to_numpy().astype(np.uint64) if S else state.sample_hash,
        sample_uid=sm.column("uid").to_numpy().astype(np.int64) if S else state.sample_uid,
        sample_window=_list_values(sm.column("window"), W) if S else state.sample_window,
        sample_act=sample_act.astype(np.float32),
        vocab={int(k): v for k, v in vocab.items()},
    )


def _list_values(column: Any, width: int) -> Any:
    import numpy as np

    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in column.chunks]
    flat = np.concatenate(chunks) if chunks else np.zeros(0)
    return flat.reshape(-1, width)


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationContext:
    """One context of a neuron: the window's token strings, which one is the token the activation
    belongs to, and the activation there."""

    tokens: tuple[str, ...]
    center: int
    activation: float
    uid: int
    #: "top" (a top-activating exemplar, ``rank`` 0 = highest) or "random" (a random-sample token).
    kind: str = "top"
    rank: int = 0

    @property
    def token(self) -> str:
        return self.tokens[self.center]

    def text(self, *, mark: tuple[str, str] = ("[[", "]]")) -> str:
        """The window as text with the center token between the ``mark`` strings."""
        parts = []
        for i, tok in enumerate(self.tokens):
            parts.append(f"{mark[0]}{tok}{mark[1]}" if i == self.center else tok)
        return "".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class NeuronActivationStats:
    """Activation statistics of one neuron over every token seen (quantiles from the random sample)."""

    token_count: int
    mean: float
    std: float
    minimum: float
    maximum: float
    quantiles: Mapping[float, float] = field(default_factory=dict)


class ExemplarFile:
    """Read access to an exemplar file, loaded per layer on first use (thread-compatible: callers
    that share one instance across threads serialise their calls)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        con, meta = _open_checked(self.path)
        try:
            self.settings = _settings(meta, self.path)
            self.complete = meta.get("complete") == "true"
            self.tokens_seen = int(meta.get("tokens_seen", "0"))
            self.shards = tuple(json.loads(meta.get("shards", "[0]")))
            self._vocab = {int(k): v for k, v in con.execute("SELECT token_id, token FROM tokens").fetchall()}
        finally:
            con.close()
        self._layers: dict[int, dict[str, Any]] = {}

    @property
    def layers(self) -> tuple[int, ...]:
        return self.settings.layers

    def has(self, layer: int, neuron: int) -> bool:
        return layer in self.settings.layers and 0 <= neuron < self.settings.num_neurons

    def _layer(self, layer: int) -> dict[str, Any]:
        import numpy as np

        if layer not in self.settings.layers:
            raise NotFound(f"layer {layer} is not in {self.path} (layers {list(self.settings.layers)})")
        cached = self._layers.get(layer)
        if cached is not None:
            return cached
        s = self.settings
        K, F, W = s.top_k, s.num_neurons, s.window
        con, _meta = _open_checked(self.path)
        try:
            ex = con.execute(
                "SELECT neuron, rank, activation, uid, \"window\" FROM exemplars WHERE layer = ?", [layer]
            ).fetch_arrow_table()
            act = np.full((F, K), -np.inf, dtype=np.float32)
            uid = np.full((F, K), -1, dtype=np.int64)
            win = np.full((F, K, W), -1, dtype=np.int32)
            if ex.num_rows:
                fi = ex.column("neuron").to_numpy().astype(np.int64)
                ki = ex.column("rank").to_numpy().astype(np.int64)
                act[fi, ki] = ex.column("activation").to_numpy()
                uid[fi, ki] = ex.column("uid").to_numpy()
                win[fi, ki] = _list_values(ex.column("window"), W)
            st = con.execute(
                "SELECT act_sum, act_sq_sum, act_min, act_max, quantiles FROM neuron_stats WHERE layer = ? ORDER BY neuron",
                [layer],
            ).fetch_arrow_table()
            sm = con.execute("SELECT uid, \"window\" FROM samples ORDER BY rank").fetch_arrow_table()
            sa = con.execute(
                "SELECT activations FROM sample_activations WHERE layer = ? ORDER BY rank", [layer]
            ).fetch_arrow_table()
        finally:
            con.close()
        S = sm.num_rows
        data = {
            "act": act, "uid": uid, "window": win,
            "sum": st.column("act_sum").to_numpy(), "sq": st.column("act_sq_sum").to_numpy(),
            "min": st.column("act_min").to_numpy(), "max": st.column("act_max").to_numpy(),
            "quantiles": _list_values(st.column("quantiles"), len(QUANTILE_LEVELS)),
            "sample_uid": sm.column("uid").to_numpy() if S else np.zeros(0, np.int64),
            "sample_window": _list_values(sm.column("window"), W) if S else np.zeros((0, W), np.int32),
            "sample_act": _list_values(sa.column("activations"), F) if S else np.zeros((0, F), np.float32),
        }  # fmt: skip
        self._layers[layer] = data
        return data

    def _tokens(self, ids: Any) -> tuple[tuple[str, ...], int]:
        """Token strings of a window (pads dropped) and the center's index among them."""
        before = self.settings.context_before
        out, center = [], 0
        for i, tid in enumerate(ids.tolist()):
            if tid < 0:
                continue
            if i == before:
                center = len(out)
            out.append(self._vocab.get(int(tid), f"<{tid}>"))
        return tuple(out), center

    def top(self, layer: int, neuron: int) -> list[ActivationContext]:
        """The neuron's top-activating contexts, highest first."""
        data = self._layer(layer)
        self._check_neuron(neuron)
        out = []
        for rank in range(self.settings.top_k):
            uid = int(data["uid"][neuron, rank])
            if uid < 0:
                break
            tokens, center = self._tokens(data["window"][neuron, rank])
            out.append(ActivationContext(tokens=tokens, center=center, activation=float(data["act"][neuron, rank]),
                                         uid=uid, kind="top", rank=rank))
        return out

    def random(self, layer: int, neuron: int) -> list[ActivationContext]:
        """Every random-sample context with this neuron's activation at its token (sample order)."""
        data = self._layer(layer)
        self._check_neuron(neuron)
        out = []
        for i in range(data["sample_uid"].shape[0]):
            tokens, center = self._tokens(data["sample_window"][i])
            out.append(ActivationContext(tokens=tokens, center=center, activation=float(data["sample_act"][i, neuron]),
                                         uid=int(data["sample_uid"][i]), kind="random", rank=i))
        return out

    def stats(self, layer: int, neuron: int) -> NeuronActivationStats:
        import math

        data = self._layer(layer)
        self._check_neuron(neuron)
        n = self.tokens_seen
        mean = float(data["sum"][neuron]) / n if n else 0.0
        var = float(data["sq"][neuron]) / n - mean * mean if n else 0.0
        return NeuronActivationStats(
            token_count=n, mean=mean, std=math.sqrt(max(var, 0.0)),
            minimum=float(data["min"][neuron]), maximum=float(data["max"][neuron]),
            quantiles={q: float(v) for q, v in zip(QUANTILE_LEVELS, data["quantiles"][neuron])},
        )  # fmt: skip

    def _check_neuron(self, neuron: int) -> None:
        if not 0 <= neuron < self.settings.num_neurons:
            raise NotFound(f"neuron {neuron} is outside 0..{self.settings.num_neurons - 1}")
