"""The first run on the bundled SmolLM2-135M-Instruct: the README's main command traces " Paris",
says which prompt form it used, and the seed's aspirin example states what it traced.

The commands run as a user runs them (the `circuits` executable in a subprocess). The README
command itself, verbatim, traces a 360-node graph (about 2 minutes on 2 shared cores) and is marked
slow; the same command with a smaller --max-nodes runs by default.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from circuits_attribution.models import SMOLLM2_NAME, is_prepared

REPO = Path(__file__).resolve().parents[2]
CIRCUITS = Path(sys.executable).with_name("circuits")

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(not is_prepared(), reason="SmolLM2 cache not prepared (python -m circuits_attribution.prepare_model)"),
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CIRCUITS), *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def _traced(summary: str) -> list[tuple[str, float]]:
    """[(token, p)] of the summary line's traced logits."""
    part = summary.split("traced logits: ", 1)[1].split("; m=", 1)[0]
    return [(m.group(1), float(m.group(2))) for m in re.finditer(r"'((?:[^'\\]|\\.)*)' p=([0-9.e+-]+)", part)]


def readme_main_command() -> list[str]:
    """The `circuits graph ...` part of the README's set-up block, as argv."""
    import shlex

    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- setup -->", 1)[1].split("<!-- /setup -->", 1)[0]
    command = next(line for line in block.splitlines() if "circuits graph" in line)
    argv = shlex.split(command.split("&&", 1)[1])
    assert argv[0] == ".venv/bin/circuits"
    return argv[1:]


def _check_main_example(result: subprocess.CompletedProcess[str], folder: Path) -> dict:
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = result.stdout.strip().splitlines()
    traced = _traced(summary)
    assert traced[0][0] == " Paris" and traced[0][1] > 0.7, summary
    assert "prompt: raw completion (SmolLM2-135M-Instruct's default" in summary
    assert "hint:" not in result.stderr  # a strong answer needs no hint
    # one progress bar (the edge pass): loading the weights draws none of its own
    bars = {line.split(":", 1)[0].strip() for line in re.split(r"[\r\n]", result.stderr) if "%|" in line}
    assert bars == {"edges"}, result.stderr[-2000:]
    path = folder / "graphs" / "relp-the-capital-of-france-is.json"
    data = json.loads(path.read_text())
    logits = sorted((n for n in data["nodes"] if n["isLogit"]), key=lambda n: -n["token_prob"])
    assert logits[0]["clerp"].startswith('Output " Paris" (p=0.77')
    settings = data["metadata"]["generation_settings"]
    assert settings["prompt_form"] == "raw" and settings["raw"] is True
    return data


@pytest.mark.slow
def test_readme_main_command_verbatim_traces_paris(tmp_path):
    argv = readme_main_command()
    assert argv == ["graph", "The capital of France is", "--model", SMOLLM2_NAME]
    _check_main_example(_run(argv, tmp_path), tmp_path)


def test_readme_main_command_with_fewer_nodes_traces_paris_and_chat_form_hints(tmp_path):
    argv = [*readme_main_command(), "--max-nodes", "20"]
    data = _check_main_example(_run(argv, tmp_path), tmp_path)
    assert data["metadata"]["generation_settings"]["nodes_pruned"] > 0
    # the chat form is weak on this model: the summary says so and the hint points back
    chat = _run([*argv, "--chat", "--slug", "chat"], tmp_path)
    assert chat.returncode == 0, chat.stderr[-2000:]
    (summary,) = chat.stdout.strip().splitlines()
    assert "prompt: chat template (as requested)" in summary and _traced(summary)[0] == ("L", 0.097)
    hints = [line for line in chat.stderr.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "p=0.097 (< 0.2)" in hints[0] and "--raw (completion form)" in hints[0]


def test_seed_aspirin_example_states_what_it_traced(tmp_path):
    """The seed's example, with --max-nodes lowered for time: both targets are several tokens, so
    their first tokens are traced; the leading-space variants are far more probable and named."""
    argv = ["graph", "The enzyme inhibited by aspirin is", "--target-tokens", "COX", "cyclooxygenase",
            "--slug", "aspirin-cox", "--max-nodes", "20"]
    result = _run(argv, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = result.stdout.strip().splitlines()
    assert "'CO' p=4.1e-07 (first token of 'COX')" in summary, summary
    assert "'cycl' p=7.1e-06 (first token of 'cyclooxygenase')" in summary
    lines = result.stderr.splitlines()
    assert "note: target 'COX' is 2 tokens ['CO', 'X']: traced its first token 'CO'" in lines
    assert "note: target 'cyclooxygenase' is 5 tokens ['cycl', 'oo', 'x', 'ygen', 'ase']: traced its first token 'cycl'" in lines
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 2 and re.search(r"' CO' with a leading space is [0-9]{3}x more probable", warnings[0])
    assert "pass ' COX' to trace it" in warnings[0] and "pass ' cyclooxygenase' to trace it" in warnings[1]
    data = json.loads((tmp_path / "graphs" / "relp-aspirin-cox.json").read_text())
    targets = data["metadata"]["generation_settings"]["targets"]
    assert [(t["text"], t["traced"], t["pieces"]) for t in targets] == [
        ("COX", "CO", ["CO", "X"]), ("cyclooxygenase", "cycl", ["cycl", "oo", "x", "ygen", "ase"])]
    # the probabilities are the model's own: a plain forward gives the same numbers
    import torch

    from circuits_attribution import load_model

    loaded = load_model(SMOLLM2_NAME)
    ids = loaded.tokenizer("The enzyme inhibited by aspirin is")["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    by_token = {n["clerp"].split('"')[1]: n["token_prob"] for n in data["nodes"] if n["isLogit"]}
    assert by_token["CO"] == pytest.approx(float(probs[targets[0]["token_id"]]), rel=1e-4)
    assert float(probs[loaded.tokenizer.encode(" COX", add_special_tokens=False)[0]]) > 100 * by_token["CO"]


def test_paris_without_its_space_warns_and_names_the_spaced_token(tmp_path):
    result = _run([*readme_main_command(), "--target-tokens", "Paris", "--max-nodes", "5"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = result.stdout.strip().splitlines()
    assert _traced(summary) == [("Paris", 0.00052)], summary
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "target 'Paris' traces 'Paris' (p=0.00052), but ' Paris' with a leading space" in warning
    assert "(p=0.77): pass ' Paris' to trace it" in warning
