"""The viewer in a real headless Chromium, driven over the DevTools protocol (CDP websocket).

Opens the page that `circuits view --port 0` serves on localhost at 1600x1000 and checks: no
console errors or exceptions; the node filter draws exactly the nodes whose cumulative influence
share is within the threshold (computed here from the graph JSON) and its slider changes that set;
the edge filter likewise; hover shows the labels; a real mouse click on a node highlights exactly
its neighbours and dims the rest; zoom and fit. On the real SmolLM2 "The capital of France is"
graph: the token axis, the " Paris" logit label and the top-10 neurons by |RelP| are visible
without scrolling, and the folder picker switches graphs. Screenshots go to
$CIRCUITS_TEST_ARTIFACTS or benchmarks/out/. Skipped when chromium or websocket-client is missing
(CI: `apt-get install -y chromium`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
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
         "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1600,1000", "about:blank"],
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
        # the viewport itself 1600x1000 (the window size includes headless chrome's own bars)
        cdp.send("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
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


def expected_neighbours(legacy: dict, node_id: str, threshold: float, shown: set[str]) -> set[str]:
    out = set()
    for link in legacy["links"]:
        if abs(link["weight"]) >= threshold and link["source"] in shown and link["target"] in shown:
            if link["source"] == node_id:
                out.add(link["target"])
            elif link["target"] == node_id:
                out.add(link["source"])
    out.discard(node_id)
    return out


def shown_nodes(legacy: dict, node_threshold: float) -> set[str]:
    """The viewers' rule: embeddings and logits always, neurons when influence <= threshold."""
    return {n["node_id"] for n in legacy["nodes"]
            if n["feature_type"] != "mlp_neuron" or n["influence"] is None or n["influence"] <= node_threshold}


def rendered_ids(browser) -> set[str]:
    return set(browser.eval("Array.from(document.querySelectorAll('g.cv-node')).map(g => g.dataset.id)"))


