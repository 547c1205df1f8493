"""Search and label lookups from memory (CircuitDatabase(preload=True), circuits_atlas.memory) give
exactly the SQL path's answers: BM25 scores, order, ties, min_score, limit, the substring fallback
and the labels of every hit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from circuits_atlas import CircuitDatabase
from circuits_atlas.build import build_atlas
from circuits_atlas.duck import FTS_SCHEMA
from circuits_atlas.memory import _ascii_tokens
from circuits_atlas.writeback import write_label

VOCAB = ("enzyme catalysis capital city river number date month year name person country language verb noun "
         "plural tense negation quote bracket code python function loop math digit color animal food music "
         "sport science history money emotion question answer weather ocean star").split()  # fmt: skip
LAYERS, NEURONS = 4, 150


@pytest.fixture(scope="module")
def labelled_atlas(tmp_path_factory: pytest.TempPathFactory, random_export) -> Path:
    root = tmp_path_factory.mktemp("search")
    export = random_export(root / "export", layers=LAYERS, neurons=NEURONS, edges=800, seed=5)
    rng = random.Random(11)
    lines = []
    for layer in range(LAYERS):
        for neuron in range(NEURONS):
            if rng.random() < 0.1:
                continue  # unlabelled
            words = rng.sample(VOCAB[:12], 2) + rng.sample(VOCAB, rng.choice((1, 2, 3)))
            rec = {"layer": layer, "neuron": neuron, "label": " ".join(words) + (" detector" if rng.random() < 0.5 else ""),
                   "source": "progressive_output"}  # fmt: skip
            if rng.random() < 0.6:
                rec["input_label"] = f"tokens about {rng.choice(VOCAB)}, e.g. '{rng.choice(VOCAB)}-{rng.randrange(9)}'"
            if rng.random() < 0.5:
                rec["description"] = f"Promotes {rng.choice(VOCAB)} continuations (the {rng.choice(VOCAB)}s)."
            if rng.random() < 0.7:
                rec.update(output_score_detection=rng.randrange(11) / 10, output_score_simulation=rng.random(),
                           output_score_contexts=20, output_score_positives=rng.randrange(20))  # fmt: skip
            if "input_label" in rec and rng.random() < 0.5:
                rec.update(input_score_detection=rng.randrange(11) / 10, input_score_simulation=rng.random(),
                           input_score_contexts=20, input_score_positives=rng.randrange(20))  # fmt: skip
            lines.append(json.dumps(rec))
    labels = root / "labels.jsonl"
    labels.write_text("\n".join(lines) + "\n")
    out = root / "atlas.duckdb"
    build_atlas(export_dir=export, output_path=out, labels_path=labels, clustering=None, min_edge_count=1)
    # A writeback label (its own pass): the labels lookups must show it in both paths.
    write_label(out, layer=1, neuron=3, text="scientist says rivers", description="checked by hand")
    return out


def queries() -> list[str]:
    rng = random.Random(2)
    qs = [" ".join(rng.sample(VOCAB, rng.choice((1, 2, 3, 4)))) for _ in range(40)]
    qs += ["ENZYME, Catalysis!", "rivers", "the city of the river", "tokens about", "detector", "e.g.", "enzym",
           "'river'-3", "  math\tdigit\nloop  ", "x\x0bmath", "café river", "Ωmega", "zzzz", "continuations", "(the",
           "%river%", "river_", "a", "s", "9"]  # fmt: skip
    return qs


def test_search_from_memory_equals_sql(labelled_atlas: Path) -> None:
    with CircuitDatabase(labelled_atlas, preload=True) as mem, CircuitDatabase(labelled_atlas) as sql:
        assert mem.memory is not None and sql.memory is None
        compared = nonempty = fallback = 0
        for q in queries():
            for limit in (1, 3, 20, 1000):
                for min_score in (0.0, 0.3, 0.75):
                    got = mem.search(q, limit, min_score=min_score)
                    want = sql.search(q, limit, min_score=min_score)
                    assert got == want, (q, limit, min_score)
                    compared += 1
                    nonempty += bool(want)
                    fallback += any(h.score == 0.0 for h in want)
        assert compared > 700 and nonempty > 500 and fallback > 20
        # Ties exist and are broken the same way (equal scores at the top of a query).
        hits = sql.search("enzyme", 50)
        assert len({h.score for h in hits}) < len(hits)
        # The labels lookups (get_unit, get_cluster paths) agree too, writeback label included.
        for layer in range(LAYERS):
            for neuron in range(0, NEURONS, 7):
                assert mem.get_unit(layer, neuron) == sql.get_unit(layer, neuron)
        unit = mem.get_unit(1, 3)
        assert [label.source for label in unit.labels][-1] == "scientist"


def test_python_tokens_equal_the_macro(labelled_atlas: Path) -> None:
    import duckdb

    con = duckdb.connect(str(labelled_atlas), read_only=True)
    try:
        rng = random.Random(4)
        alphabet = "abcXYZ019 \t\n\r\x0b\x0c!@#$%^&*()_+={}[]:;<>,.?~\\/|'\"`-éß"
        texts = queries() + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))) for _ in range(300)]
        checked = 0
        for text in texts:
            mine = _ascii_tokens(text)
            if mine is None:
                assert not text.isascii()
                continue
            macro = con.execute(f"SELECT {FTS_SCHEMA}.tokenize(?)", [text]).fetchone()[0]
            assert mine == macro, repr(text)
            checked += 1
        assert checked > 200
    finally:
        con.close()


def test_term_ids_from_python_tokens_equal_the_macro(labelled_atlas: Path) -> None:
    with CircuitDatabase(labelled_atlas, preload=True) as db:
        memory = db.memory
        assert memory._python_tokens
        cur = db._cursor()
        for q in queries():
            rows = cur.execute(f"SELECT DISTINCT d.termid FROM {FTS_SCHEMA}.dict d WHERE d.term IN "
                               f"(SELECT stem(unnest({FTS_SCHEMA}.tokenize(?)), 'porter'))", [q]).fetchall()  # fmt: skip
            assert memory.term_ids(cur, q) == tuple(sorted(r[0] for r in rows)), q


def test_server_uses_memory_search(labelled_atlas: Path) -> None:
    from circuits.client import AtlasClient
    from circuits_server.serving import ServerSettings
    from circuits_atlas.server import AtlasSettings, build_server

    srv = build_server(AtlasSettings(duckdb_path=str(labelled_atlas), server=ServerSettings(port=0, max_workers=4))).start()
    try:
        with AtlasClient(srv.address, timeout=10) as client, CircuitDatabase(labelled_atlas) as sql:
            for q in ("enzyme river", "city", "zzzz", "tokens about"):
                assert client.search(q, limit=25, min_score=0.3) == sql.search(q, 25, min_score=0.3)
    finally:
        srv.stop(grace=1)
