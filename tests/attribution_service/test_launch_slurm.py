"""`circuits launch --slurm`: the sbatch array script, run as Slurm runs it, and on a real Slurm.

The real-Slurm test starts a private single-node cluster from Debian's slurm-wlm (munged,
slurmctld and slurmd on localhost, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, own
ports, state and munge key) and submits a 2-task array over a tiny checkpoint; it skips, saying
why, where the binaries are missing (scripts/ci_services.sh installs them) or it cannot run as root.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from circuits.cli import main
from circuits_core.graphio import is_graph_file, read_graph

PROMPTS = ["the capital of france is", "one two three", "red green blue", "the cat and the dog", "sun moon"]


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "id": f"p{i}"}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def graphs_by_prompt(directory: Path) -> Counter:
    return Counter(read_graph(p).prompt for p in sorted(directory.iterdir()) if p.is_file() and is_graph_file(p))


def test_dry_run_prints_an_array_job_with_the_resources_passed_through(capsys, tmp_path) -> None:
    code = main([
        "launch", "--slurm", "--dry-run", "--prompts", str(tmp_path / "p.jsonl"), "--shards", "4", "--gpus", "1",
        "--output-dir", str(tmp_path / "out"), "--name", "run-7", "--parallelism", "2", "--partition", "gpu",
        "--gres", "gpu:a100:1", "--time", "04:00:00", "--mem", "32G", "--cpus-per-task", "8",
        "--sbatch-arg=--account=lab", "--aggregator", "agg-0:50051,agg-1:50051", "--worker-arg=--k", "--worker-arg=10",
        "--python", "/opt/env/bin/python",
    ])
    assert code == 0
    script = capsys.readouterr().out
    directives = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=run-7", "--array=0-3%2", f"--output={tmp_path}/out/_logs/%x-%A_%a.out", "--partition=gpu",
        "--gres=gpu:a100:1", "--time=04:00:00", "--mem=32G", "--cpus-per-task=8", "--account=lab",
    ]
    (exec_line,) = [line for line in script.splitlines() if line.startswith("exec ")]
    argv = shlex.split(exec_line.replace('"${SLURM_ARRAY_TASK_ID}"', "3"))[1:]
    assert argv[:3] == ["/opt/env/bin/python", "-m", "circuits_attribution.worker"]
    from circuits_attribution.worker import build_parser

    parsed = build_parser().parse_args(argv[3:])
    assert (parsed.shard_index, parsed.shard_count, parsed.device, parsed.k) == (3, 4, "cuda", 10)
    assert parsed.aggregator == "agg-0:50051,agg-1:50051"
    assert str(parsed.output_dir) == f"{tmp_path}/out" and str(parsed.prompts) == f"{tmp_path}/p.jsonl"


def test_gpus_become_a_gres_request_and_cpu_runs_need_none(capsys, tmp_path) -> None:
    for gpus, expected in (("2", ["--gres=gpu:2"]), ("0", [])):
        assert main(["launch", "--slurm", "--dry-run", "--prompts", "p.jsonl", "--shards", "1", "--gpus", gpus]) == 0
        script = capsys.readouterr().out
        assert [line[8:] for line in script.splitlines() if line.startswith("#SBATCH --gres")] == expected
        assert ("--device cuda" in script) == (gpus != "0")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--time", "4 hours", "--time"), ("--partition", "a b", "--partition"), ("--name", "bad name", "--name"),
     ("--sbatch-arg", "account=lab", "--sbatch-arg"), ("--aggregator", "nohostport", "HOST:PORT")],
)
def test_bad_slurm_values_are_one_line_errors(capsys, flag: str, value: str, message: str) -> None:
    code = main(["launch", "--slurm", "--dry-run", "--prompts", "p.jsonl", "--shards", "2", f"{flag}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_kubernetes_launch_still_requires_an_image(capsys) -> None:
    assert main(["launch", "--dry-run", "--prompts", "/data/p.jsonl", "--shards", "2"]) == 2
    assert "--image is required" in capsys.readouterr().err


def _run_script_as_slurm_would(script: Path, task: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)


def test_the_written_script_runs_every_shard_once_and_resumes(tmp_path, tiny_checkpoint) -> None:
    """No Slurm needed: the script run once per array index (as sbatch would) covers every prompt
    exactly once; running it again traces nothing new."""
    prompts = prompts_file(tmp_path)
    out = tmp_path / "graphs"
    script = tmp_path / "run.sbatch"
    assert main(["launch", "--slurm", "--prompts", str(prompts), "--shards", "2", "--gpus", "0", "--dtype", "float32",
                 "--model", str(tiny_checkpoint), "--output-dir", str(out), "--script", str(script), "--name", "t"]) == 0
    assert os.access(script, os.X_OK) and (out / "_logs").is_dir()
    for task in (0, 1):
        result = _run_script_as_slurm_would(script, task)
        assert result.returncode == 0, result.stderr
    assert graphs_by_prompt(out) == Counter(PROMPTS)
    again = _run_script_as_slurm_would(script, 1)
    assert again.returncode == 0 and "traced 0" in again.stdout and "already done 2" in again.stdout, again.stdout


# -- a real single-node Slurm ---------------------------------------------------------------------
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@pytest.fixture
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + slurmd on localhost with a private config; yields the environment."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge "
                    "(scripts/ci_services.sh does)")
    if os.geteuid() != 0:
        pytest.skip("a private slurmd must run as root (it starts jobs as their users)")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=circuits-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={root}/munge.socket",
        "CredType=cred/munge",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        "MinJobAge=600",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    sbin = lambda name: shutil.which(name) or f"/usr/sbin/{name}"  # noqa: E731
    pid_files = [root / "slurmd.pid", root / "slurmctld.pid", root / "munged.pid"]
    try:
        subprocess.run([sbin("munged"), "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
                        f"--pid-file={root}/munged.pid", f"--log-file={root}/log/munged.log",
                        f"--seed-file={root}/munged.seed"], env=env, check=True, timeout=30)
        subprocess.run([sbin("slurmctld"), "-c"], env=env, check=True, timeout=30)
        subprocess.run([sbin("slurmd")], env=env, check=True, timeout=30)
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(1)
        if state != "idle":
            logs = "\n".join((root / "log" / n).read_text()[-1500:] for n in ("slurmctld.log", "slurmd.log") if (root / "log" / n).exists())
            pytest.fail(f"the private Slurm node never became idle (state {state!r}):\n{logs}")
        yield env
    finally:
        for path in pid_files:  # only the daemons this fixture started, by their pid
            pid = _pid(path)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        time.sleep(1)


@pytest.mark.timeout(900)
def test_a_real_slurm_array_traces_every_prompt_exactly_once(tmp_path, tiny_checkpoint, slurm_cluster) -> None:
    prompts = prompts_file(tmp_path)
    out = tmp_path / "graphs"
    script = tmp_path / "circuits.sbatch"
    command = [
        str(Path(sys.executable).with_name("circuits")), "launch", "--slurm", "--submit", "--prompts", str(prompts), "--shards", "2",
        "--gpus", "0", "--dtype", "float32", "--model", str(tiny_checkpoint), "--output-dir", str(out),
        "--script", str(script), "--name", "circuits-test", "--time", "10:00", "--mem", "500M", "--poll", "1",
        "--timeout", "600", "--worker-arg=--max-nodes", "--worker-arg=50",
    ]
    env = {**slurm_cluster, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=700)
    logs = "\n".join(f"{p.name}:\n{p.read_text()[-800:]}" for p in sorted((out / "_logs").glob("*"))) if (out / "_logs").is_dir() else ""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs}"
    assert "2/2 shards completed" in result.stdout and "complete" in result.stdout, result.stdout
    assert graphs_by_prompt(out) == Counter(PROMPTS)  # every prompt, exactly once
    task_logs = sorted(p.name for p in (out / "_logs").glob("circuits-test-*_*.out"))
    assert len(task_logs) == 2, task_logs
    ledgers = sorted(p.name for p in (out / "_progress").iterdir())
    assert ledgers == ["shard-0-of-2.jsonl", "shard-1-of-2.jsonl"], ledgers
