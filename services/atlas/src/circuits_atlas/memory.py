"""Search postings, neuron label columns and the labels table held in memory for a long-lived reader.

``CircuitDatabase(path, preload=True)`` (what the atlas server uses) loads these once at open
(~2 s and ~0.7 GB for 1.6M labelled neurons) and then answers ``search`` and the per-unit label
lookups without SQL: BM25 top-k over the precomputed ``search_postings`` contributions and row
takes from Arrow columns. The atlas is opened read-only, and DuckDB lets no other process write the
file while it is open, so the copy can never go out of date while the database object lives.

Results are identical to the SQL path (``database.BM25_SQL`` / ``BM25_FILTERED_SQL`` and
``_labels_by_key``): a document's score is the sum of its query terms' contributions added in termid
order (the SQL's ordered aggregate), ranked by score DESC then docid; the labels of a unit come
output pass first, then the other passes by name.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from circuits_core.errors import FailedPrecondition

#: Neuron columns a search hit needs (database.UNIT_COLUMNS) plus the detection score (min_score).
LABEL_FIELDS = ("label_pass", "text", "description", "source", "score_detection", "score_simulation",
                "score_contexts", "score_positives")  # fmt: skip
_ACCUMULATORS = 4
_STEM_CACHE = 1 << 16
#: The fts extension's ``tokenize`` macro (duckdb-extension-fts for DuckDB 1.5) that _ascii_tokens
#: implements; checked against the file's macro at load.
TOKENIZE_MACRO = (
    "string_split_regex(regexp_replace(lower(strip_accents(CAST(s AS VARCHAR))), "
    "'[0-9!@#$%^&*()_+={}\\[\\]:;<>,.?~\\\\/\\|''''\"`-]+', ' ', 'g'), '\\s+')"
)
_PUNCTUATION = re.compile(r"[0-9!@#$%^&*()_+={}\[\]:;<>,.?~\\/|'\"`-]+")
#: RE2's \s (the macro's split) is [\t\n\f\r ]: no \v, unlike Python's.
_WHITESPACE = re.compile(r"[\t\n\f\r ]+")


def _ascii_tokens(text: str) -> list[str] | None:
    """The tokenize macro's tokens of an ASCII text (None for any other text)."""
    if not text.isascii():
        return None
    return _WHITESPACE.split(_PUNCTUATION.sub(" ", text.lower()))


def _keys(layer: np.ndarray, neuron: np.ndarray) -> np.ndarray:
    return layer.astype(np.int64) * (1 << 32) + neuron.astype(np.int64)


