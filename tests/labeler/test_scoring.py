"""Label scores: the arithmetic against brute force, answer parsing, and the planted-neuron check
(a tiny model whose neurons fire on one token each: the correct label scores high, a shuffled
label near chance), end to end through exemplars, the progressive labeler and the stand-in LLM."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from circuits_core.config import config_from_mapping
from circuits_labeler.cache import AnswerCache
from circuits_labeler.engine import ProgressiveLabeler
from circuits_labeler.evidence import DuckDBEvidence, write_evidence_parquet
from circuits_labeler.llm import AnthropicBackend
from circuits_labeler.prompts import MalformedAnswer, ParsedAnswer
from circuits_labeler.scoring import pearson, parse_predictions, score_predictions, split_exemplars
from circuits_labeler.testing import StandInLLMServer
from labeler_support import SECRET_KEY

PLANTED = {"cat": (1, 7, 60), "dog": (1, 11, 61), "sun": (2, 3, 62)}  # token -> (layer, neuron, private dim)


def test_detection_is_balanced_accuracy_and_simulation_is_correlation():
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(2, 30)
        acts = [rng.uniform(-1, 3) for _ in range(n)]
        preds = [rng.randint(0, 10) for _ in range(n)]
        score = score_predictions(preds, acts, threshold=1.0)
        truth = [a >= 1.0 for a in acts]
        pos = [p >= 5 for t, p in zip(truth, preds) if t]
        neg = [p < 5 for t, p in zip(truth, preds) if not t]
        expected = (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2 if pos and neg else None
        assert score.detection == pytest.approx(expected) if expected is not None else score.detection is None
        assert score.contexts == n and score.positives == sum(truth)
        if len(set(preds)) > 1:
            import numpy as np

            assert score.simulation == pytest.approx(float(np.corrcoef(preds, acts)[0, 1]))
    assert pearson([3, 3, 3], [1.0, 2.0, 3.0]) == 0.0  # a constant guess carries no information
    assert pearson([1, 2], [5.0, 5.0]) is None
    perfect = score_predictions([10, 10, 0, 0], [2.0, 3.0, 0.0, 0.1], threshold=1.0)
    assert perfect.detection == 1.0 and perfect.simulation > 0.9


def test_parse_predictions_accepts_json_and_rejects_wrong_counts():
    assert parse_predictions('{"predictions": [0, 10, 7.6]}', 3) == [0, 10, 8]
    assert parse_predictions('Sure!\n```json\n{"predictions": [1, 2]}\n```', 2) == [1, 2]
    assert parse_predictions("[11, -3]", 2) == [10, 0]
    for text, n in (('{"predictions": [1]}', 2), ("no json here", 1), ('{"predictions": ["a"]}', 1),
                    ('{"predictions": [true]}', 1)):
        with pytest.raises(MalformedAnswer):
            parse_predictions(text, n)


def test_split_exemplars_alternates_ranks():
    shown, held = split_exemplars(list(range(7)))
    assert shown == [0, 2, 4, 6] and held == [1, 3, 5]


@pytest.fixture(scope="module")
def planted_exemplars(tmp_path_factory):
    from circuits_attribution.exemplars import run_exemplars
    from circuits_attribution.testing import WORDS, build_model, build_tokenizer, plant_token_neuron
    from circuits_core.exemplars import ExemplarRunSettings

    root = tmp_path_factory.mktemp("planted")
    model = build_model("llama", dtype=torch.float32)
    tokenizer = build_tokenizer()
    for token, (layer, neuron, dim) in PLANTED.items():
        plant_token_neuron(model, layer=layer, neuron=neuron, token_id=tokenizer.convert_tokens_to_ids(token), dim=dim)
    rng = random.Random(1)
    words = [w for w in WORDS[:70]]
    with open(root / "corpus.jsonl", "w") as fh:
        for _ in range(120):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(10, 40)))}) + "\n")
    out = root / "ex.duckdb"
    run_exemplars(ExemplarRunSettings(corpus=str(root / "corpus.jsonl"), output=out, model="tiny", top_k=20,
                                      random_samples=64, seq_len=32, batch_size=4, context_before=4, context_after=2,
                                      progress=False), model=model, tokenizer=tokenizer)
    return out


def make_labeler(tmp_path: Path, server: StandInLLMServer, exemplars_path: Path, **labeling) -> ProgressiveLabeler:
    from circuits_server.exemplar_files import ExemplarFile

    keys = list(PLANTED.values())
    edges = [(a[0], a[1], b[0], b[1], 4, 0.3) for a, b in itertools.permutations(keys, 2) if a[0] < b[0]]
    evidence = write_evidence_parquet(tmp_path / "export", edges=edges, units=[(l, n, 5) for l, n, _ in keys])
    section = {
        "backend": "anthropic", "model": "stand-in", "base_url": server.base_url, "api_key_file": str(tmp_path / "key"),
        "min_effect": 0.0, "min_labeled_upstream": 5, "retry_base_delay": 0.01, "cache_fsync": False,
        "cache_path": "cache.jsonl", "labels_path": "labels.jsonl", "num_layers": 4, **labeling,
    }  # fmt: skip
    (tmp_path / "key").write_text(SECRET_KEY)
    config = config_from_mapping({"labeling": section}, base_dir=str(tmp_path))
    return ProgressiveLabeler(
        settings=config.labeling, evidence=DuckDBEvidence(evidence), projections=None,
        cache=AnswerCache(tmp_path / "cache.jsonl", fsync=False),
        backend_factory=lambda: AnthropicBackend(model="stand-in", api_key=SECRET_KEY, base_url=server.base_url),
        labels_path=tmp_path / "labels.jsonl", exemplars=ExemplarFile(exemplars_path),
    )


def test_planted_neurons_correct_labels_score_high_and_shuffled_labels_near_chance(planted_exemplars, tmp_path):
    with StandInLLMServer() as server:
        labeler = make_labeler(tmp_path, server, planted_exemplars)
        final = labeler.run()
        assert final.state == "done", final.message
        scored = {}
        for token, (layer, neuron, _dim) in PLANTED.items():
            entry = labeler.store.get((layer, neuron))
            # Pass 2 ran on exemplars alone (min_labeled_upstream=5 is never met) and read the token.
            assert entry.input.label == f"fires on the token {token}"
            scored[token] = entry.input_score
            assert entry.input_score.detection >= 0.95 and entry.input_score.simulation >= 0.9, entry.input_score
            assert entry.input_score.contexts == 20 and entry.input_score.positives >= 10
            # The stand-in's output label ("output L1/N7") names no token: exactly chance.
            assert entry.output_score.detection == 0.5 and entry.output_score.simulation == 0.0
        prompts = server.answered(label_pass="score")
        assert len(prompts) == 2 * len(PLANTED)
        assert all('"predictions"' in r.prompt and "[[" in r.prompt for r in prompts)
        # The labels file carries the scores.
        records = {(r["layer"], r["neuron"]): r for r in map(json.loads, open(tmp_path / "labels.jsonl"))}
        assert records[PLANTED["cat"][:2]]["input_score_detection"] == scored["cat"].detection

        # Shuffle: each neuron gets another neuron's (correct) label.
        tokens = list(PLANTED)
        for token, other in zip(tokens, tokens[1:] + tokens[:1]):
            key = PLANTED[token][:2]
            labeler.store.set(key, label_pass="input", answer=ParsedAnswer(
                label=f"fires on the token {other}", description="", type="token-pattern", confidence="high"))
            assert labeler.store.get(key).input_score is None  # a changed label drops the old score
        server.reset()
        labeler.score_labels()
        for token in tokens:
            score = labeler.store.get(PLANTED[token][:2]).input_score
            assert 0.35 <= score.detection <= 0.65 and abs(score.simulation) <= 0.3, (token, score)
        # Only the shuffled (changed) labels were paid for again; the output scores came from the cache.
        assert len(server.answered(label_pass="score")) == len(PLANTED)


def test_scores_resume_from_the_cache_and_respect_the_budget(planted_exemplars, tmp_path):
    with StandInLLMServer() as server:
        make_labeler(tmp_path, server, planted_exemplars).run()
        paid = len(server.answered())
        server.reset()
        again = make_labeler(tmp_path, server, planted_exemplars)
        assert again.run().state == "done" and server.answered() == []  # everything cached
        assert again.store.get(PLANTED["dog"][:2]).input_score.detection >= 0.95
        server.reset()
        poor = make_labeler(tmp_path / "budget", server, planted_exemplars, max_tokens_total=1)
        final = poor.run()
        assert final.state == "budget_exhausted" and len(server.answered()) < paid
    with pytest.raises(Exception, match="exemplars_path"):
        ProgressiveLabeler(settings=poor.settings, evidence=poor.evidence, projections=None, cache=poor.cache,
                           backend_factory=poor.backend_factory, num_layers=4).run(score=True)
