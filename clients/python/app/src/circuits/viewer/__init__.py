"""A self-contained HTML viewer for attribution graphs (no CDN, no JS dependencies).

``render_page(graph)`` returns one HTML document holding the viewer's CSS and JS
(``circuits/viewer/static/``) and the graph's legacy JSON (relp-spec §E). The page draws layers
(y) × token positions (x), sizes nodes by |attribution|, colours them by cluster (node field
``cluster`` or ``qParams.supernodes``), shows labels on hover, filters edges by |weight| with a
slider and highlights a clicked node's neighbours. ``serve_page`` serves it on localhost.
"""

from __future__ import annotations

import html
import http.server
import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from circuits_core.errors import InvalidArgument
from circuits_core.schemas import Graph

__all__ = ["ViewerServer", "graph_json_for_page", "render_page", "serve_page", "write_page"]


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


def graph_json_for_page(graph: Graph | Mapping[str, Any]) -> str:
    """The graph's legacy JSON as text that is safe inside ``<script type="application/json">``."""
    data = graph.to_legacy() if isinstance(graph, Graph) else graph
    if not isinstance(data, Mapping) or "nodes" not in data:
        raise InvalidArgument("viewer: expected a Graph or a legacy graph dict with 'nodes'")
    text = json.dumps(_finite(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # "<" only occurs inside JSON strings, where \u003c means the same; escaping every one
    # means "</script" or "<!--" in a label can never end or confuse the script element.
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render_page(graph: Graph | Mapping[str, Any], *, title: str | None = None, extra_html: str = "") -> str:
    """One self-contained HTML page showing ``graph``; ``extra_html`` is placed below the viewer.

    The page loads nothing from the network: CSS, JS and the graph are inline.
    """
    payload = graph_json_for_page(graph)
    if title is None:
        prompt = graph.prompt if isinstance(graph, Graph) else str((graph.get("metadata") or {}).get("prompt", ""))
        title = f"circuits · {prompt}" if prompt else "circuits graph"
    css = _static("viewer.css")
    js = _static("viewer.js").replace("</script", "<\\/script")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{css}</style>\n</head>\n<body>\n"
        "<div id=\"cv-root\">loading graph…</div>\n"
        f"{extra_html}\n"
        f"<script type=\"application/json\" id=\"circuits-graph\">{payload}</script>\n"
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


class _PageHandler(http.server.BaseHTTPRequestHandler):
    page: bytes = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.page)
        elif path == "/graph.json":
            self._send(200, "application/json", self.server.graph_json)  # type: ignore[attr-defined]
        elif path == "/favicon.ico":
            self._send(204, "image/x-icon", b"")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

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
    """A localhost HTTP server for one page; ``url`` is known once constructed (port 0 = any)."""

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


def serve_page(page_html: str, *, host: str = "127.0.0.1", port: int = 0, graph_json: str = "") -> ViewerServer:
    """Bind a server for ``page_html`` on ``host:port`` (port 0 picks a free port); not started yet."""
    handler = type("PageHandler", (_PageHandler,), {"page": page_html.encode("utf-8")})
    try:
        httpd = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise InvalidArgument(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    httpd.daemon_threads = True
    httpd.graph_json = graph_json.encode("utf-8")  # type: ignore[attr-defined]
    bound_host, bound_port = httpd.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return ViewerServer(httpd=httpd, url=f"http://{shown}:{bound_port}/")
