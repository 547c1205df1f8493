"""`circuits view GRAPH`: open a graph in the self-contained interactive viewer.

Serves the page on localhost (``--port 0`` picks a free port and the URL is printed) until
Ctrl-C, or writes it to ``--output page.html`` and exits.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", help="graph file (.json, .json.gz, .pb, .pb.gz)")
    parser.add_argument("--output", "-o", default="", help="write the HTML page here and exit instead of serving")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (0 = any free port; default 0)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a web browser")


def run(args: argparse.Namespace) -> int:
    from circuits_core.errors import InvalidArgument
    from circuits_core.graphio import read_viewer_json
    from circuits.viewer import graph_json_for_page, render_page, serve_page, write_page

    if not (0 <= args.port <= 65535):
        raise InvalidArgument(f"--port must be in 0..65535, got {args.port}")
    # JSON graphs are shown as written (extra fields, supernodes), after the graph reader checked them.
    data = read_viewer_json(args.graph)

    if args.output:
        path = write_page(data, args.output)
        print(path)
        return 0

    server = serve_page(render_page(data), host=args.host, port=args.port, graph_json=graph_json_for_page(data))
    print(f"serving {args.graph} at {server.url}  (Ctrl-C to stop)", flush=True)
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
