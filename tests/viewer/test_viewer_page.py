"""The viewer page without a browser: self-contained, embeds the graph exactly, safe escaping,
`circuits view --output` and the localhost server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

from viewer_graphs import synthetic_graph

from circuits import analysis
from circuits.cli import main
from circuits.viewer import render_page

EMBEDDED = re.compile(r'<script type="application/json" id="circuits-graph">(.*?)</script>', re.S)


def embedded_graph(page: str) -> dict:
    match = EMBEDDED.search(page)
    assert match, "graph JSON not embedded"
    return json.loads(match.group(1))


def test_page_is_self_contained_and_embeds_the_graph() -> None:
    graph = synthetic_graph(1)
    graph = analysis.with_clusters(graph, analysis.cluster_graph(graph))
    page = render_page(graph)
    assert embedded_graph(page) == json.loads(json.dumps(graph.to_legacy()))
    # no external resources of any kind
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "@import" not in page and "url(http" not in page
    assert page.count("<script") == 2  # the JSON and the inline viewer


def test_hostile_text_cannot_break_out_of_the_script() -> None:
    nasty = 'x </script><script>window.pwned=1</script> <!-- \u2028 "quote"'
    graph = synthetic_graph(2, prompt=nasty)
    page = render_page(graph)
    assert "<script>window.pwned" not in page and "</script><script>" not in page
    assert page.count("</script>") == 2
    assert embedded_graph(page)["metadata"]["prompt"] == nasty
    assert "<title>circuits · x &lt;/script&gt;" in page


def test_nan_values_become_null() -> None:
    graph = synthetic_graph(3)
    data = graph.to_legacy()
    data["nodes"][0]["activation"] = float("nan")
    page = render_page(data)
    assert embedded_graph(page)["nodes"][0]["activation"] is None


def test_view_output_writes_page(tmp_path, capsys) -> None:
    path = synthetic_graph(4).save(tmp_path / "g.json")
    assert main(["view", str(path), "--output", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    assert len(embedded_graph(page)["nodes"]) == len(json.loads(path.read_text())["nodes"])


def test_view_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["view", str(tmp_path / "missing.json"), "--output", str(tmp_path / "p.html")]) == 2
    (tmp_path / "bad.json").write_text('{"nodes": []}')
    assert main(["view", str(tmp_path / "bad.json"), "--output", str(tmp_path / "p.html")]) == 2
    assert main(["view", str(tmp_path / "g.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


def start_view_server(graph_path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Run `circuits view GRAPH --port 0 --no-browser`; return the process and the printed URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "circuits.cli", "view", str(graph_path), "--port", "0", "--no-browser", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"no URL printed: {line!r} {proc.stderr.read()}")
    return proc, match.group(1)


def test_view_serves_on_localhost(tmp_path) -> None:
    path = synthetic_graph(5).save(tmp_path / "g.json")
    started = time.monotonic()
    proc, url = start_view_server(path)
    try:
        assert url.startswith("http://127.0.0.1:") and time.monotonic() - started < 20
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
            page = resp.read().decode()
        assert len(embedded_graph(page)["nodes"]) == len(json.loads(path.read_text())["nodes"])
        with urllib.request.urlopen(url + "graph.json", timeout=10) as resp:
            assert json.loads(resp.read())["metadata"]["prompt"] == "The capital of France is"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
