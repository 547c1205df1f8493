"""The viewer page without a browser: self-contained, embeds the graph exactly, safe escaping,
`circuits view --output` and the localhost server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
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


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_view_serves_a_folder_with_a_picker_and_circuit_tracers_routes(tmp_path) -> None:
    from circuits_core.graph_index import index_entry, update_graph_index
    from circuits_core.graphio import write_graph

    folder = tmp_path / "graphs"
    names = {}
    for seed, prompt in ((1, "The capital of France is"), (2, "The capital of Italy is")):
        graph = synthetic_graph(seed, prompt=prompt)
        legacy = graph.to_legacy()
        path = graph.save(folder / f"{legacy['metadata']['slug']}.json")
        update_graph_index(folder, index_entry(legacy))
        names[prompt] = path.name
    write_graph(synthetic_graph(3), folder / "extra.pb.gz")  # compact files are listed too
    (folder / "broken.json").write_text('{"metadata": ')  # listed; its page says what is wrong
    (folder / "notes.txt").write_text("not a graph")
    (tmp_path / "secret.json").write_text('{"secret": true}')

    proc, url = start_view_server(folder)
    try:
        status, ctype, body = _get(url)
        assert status == 200 and "text/html" in ctype
        listing = json.loads(re.search(r'id="circuits-graphs">(.*?)</script>', body.decode(), re.S).group(1))
        assert sorted(g["name"] for g in listing) == sorted([*names.values(), "extra.pb.gz", "broken.json"])
        status, _, body = _get(url + "graph/broken.json")
        assert status == 422 and body.decode().startswith("error: ") and "broken.json" in body.decode()
        assert {g["prompt"] for g in listing} >= set(names)
        italy = next(g for g in listing if g["prompt"] == "The capital of Italy is")
        status, _, body = _get(url.rstrip("/") + italy["href"])
        assert status == 200 and embedded_graph(body.decode())["metadata"]["prompt"] == "The capital of Italy is"
        # circuit-tracer's index.html reads these two
        status, _, body = _get(url + "data/graph-metadata.json")
        index = json.loads(body)
        assert status == 200 and {g["prompt"] for g in index["graphs"]} >= set(names)
        slug = names["The capital of France is"][: -len(".json")]
        status, ctype, body = _get(url + f"graph_data/{slug}.json")
        assert status == 200 and ctype == "application/json" and json.loads(body)["metadata"]["slug"] == slug
        # nothing outside the listed files is reachable
        for bad in ("graph/..%2Fsecret.json", "graph_data/..%2Fsecret.json", "graph/notes.txt", "graph/missing.json", "etc/passwd"):
            assert _get(url + bad)[0] == 404, bad
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_view_output_needs_a_file_and_old_files_get_the_viewer_fields(tmp_path, capsys) -> None:
    from circuits.viewer import viewer_json

    assert main(["view", str(tmp_path), "--output", str(tmp_path / "p.html")]) == 2
    assert capsys.readouterr().err.startswith("error: --output writes one graph's page")
    legacy = synthetic_graph(6).to_legacy()
    old = json.loads(json.dumps(legacy))
    for node in old["nodes"]:  # as written before: the signed score in influence, no attribution key
        node["influence"] = node.pop("attribution")
    del old["metadata"]["transcoder_list"]
    upgraded = viewer_json(old)
    assert [n["attribution"] for n in upgraded["nodes"]] == [n["attribution"] for n in legacy["nodes"]]
    assert [n["influence"] for n in upgraded["nodes"]] == [n["influence"] for n in legacy["nodes"]]
    assert viewer_json(legacy) == legacy  # the current format is shown as written
