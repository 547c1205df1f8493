"""`circuits launch`: run batch attribution as a Kubernetes Indexed Job or a Slurm array job.

    circuits launch --image registry/circuits-attribution:0.1 --prompts /data/prompts.jsonl \\
        --shards 16 --gpus 1 --aggregator circuits-aggregator:50052 --namespace circuits \\
        --volume-claim circuits-data
    circuits launch --slurm --prompts prompts.jsonl --shards 16 --output-dir /scratch/graphs \\
        --partition gpu --gres gpu:a100:1 --time 04:00:00 --mem 32G [--submit]

Each pod (task) runs ``python -m circuits_attribution.worker`` on shard ``$JOB_COMPLETION_INDEX``
(``$SLURM_ARRAY_TASK_ID``); workers are resumable, so a retried shard skips what it already
finished. ``--dry-run`` prints the manifest (YAML) or the sbatch script without contacting a
cluster; ``--slurm`` writes the script (``--script``) and submits it with ``--submit``.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slurm", action="store_true", help="a Slurm array job (sbatch) instead of a Kubernetes Job")
    parser.add_argument("--image", default="", help="container image with circuits-attribution installed (Kubernetes)")
    parser.add_argument("--prompts", required=True, help="prompts JSONL path as the pods see it")
    parser.add_argument("--shards", type=int, required=True, help="number of shards (= pods = Job completions)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per pod; 0 runs on CPU (default: %(default)s)")
    parser.add_argument("--aggregator", default="", metavar="HOST:PORT", help="aggregator the workers stream graphs to")
    parser.add_argument("--namespace", default="default", help="Kubernetes namespace (default: %(default)s)")
    parser.add_argument("--name", default=None, help="Job name (default: circuits-attribution-<timestamp>)")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="model id or path in the pod")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (default: %(default)s)")
    parser.add_argument("--output-dir", default=None,
                        help="graph directory in the pod (default: /data/graphs) or, with --slurm, on the shared "
                             "filesystem (default: graphs)")
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
    slurm = parser.add_argument_group("Slurm (--slurm)")
    slurm.add_argument("--script", default=None, help="where to write the sbatch script (default: <name>.sbatch)")
    slurm.add_argument("--submit", action="store_true", help="submit the script with sbatch and watch its tasks")
    slurm.add_argument("--partition", default="", help="Slurm partition")
    slurm.add_argument("--gres", default="", help="generic resources per task (default: gpu:<gpus> when --gpus > 0)")
    slurm.add_argument("--time", default="", help="time limit per task, e.g. 04:00:00")
    slurm.add_argument("--mem", default="", help="memory per node, e.g. 32G")
    slurm.add_argument("--cpus-per-task", type=int, default=0, help="CPUs per task (default: the partition's)")
    slurm.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                       help="further sbatch option, repeatable (e.g. --sbatch-arg=--account=lab)")
    slurm.add_argument("--python", default=None,
                       help="Python with circuits-attribution on the compute nodes (default: the Python running this command)")
    slurm.add_argument("--log-dir", default="", help="per-task logs (default: <output-dir>/_logs)")
    slurm.add_argument("--sbatch", default="sbatch", help="sbatch command (default: %(default)s)")
    slurm.add_argument("--scontrol", default="scontrol", help="scontrol command (default: %(default)s)")


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
        output_dir=args.output_dir or "/data/graphs",
        volume_claim=args.volume_claim,
        mount_path=args.mount_path,
        parallelism=args.parallelism,
        backoff_limit_per_index=args.backoff_limit_per_index,
        max_failed_indexes=args.max_failed_indexes,
        worker_args=tuple(args.worker_arg),
        service_account=args.service_account,
    )


def slurm_settings_from_args(args: argparse.Namespace):
    """SlurmSettings with paths made absolute (the script runs from any directory)."""
    import os

    from circuits_attribution.launch import SlurmSettings

    def absolute(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path)) if path else path

    model = args.model
    if os.path.exists(os.path.expanduser(model)):
        model = absolute(model)
    return SlurmSettings(
        prompts=absolute(args.prompts),
        shards=args.shards,
        output_dir=absolute(args.output_dir or "graphs"),
        model=model,
        dtype=args.dtype,
        gpus=args.gpus,
        aggregator=args.aggregator,
        name=args.name or f"circuits-attribution-{time.strftime('%Y%m%d-%H%M%S')}",
        parallelism=args.parallelism,
        worker_args=tuple(args.worker_arg),
        partition=args.partition,
        gres=args.gres,
        time=args.time,
        mem=args.mem,
        cpus_per_task=args.cpus_per_task,
        sbatch_args=tuple(args.sbatch_arg),
        python=args.python or sys.executable,
        log_dir=absolute(args.log_dir),
    )


def run_slurm(args: argparse.Namespace, launch) -> int:
    """Write (print with --dry-run) the sbatch script; with --submit submit it and watch its tasks."""
    settings = slurm_settings_from_args(args)
    if args.dry_run:
        sys.stdout.write(launch.sbatch_script(settings))
        return 0
    script = launch.write_sbatch_script(settings, args.script or f"{settings.name}.sbatch")
    print(f"wrote {script}: {settings.shards} array task(s), graphs in {settings.output_dir}", flush=True)
    if not args.submit:
        print(f"submit with: {args.sbatch} {script}", flush=True)
        return 0
    job_id = launch.submit_sbatch(script, sbatch=args.sbatch)
    print(f"submitted Slurm job {job_id} ({settings.name}): {settings.shards} shard(s)", flush=True)
    if args.no_wait:
        return 0
    from tqdm.auto import tqdm

    with tqdm(total=settings.shards, desc=settings.name, unit="shard", file=sys.stderr) as bar:

        def show(progress) -> None:
            bar.n = progress.completed
            bar.set_postfix_str(f"running {progress.running}, pending {progress.pending}, failed {len(progress.failed)}")
            bar.refresh()

        final = launch.watch_slurm_job(
            job_id, shards=settings.shards, poll_seconds=args.poll, timeout=args.timeout, on_progress=show,
            scontrol=args.scontrol,
        )
    print(final.line(), flush=True)
    if final.failed:
        return 1
    return 0 if final.ok else 3


def run(args: argparse.Namespace, *, api=None) -> int:
    """Create (or print) the Job; watch it unless --no-wait. Exit 0 on success, 1 if the Job failed."""
    from circuits.extras import require

    launch = require("circuits_attribution.launch", what="`circuits launch`")
    if args.slurm:
        return run_slurm(args, launch)
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
