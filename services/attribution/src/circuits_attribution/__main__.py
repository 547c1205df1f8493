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
from typing import Any

from circuits_core.config import DEFAULT_PORTS, SMALL_MODEL
from circuits_core.errors import CircuitsError, InvalidArgument, error_line
from circuits_core.limits import DEFAULT_LIMITS


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
    parser.add_argument("--max-batch", type=int, default=1,
                        help="trace requests an engine traces together as one left-padded batch; each graph equals "
                             "the request's single trace up to float rounding (default: %(default)s)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="milliseconds a batch waits for more requests after its first one (default: %(default)s)")
    parser.add_argument("--max-k", type=int, default=DEFAULT_LIMITS.max_k,
                        help="most top logits (k) one trace request may ask for; INVALID_ARGUMENT beyond, 0 = the "
                             "model's vocabulary (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 (default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda | cuda:N | auto (cuda when a GPU is visible, else cpu; default: %(default)s)")
    from circuits_core.fieldargs import add_field_arguments
    from circuits_core.memory import EnginePlacement

    add_field_arguments(parser, EnginePlacement)
    from circuits_server.serving import add_server_arguments

    add_server_arguments(parser, default_port=DEFAULT_PORTS["attribution"])
    return parser


def _placement(args: Any) -> Any:
    from circuits_core.fieldargs import field_values
    from circuits_core.memory import EnginePlacement

    return EnginePlacement(**field_values(args, EnginePlacement))


def serve(argv: Sequence[str]) -> int:
    from circuits_server.serving import server_settings_from_args, write_port_file

    from circuits_attribution.models import load_engine, resolve_device
    from circuits_attribution.server import AttributionSettings, build_server

    args = build_parser().parse_args(list(argv))
    _placement(args)  # bad --memory-budget / --device-map values fail before the server starts
    if args.max_concurrent < 1:
        raise InvalidArgument(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.max_queue < 0:
        raise InvalidArgument(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_batch < 1:
        raise InvalidArgument(f"--max-batch must be >= 1, got {args.max_batch}")
    if not args.batch_window_ms >= 0:
        raise InvalidArgument(f"--batch-window-ms must be >= 0, got {args.batch_window_ms}")
    if args.max_k < 0:
        raise InvalidArgument(f"--max-k must be >= 0, got {args.max_k}")
    settings = AttributionSettings(
        server=server_settings_from_args(args),
        model=args.model,
        dtype=args.dtype,
        device=resolve_device(args.device),
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        max_k=args.max_k,
    )
    server = build_server(settings).start()
    metrics = f", metrics on :{server.grpc.metrics.port}" if server.grpc.metrics.port else ""
    print(f"attribution server listening on {server.address}{metrics}; loading {args.model} ...", flush=True)
    write_port_file(server.grpc, args.port_file)
    try:
        engine = load_engine(args.model, dtype=args.dtype, device=settings.device, **_placement(args).engine_options())
        server.load(engine)
    except BaseException:
        server.stop(0)
        raise
    info = server.runner.model_info
    print(
        f"serving {info.model} ({info.architecture}, {info.num_layers} layers, {info.dtype} on {info.device}) "
        f"on {server.address}, max_concurrent={server.runner.max_concurrent}, max_queue={args.max_queue}, max_batch={args.max_batch}",
        flush=True,
    )
    server.wait()
    print("attribution server stopped", flush=True)
    _exit_at_once(0)
    return 0


def _exit_at_once(code: int) -> None:
    """End the process now that the server stopped (in-flight traces ended, everything closed).

    The interpreter's own teardown of torch/transformers/grpc takes seconds (3.5-5 s measured on a
    loaded 2-core machine, with no trace ever run), which would push a pod past its termination
    grace period; nothing is left to flush but the standard streams and log handlers.
    """
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


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
