"""SECURITY SETTINGS: no setting may silently weaken security (issue 25, item 5).

Each case of the issue either refuses to start (exit 2, one ``error:`` line, checked on a real
service process) or works as written / warns clearly:

* a ``#`` inside a token belongs to the token (it used to cut the token and drop its scope);
* a token listed twice is refused (it used to take the last scope silently);
* a UTF-8 byte-order mark is not part of the first token;
* a tokens file other users can read gets a warning (the chart mounts Secrets 0440);
* ``--insecure`` with ``--tls-client-ca`` (or any TLS file) is refused (it served plaintext);
* an expired certificate is refused; a key that is not the certificate's is one error line
  (it was a traceback and exit 1);
* two ``authorization`` headers are refused (the last used to win).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from drill_support import record_drill

TOKEN_WITH_HASH = "drill-hash#token-4c8e2a7b91d3"
WRITE_TOKEN = "drill-settings-write-7d1e9b3c5a"
CASES: list[str] = []


def _start_refused(tmp_path: Path, *flags: str) -> str:
    """Run the aggregator with ``flags``; assert exit 2 ending with one ``error:`` line; return it."""
    proc = subprocess.run(
        [sys.executable, "-m", "circuits_aggregator", "--state", str(tmp_path / "state.duckdb"), "--port", "0", *flags],
        capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0], (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr  # warnings (logged lines) may come first
    return errors[0]


def _aggregator(tmp_path: Path, tokens: Path):
    from circuits_aggregator import AggregateStore
    from circuits_aggregator.server import AggregatorServerSettings, build_server
    from circuits_server.serving import ServerSettings

    store = AggregateStore(tmp_path / "state.duckdb")
    settings = AggregatorServerSettings(server=ServerSettings(port=0, auth_tokens_file=str(tokens)))
    server = build_server(settings, store=store).start()
    server.set_serving(True)
    return server


def _call(address: str, method: str, metadata: tuple) -> grpc.StatusCode:
    from circuits_core._proto.circuits.v1 import aggregator_pb2, aggregator_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
        try:
            if method == "Stats":
                stub.Stats(aggregator_pb2.StatsRequest(), metadata=metadata, timeout=10)
            else:  # Export needs the admin scope
                stub.Export(aggregator_pb2.ExportRequest(directory="/nonexistent-root/x"), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_token_file_is_read_as_written(tmp_path) -> None:
    from circuits_server.serving import load_tokens

    tokens = tmp_path / "tokens"
    # BOM first, a '#' inside a token, a trailing comment, a comment line.
    tokens.write_bytes(("\ufeff" + f"{WRITE_TOKEN} read,write\n# operators\n{TOKEN_WITH_HASH} admin  # ops team\n").encode())
    tokens.chmod(0o600)
    assert load_tokens(str(tokens)) == {WRITE_TOKEN: frozenset({"read", "write"}), TOKEN_WITH_HASH: frozenset({"admin"})}
    server = _aggregator(tmp_path, tokens)
    try:
        bearer = lambda token: (("authorization", f"Bearer {token}"),)  # noqa: E731
        assert _call(server.address, "Stats", bearer(WRITE_TOKEN)) == grpc.StatusCode.OK  # first line: no BOM in it
        # The whole '#' token works with its admin scope (INVALID_ARGUMENT: past auth, the path is outside the root) ...
        assert _call(server.address, "Export", bearer(TOKEN_WITH_HASH)) == grpc.StatusCode.INVALID_ARGUMENT
        # ... and its prefix is no token at all.
        assert _call(server.address, "Stats", bearer(TOKEN_WITH_HASH.split("#")[0])) == grpc.StatusCode.UNAUTHENTICATED
        # Two authorization headers, even two valid ones, are refused.
        both = (("authorization", f"Bearer {WRITE_TOKEN}"), ("authorization", f"Bearer {TOKEN_WITH_HASH}"))
        assert _call(server.address, "Stats", both) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0.5)
    CASES.extend(["hash in token", "BOM", "two authorization headers"])


def test_token_file_mistakes_refuse_to_start(tmp_path) -> None:
    twice = tmp_path / "twice"
    twice.write_text(f"{WRITE_TOKEN} read\n{WRITE_TOKEN} admin\n")
    twice.chmod(0o600)
    line = _start_refused(tmp_path, "--insecure", "--auth-tokens-file", str(twice))
    assert "already listed on line 1" in line and WRITE_TOKEN not in line
    bad_utf8 = tmp_path / "latin1"
    bad_utf8.write_bytes(b"caf\xe9-token-0123456789abcdef read\n")
    bad_utf8.chmod(0o600)
    assert "not UTF-8" in _start_refused(tmp_path, "--insecure", "--auth-tokens-file", str(bad_utf8))
    CASES.extend(["token listed twice", "tokens not UTF-8"])


def test_tokens_file_readable_by_others_warns(tmp_path, caplog) -> None:
    from circuits_server.serving import load_tokens

    tokens = tmp_path / "tokens"
    tokens.write_text(f"{WRITE_TOKEN} read\n")
    tokens.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="circuits_server.serving"):
        load_tokens(str(tokens))
    assert "readable or writable by other users (mode 0o644)" in caplog.text
    caplog.clear()
    tokens.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="circuits_server.serving"):
        load_tokens(str(tokens))
    assert caplog.text == ""
    CASES.append("world-readable tokens warn")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=drill-ca")  # fmt: skip
    for name, days in (("server", "2"), ("expired", "-1"), ("other", "2")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=localhost")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", days)  # fmt: skip
    for name in ("ca.key", "server.key", "expired.key", "other.key"):
        (d / name).chmod(0o600)
    return {p.name: p for p in d.iterdir()}


def test_tls_mistakes_refuse_to_start(tmp_path, pki) -> None:
    line = _start_refused(tmp_path, "--insecure", "--tls-client-ca", str(pki["ca.pem"]))
    assert "--insecure contradicts --tls-client-ca" in line
    line = _start_refused(tmp_path, "--tls-client-ca", str(pki["ca.pem"]))
    assert "needs --tls-cert and --tls-key" in line
    line = _start_refused(tmp_path, "--tls-cert", str(pki["expired.pem"]), "--tls-key", str(pki["expired.key"]))
    assert "expired on" in line
    line = _start_refused(tmp_path, "--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["other.key"]))
    assert "does not belong to certificate" in line
    line = _start_refused(tmp_path, "--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]),
                          "--tls-client-ca", str(pki["server.key"]))  # fmt: skip
    assert "TLS client CA" in line
    CASES.extend(["--insecure with --tls-client-ca", "client CA without TLS", "expired certificate",
                  "key/certificate mismatch", "CA file without certificates"])  # fmt: skip


def test_zz_settings_summary() -> None:
    if not CASES:
        pytest.skip("no settings drill ran")
    record_drill("security settings: refuse or warn", requests=len(CASES), errors=0,
                 note=f"{len(CASES)} cases: exit 2 one line / warning / as written")  # fmt: skip
