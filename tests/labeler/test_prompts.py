"""Layer bands scale with the model; answer parsing accepts valid answers and names what is wrong."""

from __future__ import annotations

import json

import pytest

from circuits_labeler.prompts import (
    INPUT_TYPES, OUTPUT_TYPES, LayerBands, MalformedAnswer, NeuronContext, output_prompt, parse_answer,
)


@pytest.mark.parametrize(
    ("layers", "late_start", "mid_start"), [(32, 26, 10), (30, 24, 9), (4, 3, 1), (1, 0, 0), (80, 64, 24)]
)
def test_bands_scale_with_layer_count(layers, late_start, mid_start):
    bands = LayerBands.for_model(layers)
    assert (bands.late_start, bands.mid_start) == (late_start, mid_start)
    assert bands.band(layers - 1) == "late"
    assert bands.band(0) == ("late" if layers == 1 else "early")


def test_prompt_states_layer_count_not_32():
    ctx = NeuronContext(layer=5, neuron=9, num_layers=30, band=LayerBands.for_model(30).band(5))
    text = output_prompt(ctx).user
    assert "layer 5 of 30" in text and "Neuron: L5/N9" in text and "early band" in text and "31" not in text


GOOD = {"label": "promotes city names", "description": "Promotes Paris.", "type": "Semantic", "confidence": "HIGH"}


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(GOOD),
        "Sure! ```json\n" + json.dumps(GOOD) + "\n```",
        "Here it is: " + json.dumps(GOOD) + " hope that helps",
        json.dumps({**GOOD, "confidence": 0.9}),
    ],
)
def test_parse_accepts_wrapped_and_normalised(text):
    answer = parse_answer(text, allowed_types=OUTPUT_TYPES)
    assert answer.label == "promotes city names" and answer.type == "semantic" and answer.confidence == "high"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("I think it is about cities.", "no JSON object"),
        (json.dumps({**GOOD, "label": ""}), "label"),
        (json.dumps({**GOOD, "label": 7}), "label"),
        (json.dumps({**GOOD, "label": "x" * 200}), "longer"),
        (json.dumps({**GOOD, "type": "vibes"}), "type"),
        (json.dumps({**GOOD, "confidence": "certain"}), "confidence"),
        (json.dumps({**GOOD, "confidence": 3}), "confidence"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "type"}), "type"),
        ("", "no JSON object"),
    ],
)
def test_parse_rejects_with_reason(text, reason):
    with pytest.raises(MalformedAnswer, match=reason):
        parse_answer(text, allowed_types=OUTPUT_TYPES)


def test_input_types_are_separate():
    with pytest.raises(MalformedAnswer):
        parse_answer(json.dumps(GOOD), allowed_types=INPUT_TYPES)
    ok = parse_answer(json.dumps({**GOOD, "type": "upstream gated"}), allowed_types=INPUT_TYPES)
    assert ok.type == "upstream-gated"
