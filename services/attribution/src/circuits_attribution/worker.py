"""Batch attribution worker: one shard of a prompts file -> compressed graph files / aggregator.

    python -m circuits_attribution.worker --prompts prompts.jsonl --shard-index 3 --shard-count 16 \\
        --output-dir graphs/ [--aggregator aggregator:50052] --model HuggingFaceTB/SmolLM2-135M-Instruct

Prompts file: JSON lines ``{"prompt": ..., "id": ...?, "target_tokens": [...]?}`` (any
:class:`~circuits_core.tracing.TraceRequest` field; read by :func:`circuits_core.tracing.parse_prompt_line`).
Settings a line does not give come from the trace flags (``--k``, ``--tau``, ... generated from
TraceSettings). Line ``n`` (1-based) belongs to shard ``(n - 1) % shard_count`` and is traced with
``corpus_index = n - 1`` unless it sets one; the shard index defaults to ``$JOB_COMPLETION_INDEX``
(Kubernetes Indexed Jobs). A bad line is reported as ``FILE:LINE: reason`` and skipped.

Each graph is written atomically as ``<output-dir>/<graph_id>.pb.gz`` and/or streamed to the
aggregator; only then is its line recorded in the shard's ledger
(``<output-dir>/_progress/shard-<i>-of-<n>.jsonl``). A restarted worker skips recorded lines, so
a SIGKILL loses nothing and repeats at most the one prompt that was being finished (which
rewrites the same file under the same content id, and the aggregator counts a graph id once).
A TLS or token-checking aggregator takes ``--aggregator-tls-ca/-tls-cert/-tls-key`` and
``--aggregator-token-file`` (a token with the ``write`` scope).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from circuits_core.config import SMALL_MODEL, env_setting
from circuits_core.errors import CircuitsError, InvalidArgument, error_line
from circuits_core.fieldargs import add_field_arguments, field_values
from circuits_core.memory import EnginePlacement
from circuits_core.schemas import Graph
from circuits_core.tracing import PromptLine, TraceSettings, parse_prompt_line

if TYPE_CHECKING:
    from circuits_core.capabilities import Tracer
    from circuits_core.tracing import TraceRequest
    from circuits_sdk.credentials import ClientCredentials


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """One shard of a batch run. Field comments are the CLI help."""

    #: JSONL prompts file.
    prompts: Path
    #: This worker's shard (0-based).
    shard_index: int = 0
    #: Number of shards the prompts are split into.
    shard_count: int = 1
    #: Directory for <graph_id>.pb.gz files and the progress ledger.
    output_dir: Path = Path("graphs")
    #: Write graph files (off: aggregator only; the ledger still lives in output_dir).
    write_files: bool = True
    #: Show a progress bar.
    progress: bool = True
    #: Trace settings for lines that don't set them.
    trace_defaults: TraceSettings = TraceSettings()
    #: Prompts traced together as one left-padded batch (engines with ``trace_many``; each graph
    #: equals the prompt's single trace up to float rounding). 1 traces one prompt at a time.
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidArgument(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.shard_count < 1:
            raise InvalidArgument(f"--shard-count must be >= 1, got {self.shard_count}")
        if not 0 <= self.shard_index < self.shard_count:
            raise InvalidArgument(f"--shard-index must be in [0, {self.shard_count}), got {self.shard_index}")


@dataclass(slots=True)
class WorkerReport:
    traced: int = 0
    already_done: int = 0
    bad_lines: int = 0
    failed: int = 0
    graph_ids: list[str] = dataclasses.field(default_factory=list)

    def summary(self, settings: WorkerSettings) -> str:
        return (
            f"shard {settings.shard_index}/{settings.shard_count}: traced {self.traced}, "
            f"already done {self.already_done}, bad lines {self.bad_lines}, failed {self.failed}"
        )


class GraphSink(Protocol):
    """Somewhere graphs go besides files; ``send`` returns once the graph is durably accepted."""

    def send(self, graph: Graph) -> None: ...

    def close(self) -> None: ...


# -- prompts -------------------------------------------------------------------------------------
def read_prompt_line(text: str, *, line: int, source: str, defaults: TraceSettings = TraceSettings()) -> PromptLine:
    """One line of the shard: its request (``corpus_index = line - 1`` unless set); InvalidArgument('FILE:LINE: reason')."""
    return parse_prompt_line(text, where=f"{source}:{line}", defaults=defaults, corpus_index=line - 1)


def shard_lines(path: Path, settings: WorkerSettings) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of this shard's non-blank lines."""
    try:
        # surrogateescape: one line of invalid UTF-8 is refused alone (parse_prompt_line), not the file
        handle = open(path, encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: prompts file not found") from None
    with handle:
        for number, text in enumerate(handle, start=1):
            if (number - 1) % settings.shard_count != settings.shard_index or not text.strip():
                continue
            yield number, text


# -- ledger --------------------------------------------------------------------------------------
class Ledger:
    """Append-only record of finished lines of one shard (survives kills: torn lines are ignored)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[int, dict[str, Any]] = {}
        if path.exists():
            for text in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(text)
                    self.done[int(record["line"])] = record
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill mid-write
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8")
        size = path.stat().st_size
        if size and not path.read_bytes()[-1:] == b"\n":
            self._handle.write("\n")  # end a torn last line so the next record parses

    def record(self, line: int, **fields: Any) -> None:
        entry = {"line": line, **fields}
        self._handle.write(json.dumps(entry, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done[line] = entry

    def close(self) -> None:
        self._handle.close()


def ledger_path(settings: WorkerSettings) -> Path:
    return settings.output_dir / "_progress" / f"shard-{settings.shard_index}-of-{settings.shard_count}.jsonl"


def graph_path(output_dir: Path, graph_id: str) -> Path:
    return output_dir / f"{graph_id}.pb.gz"


# -- the run -------------------------------------------------------------------------------------
def run_worker(
    settings: WorkerSettings,
    engine: Tracer,
    *,
    sink: GraphSink | None = None,
    log: Any = None,
) -> WorkerReport:
    """Trace this shard's prompts that are not yet in the ledger; return counts.

    ``engine`` traces the requests (a RelPAttributor, or the client of a server that has one);
    ``sink`` receives each graph after its file is written and before the line is recorded as done.
    """
    from circuits_core.graphio import write_graph

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if not settings.write_files and sink is None:
        raise InvalidArgument("nothing to do with the graphs: give --output-dir files or --aggregator")
    report = WorkerReport()
    ledger = Ledger(ledger_path(settings))
    lines = list(shard_lines(settings.prompts, settings))
    bar = None
    if settings.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lines), desc=f"shard {settings.shard_index}", unit="prompt", file=sys.stderr)
    pending: list[tuple[int, PromptLine]] = []

    def flush() -> None:
        outcomes = _trace_lines(engine, [item.request for _, item in pending])
        for (number, item), outcome in zip(pending, outcomes):
            if isinstance(outcome, InvalidArgument):
                # Deterministic for this line (e.g. a multi-token target): record it, don't retry.
                log(f"{settings.prompts}:{number}: {outcome}; skipped")
                ledger.record(number, error=str(outcome))
                report.failed += 1
                continue
            graph = outcome
            if item.prompt_id is not None:
                extra = {**graph.metadata.extra, "prompt_id": item.prompt_id}
                graph = dataclasses.replace(graph, metadata=dataclasses.replace(graph.metadata, extra=extra))
            if settings.write_files:
                write_graph(graph, graph_path(settings.output_dir, graph.graph_id))
            if sink is not None:
                sink.send(graph)
            ledger.record(number, graph_id=graph.graph_id, **({"id": item.prompt_id} if item.prompt_id is not None else {}))
            report.traced += 1
            report.graph_ids.append(graph.graph_id)
        pending.clear()

    try:
        for number, text in lines:
            if bar is not None:
                bar.update(1)
            previous = ledger.done.get(number)
            if previous is not None and (
                "graph_id" not in previous
                or not settings.write_files
                or graph_path(settings.output_dir, previous["graph_id"]).exists()
            ):
                report.already_done += 1
                continue
            try:
                item = read_prompt_line(text, line=number, source=str(settings.prompts), defaults=settings.trace_defaults)
            except InvalidArgument as exc:
                log(f"{exc}; skipped")
                report.bad_lines += 1
                continue
            pending.append((number, item))
            if len(pending) >= settings.batch_size:
                flush()
        if pending:
            flush()
    finally:
        if bar is not None:
            bar.close()
        ledger.close()
    return report


def _trace_lines(engine: Tracer, requests: list[TraceRequest]) -> list[Graph | InvalidArgument]:
    """Each request's graph or its InvalidArgument: one ``trace_many`` batch when the engine has it
    (RelPAttributor), else one trace at a time."""
    trace_many = getattr(engine, "trace_many", None)
    if trace_many is not None and len(requests) > 1:
        return list(trace_many(requests))
    outcomes: list[Graph | InvalidArgument] = []
    for request in requests:
        try:
            outcomes.append(engine.trace(request))
        except InvalidArgument as exc:
            outcomes.append(exc)
    return outcomes


class AggregatorSink:
    """Sends each graph to the aggregator shard that owns it; ``send`` returns once that shard
    acknowledged it as committed.

    ``target``: ``host:port`` of the only aggregator, or the comma-separated addresses of every
    shard in shard order (``<release>-aggregator-<i>.<release>-aggregator-headless...``, what the
    chart passes): graph ``g`` goes to shard ``shard_of(g.graph_id, N)``, N = number of addresses.
    Each shard's AggregatorClient keeps an unacknowledged graph and re-sends it across
    reconnects (a restarted shard counts a graph id once), so every graph lands exactly once in
    exactly one shard. ``credentials``: the TLS files and bearer token every shard's client
    presents (the worker's ``--aggregator-tls-*`` / ``--aggregator-token-file``).
    """

    def __init__(self, target: str, *, credentials: ClientCredentials | None = None) -> None:
        self.targets = [t.strip() for t in target.split(",") if t.strip()]
        if not self.targets:
            raise InvalidArgument("--aggregator: give host:port, or the comma-separated addresses of every shard")
        if len(set(self.targets)) != len(self.targets):
            raise InvalidArgument(f"--aggregator: a shard address is listed twice ({target})")
        self.target = target
        self.credentials = credentials
        self._clients: dict[int, Any] = {}

    def shard_for(self, graph_id: str) -> int:
        from circuits_core.aggregator_types import shard_of

        return shard_of(graph_id, len(self.targets))

    def _client(self, shard: int) -> Any:
        client = self._clients.get(shard)
        if client is None:
            from circuits_sdk.aggregator import AggregatorClient

            kwargs = self.credentials.client_kwargs() if self.credentials is not None else {}
            client = self._clients[shard] = AggregatorClient(self.targets[shard], **kwargs)
        return client

    def send(self, graph: Graph) -> None:
        from circuits_core.errors import FailedPrecondition

        shard = self.shard_for(graph.graph_id)
        report = self._client(shard).ingest([graph])
        if graph.graph_id in report.rejected_graph_ids:
            raise FailedPrecondition(
                f"aggregator {self.targets[shard]} (shard {shard} of {len(self.targets)}) does not own graph "
                f"{graph.graph_id}: its --shard-index/--shard-count differ from the address order"
            )

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


# -- command line ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m circuits_attribution.worker",
        description="Trace one shard of a JSONL prompts file into graph files and/or an aggregator (resumable).",
    )
    parser.add_argument("--prompts", required=True, type=Path, help="JSONL prompts file")
    parser.add_argument("--shard-index", type=int, default=None,
                        help="this shard (0-based; default: $JOB_COMPLETION_INDEX, else 0)")
    parser.add_argument("--shard-count", type=int, default=1, help="number of shards (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=Path("graphs"),
                        help="graph files and progress ledger (default: %(default)s)")
    parser.add_argument("--no-files", action="store_true", help="don't write graph files (aggregator only)")
    parser.add_argument("--aggregator", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                        help="stream graphs to this aggregator, or to shard_of(graph_id) of the comma-separated "
                             "shard addresses (in shard order)")
    from circuits_sdk.credentials import add_credential_arguments

    add_credential_arguments(parser, peer="aggregator", what="the --aggregator shards")
    parser.add_argument("--model", default=SMALL_MODEL, help="hub id or local checkpoint directory (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    add_field_arguments(parser, EnginePlacement)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="prompts traced together in one left-padded batch (default: %(default)s)")
    add_field_arguments(
        parser.add_argument_group("trace settings (for prompt lines that don't set them)"), TraceSettings
    )
    return parser


def _shard_index(value: int | None) -> int:
    if value is not None:
        return value
    raw = env_setting("JOB_COMPLETION_INDEX", "0") or "0"
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(f"JOB_COMPLETION_INDEX must be an integer, got {raw!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        settings = WorkerSettings(
            prompts=args.prompts,
            shard_index=_shard_index(args.shard_index),
            shard_count=args.shard_count,
            output_dir=args.output_dir,
            write_files=not args.no_files,
            progress=not args.no_progress,
            trace_defaults=TraceSettings(**field_values(args, TraceSettings)),
            batch_size=args.batch_size,
        )
        if not settings.prompts.is_file():
            raise InvalidArgument(f"{settings.prompts}: prompts file not found")
        from circuits_sdk.credentials import credentials_from_args

        credentials = credentials_from_args(args, peer="aggregator")
        if not args.aggregator and not credentials.empty:
            raise InvalidArgument("--aggregator-tls-* / --aggregator-token-file need --aggregator")
        from circuits_attribution.models import load_engine

        placement = EnginePlacement(**field_values(args, EnginePlacement))
        engine = load_engine(args.model, dtype=args.dtype, device=args.device, **placement.engine_options())
        sink = AggregatorSink(args.aggregator, credentials=credentials) if args.aggregator else None
        try:
            report = run_worker(settings, engine, sink=sink)
        finally:
            if sink is not None:
                sink.close()
    except CircuitsError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    print(report.summary(settings), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
