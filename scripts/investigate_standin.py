#!/usr/bin/env python
"""Run `circuits investigate` offline against the scripted stand-in LLM (no key, no network).

Usage: .venv/bin/python scripts/investigate_standin.py L/N [circuits investigate flags ...]
e.g.   .venv/bin/python scripts/investigate_standin.py 8/1096 --output reports

The stand-in (circuits_labeler.testing.ScriptedScientist) plays the agent: it reads the tool
results and walks every tool (context, probes, hypothesis, pre-registered predictions, ablation,
steering, patching, attribution, finish), testing the hypothesis "fires on the token T" where T
is the token of the largest activation on its probe sentences, with country-name contexts. The
model, tools, transcript and report are the real ones; only the LLM is scripted.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from circuits.cli import main
from circuits_labeler.testing import ScriptedScientist, StandInLLMServer

PROBES = ["The cat sat on the mat.", "Paris is the capital of France.", "She played the piano all night.",
          "The stock market fell sharply today.", "My dog loves to chase the ball."]
CONTEXTS = ["We spent the summer in {} with friends.", "The wine from {} is famous.", "He moved to {} after college.",
            "The president of {} gave a speech."]
ALTERNATIVES = ["Spain", "Italy", "Germany", "Brazil"]


def run(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    scientist = ScriptedScientist(probes=PROBES, fillers=[], contexts=CONTEXTS, alternatives=ALTERNATIVES)
    with tempfile.TemporaryDirectory() as tmp, StandInLLMServer(responder=scientist) as server:
        key = Path(tmp) / "key"
        key.write_text("stand-in-key")
        return main(["investigate", argv[0], "--base-url", server.base_url, "--llm-model", "stand-in (scripted)",
                     "--api-key-file", str(key), *argv[1:]])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
