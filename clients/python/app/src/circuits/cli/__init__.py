"""The ``circuits`` command line.

Each subcommand lives in ``circuits.cli.<module>`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only to build the parser (they keep heavy imports
inside ``run``). Errors derived from :class:`circuits_core.errors.CircuitsError` print one line and exit
with code 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from circuits import __version__
from circuits.extras import missing_part_error
from circuits_core.errors import CircuitsError, error_line

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "graph": ("circuits.cli.graph", "trace a prompt into a RelP attribution graph"),
    "analyze": ("circuits.cli.analyze", "graph -> labels -> clusters -> analysis report"),
    "aggregate": ("circuits.cli.aggregate", "aggregate edge statistics over many graphs"),
    "exemplars": ("circuits.cli.exemplars", "top-activating and random contexts of every neuron over a corpus"),
    "label": ("circuits.cli.label", "two-pass progressive LLM labelling of neurons"),
    "cluster": ("circuits.cli.cluster", "Infomap clusters of an atlas or a graph"),
    "build-db": ("circuits.cli.build_db", "build the DuckDB atlas"),
    "query": ("circuits.cli.query", "search the atlas by label text"),
    "mcp": ("circuits.cli.mcp", "serve the atlas to AI agents over MCP (stdio or HTTP)"),
    "serve": ("circuits.cli.serve", "run a gRPC service (attribution, aggregator, labeler, atlas) or the HTTP gateway"),
    "launch": ("circuits.cli.launch", "launch a batch attribution run as a Kubernetes Indexed Job"),
    "validate": ("circuits.cli.validate", "faithfulness curves of a graph by ablation"),
    "intervene": ("circuits.cli.intervene", "set/scale/zero/mean-ablate neurons and show logits"),
    "investigate": ("circuits.cli.investigate", "an LLM agent investigates one neuron and writes an HTML report"),
    "patch": ("circuits.cli.patch", "activation patching between a clean and a corrupt prompt, vs RelP"),
    "diff": ("circuits.cli.diff", "compare two graphs: neurons and edges gained, lost and changed"),
    "connectivity": ("circuits.cli.connectivity", "weight-based projections and weight-graph edges of a model"),
    "view": ("circuits.cli.view", "open a graph in the interactive viewer"),
    "up": ("circuits.cli.up", "run all services locally, wired like the Helm chart"),
    "neurondb": ("circuits.cli.neurondb", "import/query neuron descriptions in PostgreSQL"),
}


def _not_implemented(name: str):
    def run(_args: argparse.Namespace) -> int:
        print(f"error: `circuits {name}` is not implemented yet", file=sys.stderr)
        return 2

    return run


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="circuits",
        description="RelP neuron attribution graphs, aggregation, labels, clusters and the atlas.",
    )
    parser.add_argument("--version", action="version", version=f"circuits {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            p.set_defaults(_run=_not_implemented(name))
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


class _LineTrackingStream:
    """stderr as the command sees it, remembering whether the last write ended a line.

    A progress bar leaves its line without a newline (``\r`` and blanks); the final ``error:``
    line must still start a line of its own, on a terminal and in a redirected log alike."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        if text:
            self.at_line_start = text.endswith("\n")
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _report(stream: _LineTrackingStream, line: str) -> None:
    """Print a final ``error:`` / ``interrupted`` line, on a line of its own."""
    print(("" if stream.at_line_start else "\n") + line, file=stream, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    stderr = sys.stderr = _LineTrackingStream(sys.stderr)
    try:
        return int(args._run(args) or 0)
    except CircuitsError as exc:
        _report(stderr, error_line(exc))
        return 2
    except ModuleNotFoundError as exc:
        missing = missing_part_error(exc, what=f"`circuits {args.command}`")
        if missing is None:
            raise
        _report(stderr, f"error: {missing}")
        return 2
    except KeyboardInterrupt:
        _report(stderr, "interrupted")
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if sys.stderr is stderr:
            sys.stderr = stderr._stream  # noqa: SLF001


if __name__ == "__main__":
    sys.exit(main())
