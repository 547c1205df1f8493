"""`circuits serve labeler --config label_config.yaml --port N` (also `python -m circuits_labeler`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from circuits_core.config import DEFAULT_PORTS
from circuits_core.errors import CircuitsError, error_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuits serve labeler", description="Run the LabelerService gRPC server.")
    parser.add_argument("--config", required=True, help="YAML config with a labeling section")
    from circuits_core.limits import add_limit_arguments
    from circuits_server.serving import add_server_arguments

    parser.add_argument("--attribution", default="", metavar="HOST:PORT",
                        help="attribution server the neuron scientist (Investigate RPC) runs the model on")
    parser.add_argument("--reports", default="investigations", help="folder of investigation reports (default: %(default)s)")
    add_server_arguments(parser, default_port=DEFAULT_PORTS["labeler"])
    add_limit_arguments(parser, LIMITS)
    return parser


#: Limits the labeler server takes from its command line.
LIMITS = ("max_units_per_request", "max_results", "max_label_units_per_request", "max_labels_per_window",
          "label_window_s")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from circuits_core.config import load_config
    from circuits_core.limits import limits_from_args
    from circuits_server.serving import server_settings_from_args, write_port_file

    from circuits_labeler.build import build_labeler
    from circuits_labeler.server import build_server
    from circuits_labeler.service import LabelerService

    try:
        settings = server_settings_from_args(args)
        limits = limits_from_args(args)
        config = load_config(args.config)
        labeler = build_labeler(config)
        investigations = None
        if args.attribution:
            from circuits_sdk.attribution import AttributionClient

            from circuits_labeler.scientist.service import Investigations

            engine = AttributionClient(args.attribution)
            investigations = Investigations(engine=engine, labeling=config.labeling, reports_dir=args.reports,
                                            model_name=args.attribution, exemplars=labeler.exemplars,
                                            base_dir=Path(config.base_dir))
        service = LabelerService(labeler, limits=limits, investigations=investigations)
        server = build_server(settings, service=service, limits=limits)
        server.start()
    except CircuitsError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    server.set_serving(True)
    print(f"labeler serving on {server.address}", flush=True)
    write_port_file(server, args.port_file)
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
