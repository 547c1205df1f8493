"""A self-contained HTML viewer for attribution graphs (no CDN, no JS dependencies).

``render_page(graph)`` returns one HTML document holding the viewer's CSS and JS
(``circuits/viewer/static/``) and the graph's legacy JSON (relp-spec §E). The page fits the whole
graph to the window: layers (y) × token positions (x) with the token axis, logit tokens and the
labels of the strongest neurons written on the plot; nodes sized by |attribution|, coloured by
cluster; node pruning by cumulative influence share (as circuit-tracer and Neuronpedia prune)
and an edge |weight| filter; zoom and pan.

``GraphCatalog`` lists the graphs of one file or of a folder; ``serve_catalog`` serves them on
localhost with a picker (``circuits view FILE|DIR``). Its routes (see ``_Handler.ROUTES``) include
circuit-tracer's ``/data/graph-metadata.json`` and ``/graph_data/<slug>.json``. A graph with more
than ``GraphCatalog.big_edges`` edges is served as a pruned first view, with the neighbourhood of a
clicked node fetched from ``/neighbourhood/<name>?node=<node_id>`` (:mod:`circuits.viewer.subgraph`).
"""

from __future__ import annotations

import html
import http.server
import json
import math
import re
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from circuits_core.errors import CircuitsError, InvalidArgument
from circuits_core.schemas import Graph

__all__ = [
    "GraphCatalog",
    "ViewerServer",
    "graph_json_for_page",
    "render_page",
    "serve_catalog",
    "serve_page",
    "viewer_json",
    "write_page",
]


