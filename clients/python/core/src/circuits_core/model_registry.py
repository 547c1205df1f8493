"""The models the project knows by name, and how each one is prompted unless a request says otherwise.

A request's ``raw`` setting is tri-state: True (completion form: the prompt tokenized as it is),
False (chat form: the model's chat template with one user turn and the generation prompt) or
None, "the model's own default", resolved here:

* a known model uses its profile's ``prompt_form`` (the bundled SmolLM2-135M-Instruct is a
  dequantized Q4 GGUF that answers "The capital of France is" with " Paris" at p=0.77 in
  completion form, but with "L" at p=0.10 in its chat form, so its default is raw);
* any other model uses its chat template when its tokenizer has one, else the raw form.

The engine records the form it used and why in the graph metadata, so a local and a remote trace
of the same request agree. Light: no torch, no transformers.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

PromptForm = Literal["chat", "raw"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelProfile:
    """What the project knows about one hub model."""

    #: Hub id, e.g. ``meta-llama/Llama-3.1-8B-Instruct``.
    name: str
    #: The prompt form used when a request leaves ``raw`` unset.
    prompt_form: PromptForm
    #: Why that form (shown with the summary of a trace that used it).
    reason: str = ""
    #: Ships with the project (loads offline, no hub needed).
    bundled: bool = False


KNOWN_MODELS: tuple[ModelProfile, ...] = (
    ModelProfile(
        name="HuggingFaceTB/SmolLM2-135M-Instruct", prompt_form="raw", bundled=True,
        reason="the bundled Q4 GGUF answers in completion form, not in its chat form",
    ),
    ModelProfile(name="meta-llama/Llama-3.1-8B-Instruct", prompt_form="chat", reason="instruct model"),
    ModelProfile(name="Qwen/Qwen3-32B", prompt_form="chat", reason="instruct model"),
)


def _normalized(name: str) -> str:
    """``org/name``, ``name`` or a cache folder ``org--name`` -> lowercase ``name``."""
    last = name.strip().rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return last.rsplit("--", 1)[-1].lower()


def model_profile(name: str) -> ModelProfile | None:
    """The profile of a known model: by hub id, by its name without the organisation, or by a
    local folder named like either (the model cache's ``org--name`` folders included)."""
    if not name:
        return None
    key = name.strip().lower()
    for profile in KNOWN_MODELS:
        if profile.name.lower() == key:
            return profile
    short = _normalized(name)
    matches = [p for p in KNOWN_MODELS if _normalized(p.name) == short]
    return matches[0] if len(matches) == 1 else None


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptFormChoice:
    """The prompt form a trace uses and where it came from."""

    form: PromptForm
    #: request (the caller set raw), model (the model's profile) or template (has / lacks a chat template).
    source: Literal["request", "model", "template"]
    #: One phrase for people, e.g. "raw completion (SmolLM2-135M-Instruct's default: ...)".
    description: str

    @property
    def raw(self) -> bool:
        return self.form == "raw"


def choose_prompt_form(model_name: str, raw: bool | None, *, has_chat_template: bool) -> PromptFormChoice:
    """Resolve a request's tri-state ``raw`` for ``model_name`` (see the module docstring)."""
    if raw is not None:
        form: PromptForm = "raw" if raw else "chat"
        return PromptFormChoice(form=form, source="request", description=_form_words(form) + " (as requested)")
    profile = model_profile(model_name)
    if profile is not None:
        short = profile.name.rsplit("/", 1)[-1]
        why = f": {profile.reason}" if profile.reason else ""
        return PromptFormChoice(
            form=profile.prompt_form, source="model", description=f"{_form_words(profile.prompt_form)} ({short}'s default{why})"
        )
    if has_chat_template:
        return PromptFormChoice(form="chat", source="template", description="chat template (the model has one)")
    return PromptFormChoice(form="raw", source="template", description="raw completion (the model has no chat template)")


def _form_words(form: PromptForm) -> str:
    return "raw completion" if form == "raw" else "chat template"


def nearest_model_names(name: str, candidates: Iterable[str] = (), *, n: int = 3) -> list[str]:
    """Known and locally available model names closest to ``name`` (best first, at most ``n``)."""
    pool = list(dict.fromkeys([*(p.name for p in KNOWN_MODELS), *candidates]))
    by_short: dict[str, list[str]] = {}
    for candidate in pool:
        by_short.setdefault(_normalized(candidate), []).append(candidate)
    found: list[str] = []
    for short in difflib.get_close_matches(_normalized(name), list(by_short), n=n, cutoff=0.6):
        found += by_short[short]
    for full in difflib.get_close_matches(name, pool, n=n, cutoff=0.6):
        if full not in found:
            found.append(full)
    return found[:n]
