"""`circuits launch`: run batch attribution as a Kubernetes Indexed Job and follow its progress.

    circuits launch --image registry/circuits-attribution:0.1 --prompts /data/prompts.jsonl \\
        --shards 16 --gpus 1 --aggregator circuits-aggregator:50052 --namespace circuits \\
        --volume-claim circuits-data

Each pod runs ``python -m circuits_attribution.worker`` on shard ``$JOB_COMPLETION_INDEX``;
workers are resumable, so a retried shard skips what it already finished. ``--dry-run`` prints
the manifest (YAML) without contacting a cluster.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, help="container image with circuits-attribution installed")
    parser.add_argument("--prompts", required=True, help="prompts JSONL path as the pods see it")
    parser.add_argument("--shards", type=int, required=True, help="number of shards (= pods = Job completions)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per pod; 0 runs on CPU (default: %(default)s)")
    parser.add_argument("--aggregator", default="", metavar="HOST:PORT", help="aggregator the workers stream graphs to")
    parser.add_argument("--namespace", default="default", help="Kubernetes namespace (default: %(default)s)")
    parser.add_argument("--name", default=None, help="Job name (default: circuits-attribution-<timestamp>)")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="model id or path in the pod")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (default: %(default)s)")
    parser.add_argument("--output-dir", default="/data/graphs", help="graph directory in the pod (default: %(default)s)")
    parser.add_argument("--volume-claim", default="", help="PersistentVolumeClaim to mount (prompts, graphs)")
    parser.add_argument("--mount-path", default="/data", help="where the claim is mounted (default: %(default)s)")
    parser.add_argument("--parallelism", type=int, default=0, help="pods at once (default: all shards)")
    parser.add_argument("--backoff-limit-per-index", type=int, default=3,
                        help="retries per shard before it counts as failed (default: %(default)s)")
    parser.add_argument("--max-failed-indexes", type=int, default=-1,
                        help="failed shards tolerated before the Job fails (default: no limit)")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="extra worker flag, repeatable (e.g. --worker-arg=--k --worker-arg=10)")
    parser.add_argument("--service-account", default="", help="service account of the pods")
    parser.add_argument("--dry-run", action="store_true", help="print the Job manifest and exit")
    parser.add_argument("--no-wait", action="store_true", help="create the Job and exit without watching")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between status polls (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=None, help="stop watching after this many seconds")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster or ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context")


def settings_from_args(args: argparse.Namespace):
    from circuits_attribution.launch import LaunchSettings

    return LaunchSettings(
        image=args.image,
        prompts=args.prompts,
        shards=args.shards,
        gpus=args.gpus,
        aggregator=args.aggregator,
        namespace=args.namespace,
        name=args.name or f"circuits-attribution-{time.strftime('%Y%m%d-%H%M%S')}",
        model=args.model,
        dtype=args.dtype,
        output_dir=args.output_dir,
        volume_claim=args.volume_claim,
        mount_path=args.mount_path,
        parallelism=args.parallelism,
        backoff_limit_per_index=args.backoff_limit_per_index,
        max_failed_indexes=args.max_failed_indexes,
        worker_args=tuple(args.worker_arg),
        service_account=args.service_account,
    )


def run(args: argparse.Namespace, *, api=None) -> int:
    """Create (or print) the Job; watch it unless --no-wait. Exit 0 on success, 1 if the Job failed."""
    from circuits.extras import require

    launch = require("circuits_attribution.launch", what="`circuits launch`")
    settings = settings_from_args(args)
    manifest = launch.job_manifest(settings)
    if args.dry_run:
        import yaml

        sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
        return 0
    api = api or launch.batch_api(kubeconfig=args.kubeconfig, context=args.context)
    launch.create_job(api, manifest)
    print(f"created Job {settings.namespace}/{settings.name}: {settings.shards} shards, {settings.gpus} GPU(s) each", flush=True)
    if args.no_wait:
        return 0
    from tqdm.auto import tqdm

    with tqdm(total=settings.shards, desc=settings.name, unit="shard", file=sys.stderr) as bar:

        def show(progress) -> None:
            bar.n = progress.succeeded
            bar.set_postfix_str(f"active {progress.active}, failed pods {progress.failed}")
            bar.refresh()

        final = launch.watch_job(
            api, settings.name, settings.namespace, shards=settings.shards,
            poll_seconds=args.poll, timeout=args.timeout, on_progress=show,
        )
    print(final.line(), flush=True)
    if final.failed_job:
        return 1
    return 0 if final.complete else 3
