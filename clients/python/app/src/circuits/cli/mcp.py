"""`circuits mcp`: the atlas as an MCP server for AI agents (stdio or streamable HTTP).

    circuits mcp --atlas atlas.duckdb                          # stdio (an agent starts it)
    circuits mcp --remote localhost:50054 --attribution localhost:50051
    circuits mcp --atlas atlas.duckdb --transport http --port 8765   # http://127.0.0.1:8765/mcp

Tools: search_units, unit_card, unit_neighbours, cluster_members, atlas_stats, and trace_prompt
when an attribution server is given. Answers are compact JSON (:mod:`circuits.atlas_tools`); bad
arguments come back as tool errors, never as a crash of the server.
"""

# No `from __future__ import annotations`: the MCP SDK reads the tools' parameter annotations
# (Annotated[..., Field(...)] built inside build_server) from the live signature.
import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Annotated, Any

from circuits.cli._remote import add_auth_arguments, remote_from_args
from circuits_core.errors import CircuitsError, InvalidArgument

INSTRUCTIONS = (
    "Query an atlas of MLP neurons of a language model (RelP attribution graphs aggregated over many "
    "prompts, neurons labelled by an LLM, clustered with Infomap). Units are written L{layer}/N{neuron}. "
    "Start with search_units to find neurons by what their labels say, then unit_card and "
    "unit_neighbours to see what feeds a neuron and what it feeds, and cluster_members for its circuit."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--atlas", metavar="FILE", help="atlas DuckDB file opened read-only in this process")
    source.add_argument("--remote", metavar="HOST:PORT", help="an atlas server (circuits serve atlas)")
    add_auth_arguments(parser)
    parser.add_argument("--attribution", metavar="HOST:PORT", default="",
                        help="an attribution server: enables the trace_prompt tool")
    parser.add_argument("--transport", choices=("stdio", "http"), default="stdio",
                        help="stdio (default; the agent starts this command) or streamable HTTP")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (default %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="HTTP port (default %(default)s)")
    parser.add_argument("--path", default="/mcp", help="HTTP endpoint path (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per atlas query (default %(default)s)")


@contextlib.contextmanager
def open_atlas(args: argparse.Namespace) -> "Iterator[Any]":
    """The atlas the flags name: CircuitDatabase (in process) or AtlasClient (remote)."""
    from circuits import backends

    remote = remote_from_args(args)
    with contextlib.closing(backends.open_atlas(remote=remote, path=args.atlas or "", what="`circuits mcp --atlas`")) as atlas:
        if remote is not None:
            atlas.stats(timeout=args.timeout)  # fail now, with one line, when it is unreachable
        yield atlas


def build_server(tools: Any) -> Any:
    """An MCPServer whose tools call ``tools`` (an AtlasTools); domain errors become tool errors."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import CallToolResult, TextContent, ToolAnnotations
    from pydantic import Field

    from circuits import __version__
    from circuits.atlas_tools import MAX_MEMBERS, MAX_NEIGHBOURS, MAX_SEARCH, MAX_TRACE_NEURONS

    server = MCPServer(name="circuits-atlas", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")
    read_only = ToolAnnotations(readOnlyHint=True, idempotentHint=True, openWorldHint=False)

    # The answer as structured content, and as compact JSON text for models that read text.
    Answer = Annotated[CallToolResult, dict[str, Any]]

    def call(method: Any, *args: Any) -> CallToolResult:
        try:
            answer = method(*args)
        except CircuitsError as exc:
            raise ToolError(str(exc)) from None
        text = json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=answer)

    Layer = Annotated[int, Field(ge=0, description="decoder layer of the neuron (0 = first)")]
    Neuron = Annotated[int, Field(ge=0, description="neuron index within the layer's MLP")]

    def search_units(
        text: Annotated[str, Field(min_length=1, max_length=1000, description="words to look for in neuron labels")],
        limit: Annotated[int, Field(ge=1, le=MAX_SEARCH, description="most results")] = 10,
    ) -> Answer:
        """Find neurons whose labels match the text (BM25 over label words, then substring), best first, with relevance scores."""
        return call(tools.search_units, text, limit)

    def unit_card(layer: Layer, neuron: Neuron) -> Answer:
        """One neuron's card: its labels (what it does / what triggers it), activation statistics over the traced prompts, its cluster and its number of edges."""
        return call(tools.unit_card, layer, neuron)

    def unit_neighbours(
        layer: Layer,
        neuron: Neuron,
        direction: Annotated[str, Field(pattern="^(both|downstream|upstream)$", description="downstream = neurons it feeds, upstream = neurons feeding it")] = "both",
        limit: Annotated[int, Field(ge=1, le=MAX_NEIGHBOURS, description="most neighbours per direction")] = 10,
        min_count: Annotated[int, Field(ge=0, description="only edges seen in at least this many graphs")] = 0,
    ) -> Answer:
        """A neuron's strongest neighbours in the aggregated attribution graphs (most frequent edges first), with their labels and mean edge weights."""
        return call(tools.unit_neighbours, layer, neuron, direction, limit, min_count)

    def cluster_members(
        cluster: Annotated[str, Field(min_length=1, max_length=100, description='cluster id ("3") or hierarchy path ("3.1")')],
        limit: Annotated[int, Field(ge=1, le=MAX_MEMBERS, description="most member neurons")] = 25,
    ) -> Answer:
        """An Infomap cluster of the atlas: its size and layer span, and its member neurons with labels."""
        return call(tools.cluster_members, cluster, limit)

    def atlas_stats() -> Answer:
        """How big the atlas is (neurons, edges, clusters) and how it was built (model, thresholds)."""
        return call(tools.atlas_stats)

    for fn in (search_units, unit_card, unit_neighbours, cluster_members, atlas_stats):
        server.add_tool(fn, annotations=read_only)

    if tools.attribution is not None:

        def trace_prompt(
            prompt: Annotated[str, Field(min_length=1, max_length=4000, description="the prompt to trace")],
            top: Annotated[int, Field(ge=1, le=MAX_TRACE_NEURONS, description="neurons in the summary")] = 15,
            k: Annotated[int, Field(ge=0, le=50, description="top logits the graph explains (0 = the default, 5)")] = 0,
        ) -> Answer:
            """Trace a prompt into a RelP attribution graph on the model and summarise it: the predicted tokens and the neurons with the largest attribution, labelled from the atlas."""
            return call(tools.trace_prompt, prompt, top, k)

        server.add_tool(trace_prompt, annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    return server


def run(args: argparse.Namespace) -> int:
    if args.transport == "http" and not 0 < args.port < 65536:
        raise InvalidArgument(f"--port must be 1..65535, got {args.port}")
    if args.timeout <= 0:
        raise InvalidArgument(f"--timeout must be positive, got {args.timeout}")
    from circuits.extras import require

    require("mcp.server.mcpserver", what="`circuits mcp`")
    from circuits.atlas_tools import AtlasTools

    # stdout is the protocol channel under stdio: logs go to stderr only.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with contextlib.ExitStack() as stack:
        atlas = stack.enter_context(open_atlas(args))
        attribution = None
        if args.attribution:
            from circuits import backends

            remote = remote_from_args(args, address=args.attribution)
            attribution = stack.enter_context(contextlib.closing(backends.open_tracer(remote=remote)))
        server = build_server(AtlasTools(atlas, attribution=attribution, timeout=args.timeout))
        if args.transport == "stdio":
            server.run("stdio")
        else:
            print(f"MCP server on http://{args.host}:{args.port}{args.path}", file=sys.stderr, flush=True)
            server.run("streamable-http", host=args.host, port=args.port, streamable_http_path=args.path)
    return 0
