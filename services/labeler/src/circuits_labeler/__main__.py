"""`circuits serve labeler --config label_config.yaml --port N` (also `python -m circuits_labeler`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from circuits_core.config import DEFAULT_PORTS
from circuits_core.errors import CircuitsError, error_line

if TYPE_CHECKING:
    from circuits_sdk.attribution import AttributionClient


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuits serve labeler", description="Run the LabelerService gRPC server.")
    parser.add_argument("--config", required=True, help="YAML config with a labeling section")
    from circuits_core.limits import add_limit_arguments
    from circuits_server.serving import add_server_arguments

    parser.add_argument("--attribution", default="", metavar="HOST:PORT",
                        help="attribution server the neuron scientist (Investigate RPC) runs the model on")
    parser.add_argument("--reports", default="investigations", help="folder of investigation reports (default: %(default)s)")
    from circuits_sdk.credentials import add_credential_arguments

    add_credential_arguments(parser, peer="attribution", what="the --attribution server")
    add_server_arguments(parser, default_port=DEFAULT_PORTS["labeler"])
    add_limit_arguments(parser, LIMITS)
    return parser


#: Limits the labeler server takes from its command line.
LIMITS = ("max_units_per_request", "max_results", "max_label_units_per_request", "max_labels_per_window",
          "label_window_s")  # fmt: skip


def attribution_client_from_args(args: argparse.Namespace) -> AttributionClient | None:
    """The SDK client of the ``--attribution`` server with the ``--attribution-tls-*`` /
    ``--attribution-token-file`` credentials, or None without ``--attribution``.

    InvalidArgument for credential flags without ``--attribution``, a certificate without its key
    (or the reverse) and an unreadable or empty token file. The channel connects on first use."""
    from circuits_core.errors import InvalidArgument
    from circuits_sdk.credentials import credentials_from_args

    credentials = credentials_from_args(args, peer="attribution")
    if not args.attribution:
        if not credentials.empty:
            raise InvalidArgument("--attribution-tls-* / --attribution-token-file need --attribution HOST:PORT")
        return None
    from circuits_sdk.attribution import AttributionClient

    return AttributionClient(args.attribution, **credentials.client_kwargs())


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
        engine = attribution_client_from_args(args)  # flag errors before the (slow) labeler set-up
        config = load_config(args.config)
        labeler = build_labeler(config)
        investigations = None
        if engine is not None:
            from circuits_labeler.scientist.service import Investigations

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
