"""Activation exemplars over a text corpus: the model pass behind ``circuits exemplars``.

The corpus (plain text files, JSONL with a text field, Parquet with a text column, a directory
of those, or ``builtin:python-docs``) is tokenized document by document, each document prefixed
with the tokenizer's BOS (else EOS) token, and packed into one stream cut into sequences of
``seq_len`` tokens; ``batch_size`` consecutive sequences form a batch. The layout depends only on
the corpus, the tokenizer and these two numbers, so batch ``b`` is the same tensor in every run:
shard ``i`` of ``n`` (an Indexed Job pod) processes the batches with ``b % n == i``, and the shard
files merge into exactly what one process writes (:mod:`circuits_server.exemplar_files`).

Per batch, one forward pass of the decoder (no LM head; it stops after the last recorded layer)
with a hook on every recorded layer's ``mlp.down_proj`` input (the neuron activations, relp-spec
§B.1) that, for all neurons at once,

* takes the batch's top-k tokens per neuron (``torch.topk`` over tokens, ``[N, F] -> [k, F]``) and
  merges them into the running ``[K, F]`` buffer (a stable sort of ``[K + k, F]``), windows
  gathered from a ``[N, W]`` window table;
* adds the activation sum, sum of squares and minimum;
* gathers the activations at the batch's random-sample candidates (tokens whose hash is below
  the running sample's largest).

Special tokens (BOS/EOS/pad...) are never an exemplar's or a sample's token and are not counted
in the statistics (they still show inside windows). The state is checkpointed into the output
file (atomically) every ``checkpoint_seconds`` and at the end; ``resume`` continues from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circuits_core.errors import FailedPrecondition, InvalidArgument, NotFound
from circuits_core.exemplars import ExemplarRunSettings, add_run_arguments, run_settings_from_args
from circuits_server.exemplar_files import (
    POSITION_BITS,
    ExemplarSettings,
    ExemplarState,
    read_state,
    sample_hashes,
    write_state,
)

log = logging.getLogger("circuits_attribution.exemplars")

BUILTIN_PREFIX = "builtin:"
#: Corpora that ship with Python itself (no download): the language reference topics of pydoc.
BUILTIN_CORPORA = ("python-docs",)
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExemplarReport:
    output: Path
    batches: int
    tokens: int
    seconds: float
    complete: bool
    skipped_batches: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# -- corpus -----------------------------------------------------------------------------------------
def _builtin_documents(name: str) -> list[str]:
    if name == "python-docs":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return [topics[key] for key in sorted(topics)]
    raise InvalidArgument(f"unknown builtin corpus {name!r}; use one of {', '.join(BUILTIN_CORPORA)}")


def corpus_files(corpus: str | Path) -> list[Path]:
    """The files of a corpus path (a file, or a directory's text/JSONL/Parquet files, sorted)."""
    path = Path(corpus)
    if path.is_file():
        return [path]
    if path.is_dir():
        suffixes = (*TEXT_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise InvalidArgument(f"{path}: no corpus files ({', '.join(suffixes)}) in the directory")
        return files
    raise InvalidArgument(f"{path}: corpus not found (a file, a directory or builtin:NAME)")


def corpus_fingerprint(corpus: str, *, text_field: str = "text") -> str:
    """sha256 over the corpus content (file names relative to the corpus, bytes) and the text field."""
    digest = hashlib.sha256(f"text_field={text_field}\n".encode())
    if corpus.startswith(BUILTIN_PREFIX):
        for doc in _builtin_documents(corpus[len(BUILTIN_PREFIX):]):
            digest.update(doc.encode("utf-8", "surrogatepass"))
            digest.update(b"\x1e")
        return digest.hexdigest()
    root = Path(corpus)
    for file in corpus_files(corpus):
        rel = file.name if root.is_file() else str(file.relative_to(root))
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\x1f")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\x1e")
    return digest.hexdigest()


def iter_documents(corpus: str, *, text_field: str = "text") -> Iterator[str]:
    """Documents of the corpus in a fixed order. A text file is one document; a JSONL line or a
    Parquet row is one document (``text_field``). Bad lines raise InvalidArgument('FILE:LINE: ...')."""
    if corpus.startswith(BUILTIN_PREFIX):
        yield from _builtin_documents(corpus[len(BUILTIN_PREFIX):])
        return
    for file in corpus_files(corpus):
        suffix = file.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            yield from _parquet_documents(file, text_field)
        elif suffix in JSONL_SUFFIXES or (suffix == ".json" and Path(corpus).is_file()):
            yield from _jsonl_documents(file, text_field)
        else:
            try:
                yield file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(f"{file}: not UTF-8 text") from None


def _jsonl_documents(file: Path, text_field: str) -> Iterator[str]:
    with open(file, encoding="utf-8", errors="surrogateescape") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{file}:{number}: invalid JSON ({exc.msg})") from None
            text = obj if isinstance(obj, str) else obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise InvalidArgument(f"{file}:{number}: no string field {text_field!r}")
            yield text


def _parquet_documents(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(file)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise InvalidArgument(f"{file}: not a readable Parquet file ({exc.__class__.__name__})") from None
    if text_field not in handle.schema_arrow.names:
        raise InvalidArgument(f"{file}: no column {text_field!r} (columns: {', '.join(handle.schema_arrow.names)})")
    for batch in handle.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text


def separator_id(tokenizer: Any) -> int:
    """The token put before every document (BOS, else EOS)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise InvalidArgument("the tokenizer has neither a BOS nor an EOS token to separate documents")


def iter_sequences(documents: Iterator[str], tokenizer: Any, seq_len: int) -> Iterator[np.ndarray]:
    """The packed token stream cut into int64 sequences of ``seq_len`` (the last may be shorter)."""
    sep = separator_id(tokenizer)
    buffer = np.zeros(0, dtype=np.int64)
    for doc in documents:
        if not doc.strip():
            continue
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        buffer = np.concatenate([buffer, np.asarray([sep, *ids], dtype=np.int64)])
        while buffer.shape[0] >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]
    if buffer.shape[0]:
        yield buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    index: int
    #: [B, T] token ids (a short last sequence is right-padded with the separator).
    ids: np.ndarray
    #: [B, T] real (not padding) positions.
    real: np.ndarray
    #: Global index of the batch's first sequence.
    first_sequence: int

    @property
    def tokens(self) -> int:
        return int(self.real.sum())


def iter_batches(sequences: Iterator[np.ndarray], batch_size: int, *, pad_id: int) -> Iterator[Batch]:
    """Consecutive sequences grouped into batches (global batch index, padded ids, real mask)."""
    pending: list[np.ndarray] = []
    index = 0
    first = 0

    def make() -> Batch:
        width = max(s.shape[0] for s in pending)
        ids = np.full((len(pending), width), pad_id, dtype=np.int64)
        real = np.zeros((len(pending), width), dtype=bool)
        for row, seq in enumerate(pending):
            ids[row, : seq.shape[0]] = seq
            real[row, : seq.shape[0]] = True
        return Batch(index=index, ids=ids, real=real, first_sequence=first)

    for seq in sequences:
        pending.append(seq)
        if len(pending) == batch_size:
            yield make()
            index += 1
            first += len(pending)
            pending = []
    if pending:
        yield make()


# -- the running top-k / sample / statistics buffers -----------------------------------------------------
class TokenStore:
    """The token ids of every sequence a run has seen, so windows are cut only when written
    (the hot loop moves uids, never windows)."""

    def __init__(self, *, seq_len: int, before: int, after: int) -> None:
        self.seq_len, self.before, self.after = seq_len, before, after
        self._seqs: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []

    def add(self, first_sequence: int, ids: np.ndarray, real: np.ndarray) -> None:
        """Record a batch: ``ids``/``real`` [B, T] for sequences first_sequence, first_sequence + 1, ..."""
        B, T = ids.shape
        rows = np.full((B, self.seq_len), -1, dtype=np.int32)
        rows[:, :T] = np.where(real, ids, -1)
        self._seqs.append(first_sequence + np.arange(B, dtype=np.int64))
        self._rows.append(rows)

    def windows(self, uids: np.ndarray) -> np.ndarray:
        """[n, W] token-id windows around the tokens ``uids`` (-1 outside the sequence)."""
        W = self.before + 1 + self.after
        uids = np.asarray(uids, dtype=np.int64).reshape(-1)
        out = np.full((uids.shape[0], W), -1, dtype=np.int32)
        if not self._seqs or not uids.shape[0]:
            return out
        seqs = np.concatenate(self._seqs)
        rows = np.concatenate(self._rows)
        order = np.argsort(seqs, kind="stable")
        seqs, rows = seqs[order], rows[order]
        padded = np.full((rows.shape[0], self.before + self.seq_len + self.after), -1, dtype=np.int32)
        padded[:, self.before : self.before + self.seq_len] = rows
        seq = uids >> POSITION_BITS
        pos = uids & ((1 << POSITION_BITS) - 1)
        row = np.searchsorted(seqs, seq)
        found = (uids >= 0) & (row < seqs.shape[0])
        found[found] &= seqs[row[found]] == seq[found]
        cols = pos[found, None] + np.arange(W)[None, :]
        out[found] = padded[row[found][:, None], cols]
        return out


class RunningExemplars:
    """Device-side running state of one run (see the module docstring for the per-batch steps).

    Shapes: ``top_act`` [L, K, F] float32 (-inf = empty), ``top_uid`` [L, K, F] int64 (-1 = empty);
    ``act_sum``/``act_sq`` [L, F] float64, ``act_min`` [L, F]; samples: ``sample_hash``/``sample_uid``
    [S] (numpy, CPU), ``sample_act`` [L, S, F] float32 (device). ``uid`` order = sequence then
    position, so every batch's uids are larger than everything a shard has seen before (ties in
    the stable merges keep the lower uid). Windows come from :class:`TokenStore` when written.
    """

    def __init__(self, state: ExemplarState, *, device: str | torch.device = "cpu") -> None:
        self.settings = state.settings
        self.device = torch.device(device)
        dev = self.device
        self.top_act = torch.as_tensor(np.array(state.top_act), device=dev)
        self.top_uid = torch.as_tensor(np.array(state.top_uid), device=dev)
        self.act_sum = torch.as_tensor(np.array(state.act_sum), device=dev)
        self.act_sq = torch.as_tensor(np.array(state.act_sq_sum), device=dev)
        self.act_min = torch.as_tensor(np.array(state.act_min), device=dev)
        self.sample_hash = state.sample_hash.copy()
        self.sample_uid = state.sample_uid.copy()
        self.sample_act = torch.as_tensor(np.array(state.sample_act), device=dev)
        self.tokens_seen = state.tokens_seen
        self.batches_done = state.batches_done
        self._batch: dict[str, Any] = {}

    # -- per batch ----------------------------------------------------------------------------------
    def begin_batch(self, *, uids: np.ndarray, valid: np.ndarray) -> None:
        """Prepare a batch of N flattened tokens: uids [N], valid [N] (may be an exemplar's token)."""
        dev = self.device
        valid_idx = np.nonzero(valid)[0]
        S = self.settings.random_samples
        cand = np.zeros(0, dtype=np.int64)
        cand_hash = np.zeros(0, dtype=np.uint64)
        if S and valid_idx.shape[0]:
            hashes = sample_hashes(uids[valid_idx], self.settings.seed)
            if self.sample_hash.shape[0] >= S:
                below = hashes < self.sample_hash.max()
                hashes, positions = hashes[below], np.nonzero(below)[0]
            else:
                positions = np.arange(hashes.shape[0])
            if hashes.shape[0] > S:
                keep = np.argpartition(hashes, S - 1)[:S]
                hashes, positions = hashes[keep], positions[keep]
            cand, cand_hash = positions, hashes  # indices into the valid tokens
        self._batch = {
            "valid_idx": torch.as_tensor(valid_idx, device=dev),
            "n_valid": int(valid_idx.shape[0]),
            "all_valid": bool(valid_idx.shape[0] == valid.shape[0]),
            "uids": torch.as_tensor(uids[valid_idx], device=dev),
            "cand": torch.as_tensor(cand, device=dev),
            "cand_np": cand,
            "cand_hash": cand_hash,
            "cand_uid": uids[valid_idx][cand],
            "pending": {},
        }

    def observe(self, row: int, acts: torch.Tensor) -> None:
        """Fold one recorded layer's activations (``[B, T, F]``, row = its index in ``layers``) in."""
        b = self._batch
        F = acts.shape[-1]
        a = acts.reshape(-1, F)
        a = a if b["all_valid"] else a.index_select(0, b["valid_idx"])
        a = a.float()  # [Nv, F]
        if a.shape[0] == 0:
            return
        # Per-batch sums in float32 (the same numbers in every run), accumulated in float64.
        self.act_sum[row] += a.sum(0).double()
        self.act_sq[row] += torch.mul(a, a).sum(0).double()
        self.act_min[row] = torch.minimum(self.act_min[row], a.amin(0))
        if b["cand"].shape[0]:
            b["pending"][row] = a.index_select(0, b["cand"])
        # Only neurons whose batch maximum beats their K-th kept activation can change: a token
        # equal to it loses the tie (larger uid). After a few batches that is a small minority.
        active = torch.nonzero(a.amax(0) > self.top_act[row, -1]).flatten()
        if active.shape[0] == F:
            self._merge_top(row, a, None)
        elif active.shape[0]:
            self._merge_top(row, a.index_select(1, active), active)

    def _merge_top(self, row: int, a: torch.Tensor, cols: torch.Tensor | None) -> None:
        """Merge the batch's top tokens of the neurons ``cols`` (all when None; ``a`` holds only
        their columns) into the running buffer of layer ``row``."""
        b = self._batch
        K = self.settings.top_k
        n = a.shape[0]
        k = min(K, n)
        # One more than needed: the (k+1)-th value tells whether ties straddle the cut.
        vals, idx = torch.topk(a, min(k + 1, n), dim=0)  # [k(+1), C]
        if vals.shape[0] > k:
            tied = vals[k] == vals[k - 1]
            vals, idx = vals[:k], idx[:k]
            if bool(tied.any()):
                # More tokens share the k-th value than fit: take the lowest uids (token order).
                for col in torch.nonzero(tied).flatten().tolist():
                    idx[:, col] = torch.sort(a[:, col], descending=True, stable=True).indices[:k]
        # Candidates in (activation desc, uid asc) order: sort by token index, then stably by value.
        idx = torch.sort(idx, dim=0).values
        vals = torch.gather(a, 0, idx)
        order = torch.sort(vals, dim=0, descending=True, stable=True).indices
        idx = torch.gather(idx, 0, order)
        vals = torch.gather(vals, 0, order)
        cand_uid = b["uids"][idx]  # [k, C]
        # Merge: the buffer's uids are all smaller than the batch's, so a stable sort keeps uid order.
        buf_act, buf_uid = self.top_act[row], self.top_uid[row]
        if cols is not None:
            buf_act, buf_uid = buf_act[:, cols], buf_uid[:, cols]
        all_act = torch.cat([buf_act, vals])
        keep = torch.sort(all_act, dim=0, descending=True, stable=True).indices[:K]  # [K, C]
        new_act = torch.gather(all_act, 0, keep)
        new_uid = torch.gather(torch.cat([buf_uid, cand_uid]), 0, keep)
        if cols is None:
            self.top_act[row], self.top_uid[row] = new_act, new_uid
        else:
            self.top_act[row, :, cols], self.top_uid[row, :, cols] = new_act, new_uid

    def end_batch(self) -> None:
        """Merge the batch's sample candidates into the running bottom-k sample."""
        b = self._batch
        self.tokens_seen += b["n_valid"]
        self.batches_done += 1
        S = self.settings.random_samples
        if S and b["cand_np"].shape[0]:
            L = len(self.settings.layers)
            if len(b["pending"]) != L:
                raise RuntimeError("a recorded layer produced no activations in this batch")
            hashes = np.concatenate([self.sample_hash, b["cand_hash"]])
            uids = np.concatenate([self.sample_uid, b["cand_uid"]])
            keep = np.lexsort((uids, hashes))[:S]
            self.sample_hash = hashes[keep]
            self.sample_uid = uids[keep]
            keep_t = torch.as_tensor(keep, device=self.device)
            new = torch.stack([b["pending"][row] for row in range(L)])  # [L, c, F]
            self.sample_act = torch.cat([self.sample_act, new], dim=1).index_select(1, keep_t)
        self._batch = {}

    def to_state(self, base: ExemplarState, *, next_batch: int, complete: bool, tokens: TokenStore,
                 vocab_of: Callable[[np.ndarray], dict[int, str]]) -> ExemplarState:
        """The state as file columns, windows cut from ``tokens``; ``vocab_of(ids)`` names the ids."""
        top_uid = self.top_uid.cpu().numpy()
        top_window = tokens.windows(top_uid).reshape(*top_uid.shape, -1)
        sample_window = tokens.windows(self.sample_uid)
        ids = np.union1d(np.unique(top_window), np.unique(sample_window))
        return replace(
            base,
            next_batch=next_batch, complete=complete, tokens_seen=self.tokens_seen, batches_done=self.batches_done,
            top_act=self.top_act.cpu().numpy(), top_uid=top_uid, top_window=top_window,
            act_sum=self.act_sum.cpu().numpy(), act_sq_sum=self.act_sq.cpu().numpy(),
            act_min=self.act_min.cpu().numpy(), sample_hash=self.sample_hash, sample_uid=self.sample_uid,
            sample_window=sample_window, sample_act=self.sample_act.cpu().numpy(), vocab=vocab_of(ids[ids >= 0]),
        )  # fmt: skip


class _StopForward(Exception):
    """Raised by the last recorded layer's hook: the rest of the forward pass is not needed."""


def decoder_layers(model: Any) -> Any:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise InvalidArgument(f"{type(model).__name__}: no model.layers (not a decoder-only transformers LM)")
    return layers


class ExemplarRecorder:
    """Hooks on the recorded layers' ``mlp.down_proj`` inputs feeding a :class:`RunningExemplars`."""

    def __init__(self, model: Any, running: RunningExemplars) -> None:
        self.model = model
        self.running = running
        layers = decoder_layers(model)
        self.rows = {layer: row for row, layer in enumerate(running.settings.layers)}
        self.last = max(self.rows)
        self._handles = []
        for layer, row in self.rows.items():
            module = layers[layer].mlp.down_proj
            self._handles.append(module.register_forward_pre_hook(self._hook(row, layer == self.last)))

    def _hook(self, row: int, last: bool) -> Callable[..., None]:
        def hook(_module: Any, inputs: tuple[Any, ...]) -> None:
            self.running.observe(row, inputs[0].detach())
            if last:
                raise _StopForward

        return hook

    def forward(self, ids: np.ndarray) -> None:
        """Run the decoder over ``ids`` [B, T] up to the last recorded layer."""
        base = getattr(self.model, "model", self.model)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            try:
                base(input_ids=torch.as_tensor(ids, device=device), use_cache=False)
            except _StopForward:
                pass

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# -- the run ----------------------------------------------------------------------------------------------
def exemplar_settings(run: ExemplarRunSettings, *, model: Any, fingerprint: str) -> ExemplarSettings:
    """The file settings of a run (what must match to resume or merge)."""
    num_layers = len(decoder_layers(model))
    layers = tuple(sorted(set(run.layers))) or tuple(range(num_layers))
    bad = [layer for layer in layers if layer >= num_layers]
    if bad:
        raise InvalidArgument(f"--layers {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    num_neurons = int(decoder_layers(model)[layers[0]].mlp.down_proj.in_features)
    tokens_per_batch = run.seq_len * run.batch_size
    max_batches = -(-run.max_tokens // tokens_per_batch) if run.max_tokens else 0
    return ExemplarSettings(
        model=run.model, corpus=run.corpus, corpus_fingerprint=fingerprint, text_field=run.text_field,
        layers=layers, num_neurons=num_neurons, top_k=run.top_k, random_samples=run.random_samples,
        context_before=run.context_before, context_after=run.context_after, seq_len=run.seq_len,
        batch_size=run.batch_size, max_batches=max_batches, seed=run.seed, shard_count=run.shard_count,
    )  # fmt: skip


def _initial_state(run: ExemplarRunSettings, settings: ExemplarSettings) -> ExemplarState:
    output = Path(run.output)
    if output.exists() and not run.resume:
        raise FailedPrecondition(f"{output} already exists; pass --resume to continue it or choose another --output")
    if not output.exists():
        return ExemplarState.empty(settings, shard=run.shard_index)
    state = read_state(output)
    if state.settings != settings:
        from dataclasses import fields

        diff = [f.name for f in fields(ExemplarSettings) if getattr(state.settings, f.name) != getattr(settings, f.name)]
        raise FailedPrecondition(f"{output} was made with different settings ({', '.join(diff)} differ); "
                                 "resume with the same settings or choose another --output")
    if state.shards != (run.shard_index,):
        raise FailedPrecondition(f"{output} holds shard(s) {list(state.shards)}, not shard {run.shard_index}")
    return state


class _Vocabulary:
    """Token strings by id, decoded once per id."""

    def __init__(self, tokenizer: Any, known: dict[int, str]) -> None:
        self.tokenizer = tokenizer
        self.known = dict(known)

    def __call__(self, ids: np.ndarray) -> dict[int, str]:
        out = {}
        for tid in ids.tolist():
            if tid not in self.known:
                self.known[tid] = self.tokenizer.decode([int(tid)])
            out[int(tid)] = self.known[tid]
        return out


def run_exemplars(
    run: ExemplarRunSettings,
    *,
    model: Any,
    tokenizer: Any,
    device: str | None = None,
    stop_after_batches: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> ExemplarReport:
    """Process this shard's batches not yet in the output file; write the file (atomically).

    ``stop_after_batches`` (> 0) stops after that many new batches with the state saved as
    unfinished (what a kill after a checkpoint leaves behind). ``on_batch(batch_index, tokens)``
    after each processed batch.
    """
    fingerprint = corpus_fingerprint(run.corpus, text_field=run.text_field)
    settings = exemplar_settings(run, model=model, fingerprint=fingerprint)
    state = _initial_state(run, settings)
    device = device or str(next(model.parameters()).device)
    running = RunningExemplars(state, device=device)
    special = np.array(sorted(set(int(t) for t in tokenizer.all_special_ids)), dtype=np.int64)
    pad_id = separator_id(tokenizer)
    recorder = ExemplarRecorder(model, running)
    tokens = TokenStore(seq_len=run.seq_len, before=settings.context_before, after=settings.context_after)
    vocab = _Vocabulary(tokenizer, state.vocab)
    bar = None
    if run.progress:
        from tqdm.auto import tqdm

        total = None
        if settings.max_batches:
            total = len(range(run.shard_index, settings.max_batches, run.shard_count))
        bar = tqdm(total=total, desc=f"exemplars shard {run.shard_index}/{run.shard_count}", unit="batch",
                   file=sys.stderr, initial=state.batches_done)
    started = time.perf_counter()
    last_checkpoint = started
    next_batch = state.next_batch
    new_batches = new_tokens = skipped = 0
    complete = True
    try:
        batches = iter_batches(
            iter_sequences(iter_documents(run.corpus, text_field=run.text_field), tokenizer, run.seq_len),
            run.batch_size, pad_id=pad_id,
        )  # fmt: skip
        for batch in batches:
            if settings.max_batches and batch.index >= settings.max_batches:
                break
            if batch.index % run.shard_count != run.shard_index:
                continue
            if batch.index < next_batch:
                tokens.add(batch.first_sequence, batch.ids, batch.real)  # windows of resumed exemplars
                skipped += 1
                continue
            if stop_after_batches and new_batches >= stop_after_batches:
                complete = False
                break
            B, T = batch.ids.shape
            seq = batch.first_sequence + np.arange(B, dtype=np.int64)
            uids = ((seq[:, None] << POSITION_BITS) | np.arange(T, dtype=np.int64)[None, :]).reshape(-1)
            valid = (batch.real & ~np.isin(batch.ids, special)).reshape(-1)
            tokens.add(batch.first_sequence, batch.ids, batch.real)
            running.begin_batch(uids=uids, valid=valid)
            recorder.forward(batch.ids)
            running.end_batch()
            next_batch = batch.index + run.shard_count
            new_batches += 1
            new_tokens += batch.tokens
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tokens=running.tokens_seen, refresh=False)
            if on_batch is not None:
                on_batch(batch.index, batch.tokens)
            now = time.perf_counter()
            if now - last_checkpoint >= run.checkpoint_seconds:
                write_state(running.to_state(state, next_batch=next_batch, complete=False, tokens=tokens,
                                             vocab_of=vocab), run.output)
                last_checkpoint = time.perf_counter()
    finally:
        recorder.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    final = running.to_state(state, next_batch=next_batch, complete=complete, tokens=tokens, vocab_of=vocab)
    write_state(final, run.output)
    return ExemplarReport(output=Path(run.output), batches=new_batches, tokens=new_tokens, seconds=seconds,
                          complete=complete, skipped_batches=skipped)


def load_and_run(run: ExemplarRunSettings, *, dtype: str = "float32", device: str = "cpu") -> ExemplarReport:
    """Load ``run.model`` (bundled SmolLM2, a checkpoint directory or the hub cache) and run."""
    from circuits_attribution.models import load_model

    if not run.corpus.startswith(BUILTIN_PREFIX):
        corpus_files(run.corpus)  # a bad corpus fails before the model loads
    if Path(run.output).exists() and not run.resume:
        raise FailedPrecondition(f"{run.output} already exists; pass --resume to continue it or choose another --output")
    loaded = load_model(run.model, dtype=dtype, device=device)
    return run_exemplars(run, model=loaded.model, tokenizer=loaded.tokenizer, device=device)


def merge_exemplar_files(inputs: Sequence[str | Path], output: str | Path, *, allow_partial: bool = False) -> Path:
    """Merge shard files of one run into ``output`` (exact: see :mod:`circuits_server.exemplar_files`)."""
    from circuits_server.exemplar_files import merge_states

    if not inputs:
        raise InvalidArgument("--merge needs at least one exemplar file")
    out = Path(output)
    resolved = {Path(p).resolve() for p in inputs}
    if out.resolve() in resolved:
        raise InvalidArgument(f"{out}: the merge output must not be one of its inputs")
    for p in inputs:
        if not Path(p).is_file():
            raise NotFound(f"{p}: exemplar file not found")
    return write_state(merge_states([read_state(p) for p in inputs], allow_partial=allow_partial), out)


# -- Kubernetes ------------------------------------------------------------------------------------------
WORKER_MODULE = "circuits_attribution.exemplars"


def worker_command(*, corpus: str, output_dir: str, shards: int, model: str, dtype: str, device: str,
                   extra: Sequence[str] = ()) -> list[str]:
    """The container command of every pod of an exemplars Indexed Job (shard = JOB_COMPLETION_INDEX)."""
    return [
        "python", "-m", WORKER_MODULE, "--corpus", corpus, "--output-dir", output_dir,
        "--shard-count", str(shards), "--model", model, "--dtype", dtype, "--device", device,
        "--resume", "--no-progress", *extra,
    ]  # fmt: skip


def job_manifest(launch: Any, *, corpus: str, extra: Sequence[str] = ()) -> dict[str, Any]:
    """An Indexed Job running one exemplar shard per pod (``launch`` is a
    :class:`circuits_attribution.launch.LaunchSettings`; shard files land in its output_dir)."""
    from circuits_attribution.launch import job_manifest as attribution_job

    manifest = attribution_job(launch)
    pod = manifest["spec"]["template"]
    pod["spec"]["containers"][0]["command"] = worker_command(
        corpus=corpus, output_dir=launch.output_dir, shards=launch.shards, model=launch.model, dtype=launch.dtype,
        device="cuda" if launch.gpus else "cpu", extra=extra,
    )  # fmt: skip
    for labels in (manifest["metadata"]["labels"], pod["metadata"]["labels"]):
        labels["app.kubernetes.io/component"] = "exemplars-worker"
    return manifest


def shard_output(output_dir: str | Path, shard_index: int, shard_count: int) -> Path:
    return Path(output_dir) / f"exemplars-{shard_index:05d}-of-{shard_count:05d}.duckdb"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m circuits_attribution.exemplars``: one shard of an Indexed Job (resumable)."""
    import argparse

    from circuits_core.config import SMALL_MODEL, env_setting
    from circuits_core.errors import CircuitsError

    parser = argparse.ArgumentParser(prog="python -m circuits_attribution.exemplars",
                                     description="Activation exemplars of one corpus shard (resumable).")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--output-dir", required=True, help="shard files go to exemplars-<i>-of-<n>.duckdb here")
    parser.add_argument("--shard-index", type=int, default=None, help="default: $JOB_COMPLETION_INDEX, else 0")
    parser.add_argument("--shard-count", type=int, default=1)
    parser.add_argument("--model", default=SMALL_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    add_run_arguments(parser)
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        index = args.shard_index
        if index is None:
            raw = env_setting("JOB_COMPLETION_INDEX", "0") or "0"
            if not raw.isdigit():
                raise InvalidArgument(f"JOB_COMPLETION_INDEX must be an integer, got {raw!r}")
            index = int(raw)
        output = shard_output(args.output_dir, index, args.shard_count)
        run = run_settings_from_args(args, output=output, shard_index=index,
                                     resume=args.resume and output.exists(), progress=not args.no_progress)
        report = load_and_run(run, dtype=args.dtype, device=args.device)
    except CircuitsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"shard {index}/{args.shard_count}: {report.batches} batches, {report.tokens} tokens "
          f"({report.tokens_per_second:,.0f} tokens/s) -> {report.output}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
