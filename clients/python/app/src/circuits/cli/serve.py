"""`circuits serve <service> ...`: run one gRPC service (or the Envoy gateway) in the foreground.

Each service package owns its flags (``circuits_<service>.__main__.main(argv)``; the gateway's are
``circuits_server.gateway.main``); this command only dispatches, so `circuits serve atlas --help`
shows the atlas server's own options.
"""

from __future__ import annotations

import argparse

from circuits_core.config import DEFAULT_PORTS

SERVICES = ("attribution", "aggregator", "labeler", "atlas", "gateway")
#: service -> module whose main(argv) runs it
MODULES = {name: f"circuits_{name}.__main__" for name in SERVICES} | {"gateway": "circuits_server.gateway"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ports = ", ".join(f"{name} :{DEFAULT_PORTS[name]}" for name in SERVICES)
    lead = f"{parser.description}. " if parser.description else ""
    parser.description = (f"{lead}Default ports: {ports} (--port PORT changes it; "
                          "`circuits serve SERVICE --help` lists the service's own flags).")
    parser.add_argument("service", choices=SERVICES, help=f"which service to run (default ports: {ports})")
    parser.add_argument("service_args", nargs=argparse.REMAINDER, help="the service's own flags")


def run(args: argparse.Namespace) -> int:
    from circuits.extras import require

    module = require(MODULES[args.service], what=f"`circuits serve {args.service}`")
    return int(module.main(list(args.service_args)) or 0)