def test_viewer_in_chromium(browser, tmp_path) -> None:
    graph = synthetic_graph(7)
    graph = analysis.with_clusters(graph, analysis.cluster_graph(graph))
    path = graph.save(tmp_path / "graph.json")
    legacy = json.loads(path.read_text())
    n_links = len(legacy["links"])
    assert legacy["metadata"]["node_threshold"] == 0.8

    proc, url = start_view_server(path)
    try:
        browser.send("Page.navigate", url=url)
        browser.wait_for("document.documentElement.getAttribute('data-viewer-ready') === '1'")

        # default node filter: the neurons carrying 80% of the influence, and every embedding and logit
        shown = shown_nodes(legacy, 0.8)
        assert 0 < len(shown) < len(legacy["nodes"])
        assert rendered_ids(browser) == shown
        assert browser.eval("circuitsViewer.clusterCount()") == len(legacy["qParams"]["supernodes"]) > 0
        sizes = [len(sn) - 1 for sn in legacy["qParams"]["supernodes"]]
        expected_chips = sum(1 for n in sizes if n >= 2) + min(8, sum(1 for n in sizes if n < 2))
        assert browser.eval("document.querySelectorAll('.cv-legend .cv-chip').length") == expected_chips

        # the node slider moves that set
        browser.eval("(() => { const s = document.getElementById('cv-node-threshold'); s.value = '0.5';"
                     " s.dispatchEvent(new Event('input')); })()")
        assert rendered_ids(browser) == shown_nodes(legacy, 0.5) != shown
        browser.eval("circuitsViewer.setNodeThreshold(1)")
        assert rendered_ids(browser) == {n["node_id"] for n in legacy["nodes"]}
        assert n_links > 400, "the test graph must exceed the default edge budget"

        # edge filter: the 400 strongest edges between shown nodes; the slider at 0 shows all
        browser.eval("circuitsViewer.setNodeThreshold(0.8)")
        threshold = browser.eval("circuitsViewer.threshold()")
        admitted = [link for link in legacy["links"] if abs(link["weight"]) >= threshold
                    and link["source"] in shown and link["target"] in shown]
        assert len(admitted) == browser.eval("document.querySelectorAll('path.cv-edge').length") <= 400
        browser.eval("(() => { const s = document.getElementById('cv-threshold'); s.value = '0';"
                     " s.dispatchEvent(new Event('input')); })()")
        between_shown = [link for link in legacy["links"] if link["source"] in shown and link["target"] in shown]
        assert browser.eval("document.querySelectorAll('path.cv-edge').length") == len(between_shown)
        browser.eval("circuitsViewer.setThreshold(%r)" % threshold)
        browser.screenshot(artifact_dir() / "viewer_overview.png")

        # labels sit beside the strongest shown neurons
        labelled = browser.eval("circuitsViewer.labelledNodeIds()")
        strongest = sorted((n for n in legacy["nodes"] if n["feature_type"] == "mlp_neuron" and n["node_id"] in shown),
                           key=lambda n: -abs(n["attribution"]))
        assert labelled and set(labelled) <= {n["node_id"] for n in strongest[:56]}
        assert len(browser.eval("Array.from(document.querySelectorAll('text.cv-node-label'))")) == len(labelled)

        # pick the shown neuron with most shown neighbours and click it with the mouse
        neuron_ids = [n["node_id"] for n in legacy["nodes"] if n["feature_type"] == "mlp_neuron" and n["node_id"] in shown]
        target = max(neuron_ids, key=lambda i: (len(expected_neighbours(legacy, i, threshold, shown)), i))
        neighbours = expected_neighbours(legacy, target, threshold, shown)
        assert neighbours
        rect = browser.eval(
            "(() => { const r = document.querySelector(`g.cv-node[data-id='%s'] > :not(text)`).getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()" % target
        )
        browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=rect["x"], y=rect["y"])
        tooltip = browser.wait_for("(() => { const t = document.getElementById('cv-tooltip');"
                                   " return t.style.display === 'block' ? t.textContent : ''; })()")
        node = next(n for n in legacy["nodes"] if n["node_id"] == target)
        assert node["clerp"] in tooltip and "attribution" in tooltip and "influence" in tooltip
        browser.click(rect["x"], rect["y"])
        selected = browser.eval("Array.from(document.querySelectorAll('g.cv-node.cv-selected')).map(g => g.dataset.id)")
        assert selected == [target]
        highlighted = set(browser.eval("Array.from(document.querySelectorAll('g.cv-node.cv-neighbour')).map(g => g.dataset.id)"))
        assert highlighted == neighbours
        dimmed = browser.eval("document.querySelectorAll('g.cv-node.cv-dim').length")
        assert dimmed == len(shown) - 1 - len(neighbours)
        side = browser.eval("document.querySelector('.cv-side').textContent")
        assert "Strongest" in side
        browser.screenshot(artifact_dir() / "viewer_clicked.png")

        # clicking the background clears the highlight
        browser.eval("document.querySelector('.cv-bg').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
        assert browser.eval("document.querySelectorAll('g.cv-node.cv-dim').length") == 0

        # the wheel zooms about the pointer, a double-click fits the whole graph again
        before = browser.eval("document.querySelector('.cv-viewport').getAttribute('transform')")
        browser.send("Input.dispatchMouseEvent", type="mouseWheel", x=rect["x"], y=rect["y"], deltaX=0, deltaY=-400)
        zoomed = browser.wait_for("(() => { const t = document.querySelector('.cv-viewport').getAttribute('transform');"
                                  " return t !== %s ? t : ''; })()" % json.dumps(before))
        assert "scale(1.8" in zoomed
        browser.eval("document.querySelector('.cv-svg').dispatchEvent(new MouseEvent('dblclick', {bubbles: true}))")
        assert browser.eval("document.querySelector('.cv-viewport').getAttribute('transform')") == before

        assert browser.errors() == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- the real raw "The capital of France is" graph of SmolLM2-135M-Instruct ----------------------------
def _smollm2_prepared() -> bool:
    try:
        from circuits_attribution.models import is_prepared
    except ImportError:
        return False
    return is_prepared()


@pytest.fixture(scope="module")
def france_folder(tmp_path_factory):
    """`circuits graph "The capital of France is" --raw` into a folder (graph + graph-metadata.json)."""
    if not _smollm2_prepared():
        pytest.skip("SmolLM2 cache not prepared (run: python -m circuits_attribution.prepare_model)")
    folder = tmp_path_factory.mktemp("france")
    done = subprocess.run(
        [sys.executable, "-m", "circuits.cli", "graph", "The capital of France is", "--raw", "--output-dir", str(folder)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


IN_VIEW = """(() => {
  const inside = (el) => { const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0 && r.right <= innerWidth && r.bottom <= innerHeight; };
  const top = (el) => { const r = el.getBoundingClientRect();
    const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2); return hit && el.contains(hit); };
  return {
    scrolls: document.documentElement.scrollHeight > innerHeight || document.documentElement.scrollWidth > innerWidth,
    tokens: Array.from(document.querySelectorAll('text.cv-token')).map(t => [t.firstChild.nodeValue, inside(t)]),
    logits: Array.from(document.querySelectorAll('text.cv-logit-label')).map(t => [t.textContent, inside(t)]),
    nodes: Object.fromEntries(%s.map(id => { const g = document.querySelector(`g.cv-node[data-id='${id}']`);
      return [id, g ? [inside(g), top(g.firstElementChild)] : null]; })),
  };
})()"""


@pytest.mark.smollm2
def test_raw_france_graph_fits_the_window(browser, france_folder) -> None:
    (path,) = [p for p in france_folder.iterdir() if p.name.startswith("relp-")]
    legacy = json.loads(path.read_text())
    neurons = [n for n in legacy["nodes"] if n["feature_type"] == "mlp_neuron"]
    top10 = [n["node_id"] for n in sorted(neurons, key=lambda n: -abs(n["attribution"]))[:10]]
    # a second graph in the folder, for the picker
    other = synthetic_graph(8, prompt="The capital of Italy is")
    from circuits_core.graph_index import index_entry, update_graph_index

    other_legacy = other.to_legacy()
    other.save(france_folder / f"{other_legacy['metadata']['slug']}.json")
    update_graph_index(france_folder, index_entry(other_legacy))

    proc, url = start_view_server(france_folder)
    try:
        browser.send("Page.navigate", url=url)
        browser.wait_for("document.documentElement.getAttribute('data-viewer-ready') === '1'")
        assert browser.eval("document.querySelector('.cv-title').textContent") == "\u201cThe capital of France is\u201d"
        seen = browser.eval(IN_VIEW % json.dumps(top10))
        browser.screenshot(artifact_dir() / "viewer_france_raw.png")
        assert not seen["scrolls"], "the page must fit 1600x1000 without scrolling"
        # the token axis: every prompt token, inside the window
        assert [t for t, _ in seen["tokens"]] == legacy["metadata"]["prompt_tokens"]
        assert all(ok for _, ok in seen["tokens"])
        # the logit tokens, " Paris" first
        assert seen["logits"][0] == ['" Paris"', True] and all(ok for _, ok in seen["logits"])
        # the ten strongest neurons by |RelP|: drawn, inside the window, not covered
        assert seen["nodes"] == {i: [True, True] for i in top10}
        assert set(browser.eval("circuitsViewer.labelledNodeIds()")) & set(top10)

        # the picker lists both graphs and opens the other one
        options = browser.eval("Array.from(document.querySelectorAll('#cv-picker option')).map(o => o.textContent)")
        assert len(options) == 2 and any("Italy" in o for o in options)
        browser.eval("(() => { const s = document.getElementById('cv-picker');"
                     " s.value = Array.from(s.options).find(o => o.textContent.includes('Italy')).value;"
                     " s.dispatchEvent(new Event('change')); })()")
        browser.wait_for("(document.querySelector('.cv-title') || {}).textContent === '\u201cThe capital of Italy is\u201d'")
        assert browser.errors() == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)
