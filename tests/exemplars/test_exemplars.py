"""Activation exemplars: brute-force check of the vectorised pass, exact shard merge, resume, the
planted neuron, corpus formats and the CLI (tiny random Llama, word-level tokenizer)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits_attribution.exemplars import (
    corpus_fingerprint,
    iter_batches,
    iter_documents,
    iter_sequences,
    merge_exemplar_files,
    run_exemplars,
    separator_id,
)
from circuits_attribution.testing import WORDS, build_model, build_tokenizer, plant_token_neuron
from circuits_core.errors import FailedPrecondition, InvalidArgument
from circuits_core.exemplars import ExemplarRunSettings
from circuits_server.exemplar_files import POSITION_BITS, ExemplarFile, read_state, sample_hashes

STATE_ARRAYS = ("top_act", "top_uid", "top_window", "act_min", "sample_hash", "sample_uid", "sample_window", "sample_act")
PLANTED = {"cat": (1, 7, 60), "dog": (1, 11, 61), "sun": (2, 3, 62)}  # token -> (layer, neuron, private dim)


def write_corpus(path: Path, *, docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = WORDS[:70]
    with open(path, "w") as fh:
        for _ in range(docs):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny():
    model = build_model("llama", dtype=torch.float32)
    tokenizer = build_tokenizer()
    for token, (layer, neuron, dim) in PLANTED.items():
        plant_token_neuron(model, layer=layer, neuron=neuron, token_id=tokenizer.convert_tokens_to_ids(token), dim=dim)
    return model, tokenizer


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


def settings(corpus: Path, output: Path, **kw) -> ExemplarRunSettings:
    base = dict(corpus=str(corpus), output=output, model="tiny", top_k=6, random_samples=24, seq_len=16,
                batch_size=3, context_before=3, context_after=2, progress=False)
    base.update(kw)
    return ExemplarRunSettings(**base)


def test_running_topk_samples_and_stats_equal_brute_force(tiny, corpus, tmp_path):
    model, tok = tiny
    out = tmp_path / "ex.duckdb"
    run_exemplars(settings(corpus, out), model=model, tokenizer=tok)
    state = read_state(out)
    s = state.settings
    # Brute force: every activation of every token, kept in full, then sorted per neuron.
    acts: dict[int, list[np.ndarray]] = {layer: [] for layer in s.layers}
    uids, windows = [], []
    special = set(tok.all_special_ids)
    handles = [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda m, i, layer=layer: acts[layer].append(i[0].reshape(-1, i[0].shape[-1]).numpy().copy()))
        for layer in s.layers]
    try:
        for batch in iter_batches(iter_sequences(iter_documents(str(corpus)), tok, 16), 3, pad_id=separator_id(tok)):
            with torch.no_grad():
                model(input_ids=torch.as_tensor(batch.ids))
            B, T = batch.ids.shape
            for r in range(B):
                for p in range(T):
                    ok = batch.real[r, p] and int(batch.ids[r, p]) not in special
                    uids.append((batch.first_sequence + r) << POSITION_BITS | p if ok else -1)
                    row = [int(batch.ids[r, q]) if 0 <= q < T and batch.real[r, q] else -1 for q in range(p - 3, p + 3)]
                    windows.append(row)
    finally:
        for h in handles:
            h.remove()
    uids = np.array(uids)
    windows = np.array(windows)
    valid = uids >= 0
    assert state.tokens_seen == int(valid.sum())
    for row, layer in enumerate(s.layers):
        a = np.concatenate(acts[layer])[valid]
        u, w = uids[valid], windows[valid]
        np.testing.assert_allclose(state.act_sum[row], a.astype(np.float64).sum(0), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(state.act_sq_sum[row], (a.astype(np.float64) ** 2).sum(0), rtol=1e-4)
        np.testing.assert_array_equal(state.act_min[row], a.min(0))
        for neuron in range(s.num_neurons):
            order = np.lexsort((u, -a[:, neuron]))[: s.top_k]
            np.testing.assert_array_equal(state.top_uid[row, :, neuron], u[order])
            np.testing.assert_array_equal(state.top_act[row, :, neuron], a[order, neuron])
            np.testing.assert_array_equal(state.top_window[row, :, neuron], w[order])
        sample = np.lexsort((u, sample_hashes(u, s.seed)))[: s.random_samples]
        np.testing.assert_array_equal(state.sample_uid, u[sample])
        np.testing.assert_array_equal(state.sample_act[row], a[sample])
        np.testing.assert_array_equal(state.sample_window, w[sample])


def test_shards_merge_exactly_and_a_stopped_run_resumes_to_the_same_file(tiny, corpus, tmp_path):
    model, tok = tiny
    run_exemplars(settings(corpus, tmp_path / "one.duckdb"), model=model, tokenizer=tok)
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"s{i}.duckdb")
        run_exemplars(settings(corpus, parts[-1], shard_index=i, shard_count=3), model=model, tokenizer=tok)
    merge_exemplar_files(parts, tmp_path / "merged.duckdb")
    report = run_exemplars(settings(corpus, tmp_path / "part.duckdb"), model=model, tokenizer=tok, stop_after_batches=4)
    assert not report.complete and not read_state(tmp_path / "part.duckdb").complete
    with pytest.raises(FailedPrecondition, match="--resume"):
        run_exemplars(settings(corpus, tmp_path / "part.duckdb"), model=model, tokenizer=tok)
    resumed = run_exemplars(settings(corpus, tmp_path / "part.duckdb", resume=True), model=model, tokenizer=tok)
    assert resumed.complete and resumed.skipped_batches == 4
    one, merged, part = (read_state(tmp_path / n) for n in ("one.duckdb", "merged.duckdb", "part.duckdb"))
    assert merged.complete and merged.shards == (0, 1, 2)
    for other in (merged, part):
        for name in STATE_ARRAYS:
            np.testing.assert_array_equal(getattr(one, name), getattr(other, name), err_msg=name)
        np.testing.assert_allclose(one.act_sum, other.act_sum, rtol=1e-12, atol=1e-9)
        assert one.tokens_seen == other.tokens_seen and one.vocab == other.vocab


def test_merge_refuses_overlap_unfinished_and_foreign_files(tiny, corpus, tmp_path):
    model, tok = tiny
    a = tmp_path / "a.duckdb"
    run_exemplars(settings(corpus, a, shard_index=0, shard_count=2), model=model, tokenizer=tok)
    with pytest.raises(InvalidArgument, match="more than one file"):
        merge_exemplar_files([a, a], tmp_path / "m.duckdb")
    b = tmp_path / "b.duckdb"
    run_exemplars(settings(corpus, b, shard_index=1, shard_count=2), model=model, tokenizer=tok, stop_after_batches=1)
    with pytest.raises(FailedPrecondition, match="not finished"):
        merge_exemplar_files([a, b], tmp_path / "m.duckdb")
    c = tmp_path / "c.duckdb"
    run_exemplars(settings(corpus, c, shard_index=1, shard_count=2, top_k=4), model=model, tokenizer=tok)
    with pytest.raises(InvalidArgument, match="top_k"):
        merge_exemplar_files([a, c], tmp_path / "m.duckdb")
    with pytest.raises(FailedPrecondition, match="different settings"):
        run_exemplars(settings(corpus, a, shard_index=0, shard_count=2, seed=5, resume=True), model=model, tokenizer=tok)


def test_planted_neurons_fire_only_on_their_token(tiny, corpus, tmp_path):
    model, tok = tiny
    out = tmp_path / "ex.duckdb"
    run_exemplars(settings(corpus, out, top_k=20), model=model, tokenizer=tok)
    ex = ExemplarFile(out)
    counts = {w: sum(json.loads(line)["text"].split().count(w) for line in open(corpus)) for w in PLANTED}
    for token, (layer, neuron, _dim) in PLANTED.items():
        top = ex.top(layer, neuron)
        firing = [c for c in top if c.activation > 0]
        assert len(firing) == min(counts[token], 20) > 0
        assert {c.token for c in firing} == {token}
        # The rest are exact zeros, tie-broken by the lowest uids.
        rest = [c for c in top if c.activation <= 0]
        assert all(c.activation == 0.0 for c in rest) and [c.uid for c in rest] == sorted(c.uid for c in rest)
        assert all(c.activation == 0.0 for c in ex.random(layer, neuron) if c.token != token)
        stats = ex.stats(layer, neuron)
        assert stats.minimum == 0.0 and stats.maximum == top[0].activation > 1.0


def test_corpus_formats_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["the cat is red", "paris is a city", "one two three"]
    (tmp_path / "d").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "d" / f"{i}.txt").write_text(d)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    assert list(iter_documents(str(tmp_path / "d"))) == docs
    assert list(iter_documents(str(tmp_path / "c.jsonl"), text_field="body")) == docs
    assert list(iter_documents(str(tmp_path / "c.parquet"), text_field="body")) == docs
    builtin = list(iter_documents("builtin:python-docs"))
    assert len(builtin) > 50 and sum(map(len, builtin)) > 100_000
    with pytest.raises(InvalidArgument, match="c.jsonl:1: no string field 'text'"):
        list(iter_documents(str(tmp_path / "c.jsonl")))
    with pytest.raises(InvalidArgument, match="no column 'text'"):
        list(iter_documents(str(tmp_path / "c.parquet")))
    assert corpus_fingerprint(str(tmp_path / "d")) != corpus_fingerprint(str(tmp_path / "c.jsonl"))


def test_cli_runs_merges_and_refuses_bad_input(tiny, corpus, tmp_path, capsys):
    model, tok = tiny
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    common = ["--corpus", str(corpus), "--model", str(model_dir), "--seq-len", "16", "--batch-size", "3",
              "--top-k", "5", "--random-samples", "8", "--layers", "1-2", "--no-progress"]
    from circuits.cli import main

    def call(*args: str) -> subprocess.CompletedProcess:
        code = main(["exemplars", *args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    for i in range(2):
        done = call(*common, "--shard-index", str(i), "--shard-count", "2", "--output", str(tmp_path / f"s{i}.duckdb"))
        assert done.returncode == 0, done.stderr
        assert "tokens/s" in done.stdout and "complete" in done.stdout
    merged = call("--merge", str(tmp_path / "s0.duckdb"), str(tmp_path / "s1.duckdb"), "--output", str(tmp_path / "m.duckdb"))
    assert merged.returncode == 0, merged.stderr
    ex = ExemplarFile(tmp_path / "m.duckdb")
    assert ex.layers == (1, 2) and ex.complete
    assert {c.token for c in ex.top(1, 7) if c.activation > 0} == {"cat"}
    for args, message in (
        ((*common, "--output", str(tmp_path / "s0.duckdb"), "--shard-count", "2"), "already exists; pass --resume"),
        (("--corpus", str(tmp_path / "missing"), "--output", str(tmp_path / "x.duckdb")), "corpus not found"),
        ((*common, "--layers", "1-9", "--output", str(tmp_path / "y.duckdb")), "out of range"),
        ((*common, "--top-k", "0", "--output", str(tmp_path / "z.duckdb")), "--top-k must be >= 1"),
        (("--merge", str(tmp_path / "s0.duckdb")), "--merge needs --output"),
    ):
        done = call(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], done.stderr


def test_launch_dry_run_prints_an_indexed_job(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "circuits.cli", "exemplars", "--launch", "--image", "img:1", "--shards", "4",
         "--corpus", "/data/corpus", "--output-dir", "/data/ex", "--layers", "0-3", "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    import yaml

    job = yaml.safe_load(done.stdout)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "circuits_attribution.exemplars"]
    assert "--resume" in command and command[command.index("--layers") + 1] == "0-3"
    assert command[command.index("--shard-count") + 1] == "4"


def test_exemplar_files_refuse_foreign_and_crafted_files(tiny, corpus, tmp_path):
    import duckdb

    from circuits_core.errors import NotFound

    model, tok = tiny
    out = tmp_path / "ex.duckdb"
    run_exemplars(settings(corpus, out), model=model, tokenizer=tok)
    with pytest.raises(NotFound):
        ExemplarFile(tmp_path / "missing.duckdb")
    (tmp_path / "junk.duckdb").write_bytes(b"not a database")
    with pytest.raises(InvalidArgument):  # CorruptInput or the opener's InvalidArgument: one line, exit 2
        ExemplarFile(tmp_path / "junk.duckdb")
    crafted = tmp_path / "crafted.duckdb"
    crafted.write_bytes(out.read_bytes())
    con = duckdb.connect(str(crafted))
    con.execute("CREATE MACRO leak() AS TABLE SELECT * FROM read_text('/etc/hostname')")
    con.close()
    with pytest.raises(FailedPrecondition, match="holds a macro"):
        ExemplarFile(crafted)