def _static(name: str) -> str:
    return resources.files("circuits.viewer").joinpath("static", name).read_text(encoding="utf-8")


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (browsers' JSON.parse rejects them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def viewer_json(graph: Graph | Mapping[str, Any]) -> dict[str, Any]:
    """The legacy JSON the viewer shows for ``graph``.

    A dict in the current format is shown as written (extra fields, supernodes); one written
    before the viewers' fields existed (signed score in ``influence``, no influence shares) is
    re-written through :class:`Graph` so it gets them.
    """
    if isinstance(graph, Graph):
        return graph.to_legacy()
    if not isinstance(graph, Mapping) or not isinstance(graph.get("nodes"), list):
        raise InvalidArgument("viewer: expected a Graph or a legacy graph dict with 'nodes'")
    meta = graph.get("metadata")
    current = isinstance(meta, Mapping) and "transcoder_list" in meta
    if current or not graph["nodes"] or any(isinstance(n, Mapping) and "attribution" in n for n in graph["nodes"]):
        return dict(graph)
    return Graph.from_legacy(graph).to_legacy()


def _script_json(data: Any) -> str:
    text = json.dumps(_finite(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # "<" only occurs inside JSON strings, where \u003c means the same; escaping every one
    # means "</script" or "<!--" in a label can never end or confuse the script element.
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def graph_json_for_page(graph: Graph | Mapping[str, Any]) -> str:
    """The graph's viewer JSON as text that is safe inside ``<script type="application/json">``."""
    return _script_json(viewer_json(graph))


def render_page(
    graph: Graph | Mapping[str, Any],
    *,
    title: str | None = None,
    extra_html: str = "",
    graphs: Sequence[Mapping[str, Any]] = (),
) -> str:
    """One self-contained HTML page showing ``graph``; ``extra_html`` is placed below the viewer.

    ``graphs`` (``{"href", "slug", "prompt", "scan"}`` each) adds a picker that links to them.
    The page loads nothing from the network: CSS, JS and the graph are inline.
    """
    payload = graph_json_for_page(graph)
    if title is None:
        prompt = graph.prompt if isinstance(graph, Graph) else str((graph.get("metadata") or {}).get("prompt", ""))
        title = f"circuits · {prompt}" if prompt else "circuits graph"
    css = _static("viewer.css")
    js = _static("viewer.js").replace("</script", "<\\/script")
    picker = ""
    if graphs:
        picker = f"<script type=\"application/json\" id=\"circuits-graphs\">{_script_json(list(graphs))}</script>\n"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{css}</style>\n</head>\n<body>\n"
        "<div id=\"cv-root\">loading graph…</div>\n"
        f"{extra_html}\n"
        f"<script type=\"application/json\" id=\"circuits-graph\">{payload}</script>\n"
        f"{picker}"
        f"<script>\n{js}</script>\n</body>\n</html>\n"
    )


def write_page(graph: Graph | Mapping[str, Any], path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`render_page` output to ``path`` atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_page(graph, **kwargs), encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------
# Which graphs a server shows
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogEntry:
    """One graph file a server offers: ``name`` is its file name (the key in URLs)."""

    name: str
    path: Path
    slug: str = ""
    prompt: str = ""
    scan: str = ""

    def listing(self) -> dict[str, Any]:
        return {"href": "/graph/" + urllib.parse.quote(self.name), "name": self.name, "slug": self.slug,
                "prompt": self.prompt, "scan": self.scan}


class GraphCatalog:
    """The graphs of one file, or of every graph file directly inside a folder.

    A folder is listed afresh on each call (graphs written while serving appear); prompts come
    from its ``graph-metadata.json`` where it lists the file's slug. Only listed files are ever
    read, so a URL cannot reach any other path.
    """

    def __init__(self, target: str | Path, *, big_edges: int | None = None, limits: Any = None) -> None:
        from circuits.viewer.subgraph import BIG_GRAPH_EDGES, ViewLimits

        #: Graphs with more edges are served as a pruned view + neighbourhoods (circuits.viewer.subgraph).
        self.big_edges = BIG_GRAPH_EDGES if big_edges is None else int(big_edges)
        self.limits = limits or ViewLimits()
        self._views: dict[tuple[str, int, int], Any] = {}
        self._views_lock = threading.Lock()
        self.target = Path(target)
        if self.target.is_dir():
            self.folder: Path | None = self.target
        elif self.target.is_file():
            self.folder = None
            from circuits_core.graphio import graph_format

            graph_format(self.target)  # raises for names that are not graph files
        else:
            raise InvalidArgument(f"{target}: no such file or folder")

    def entries(self) -> list[CatalogEntry]:
        from circuits_core.graphio import is_graph_file

        if self.folder is None:
            return [self._entry(self.target, {})]
        from circuits_core.graph_index import read_graph_index

        try:
            index = {g["slug"]: g for g in read_graph_index(self.folder)}
        except CircuitsError:
            index = {}
        files = sorted(p for p in self.folder.iterdir() if p.is_file() and is_graph_file(p))
        return [self._entry(p, index) for p in files]

    @staticmethod
    def _entry(path: Path, index: Mapping[str, Mapping[str, Any]]) -> CatalogEntry:
        stem = re.sub(r"\.(json|pb)(\.gz)?$", "", path.name)
        meta = index.get(stem, {})
        return CatalogEntry(name=path.name, path=path, slug=str(meta.get("slug", stem)),
                            prompt=str(meta.get("prompt", "")), scan=str(meta.get("scan", "")))

    def find(self, name: str) -> CatalogEntry | None:
        """The entry with file name or slug ``name`` (None when there is none)."""
        for entry in self.entries():
            if name in (entry.name, entry.slug):
                return entry
        return None

    def big_view(self, entry: CatalogEntry) -> Any:
        """The entry's :class:`~circuits.viewer.subgraph.BigGraphView` when it has more than
        ``big_edges`` edges (read once per file version and kept), else None."""
        stat = entry.path.stat()
        if stat.st_size < 4 * self.big_edges:  # no format stores an edge in under 4 bytes
            return None
        key = (str(entry.path), stat.st_mtime_ns, stat.st_size)
        with self._views_lock:
            if key not in self._views:
                from circuits_core.graphio import read_graph

                from circuits.viewer.subgraph import BigGraphView

                graph = read_graph(entry.path)
                view = BigGraphView(graph, name=entry.name, limits=self.limits) if len(graph.edge_table) > self.big_edges else None
                self._views = {k: v for k, v in self._views.items() if k[0] != key[0]}
                self._views[key] = view
            return self._views[key]

    def legacy(self, entry: CatalogEntry) -> dict[str, Any]:
        """The entry's viewer JSON (a corrupt file raises CorruptInput naming it); for a big graph
        its pruned first view (metadata.subgraph says so and where neighbourhoods are fetched)."""
        from circuits_core.graphio import graph_format, read_viewer_json

        view = self.big_view(entry)
        if view is not None:
            return view.first_view()

        data = read_viewer_json(entry.path)  # JSON files as written, after the graph reader checked them
        return viewer_json(data) if graph_format(entry.path) == "json" else data

    def page(self, entry: CatalogEntry) -> str:
        listing = [e.listing() for e in self.entries()] if self.folder is not None else []
        return render_page(self.legacy(entry), graphs=listing)

    def index(self) -> dict[str, Any]:
        """circuit-tracer's ``graph-metadata.json`` for the served graphs."""
        from circuits_core.graph_index import index_entry, read_graph_index

        indexed: dict[str, dict[str, Any]] = {}
        if self.folder is not None:
            try:  # the folder's own index spares reading every graph file
                indexed = {g["slug"]: g for g in read_graph_index(self.folder)}
            except CircuitsError:
                indexed = {}
        graphs = []
        for entry in self.entries():
            known = indexed.get(entry.slug)
            if known is not None and entry.name == f"{entry.slug}.json":
                graphs.append(known)
                continue
            try:
                graphs.append({**index_entry(self.legacy(entry)), "slug": entry.slug})
            except CircuitsError:
                continue
        return {"graphs": graphs}


# ------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------
Response = tuple[int, str, bytes]


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET routes (first match wins); each returns (status, content type, body)."""

    catalog: GraphCatalog

    ROUTES: tuple[tuple[str, str], ...] = (
        (r"/(?:index\.html)?", "home"),
        (r"/graph/(?P<name>[^/]+)", "graph_page"),
        (r"/graph_data/(?P<name>[^/]+?)(?:\.json)?", "graph_data"),
        (r"/graph\.json", "first_graph_data"),
        (r"/data/graph-metadata\.json", "graph_index"),
        (r"/favicon\.ico", "favicon"),
        (r"/neighbourhood/(?P<name>[^/]+)", "neighbourhood"),
    )

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        for pattern, name in self.ROUTES:
            match = re.fullmatch(pattern, path)
            if match:
                try:
                    self._send(*getattr(self, name)(**match.groupdict()))
                except CircuitsError as exc:
                    self._send(422, "text/plain; charset=utf-8", f"error: {exc}\n".encode())
                return
        self._send(404, "text/plain; charset=utf-8", b"not found\n")

    # -- routes ----------------------------------------------------------------------------
    def home(self) -> Response:
        entries = self.catalog.entries()
        if not entries:
            body = "<!DOCTYPE html><meta charset=\"utf-8\"><title>circuits</title><p>No graph files in this folder yet.</p>"
            return 200, "text/html; charset=utf-8", body.encode()
        for entry in entries:  # the first graph that reads; broken ones stay in the picker
            try:
                return self._page(entry)
            except CircuitsError as exc:
                error = exc
        raise error

    def graph_page(self, name: str) -> Response:
        entry = self.catalog.find(name)
        return self._page(entry) if entry else self._not_found()

    def graph_data(self, name: str) -> Response:
        entry = self.catalog.find(name)
        if entry is None:
            return self._not_found()
        return 200, "application/json", graph_json_for_page(self.catalog.legacy(entry)).encode()

    def first_graph_data(self) -> Response:
        entries = self.catalog.entries()
        if not entries:
            return self._not_found()
        return 200, "application/json", graph_json_for_page(self.catalog.legacy(entries[0])).encode()

    def graph_index(self) -> Response:
        return 200, "application/json", json.dumps(self.catalog.index(), ensure_ascii=False).encode()

    def favicon(self) -> Response:
        return 204, "image/x-icon", b""

    def neighbourhood(self, name: str) -> Response:
        """``?node=<node_id>``: the node's strongest incident edges and their other ends (big graphs)."""
        entry = self.catalog.find(name)
        view = self.catalog.big_view(entry) if entry else None
        node = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("node", [""])[0]
        if view is None or not node:
            return self._not_found()
        return 200, "application/json", json.dumps(_finite(view.neighbourhood(node)), ensure_ascii=False).encode()

    # -- plumbing --------------------------------------------------------------------------
    def _page(self, entry: CatalogEntry) -> Response:
        return 200, "text/html; charset=utf-8", self.catalog.page(entry).encode("utf-8")

    @staticmethod
    def _not_found() -> Response:
        return 404, "text/plain; charset=utf-8", b"not found\n"

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        return


@dataclass(slots=True)
class ViewerServer:
    """A localhost HTTP server; ``url`` is known once constructed (port 0 = any)."""

    httpd: http.server.ThreadingHTTPServer
    url: str
    _thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> ViewerServer:
        """Serve from a daemon thread (returns at once)."""
        self._thread = threading.Thread(target=self.serve_forever, name="circuits-viewer", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ViewerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bind(handler: type[http.server.BaseHTTPRequestHandler], host: str, port: int) -> ViewerServer:
    try:
        httpd = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise InvalidArgument(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    httpd.daemon_threads = True
    bound_host, bound_port = httpd.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return ViewerServer(httpd=httpd, url=f"http://{shown}:{bound_port}/")


def serve_catalog(catalog: GraphCatalog, *, host: str = "127.0.0.1", port: int = 0) -> ViewerServer:
    """Bind a server for ``catalog`` on ``host:port`` (port 0 picks a free port); not started yet."""
    return _bind(type("CatalogHandler", (_Handler,), {"catalog": catalog}), host, port)


class _StaticPage(_Handler):
    page: bytes = b""
    graph_json: bytes = b""
    ROUTES = ((r"/(?:index\.html)?", "static_page"), (r"/graph\.json", "static_json"), (r"/favicon\.ico", "favicon"))

    def static_page(self) -> Response:
        return 200, "text/html; charset=utf-8", self.page

    def static_json(self) -> Response:
        return 200, "application/json", self.graph_json


def serve_page(page_html: str, *, host: str = "127.0.0.1", port: int = 0, graph_json: str = "") -> ViewerServer:
    """Bind a server for one ready page (and its ``/graph.json``); not started yet."""
    handler = type("PageHandler", (_StaticPage,), {"page": page_html.encode("utf-8"), "graph_json": graph_json.encode("utf-8")})
    return _bind(handler, host, port)

