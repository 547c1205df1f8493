"""`circuits view GRAPH|DIR`: open graphs in the self-contained interactive viewer.

Serves one graph file, or every graph file of a folder with a picker, on localhost (``--port 0``
picks a free port and the URL is printed) until Ctrl-C; or writes one graph's page to
``--output page.html`` and exits. A served folder also answers circuit-tracer's
``/data/graph-metadata.json`` and ``/graph_data/<slug>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", help="graph file (.json, .json.gz, .pb, .pb.gz) or a folder of them")
    parser.add_argument("--output", "-o", default="", help="write the HTML page of one graph FILE here and exit instead of serving")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (0 = any free port; default 0)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a web browser")


def run(args: argparse.Namespace) -> int:
    from circuits_core.errors import InvalidArgument

    from circuits.viewer import GraphCatalog, serve_catalog, write_page

    if not (0 <= args.port <= 65535):
        raise InvalidArgument(f"--port must be in 0..65535, got {args.port}")
    catalog = GraphCatalog(args.graph)
    if args.output:
        if catalog.folder is not None:
            raise InvalidArgument(f"--output writes one graph's page: give a graph file, not the folder {args.graph}")
        path = write_page(catalog.legacy(catalog.entries()[0]), args.output)
        print(path)
        return 0
    if catalog.folder is None:
        catalog.legacy(catalog.entries()[0])  # a broken file fails here, with one line, not in the browser
    elif not catalog.entries():
        print(f"{args.graph}: no graph files yet; the page lists them as they appear", file=sys.stderr)

    server = serve_catalog(catalog, host=args.host, port=args.port)
    what = f"{len(catalog.entries())} graphs in {Path(args.graph)}" if catalog.folder is not None else args.graph
    print(f"serving {what} at {server.url}  (Ctrl-C to stop)", flush=True)
    if not args.no_browser:
        import webbrowser

        try:
            webbrowser.open(server.url)
        except Exception as exc:  # noqa: BLE001 - a missing browser is not an error
            print(f"could not open a browser ({exc}); open the URL yourself", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0
