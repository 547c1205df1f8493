"""SECRETS: after the drills, no log holds a token or key.

Runs after the other drills (file name). It first provokes the paths most likely to leak on its own (so it means
something when run alone): a refused wrong token, an LLM that rejects the API key, a log line
that quotes a registered token from a logger and handler created after registration. Then it
scans every log of the session: the subprocess logs (attribution, aggregator, atlas, labeler
servers, which got a fake ANTHROPIC_API_KEY and HF token in their environment), the in-process
log file and pytest's captured records.
"""

from __future__ import annotations

import logging

import grpc
from drill_support import (
    FAKE_ANTHROPIC_KEY,
    FAKE_HF_TOKEN,
    READ_TOKEN,
    WRITE_TOKEN,
    WRONG_TOKEN,
    find_secrets,
    record_drill,  # fmt: skip
)


def _provoke_auth_failure(tokens_file, tmp_path) -> None:
    from circuits_sdk._channel import open_channel
    from circuits_server.serving import ServerSettings
    from circuits_aggregator import AggregateStore
    from circuits_aggregator.server import AggregatorServerSettings, build_server

    store = AggregateStore(tmp_path / "state.duckdb")
    server = build_server(AggregatorServerSettings(server=ServerSettings(port=0, auth_tokens_file=str(tokens_file))),
                          store=store).start()  # fmt: skip
    server.set_serving(True)
    try:
        for token in (WRONG_TOKEN, READ_TOKEN):
            with open_channel(server.address, token=token) as channel:
                try:
                    list(channel.stream_stream("/circuits.v1.AggregatorService/Ingest")(iter([b"\n\x01a"]), timeout=5))
                except grpc.RpcError as exc:
                    assert WRONG_TOKEN not in (exc.details() or "") and READ_TOKEN not in (exc.details() or "")
    finally:
        server.stop(0.5)


def _provoke_llm_key_rejection(tmp_path, monkeypatch) -> list[str]:
    """The LLM answers 401 to the fake key: the labeler must stop cleanly without printing the key."""
    from circuits_core.config import config_from_mapping
    from circuits_labeler.build import build_labeler
    from circuits_labeler.evidence import write_evidence_parquet
    from circuits_labeler.service import LabelerService
    from circuits_labeler.testing import StandInLLMServer

    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_ANTHROPIC_KEY)
    evidence = write_evidence_parquet(tmp_path / "evidence", edges=[(0, 0, 1, 0, 3, 0.5)], units=[(0, 0, 3), (1, 0, 3)])
    with StandInLLMServer(fault_for=lambda request: "401") as llm:
        config = config_from_mapping({"labeling": {
            "backend": "anthropic", "model": "stand-in", "base_url": llm.base_url, "evidence_path": str(evidence),
            "projections_path": "", "compute_projections": False, "cache_path": "cache.jsonl",
            "labels_path": "labels.jsonl", "min_effect": 0.0, "concurrency": 1, "retry_base_delay": 0.01,
            "retry_max_delay": 0.02, "request_timeout": 2.0, "cache_fsync": False,
        }}, base_dir=str(tmp_path))  # fmt: skip
        service = LabelerService(build_labeler(config))
        texts = []
        try:
            events = list(service.run_progressive())
            texts += [repr(e) for e in events]
        except Exception as exc:  # noqa: BLE001 - a clean refusal is fine; its text is scanned
            texts.append(f"{type(exc).__name__}: {exc}")
        finally:
            service.labeler.cache.close()
        assert llm.requests and all(r.auth == "present" and r.status == 401 for r in llm.requests)
    for name in ("cache.jsonl", "labels.jsonl"):
        path = tmp_path / name
        if path.exists():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def test_no_secret_in_any_log(tmp_path, tokens_file, log_dir, session_log, caplog, monkeypatch) -> None:
    caplog.set_level(logging.DEBUG)
    _provoke_auth_failure(tokens_file, tmp_path)  # registers the tokens file's tokens as secrets
    texts = _provoke_llm_key_rejection(tmp_path, monkeypatch)

    # A logger and a handler that both appear after the secrets were registered.
    late_handler_records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            late_handler_records.append(self.format(record))

    late = ListHandler()
    root = logging.getLogger()
    root.handlers.insert(0, late)  # first: no earlier handler's filter has redacted the record yet
    try:
        logging.getLogger("circuits.drill.late").warning("retrying with token %s and %s", READ_TOKEN, WRITE_TOKEN)
    finally:
        root.removeHandler(late)

    sources = {f"captured records ({len(caplog.records)})": caplog.text, "late handler": "\n".join(late_handler_records),
               "labeler outcome and files": "\n".join(texts)}  # fmt: skip
    for path in sorted(log_dir.iterdir()):
        if path.is_file():
            sources[path.name] = path.read_text(encoding="utf-8", errors="replace")
    leaks = {name: find_secrets(text) for name, text in sources.items()}
    leaks = {name: found for name, found in leaks.items() if found}
    scanned_bytes = sum(len(t) for t in sources.values())
    record_drill("secrets: log scan", requests=len(sources), errors=sum(len(v) for v in leaks.values()),
                 note=f"{scanned_bytes // 1024} KiB in {len(sources)} logs; tokens, ANTHROPIC_API_KEY, HF token")  # fmt: skip
    assert not leaks, f"secrets in logs: {leaks}"
    assert FAKE_HF_TOKEN and FAKE_ANTHROPIC_KEY  # planted (see conftest.SECRET_ENV)
