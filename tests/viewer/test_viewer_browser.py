"""The viewer in a real headless Chromium, driven over the DevTools protocol (CDP websocket).

Opens the page that `circuits view --port 0` serves on localhost and checks: no console errors
or exceptions, one SVG node per graph node, the default edge filter draws exactly the edges the
threshold admits, the slider changes that set, hover shows the labels, and a real mouse click on
a node highlights exactly its neighbours (computed here from the graph JSON) and dims the rest.
Screenshots go to $CIRCUITS_TEST_ARTIFACTS or benchmarks/out/. Skipped when chromium or
websocket-client is missing (CI: `apt-get install -y chromium`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from test_viewer_page import start_view_server
from viewer_graphs import synthetic_graph

from circuits import analysis

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
websocket = pytest.importorskip("websocket", reason="needs websocket-client (pip install websocket-client)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


def artifact_dir() -> Path:
    path = Path(os.environ.get("CIRCUITS_TEST_ARTIFACTS") or REPO / "benchmarks" / "out")
    path.mkdir(parents=True, exist_ok=True)
    return path


class CDP:
    """Minimal synchronous CDP client: send() waits for its reply; events are kept in .events."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params):
        self.next_id += 1
        msg_id = self.next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression)
            except RuntimeError:  # the document is being replaced during navigation
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def errors(self) -> list[str]:
        out = []
        for ev in self.events:
            m, p = ev["method"], ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:300])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args", []))[:300])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", "")[:300])
        return out

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        self.ws.close()


@pytest.fixture()
def browser():
    """A headless chromium with a fresh profile; yields a CDP client attached to its page."""
    profile = tempfile.mkdtemp(prefix="circuits-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-extensions", "--no-first-run", "--mute-audio", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1500,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    cdp = None
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in json.loads(resp.read()) if t.get("type") == "page"]
        cdp = CDP(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            cdp.send(domain)
        yield cdp
    finally:
        if cdp is not None:
            cdp.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def expected_neighbours(legacy: dict, node_id: str, threshold: float) -> set[str]:
    out = set()
    for link in legacy["links"]:
        if abs(link["weight"]) >= threshold:
            if link["source"] == node_id:
                out.add(link["target"])
            elif link["target"] == node_id:
                out.add(link["source"])
    out.discard(node_id)
    return out


def test_viewer_in_chromium(browser, tmp_path) -> None:
    graph = synthetic_graph(7)
    graph = analysis.with_clusters(graph, analysis.cluster_graph(graph))
    path = graph.save(tmp_path / "graph.json")
    legacy = json.loads(path.read_text())
    n_nodes, n_links = len(legacy["nodes"]), len(legacy["links"])
    assert n_links > 400, "the test graph must exceed the default edge budget"

    proc, url = start_view_server(path)
    try:
        browser.send("Page.navigate", url=url)
        browser.wait_for("document.documentElement.getAttribute('data-viewer-ready') === '1'")

        # every node rendered, clusters in the legend
        assert browser.eval("document.querySelectorAll('#cv-root svg g.cv-node').length") == n_nodes
        assert browser.eval("circuitsViewer.clusterCount()") == len(legacy["qParams"]["supernodes"]) > 0
        sizes = [len(sn) - 1 for sn in legacy["qParams"]["supernodes"]]
        shown = sum(1 for n in sizes if n >= 2) + min(8, sum(1 for n in sizes if n < 2))
        assert browser.eval("document.querySelectorAll('.cv-legend .cv-chip').length") == shown

        # default filter: the 400 strongest edges
        threshold = browser.eval("circuitsViewer.threshold()")
        admitted = sum(1 for link in legacy["links"] if abs(link["weight"]) >= threshold)
        assert admitted == 400
        assert browser.eval("document.querySelectorAll('path.cv-edge').length") == admitted

        # moving the slider to its lowest position shows every edge
        browser.eval("(() => { const s = document.getElementById('cv-threshold'); s.value = '0';"
                     " s.dispatchEvent(new Event('input')); })()")
        assert browser.eval("document.querySelectorAll('path.cv-edge').length") == n_links
        browser.eval("circuitsViewer.setThreshold(%r)" % threshold)
        assert browser.eval("document.querySelectorAll('path.cv-edge').length") == admitted
        browser.screenshot(artifact_dir() / "viewer_overview.png")

        # pick the neuron with most neighbours above the threshold and click it with the mouse
        neuron_ids = [n["node_id"] for n in legacy["nodes"] if n["feature_type"] == "mlp_neuron"]
        target = max(neuron_ids, key=lambda i: (len(expected_neighbours(legacy, i, threshold)), i))
        neighbours = expected_neighbours(legacy, target, threshold)
        assert neighbours
        rect = browser.eval(
            "(() => { const g = document.querySelector(`g.cv-node[data-id='%s']`); g.scrollIntoView({block: 'center', inline: 'center'});"
            " const r = g.getBoundingClientRect(); return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()" % target
        )
        browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=rect["x"], y=rect["y"])
        tooltip = browser.wait_for("(() => { const t = document.getElementById('cv-tooltip');"
                                   " return t.style.display === 'block' ? t.textContent : ''; })()")
        node = next(n for n in legacy["nodes"] if n["node_id"] == target)
        assert node["clerp"] in tooltip and "attribution" in tooltip
        browser.click(rect["x"], rect["y"])
        selected = browser.eval("Array.from(document.querySelectorAll('g.cv-node.cv-selected')).map(g => g.dataset.id)")
        assert selected == [target]
        highlighted = set(browser.eval("Array.from(document.querySelectorAll('g.cv-node.cv-neighbour')).map(g => g.dataset.id)"))
        assert highlighted == neighbours
        dimmed = browser.eval("document.querySelectorAll('g.cv-node.cv-dim').length")
        assert dimmed == n_nodes - 1 - len(neighbours)
        side = browser.eval("document.querySelector('.cv-side').textContent")
        assert "Strongest" in side
        browser.screenshot(artifact_dir() / "viewer_clicked.png")

        # clicking the background clears the highlight
        browser.eval("document.querySelector('.cv-bg').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
        assert browser.eval("document.querySelectorAll('g.cv-node.cv-dim').length") == 0

        assert browser.errors() == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)
