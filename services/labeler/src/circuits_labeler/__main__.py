"""`circuits serve labeler --config label_config.yaml --port N` (also `python -m circuits_labeler`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from circuits.errors import CircuitsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuits serve labeler", description="Run the LabelerService gRPC server.")
    parser.add_argument("--config", required=True, help="YAML config with a labeling section")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a pod)")
    parser.add_argument("--port", type=int, default=50053, help="gRPC port (0 = pick a free one)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on shutdown")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from circuits.config import load_config
    from circuits.serving import ServerSettings

    from circuits_labeler.build import build_labeler
    from circuits_labeler.server import build_server
    from circuits_labeler.service import LabelerService

    try:
        config = load_config(args.config)
        service = LabelerService(build_labeler(config))
        server = build_server(
            ServerSettings(host=args.host, port=args.port, metrics_port=args.metrics_port, grace_seconds=args.grace),
            service=service,
        )
    except CircuitsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server.start()
    server.set_serving(True)
    print(f"labeler serving on {server.address}", flush=True)
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
