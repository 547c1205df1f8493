"""Constants and helpers shared by the neuron-scientist tests (a uniquely named module: every
test folder has its own conftest, so tests import from here, not from conftest)."""

from __future__ import annotations

import asyncio
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: The planted neuron: layer, index, private hidden dim, its token.
LAYER, NEURON, DIM, TOKEN = 1, 10, 60, "cat"
PROBES = ["the cat is big", "the dog is small", "paris is a city", "red green blue", "one two three"]
FILLERS = ["the", "big", "red", "moon", "one", "city"]
KEY = "sk-scientist-test-key"

from circuits.cli import main
from circuits_labeler.llm import AnthropicBackend, OpenAIBackend, RetryingLLM, RetryPolicy
from circuits_labeler.scientist.agent import AgentSettings, Scientist, budget_for, new_transcript
from circuits_labeler.scientist.tools import Sources, build_registry
from circuits_labeler.testing import StandInLLMServer

ALL_TOOLS = set(build_registry())


def investigate(argv: list[str], server: StandInLLMServer, tmp_path: Path, capsys) -> tuple[int, str, str]:
    (tmp_path / "key").write_text(KEY)
    code = main(["investigate", f"{LAYER}/{NEURON}", "--base-url", server.base_url, "--llm-model", "stand-in",
                 "--api-key-file", str(tmp_path / "key"), "--output", str(tmp_path / "reports"), "--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_agent(engine, responder, tmp_path: Path, *, api: str = "anthropic", **settings) -> tuple:
    with StandInLLMServer(responder=responder) as server:
        if api == "anthropic":
            backend = AnthropicBackend(model="stand-in", api_key=KEY, base_url=server.base_url)
        else:
            backend = OpenAIBackend(model="stand-in", api_key=KEY, base_url=server.openai_base_url)
        agent_settings = AgentSettings(**settings)
        sources = Sources(engine=engine)
        transcript = new_transcript(layer=LAYER, neuron=NEURON, model="tiny", llm={"backend": api, "model": "stand-in"},
                                    settings=agent_settings, sources=sources)
        llm = RetryingLLM(backend, policy=RetryPolicy(max_retries=0), budget=budget_for(agent_settings))
        scientist = Scientist(llm=llm, sources=sources, settings=agent_settings, transcript_path=tmp_path / "t.json")
        transcript = asyncio.run(scientist.run(transcript))
        return transcript, server.requests
