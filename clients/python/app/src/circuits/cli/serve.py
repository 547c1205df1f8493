"""`circuits serve <service> ...`: run one gRPC service in the foreground.

Each service package owns its flags (``circuits_<service>.__main__.main(argv)``); this command
only dispatches, so `circuits serve atlas --help` shows the atlas server's own options.
"""

from __future__ import annotations

import argparse

SERVICES = ("attribution", "aggregator", "labeler", "atlas")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("service", choices=SERVICES, help="which service to run")
    parser.add_argument("service_args", nargs=argparse.REMAINDER, help="the service's own flags")


def run(args: argparse.Namespace) -> int:
    from circuits.extras import require

    module = require(f"circuits_{args.service}.__main__", what=f"`circuits serve {args.service}`")
    return int(module.main(list(args.service_args)) or 0)
