"""`circuits investigate L/N`: an LLM agent investigates one neuron and writes a report.

The agent (the neuron scientist, :mod:`circuits_labeler.scientist`) starts from what is known
(atlas label and cluster, neighbours, projections, exemplars: each tool says when its source is
missing), forms hypotheses, pre-registers predictions and tests them by running the model (per-token
activations, ablation / steering with generation, patching between prompts, RelP attribution),
then ends with a label whose confidence is capped by the prediction score.

Writes ``OUTPUT/L{l}_N{n}/transcript.json`` after every step and ``report.html`` at the end (also
when the run stops at a bound: the report says why). ``--resume`` continues a stopped run from its
transcript. The LLM backend and its key come from ``--config``'s ``labeling`` section (as
``circuits label``), overridden by ``--backend/--llm-model/--base-url/--api-key-env/--api-key-file``.
The model runs in process (``--model``) or on an attribution server (``--remote``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from circuits.cli._remote import add_remote_arguments, remote_from_args
from circuits_core.config import SMALL_MODEL
from circuits_core.errors import InvalidArgument

_UNIT = re.compile(r"^\s*L?(\d+)\s*[/:]\s*N?(\d+)\s*$", re.IGNORECASE)


def parse_unit(text: str) -> tuple[int, int]:
    match = _UNIT.match(text or "")
    if not match:
        raise InvalidArgument(f"bad neuron {text!r}: expected LAYER/NEURON, e.g. 3/17 or L3/N17")
    return int(match[1]), int(match[2])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("unit", metavar="L/N", help="the neuron, e.g. 12/345 or L12/N345")
    parser.add_argument("--model", default=SMALL_MODEL, help="hub id or local checkpoint directory (default: %(default)s)")
    parser.add_argument("--atlas", default="", help="atlas DuckDB file (label, score, cluster, neighbours)")
    parser.add_argument("--exemplars", default="", help="exemplar file of `circuits exemplars` (top contexts)")
    parser.add_argument("--output", default="reports", help="output folder (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=30, help="LLM turns at most (default: %(default)s)")
    parser.add_argument("--budget-usd", type=float, default=None,
                        help="stop when the estimated spend reaches this (default: labeling.max_spend_usd; 0 = none)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in the output folder")
    parser.add_argument("--write-atlas", action="store_true", help="write the final label into --atlas (source scientist)")
    parser.add_argument("--config", default="", help="YAML config whose labeling section picks the LLM and its key")
    parser.add_argument("--backend", choices=("anthropic", "openai"), default=None, help="LLM API (overrides the config)")
    parser.add_argument("--llm-model", default=None, help="LLM model name (overrides the config)")
    parser.add_argument("--base-url", default=None, help="LLM API base URL, e.g. a vLLM server (overrides the config)")
    parser.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    parser.add_argument("--api-key-file", default=None, help="file holding the API key")
    parser.add_argument("--max-prompts", type=int, default=12, help="prompts per tool call at most (default: %(default)s)")
    parser.add_argument("--max-prompt-chars", type=int, default=400, help="characters per prompt at most (default: %(default)s)")
    parser.add_argument("--max-generate", type=int, default=24, help="generated tokens per call at most (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_remote_arguments(parser, service="attribution", instead_of="loading --model in-process (the server's model)")
    parser.add_argument("--timeout", type=float, default=300.0, help="remote call timeout in seconds (default: %(default)s)")


def _labeling(args: argparse.Namespace):
    import dataclasses

    from circuits_core.config import LabelingSection, load_config

    base_dir = None
    if args.config:
        config = load_config(args.config)
        section, base_dir = config.labeling, Path(args.config).resolve().parent
    else:
        section = LabelingSection()
    overrides = {k: v for k, v in (("backend", args.backend), ("model", args.llm_model), ("base_url", args.base_url),
                                   ("api_key_env", args.api_key_env), ("api_key_file", args.api_key_file)) if v is not None}
    if args.backend == "openai" and args.api_key_env is None and not args.config:
        overrides["api_key_env"] = "OPENAI_API_KEY"
    if args.budget_usd is not None:
        overrides["max_spend_usd"] = args.budget_usd
    return dataclasses.replace(section, **overrides), base_dir


def run(args: argparse.Namespace) -> int:
    import asyncio
    from contextlib import ExitStack

    from circuits.backends import LocalModel, open_atlas, open_tracer
    from circuits.extras import require

    llm_mod = require("circuits_labeler.llm", what="`circuits investigate`")
    agent = require("circuits_labeler.scientist.agent", what="`circuits investigate`")
    from circuits_labeler.scientist.report import write_report
    from circuits_labeler.scientist.tools import Sources, ToolLimits
    from circuits_labeler.scientist.transcript import load_transcript

    layer, neuron = parse_unit(args.unit)
    if args.max_steps < 1:
        raise InvalidArgument(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.budget_usd is not None and args.budget_usd < 0:
        raise InvalidArgument(f"--budget-usd must be >= 0, got {args.budget_usd}")
    for flag, value, top in (("--max-prompts", args.max_prompts, 64), ("--max-prompt-chars", args.max_prompt_chars, 4000),
                             ("--max-generate", args.max_generate, 256)):
        if not 1 <= value <= top:
            raise InvalidArgument(f"{flag} must be in 1..{top}, got {value}")
    if args.write_atlas and not args.atlas:
        raise InvalidArgument("--write-atlas needs --atlas")
    for flag, path in (("--atlas", args.atlas), ("--exemplars", args.exemplars)):
        if path and not Path(path).is_file():
            raise InvalidArgument(f"{flag} {path}: file not found")
    labeling, base_dir = _labeling(args)
    folder = Path(args.output) / f"L{layer}_N{neuron}"
    transcript_path, report_path = folder / "transcript.json", folder / "report.html"
    previous = None
    if transcript_path.exists():
        if not args.resume:
            raise InvalidArgument(f"{transcript_path} exists: pass --resume to continue it or choose another --output")
        previous = load_transcript(transcript_path)
        if (previous.layer, previous.neuron) != (layer, neuron):
            raise InvalidArgument(f"{transcript_path} is the investigation of {previous.unit_id}, not L{layer}/N{neuron}")
    elif args.resume:
        raise InvalidArgument(f"nothing to resume: {transcript_path} does not exist")

    backend = llm_mod.create_backend(labeling, base_dir=base_dir)
    settings = agent.AgentSettings(
        max_steps=args.max_steps, max_spend_usd=labeling.max_spend_usd, max_tokens_total=labeling.max_tokens_total,
        input_price_per_mtok=labeling.input_price_per_mtok, output_price_per_mtok=labeling.output_price_per_mtok,
        limits=ToolLimits(max_prompts=args.max_prompts, max_prompt_chars=args.max_prompt_chars,
                          max_generate_tokens=args.max_generate),
    )
    remote = remote_from_args(args, timeout=args.timeout)
    with ExitStack() as stack:
        engine = open_tracer(remote=remote, model=LocalModel(name=args.model, dtype=args.dtype, device=args.device),
                             what="`circuits investigate`")
        stack.callback(engine.close)
        sources = Sources(engine=engine)
        if args.atlas:
            sources.atlas = open_atlas(remote=None, path=args.atlas)
            stack.callback(sources.atlas.close)
        if args.exemplars:
            files = require("circuits_server.exemplar_files", what="--exemplars")
            sources.exemplars = files.ExemplarFile(args.exemplars)
        model_name = args.model if remote is None else f"{remote.address} ({engine.model_info().model})"
        if previous is None:
            transcript = agent.new_transcript(layer=layer, neuron=neuron, model=model_name,
                                              llm={"backend": labeling.backend, "model": labeling.model},
                                              settings=settings, sources=sources)
        else:
            transcript = previous
            if transcript.status == "stopped":
                transcript.status, transcript.stop_reason = "running", ""
            transcript.sources = sources.describe()
        llm = llm_mod.RetryingLLM(backend, policy=llm_mod.RetryPolicy(max_retries=labeling.max_retries),
                                  budget=agent.budget_for(settings, previous))

        def show(event) -> None:
            if not args.quiet:
                print(f"[{event.step}] {event.message}", file=sys.stderr, flush=True)

        scientist = agent.Scientist(llm=llm, sources=sources, settings=settings, transcript_path=transcript_path,
                                    on_event=show)

        async def go():
            try:
                return await scientist.run(transcript)
            finally:
                await llm.aclose()

        transcript = asyncio.run(go())
    write_report(transcript, report_path)
    if args.write_atlas and transcript.final is not None:
        writeback = require("circuits_atlas.writeback", what="--write-atlas")
        writeback.write_label(args.atlas, layer=layer, neuron=neuron, text=transcript.final.label,
                              description=transcript.final.description)
    correct, total = transcript.prediction_score()
    verdict = (f"label {transcript.final.label!r} (confidence {transcript.final.confidence}, predictions {correct}/{total})"
               if transcript.final else f"no label (predictions {correct}/{total})")
    print(f"{transcript.status}: {transcript.stop_reason}; {verdict}; {transcript.usage.input_tokens + transcript.usage.output_tokens} "
          f"tokens, ${transcript.usage.spend_usd:.4f}; report -> {report_path}")
    return 0
