"""Kill the CLI with SIGKILL mid-run; the rerun pays only for answers not yet cached and ends
with the same labels as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from circuits_core.config import load_config
from circuits_labeler.build import build_labeler
from circuits_labeler.testing import StandInLLMServer


def write_config(path: Path, server: StandInLLMServer, evidence_dir: Path, projections_path: Path, key_file: Path) -> Path:
    path.write_text(yaml.safe_dump({"labeling": {
        "backend": "anthropic", "model": "stand-in-model", "base_url": server.base_url,
        "api_key_file": str(key_file), "evidence_path": str(evidence_dir),
        "projections_path": str(projections_path), "compute_projections": False, "min_effect": 0.0,
        "concurrency": 2, "retry_base_delay": 0.01, "cache_path": "cache.jsonl", "labels_path": "labels.jsonl",
    }}))
    return path


def test_sigkill_mid_run_then_resume(tmp_path, evidence_dir, projections_path):
    key_file = tmp_path / "key"
    key_file.write_text("sk-test\n")
    (tmp_path / "killed").mkdir()
    (tmp_path / "clean").mkdir()
    with StandInLLMServer(latency=0.05) as server:
        cfg_path = write_config(tmp_path / "killed" / "label.yaml", server, evidence_dir, projections_path, key_file)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "circuits.cli", "label", "--config", str(cfg_path), "--no-progress"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 90
        while len(server.answered()) < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(0.5)  # let the stand-in finish handling requests the dead process had sent
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        first_run = [(r.label_pass, r.unit) for r in server.answered()]

        cache_lines = (tmp_path / "killed" / "cache.jsonl").read_text().splitlines()
        cached = {(rec["label_pass"], (rec["layer"], rec["neuron"])) for rec in map(json.loads, cache_lines)}
        assert 10 <= len(cached) < 40
        # Everything cached was really answered; at most the requests in flight were lost.
        assert cached <= set(first_run) and len(set(first_run) - cached) <= 2

        server.reset()
        config = load_config(cfg_path)
        labeler = build_labeler(config)
        final = labeler.run()
        labeler.cache.close()
        assert final.state == "done"
        second_run = [(r.label_pass, r.unit) for r in server.requests]
        assert not set(second_run) & cached  # no duplicate paid requests for done neurons
        assert len(second_run) == len(set(second_run))

        clean_cfg = load_config(write_config(tmp_path / "clean" / "label.yaml", server, evidence_dir, projections_path, key_file))
        server.reset()
        clean = build_labeler(clean_cfg)
        clean.run()
        clean.cache.close()
        assert len(second_run) + len(cached) == len(server.requests)
    killed_labels = (tmp_path / "killed" / "labels.jsonl").read_text()
    assert killed_labels == (tmp_path / "clean" / "labels.jsonl").read_text()
