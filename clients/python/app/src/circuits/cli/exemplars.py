"""`circuits exemplars`: top-activating and random-sample contexts of every neuron over a corpus.

    circuits exemplars --corpus corpus.jsonl --model HuggingFaceTB/SmolLM2-135M-Instruct --output ex.duckdb
    circuits exemplars --corpus builtin:python-docs --layers 0-3,28,29 --max-tokens 200000 --output ex.duckdb
    circuits exemplars ... --output ex.duckdb --resume                  # continue a killed run
    circuits exemplars ... --shard-index 2 --shard-count 8 --output ex-2.duckdb
    circuits exemplars --merge ex-0.duckdb ex-1.duckdb ... --output ex.duckdb
    circuits exemplars --launch --image IMG --shards 8 --corpus /data/corpus --output-dir /data/ex --dry-run

The corpus is a text / JSONL (``--text-field``) / Parquet file, a directory of them, or
``builtin:python-docs`` (the Python language reference shipped with Python: an offline corpus).
The output file is also the checkpoint: ``--resume`` continues it; shard files merge exactly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from circuits_core.config import SMALL_MODEL
from circuits_core.errors import InvalidArgument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", help="text/JSONL/Parquet file, a directory of them, or builtin:python-docs")
    parser.add_argument("--model", default=SMALL_MODEL, help="model id or checkpoint directory (default: %(default)s)")
    parser.add_argument("--output", help="exemplar file to write (DuckDB); with --merge the merged file")
    parser.add_argument("--dtype", default="float32", help="model dtype (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run stored in --output")
    parser.add_argument("--shard-index", type=int, default=0, help="this shard (0-based)")
    parser.add_argument("--shard-count", type=int, default=1, help="number of shards of the corpus batches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--merge", nargs="+", metavar="FILE", help="merge these shard files into --output")
    parser.add_argument("--allow-partial", action="store_true", help="with --merge: accept unfinished shards")
    launch = parser.add_argument_group("Kubernetes (--launch: one Indexed Job pod per shard)")
    launch.add_argument("--launch", action="store_true", help="run the shards as a Kubernetes Indexed Job")
    launch.add_argument("--image", default="", help="container image with circuits-attribution installed")
    launch.add_argument("--shards", type=int, default=1, help="number of shards (= pods)")
    launch.add_argument("--output-dir", default="/data/exemplars", help="shard files in the pod (default: %(default)s)")
    launch.add_argument("--gpus", type=int, default=1, help="GPUs per pod; 0 runs on CPU (default: %(default)s)")
    launch.add_argument("--namespace", default="default", help="Kubernetes namespace")
    launch.add_argument("--name", default=None, help="Job name (default: circuits-exemplars-<timestamp>)")
    launch.add_argument("--volume-claim", default="", help="PersistentVolumeClaim to mount (corpus, shard files)")
    launch.add_argument("--mount-path", default="/data", help="where the claim is mounted (default: %(default)s)")
    launch.add_argument("--dry-run", action="store_true", help="print the Job manifest and exit")
    launch.add_argument("--kubeconfig", default=None, help="kubeconfig file")
    from circuits_core.exemplars import add_run_arguments

    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from circuits.extras import require

    exemplars = require("circuits_attribution.exemplars", what="`circuits exemplars`")
    if args.merge:
        if not args.output:
            raise InvalidArgument("--merge needs --output FILE (where the merged file goes)")
        path = exemplars.merge_exemplar_files(args.merge, args.output, allow_partial=args.allow_partial)
        print(f"merged {len(args.merge)} exemplar files into {path}")
        return 0
    if not args.corpus:
        raise InvalidArgument("--corpus is required (a file, a directory or builtin:python-docs)")
    if args.launch:
        return _launch(args, exemplars)
    if not args.output:
        raise InvalidArgument("--output FILE is required")
    output = Path(args.output)
    from circuits_core.exemplars import run_settings_from_args

    run_settings = run_settings_from_args(
        args, output=output, shard_index=args.shard_index, resume=args.resume, progress=not args.no_progress
    )
    report = exemplars.load_and_run(run_settings, dtype=args.dtype, device=args.device)
    state = "complete" if report.complete else "unfinished (run again with --resume)"
    print(f"{report.batches} batches, {report.tokens} tokens in {report.seconds:.1f}s "
          f"({report.tokens_per_second:,.0f} tokens/s); skipped {report.skipped_batches} done batches; "
          f"{output}: {state}")
    return 0


def _launch(args: argparse.Namespace, exemplars) -> int:
    from circuits.extras import require

    launch = require("circuits_attribution.launch", what="`circuits exemplars --launch`")
    if not args.image:
        raise InvalidArgument("--launch needs --image")
    extra: list[str] = []
    for flag in ("text_field", "layers", "top_k", "random_samples", "context_before", "context_after", "seq_len",
                 "batch_size", "max_tokens", "seed", "checkpoint_seconds"):
        value = getattr(args, flag)
        if value not in ("", None):
            extra += [f"--{flag.replace('_', '-')}", str(value)]
    settings = launch.LaunchSettings(
        image=args.image, prompts=args.corpus, shards=args.shards, gpus=args.gpus, namespace=args.namespace,
        name=args.name or f"circuits-exemplars-{time.strftime('%Y%m%d-%H%M%S')}", model=args.model,
        dtype=args.dtype, output_dir=args.output_dir, volume_claim=args.volume_claim, mount_path=args.mount_path,
    )  # fmt: skip
    manifest = exemplars.job_manifest(settings, corpus=args.corpus, extra=extra)
    if args.dry_run:
        import yaml

        sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
        return 0
    api = launch.batch_api(kubeconfig=args.kubeconfig)
    launch.create_job(api, manifest)
    print(f"created Job {settings.namespace}/{settings.name}: {settings.shards} shards; when it completes: "
          f"circuits exemplars --merge {args.output_dir}/exemplars-*.duckdb --output ex.duckdb", flush=True)
    return 0
