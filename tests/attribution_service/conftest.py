"""Fixtures for the attribution service tests: a tiny random Llama with an offline word-level
tokenizer (saved once as a local checkpoint, so subprocesses load it like any model), the real
RelP engine on it, and a controllable fake engine for concurrency tests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from circuits_core.errors import InvalidArgument
from circuits_core.interventions import InterventionRequest, InterventionResult, TokenProbability
from circuits_core.schemas import Graph, GraphMetadata, Unit
from circuits_core.tracing import ModelInfo, TraceRequest
from circuits_attribution.service import AttributionEngine

WORDS = (
    "the capital of france is paris london rome city one two three four five red green blue "
    "big small cat dog sun moon a b c d e f g h i j k l m n o p"
).split()
TINY_MODEL_NAME = "tiny-llama-service-test"


def _tokenizer():
    from circuits_attribution.testing import build_tokenizer

    return build_tokenizer(words=WORDS, vocab_size=None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local checkpoint directory of a random 3-layer Llama (float32) with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=4,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.25 if "embed" in name or "lm_head" in name else 0.15)
    path = tmp_path_factory.mktemp("models") / TINY_MODEL_NAME
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path):
    """The real RelP engine on the tiny checkpoint, loaded like `circuits serve` loads it."""
    from circuits_attribution.models import load_engine

    return load_engine(str(tiny_checkpoint), dtype="float32", device="cpu")


class FakeEngine(AttributionEngine):
    """An engine whose traces block until released (or stopped), for concurrency tests.

    Deterministic graphs: the prompt is echoed as a one-unit graph. ``started`` counts traces
    that reached the engine; ``stopped`` counts traces that ended through ``should_stop``.
    ``concurrent`` is its ``replicas_trace_concurrently``.
    """

    def __init__(self, *, hold: bool = True, concurrent: bool = True) -> None:
        self.hold = hold
        self.replicas_trace_concurrently = concurrent
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.started = 0
        self.stopped = 0
        self.finished = 0
        self.requests: list[TraceRequest] = []
        self.batches: list[list[str]] = []  # the prompts of every trace_many call, in call order

    def replicate(self) -> FakeEngine:
        twin = FakeEngine(hold=self.hold, concurrent=self.replicas_trace_concurrently)
        twin.release = self.release
        twin.lock = self.lock
        twin._parent = self  # noqa: SLF001 - counters live on the first engine
        return twin

    def _root(self) -> FakeEngine:
        return getattr(self, "_parent", self)

    def model_info(self) -> ModelInfo:
        return ModelInfo(model="fake", num_layers=1, d_model=2, d_mlp=3, vocab_size=4, dtype="float32", device="cpu")

    def _hold(self, should_stop) -> None:
        root = self._root()
        with root.lock:
            root.started += 1
        while self.hold and not self.release.is_set():
            if should_stop():
                with root.lock:
                    root.stopped += 1
                raise RuntimeError("stopped")  # the runner maps it (its should_stop is true)
            time.sleep(0.01)
        with root.lock:
            root.finished += 1

    def trace(self, request: TraceRequest, *, should_stop) -> Graph:
        if request.prompt == "bad":
            raise InvalidArgument("prompt 'bad' is not traceable")
        with self._root().lock:
            self._root().requests.append(request)
        self._hold(should_stop)
        return Graph(
            units=(Unit(layer=0, index=len(request.prompt), position=0, kind="neuron", activation=1.0),),
            prompt=request.prompt,
            model="fake",
            graph_id=f"fake-{request.prompt}",
            metadata=GraphMetadata(slug=request.slug, metric_value=0.0, corpus_index=request.corpus_index),
        )

    def trace_many(self, requests, *, should_stop):
        with self._root().lock:
            self._root().batches.append([r.prompt for r in requests])
        return super().trace_many(requests, should_stop=should_stop)

    def intervene(self, request: InterventionRequest, *, should_stop) -> InterventionResult:
        self._hold(should_stop)
        top = TokenProbability(token=request.prompt, token_id=0, logit=1.0, probability=1.0)
        return InterventionResult(prompt_tokens=(request.prompt,), position=0, baseline=(top,), intervened=(top,),
                                  tracked=(top,), interventions=request.interventions)


@pytest.fixture
def fake_engine() -> FakeEngine:
    engine = FakeEngine()
    yield engine
    engine.release.set()
