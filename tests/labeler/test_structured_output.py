"""json_mode asks OpenAI-compatible servers (vLLM) for answers that match the label schema."""

from __future__ import annotations

import asyncio

import jsonschema

from circuits_labeler.llm import ANSWER_RESPONSE_FORMAT, ChatMessage, OpenAIBackend
from circuits_labeler.prompts import INPUT_TYPES, OUTPUT_TYPES, parse_answer
from circuits_labeler.testing import StandInLLMServer


def test_json_mode_sends_the_label_schema_and_valid_answers_parse() -> None:
    with StandInLLMServer() as server:
        backend = OpenAIBackend(model="m", api_key="k", base_url=server.openai_base_url, json_mode=True)
        asyncio.run(backend.complete(system="s", messages=[ChatMessage(role="user", content="hi")], max_tokens=50))
        (request,) = server.requests
    assert request.response_format == ANSWER_RESPONSE_FORMAT
    schema = ANSWER_RESPONSE_FORMAT["json_schema"]["schema"]
    answer = {"label": "capital cities", "description": "d", "type": "semantic", "confidence": "high"}
    jsonschema.validate(answer, schema)
    assert parse_answer(__import__("json").dumps(answer), allowed_types=OUTPUT_TYPES).label == "capital cities"
    for bad in ({"description": "d", "type": "semantic", "confidence": "high"},
                {**answer, "label": ""}, {**answer, "type": "other"}):
        try:
            jsonschema.validate(bad, schema)
        except jsonschema.ValidationError:
            continue
        raise AssertionError(f"schema accepted {bad}")
    assert set(schema["properties"]["type"]["enum"]) == set(OUTPUT_TYPES) | set(INPUT_TYPES)