class MemoryIndex:
    """What :mod:`circuits_atlas.memory` holds; build with :meth:`load` on an open atlas connection."""

    def __init__(self, *, unit_columns: Sequence[str], fts_schema: str) -> None:
        self.unit_columns = tuple(unit_columns)
        self.fts_schema = fts_schema
        self._stem_cache: dict[str, str] = {}
        self._cache_lock = threading.Lock()
        self._python_tokens = True
        self._pool: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pool_lock = threading.Lock()
        self._pool_slots = threading.BoundedSemaphore(_ACCUMULATORS)

    @classmethod
    def load(cls, con: Any, *, unit_columns: Sequence[str], fts_schema: str) -> MemoryIndex:
        self = cls(unit_columns=unit_columns, fts_schema=fts_schema)
        fts = fts_schema
        # Neurons, sorted by key; docid -> neuron row.
        cols = ", ".join(dict.fromkeys(("layer", "neuron", *self.unit_columns, "score_detection")))
        neurons = con.execute(f"SELECT {cols} FROM neurons ORDER BY layer, neuron").to_arrow_table()
        self.neurons = neurons.select(list(self.unit_columns)).combine_chunks()
        self.neuron_keys = _keys(neurons.column("layer").to_numpy(), neurons.column("neuron").to_numpy())
        detection = neurons.column("score_detection").to_numpy(zero_copy_only=False)
        self.detection = np.where(np.isnan(detection.astype(np.float64)), -1.0, detection).astype(np.float64)
        del neurons
        docs = con.execute(
            f"SELECT d.docid, n.layer, n.neuron FROM {fts}.docs d JOIN neurons n ON n.unit_id = d.name"
        ).fetchnumpy()
        self.num_docs = int(con.execute(f"SELECT coalesce(max(docid) + 1, 0) FROM {fts}.docs").fetchone()[0])
        self.doc_row = np.full(self.num_docs, -1, np.int64)
        self.doc_row[docs["docid"]] = np.searchsorted(self.neuron_keys, _keys(docs["layer"], docs["neuron"]))
        self.doc_detection = np.full(self.num_docs, -1.0)
        known = self.doc_row >= 0
        self.doc_detection[known] = self.detection[self.doc_row[known]]
        del docs
        # Postings: CSR over termid, each term's run ordered score DESC, docid (the table's order,
        # checked; sorted here when a file holds them otherwise).
        post = con.execute("SELECT termid, docid, score FROM search_postings").fetchnumpy()
        termid, docid, score = post["termid"], post["docid"], post["score"]
        del post
        if len(termid) and not _runs_in_order(termid, docid, score):
            order = np.lexsort((docid, -score, termid))
            termid, docid, score = termid[order], docid[order], score[order]
        num_terms = int(termid.max()) + 1 if len(termid) else 0
        self.term_offsets = np.zeros(num_terms + 1, np.int64)
        np.cumsum(np.bincount(termid, minlength=num_terms), out=self.term_offsets[1:])
        self.post_doc = docid.astype(np.int32 if self.num_docs < 2**31 else np.int64)
        self.post_score = score.astype(np.float64)
        if np.any(self.post_score <= 0) or np.any(np.isnan(self.post_score)):
            # The top-k below relies on contributions > 0 (BM25's idf and tf parts always are).
            raise FailedPrecondition("search_postings holds non-positive scores; not loading the search index")
        # The same runs again, each ordered by docid: a multi-term query adds them into a dense
        # accumulator in ascending docid order (streaming, not random, memory access).
        # (intp indexes: numpy would convert int32 ones on every fancy-indexing call, ~3x slower).
        by_doc = np.lexsort((docid, termid))
        self.doc_post_doc = docid[by_doc].astype(np.intp)
        self.doc_post_score = self.post_score[by_doc]
        del termid, docid, score, by_doc
        self.terms = dict(con.execute(f"SELECT term, termid FROM {fts}.dict").fetchall())
        # The split below is the tokenize macro of this fts version; any other macro text: the macro.
        macro = con.execute(
            "SELECT macro_definition FROM duckdb_functions() WHERE schema_name = ? AND function_name = 'tokenize'", [fts]
        ).fetchall()
        self._python_tokens = bool(macro) and macro[0][0] == TOKENIZE_MACRO and "" not in self.terms
        # Labels: sorted by unit key, output pass first, then by pass name (as _labels_by_key).
        labels = con.execute(
            f"SELECT layer, neuron, {', '.join(LABEL_FIELDS)} FROM labels "
            "ORDER BY layer, neuron, CASE label_pass WHEN 'output' THEN 0 ELSE 1 END, label_pass"
        ).to_arrow_table()
        self.label_keys = _keys(labels.column("layer").to_numpy(), labels.column("neuron").to_numpy())
        self.labels = labels.combine_chunks()
        return self

    # -- search -----------------------------------------------------------------------------
    def term_ids(self, cursor: Any, text: str) -> tuple[int, ...]:
        """Termids (ascending) of the query's distinct stemmed tokens, as the index's macros make them.

        ASCII text is split here with the ``tokenize`` macro's own rule (lower case, the same
        punctuation class replaced by a space, split on RE2 whitespace); other text goes to the
        macro. Stems come from DuckDB's ``stem(token, 'porter')``, cached per token."""
        tokens = _ascii_tokens(text) if self._python_tokens else None
        if tokens is None:
            rows = cursor.execute(f"SELECT DISTINCT stem(unnest({self.fts_schema}.tokenize(?)), 'porter')", [text]).fetchall()
            stems = {t for (t,) in rows}
        else:
            stems = set(self._stems(cursor, set(tokens)))
        return tuple(sorted({self.terms[t] for t in stems if t in self.terms}))

    def _stems(self, cursor: Any, tokens: set[str]) -> list[str]:
        with self._cache_lock:
            known = {t: self._stem_cache[t] for t in tokens if t in self._stem_cache}
        missing = [t for t in tokens if t not in known]
        if missing:
            rows = cursor.execute("SELECT t, stem(t, 'porter') FROM unnest(?::VARCHAR[]) AS u(t)", [missing]).fetchall()
            with self._cache_lock:
                if len(self._stem_cache) + len(rows) > _STEM_CACHE:
                    self._stem_cache.clear()
                for token, stem in rows:
                    self._stem_cache[token] = stem
                    known[token] = stem
        return list(known.values())

    def top_docs(self, term_ids: Sequence[int], k: int, min_score: float) -> tuple[np.ndarray, np.ndarray]:
        """(docids, scores) of the ``k`` best documents, score DESC then docid; ``min_score`` > 0
        keeps documents whose neuron's best detection score is at least that."""
        runs = [(int(self.term_offsets[t]), int(self.term_offsets[t + 1])) for t in term_ids
                if 0 <= t < len(self.term_offsets) - 1]  # fmt: skip
        runs = [r for r in runs if r[1] > r[0]]
        if not runs or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0)
        if len(runs) == 1:
            a, b = runs[0]
            docs, scores = self.post_doc[a:b], self.post_score[a:b]
            if min_score > 0:
                keep = self.doc_detection[docs] >= min_score
                docs, scores = docs[keep], scores[keep]
            return docs[:k].astype(np.int64), scores[:k].copy()
        # Scores of every document of the query's terms in a dense accumulator (runs in docid
        # order: streaming access). Documents of two or more terms are collected on the way; a
        # document of one term t scores exactly its contribution to t, so the best of those come
        # from the head of t's score-ordered run. The top k lie in those candidates.
        space = self._take_workspace()
        acc, buf, flags = space
        try:
            multi_parts = []
            for i, (a, b) in enumerate(runs):  # termid order: the SQL sum adds contributions in this order
                d, sc = self.doc_post_doc[a:b], self.doc_post_score[a:b]
                if i == 0:
                    acc[d] = sc
                    continue
                # Into preallocated buffers: no large temporaries (allocator page faults) per query.
                before = np.take(acc, d, out=buf[: b - a])
                seen = np.not_equal(before, 0.0, out=flags[: b - a])  # contributions are > 0
                multi_parts.append(d[seen])
                acc[d] = np.add(before, sc, out=before)
            multi = multi_parts[0] if len(multi_parts) == 1 else np.unique(np.concatenate(multi_parts))
            cands, scores = [multi], [acc[multi]]
            for a, b in runs:
                d, sc = self._single_term_head(acc, a, b, k, min_score)
                cands.append(d)
                scores.append(sc)
            for a, b in runs:
                acc[self.doc_post_doc[a:b]] = 0.0
        finally:
            self._give_workspace(space)
        cand = np.concatenate(cands).astype(np.int64)
        score = np.concatenate(scores)
        if min_score > 0:
            keep = self.doc_detection[cand] >= min_score
            cand, score = cand[keep], score[keep]
        # A document can be in both lists only with equal scores (see _single_term_head).
        cand, first = np.unique(cand, return_index=True)
        score = score[first]
        order = np.lexsort((cand, -score))[:k]
        return cand[order], score[order]

    def _single_term_head(self, acc: np.ndarray, a: int, b: int, k: int, min_score: float) -> tuple[np.ndarray, np.ndarray]:
        """The first ``k`` documents (score DESC, docid) of the term run [a, b) whose whole score is
        this term's contribution (accumulated score == contribution: no other query term, or
        others too small to change the sum) and that pass ``min_score``."""
        found_d, found_s = [], []
        need, at, step = k, a, max(4 * k, 256)
        while need > 0 and at < b:
            stop = min(b, at + step)
            d, sc = self.post_doc[at:stop], self.post_score[at:stop]
            ok = acc[d] == sc
            if min_score > 0:
                ok &= self.doc_detection[d] >= min_score
            d, sc = d[ok][:need], sc[ok][:need]
            found_d.append(d)
            found_s.append(sc)
            need -= len(d)
            at, step = stop, step * 4
        if not found_d:
            return np.zeros(0, np.int64), np.zeros(0)
        return np.concatenate(found_d).astype(np.int64), np.concatenate(found_s)

    def _take_workspace(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A zeroed score accumulator over documents and scratch buffers as long as the longest
        term run (at most _ACCUMULATORS exist; a query waits for a free one)."""
        self._pool_slots.acquire()
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        longest = int(np.max(np.diff(self.term_offsets))) if len(self.term_offsets) > 1 else 0
        return np.zeros(self.num_docs, np.float64), np.empty(longest, np.float64), np.empty(longest, np.bool_)

    def _give_workspace(self, space: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        with self._pool_lock:
            self._pool.append(space)
        self._pool_slots.release()

    # -- rows -------------------------------------------------------------------------------
    def unit_rows_of_docs(self, docids: np.ndarray) -> list[tuple | None]:
        """The UNIT_COLUMNS row of each document's neuron (None: no neuron, dropped like the SQL join)."""
        rows = self.doc_row[docids]
        present = rows >= 0
        taken = self._neuron_rows(rows[present])
        it = iter(taken)
        return [next(it) if p else None for p in present]

    def _neuron_rows(self, rows: np.ndarray) -> list[tuple]:
        if len(rows) == 0:
            return []
        part = self.neurons.take(rows)
        return list(zip(*(part.column(c).to_pylist() for c in self.unit_columns)))

    def labels_of(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[tuple]]:
        """(layer, neuron) -> its labels rows (LABEL_FIELDS order), output pass first."""
        if not keys:
            return {}
        want = _keys(np.array([k[0] for k in keys]), np.array([k[1] for k in keys]))
        lo = np.searchsorted(self.label_keys, want, side="left")
        hi = np.searchsorted(self.label_keys, want, side="right")
        idx = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(want) else np.zeros(0, np.int64)
        out: dict[tuple[int, int], list[tuple]] = {}
        if len(idx) == 0:
            return out
        part = self.labels.take(idx)
        rows = zip(*(part.column(c).to_pylist() for c in ("layer", "neuron", *LABEL_FIELDS)))
        for row in rows:
            out.setdefault((row[0], row[1]), []).append(row[2:])
        return out


def _runs_in_order(termid: np.ndarray, docid: np.ndarray, score: np.ndarray) -> bool:
    if np.any(termid[1:] < termid[:-1]):
        return False
    same = termid[1:] == termid[:-1]
    down = score[1:] < score[:-1]
    tie = (score[1:] == score[:-1]) & (docid[1:] > docid[:-1])
    return bool(np.all(~same | down | tie))
