"""TRACE STOP (issue 25 item 3): an absurd trace is refused, a long trace obeys its deadline, and
SIGTERM ends in-flight work within the grace period.

* ``k = 2^31-1`` gets INVALID_ARGUMENT naming the limit ``max_k`` (it used to be clamped to the
  vocabulary); with the cap off (``max_k=0``), a k over the vocabulary is refused, not clamped;
* a trace of a model large enough to run for minutes, sent with a 2 s deadline, gets
  DEADLINE_EXCEEDED and the engine is free again at once: the next trace is served promptly
  (the engine polls the stop signal in every phase: layer forwards, attention backwards, edge
  chunks, graph building);
* the same long trace in flight on a server process, then SIGTERM: the process prints
  "attribution server stopped" and exits 0 within the grace period plus a short margin (it used
  to keep tracing until SIGKILL).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from drill_support import ENFORCED_LIMITS, SPECIALS, WORDS, record_drill

GRACE_S = 2.0
#: Seconds past the grace period the process may take to exit (abort the engine, close).
EXIT_MARGIN_S = 5.0
LONG_PROMPT = " ".join(WORDS[i % len(WORDS)] for i in range(300))


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 8-layer Llama (d=256, F=1024, 512 positions): a full trace of a 300-token prompt
    with tau=0 and no node cap takes many minutes on this machine."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>")
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=4)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("models") / "slow-llama-drill"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_absurd_k_is_refused_naming_the_limit(tiny_engine) -> None:
    from circuits_core.errors import InvalidArgument
    from circuits_core.limits import DEFAULT_LIMITS
    from circuits_sdk.attribution import AttributionClient
    from circuits_server.serving import ServerSettings

    from circuits_attribution.server import AttributionSettings, build_server

    vocab = tiny_engine.vocab_size()
    capped = build_server(AttributionSettings(server=ServerSettings(port=0), model="tiny"), tiny_engine).start()
    uncapped = build_server(AttributionSettings(server=ServerSettings(port=0), model="tiny", max_k=0), tiny_engine).start()
    refused = 0
    try:
        with AttributionClient(capped.address, timeout=60) as client:
            for k in (2**31 - 1, DEFAULT_LIMITS.max_k + 1):
                with pytest.raises(InvalidArgument, match=rf"k={k} is over the limit max_k={DEFAULT_LIMITS.max_k} \(--max-k\)"):
                    client.trace("the capital of france is", k=k)
                refused += 1
            assert client.trace("the capital of france is", k=2).units  # still serving
        with AttributionClient(uncapped.address, timeout=60) as client:
            with pytest.raises(InvalidArgument, match=rf"k={vocab + 1} is larger than the vocabulary"):
                client.trace("the capital of france is", k=vocab + 1)
            refused += 1
            assert client.trace("the capital of france is", k=vocab).units  # the whole vocabulary is fine
    finally:
        capped.stop(0.5)
        uncapped.stop(0.5)
    ENFORCED_LIMITS.append("max_k")
    record_drill("trace: absurd k refused", requests=refused, errors=0, note="INVALID_ARGUMENT names max_k")


def test_a_long_trace_stops_at_its_deadline_and_frees_the_engine(slow_checkpoint) -> None:
    from circuits_core.errors import DeadlineExceeded
    from circuits_sdk.attribution import AttributionClient
    from circuits_server.serving import ServerSettings

    from circuits_attribution.models import load_engine
    from circuits_attribution.server import AttributionSettings, build_server

    engine = load_engine(str(slow_checkpoint), dtype="float32", device="cpu")
    server = build_server(AttributionSettings(server=ServerSettings(port=0), model="slow"), engine).start()
    try:
        with AttributionClient(server.address, timeout=600) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                client.trace(LONG_PROMPT, raw=True, tau=0.0, max_nodes=100_000, k=4, timeout=2.0)
            deadline_s = time.monotonic() - started
            # The engine stops within one layer / chunk: the runner frees it, the next call is served.
            begun = time.monotonic()
            graph = client.trace("the capital of france is", raw=True, k=1, timeout=60)
            next_s = time.monotonic() - begun
            assert graph.units
            assert server.runner.running == 0
    finally:
        server.stop(0.5)
    record_drill("trace: stops at its deadline", requests=2, errors=0, latencies_s=[deadline_s, next_s],
                 note=f"deadline 2 s: stopped after {deadline_s:.1f} s; next trace {next_s:.1f} s")
    assert next_s < 30, f"the engine was still busy with the expired trace ({next_s:.1f} s)"


def test_sigterm_ends_an_inflight_trace_within_the_grace_period(slow_checkpoint) -> None:
    import signal

    from circuits_sdk.attribution import AttributionClient

    proc = subprocess.Popen(
        [sys.executable, "-m", "circuits_attribution", "--model", str(slow_checkpoint), "--port", "0", "--insecure",
         "--host", "127.0.0.1", "--grace", str(GRACE_S)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    outcome: dict[str, object] = {}
    try:
        first = proc.stdout.readline()
        assert "listening on" in first, first
        address = first.split("listening on ")[1].split(",")[0].split(";")[0].strip()
        with AttributionClient(address, timeout=600) as client:
            client.wait_ready(timeout=120)

            def long_trace() -> None:
                try:
                    client.trace(LONG_PROMPT, raw=True, tau=0.0, max_nodes=100_000, k=4)
                    outcome["result"] = "finished"
                except Exception as exc:  # noqa: BLE001 - the drill reports what the client saw
                    outcome["result"] = type(exc).__name__

            caller = threading.Thread(target=long_trace, daemon=True)
            caller.start()
            time.sleep(3.0)  # well inside the trace
            assert "result" not in outcome, "the long trace finished too early to drill shutdown"
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=GRACE_S + EXIT_MARGIN_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                pytest.fail(f"still running {GRACE_S + EXIT_MARGIN_S:.0f} s after SIGTERM:\n{out[-3000:]}")
            exit_s = time.monotonic() - signalled
            caller.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    record_drill("trace: SIGTERM ends in-flight work", requests=1, errors=0, faults=1, recovered=1,
                 latencies_s=[exit_s], note=f"grace {GRACE_S:.0f} s: exited after {exit_s:.1f} s, client got {outcome.get('result')}")  # fmt: skip
    assert proc.returncode == 0, out[-3000:]
    assert "attribution server stopped" in out
    assert outcome.get("result") in ("Unavailable", "Cancelled"), outcome
