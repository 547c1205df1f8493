"""`circuits serve attribution ...` / `python -m circuits_attribution ...`: the attribution server.

The port opens first with health NOT_SERVING, the model loads once, then health turns SERVING.
SIGTERM/SIGINT: NOT_SERVING, running traces get ``--grace`` seconds to finish, the rest stop.

`python -m circuits_attribution worker ...` runs the batch worker instead (see worker.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from circuits_core.config import SMALL_MODEL
from circuits_core.errors import CircuitsError, InvalidArgument, error_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuits serve attribution",
        description="Serve RelP attribution graphs over gRPC (Trace, TraceBatch, GetModelInfo).",
    )
    parser.add_argument("--model", default=SMALL_MODEL, help="hub id or local checkpoint directory (default: %(default)s)")
    parser.add_argument("--max-concurrent", type=int, default=1,
                        help="traces running at once; replicas share one copy of the weights (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=8,
                        help="requests waiting for an engine; more get RESOURCE_EXHAUSTED (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 (default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda | cuda:N | auto (cuda when a GPU is visible, else cpu; default: %(default)s)")
    from circuits_server.serving import add_server_arguments

    add_server_arguments(parser, default_port=50051)
    return parser


def serve(argv: Sequence[str]) -> int:
    from circuits_server.serving import server_settings_from_args, write_port_file

    from circuits_attribution.models import load_engine, resolve_device
    from circuits_attribution.server import AttributionSettings, build_server

    args = build_parser().parse_args(list(argv))
    if args.max_concurrent < 1:
        raise InvalidArgument(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.max_queue < 0:
        raise InvalidArgument(f"--max-queue must be >= 0, got {args.max_queue}")
    settings = AttributionSettings(
        server=server_settings_from_args(args),
        model=args.model,
        dtype=args.dtype,
        device=resolve_device(args.device),
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
    )
    server = build_server(settings).start()
    metrics = f", metrics on :{server.grpc.metrics.port}" if server.grpc.metrics.port else ""
    print(f"attribution server listening on {server.address}{metrics}; loading {args.model} ...", flush=True)
    write_port_file(server.grpc, args.port_file)
    try:
        engine = load_engine(args.model, dtype=args.dtype, device=settings.device)
        server.load(engine)
    except BaseException:
        server.stop(0)
        raise
    info = server.runner.model_info
    print(
        f"serving {info.model} ({info.architecture}, {info.num_layers} layers, {info.dtype} on {info.device}) "
        f"on {server.address}, max_concurrent={server.runner.max_concurrent}, max_queue={args.max_queue}",
        flush=True,
    )
    server.wait()
    print("attribution server stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if argv[:1] == ["worker"]:
            from circuits_attribution.worker import main as worker_main

            return worker_main(argv[1:])
        return serve(argv)
    except CircuitsError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
