"""LLM backends (Anthropic Messages API, OpenAI-compatible chat completions), retries and budget.

Both backends use the official SDKs with ``max_retries=0``; :class:`RetryingLLM` does the retrying
itself (exponential backoff with jitter, honouring ``Retry-After``) on 429, 408/409, 5xx,
timeouts and connection errors. 401/403/404 stop the whole run (:class:`FatalLLMError`); other
4xx fail only the one request. :class:`Budget` counts tokens and estimated spend and says when
the configured limit is reached. The API key is resolved once, handed to the SDK and never
stored in a repr, log line or cache record.

Tool use (the neuron scientist): :meth:`complete_with_tools` sends a conversation of
:class:`AgentMessage` (text, tool calls, tool results) with :class:`ToolDefinition` JSON schemas
as Anthropic ``tools`` / ``tool_use`` / ``tool_result`` blocks, or as OpenAI-compatible
``tools`` / ``tool_calls`` / ``role: tool`` messages, and returns a :class:`ToolCompletion`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from circuits_core.config import LabelingSection, env_setting
from circuits_core.errors import ConfigError, Unauthenticated

log = logging.getLogger("circuits_labeler.llm")


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    text: str
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    role: str  # "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolDefinition:
    """A tool the model may call: its name, what it does, and the JSON schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    """One tool call of the model. ``arguments`` is the parsed JSON object, or the raw text when
    the model sent arguments that are not a JSON object (the caller refuses those)."""

    id: str
    name: str
    arguments: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolResult:
    """The answer to one tool call, sent back to the model."""

    call_id: str
    content: str
    is_error: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentMessage:
    """One turn of a tool-using conversation: the assistant's text and tool calls, or the user's
    text and the results of the previous turn's calls."""

    role: str  # "user" | "assistant"
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_results: tuple[ToolResult, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCompletion:
    """The model's answer in a tool-using conversation."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    input_tokens: int
    output_tokens: int
    #: The backend's reason for stopping (end_turn / tool_use / stop / tool_calls / max_tokens ...).
    stop_reason: str = ""


class LLMBackend(Protocol):
    """One chat completion per call; raises the SDK's exceptions unchanged."""

    model: str

    async def complete(self, *, system: str, messages: Sequence[ChatMessage], max_tokens: int,
                       response_schema: dict[str, Any] | None = None) -> Completion:
        """``response_schema``: the JSON schema of the expected answer (default: a label), used
        by backends that constrain answers (OpenAI-compatible with json_mode); others ignore it."""
        ...

    async def complete_with_tools(self, *, system: str, messages: Sequence[AgentMessage],
                                  tools: Sequence[ToolDefinition], max_tokens: int) -> ToolCompletion:
        """One turn of a tool-using conversation."""
        ...

    async def aclose(self) -> None: ...


class LLMRequestError(Exception):
    """A request failed for good (retries exhausted or a non-retryable 4xx); only this neuron fails."""


class FatalLLMError(Exception):
    """The backend refuses every request (bad key, unknown model); the run must stop."""


def resolve_api_key(settings: LabelingSection, *, base_dir: Path | None = None, required: bool) -> str:
    """The API key from ``api_key_file`` (a mounted secret) or the ``api_key_env`` variable."""
    if settings.api_key_file:
        path = Path(settings.api_key_file).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError:
            raise ConfigError(f"labeling.api_key_file: cannot read {path}") from None
        if not key:
            raise ConfigError(f"labeling.api_key_file: {path} is empty")
        return key
    key = env_setting(settings.api_key_env).strip() if settings.api_key_env else ""
    if not key and required:
        raise Unauthenticated(
            f"no API key: set {settings.api_key_env or 'ANTHROPIC_API_KEY'} or labeling.api_key_file"
        )
    return key


class AnthropicBackend:
    """Anthropic Messages API through the ``anthropic`` SDK (any compatible base_url)."""

    def __init__(self, *, model: str, api_key: str, base_url: str = "", timeout: float = 120.0) -> None:
        self.model = model
        self._api_key = api_key
        self._base_url = base_url or None
        self._timeout = timeout
        self._client: Any = None

    def __repr__(self) -> str:
        return f"AnthropicBackend(model={self.model!r}, base_url={self._base_url!r})"

    def _sdk(self) -> Any:
        if self._client is None:
            import anthropic

            self._client = anthropic.AsyncAnthropic(
                api_key=self._api_key, base_url=self._base_url, max_retries=0, timeout=self._timeout
            )
        return self._client

    async def complete(self, *, system: str, messages: Sequence[ChatMessage], max_tokens: int,
                       response_schema: dict[str, Any] | None = None) -> Completion:
        response = await self._sdk().messages.create(
            model=self.model,
            max_tokens=max_tokens,
            system=system,
            messages=[{"role": m.role, "content": m.content} for m in messages],
        )
        text = "".join(getattr(block, "text", "") for block in response.content)
        usage = response.usage
        return Completion(text=text, input_tokens=usage.input_tokens or 0, output_tokens=usage.output_tokens or 0)

    async def complete_with_tools(self, *, system: str, messages: Sequence[AgentMessage],
                                  tools: Sequence[ToolDefinition], max_tokens: int) -> ToolCompletion:
        response = await self._sdk().messages.create(
            model=self.model,
            max_tokens=max_tokens,
            system=system,
            messages=anthropic_messages(messages),
            tools=[{"name": t.name, "description": t.description, "input_schema": dict(t.parameters)} for t in tools],
        )
        texts, calls = [], []
        for block in response.content:
            kind = getattr(block, "type", "")
            if kind == "text":
                texts.append(block.text)
            elif kind == "tool_use":
                calls.append(ToolCall(id=str(block.id), name=str(block.name), arguments=block.input))
        usage = response.usage
        return ToolCompletion(text="".join(texts), tool_calls=tuple(calls), input_tokens=usage.input_tokens or 0,
                              output_tokens=usage.output_tokens or 0, stop_reason=str(response.stop_reason or ""))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _answer_schema() -> dict[str, Any]:
    from circuits_labeler.prompts import INPUT_TYPES, MAX_LABEL_CHARS, OUTPUT_TYPES

    return {
        "type": "object",
        "properties": {
            "label": {"type": "string", "minLength": 1, "maxLength": MAX_LABEL_CHARS},
            "description": {"type": "string"},
            "type": {"type": "string", "enum": [*OUTPUT_TYPES, *INPUT_TYPES]},
            "confidence": {"type": "string", "enum": ["low", "medium", "high"]},
        },
        "required": ["label", "description", "type", "confidence"],
        "additionalProperties": False,
    }


#: With json_mode, OpenAI-compatible servers (vLLM structured outputs, OpenAI) are asked for an
#: answer that matches the schema of a label, so even small models return parseable answers.
ANSWER_RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "neuron_label", "schema": _answer_schema(), "strict": True},
}


class OpenAIBackend:
    """OpenAI-compatible chat completions (OpenAI, vLLM, ...) through the ``openai`` SDK."""

    def __init__(
        self, *, model: str, api_key: str, base_url: str = "", timeout: float = 120.0, json_mode: bool = False
    ) -> None:
        self.model = model
        self._api_key = api_key or "EMPTY"  # local servers (vLLM) accept any key
        self._base_url = base_url or None
        self._timeout = timeout
        self._json_mode = json_mode
        self._client: Any = None

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self._base_url!r})"

    def _sdk(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.AsyncOpenAI(
                api_key=self._api_key, base_url=self._base_url, max_retries=0, timeout=self._timeout
            )
        return self._client

    async def complete(self, *, system: str, messages: Sequence[ChatMessage], max_tokens: int,
                       response_schema: dict[str, Any] | None = None) -> Completion:
        self._sdk()
        extra: dict[str, Any] = {}
        if self._json_mode:
            extra["response_format"] = ANSWER_RESPONSE_FORMAT if response_schema is None else {
                "type": "json_schema", "json_schema": {"name": "answer", "schema": response_schema, "strict": True},
            }
        response = await self._client.chat.completions.create(
            model=self.model,
            max_completion_tokens=max_tokens,
            messages=[{"role": "system", "content": system}, *({"role": m.role, "content": m.content} for m in messages)],
            **extra,
        )
        text = response.choices[0].message.content or "" if response.choices else ""
        usage = response.usage
        return Completion(
            text=text,
            input_tokens=(usage.prompt_tokens or 0) if usage else 0,
            output_tokens=(usage.completion_tokens or 0) if usage else 0,
        )

    async def complete_with_tools(self, *, system: str, messages: Sequence[AgentMessage],
                                  tools: Sequence[ToolDefinition], max_tokens: int) -> ToolCompletion:
        response = await self._sdk().chat.completions.create(
            model=self.model,
            max_completion_tokens=max_tokens,
            messages=openai_messages(system, messages),
            tools=[{"type": "function", "function": {"name": t.name, "description": t.description,
                                                     "parameters": dict(t.parameters)}} for t in tools],
        )
        usage = response.usage
        in_tok = (usage.prompt_tokens or 0) if usage else 0
        out_tok = (usage.completion_tokens or 0) if usage else 0
        if not response.choices:
            return ToolCompletion(text="", tool_calls=(), input_tokens=in_tok, output_tokens=out_tok, stop_reason="empty")
        choice = response.choices[0]
        calls = []
        for n, call in enumerate(choice.message.tool_calls or ()):
            function = getattr(call, "function", None)
            raw = getattr(function, "arguments", "") or ""
            calls.append(ToolCall(id=str(call.id or f"call_{n}"), name=str(getattr(function, "name", "") or ""),
                                  arguments=parse_tool_arguments(raw)))
        return ToolCompletion(text=choice.message.content or "", tool_calls=tuple(calls), input_tokens=in_tok,
                              output_tokens=out_tok, stop_reason=str(choice.finish_reason or ""))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def parse_tool_arguments(raw: Any) -> Any:
    """Arguments of a tool call as sent: a JSON object string becomes a dict; anything else (not
    JSON, a JSON list or number) is returned unchanged for the caller to refuse."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if not isinstance(raw, str):
        return raw
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return value if isinstance(value, dict) else raw


def _arguments_object(arguments: Any) -> dict[str, Any]:
    # A call whose arguments were not an object is replayed with the raw text kept visible.
    return dict(arguments) if isinstance(arguments, Mapping) else {"unparsed_arguments": str(arguments)}


def anthropic_messages(messages: Sequence[AgentMessage]) -> list[dict[str, Any]]:
    """The conversation as Anthropic Messages API ``messages`` (content blocks)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        blocks: list[dict[str, Any]] = []
        for result in message.tool_results:
            blocks.append({"type": "tool_result", "tool_use_id": result.call_id, "content": result.content,
                           **({"is_error": True} if result.is_error else {})})
        if message.text:
            blocks.append({"type": "text", "text": message.text})
        for call in message.tool_calls:
            blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": _arguments_object(call.arguments)})
        if not blocks:
            blocks.append({"type": "text", "text": "(no text)"})
        out.append({"role": message.role, "content": blocks})
    return out


def openai_messages(system: str, messages: Sequence[AgentMessage]) -> list[dict[str, Any]]:
    """The conversation as OpenAI chat ``messages`` (tool results become ``role: tool`` messages)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for message in messages:
        for result in message.tool_results:
            content = ("ERROR: " + result.content) if result.is_error else result.content
            out.append({"role": "tool", "tool_call_id": result.call_id, "content": content})
        if message.role == "assistant":
            entry: dict[str, Any] = {"role": "assistant", "content": message.text or None}
            if message.tool_calls:
                entry["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {
                        "name": c.name, "arguments": json.dumps(_arguments_object(c.arguments))}}
                    for c in message.tool_calls
                ]
            elif not message.text:
                entry["content"] = "(no text)"
            out.append(entry)
        elif message.text or not message.tool_results:
            out.append({"role": "user", "content": message.text or "(no text)"})
    return out


def create_backend(settings: LabelingSection, *, base_dir: Path | None = None) -> LLMBackend:
    """The backend chosen by ``labeling.backend`` with its key resolved."""
    if settings.backend == "anthropic":
        return AnthropicBackend(
            model=settings.model,
            api_key=resolve_api_key(settings, base_dir=base_dir, required=True),
            base_url=settings.base_url,
            timeout=settings.request_timeout,
        )
    if settings.backend == "openai":
        return OpenAIBackend(
            model=settings.model,
            api_key=resolve_api_key(settings, base_dir=base_dir, required=False),
            base_url=settings.base_url,
            timeout=settings.request_timeout,
            json_mode=settings.json_mode,
        )
    raise ConfigError(f"labeling.backend: unknown backend {settings.backend!r}")


# -- budget -----------------------------------------------------------------------------------
class Budget:
    """Tokens and estimated USD spent; ``exhausted`` once a non-zero limit is reached (thread-safe)."""

    def __init__(
        self,
        *,
        max_tokens_total: int = 0,
        max_spend_usd: float = 0.0,
        input_price_per_mtok: float = 0.0,
        output_price_per_mtok: float = 0.0,
    ) -> None:
        self.max_tokens_total = max_tokens_total
        self.max_spend_usd = max_spend_usd
        self.input_price = input_price_per_mtok / 1e6
        self.output_price = output_price_per_mtok / 1e6
        self.input_tokens = 0
        self.output_tokens = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: LabelingSection) -> Budget:
        return cls(
            max_tokens_total=settings.max_tokens_total,
            max_spend_usd=settings.max_spend_usd,
            input_price_per_mtok=settings.input_price_per_mtok,
            output_price_per_mtok=settings.output_price_per_mtok,
        )

    def charge(self, input_tokens: int, output_tokens: int) -> None:
        with self._lock:
            self.input_tokens += max(0, int(input_tokens))
            self.output_tokens += max(0, int(output_tokens))

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def spend_usd(self) -> float:
        return self.input_tokens * self.input_price + self.output_tokens * self.output_price

    @property
    def exhausted(self) -> bool:
        if self.max_tokens_total and self.tokens >= self.max_tokens_total:
            return True
        return bool(self.max_spend_usd) and self.spend_usd >= self.max_spend_usd

    def describe(self) -> str:
        return f"{self.tokens} tokens ({self.input_tokens} in, {self.output_tokens} out), ${self.spend_usd:.4f}"


# -- retries ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max_retries: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds before retry number ``retry`` (0-based): full-jitter exponential, at least Retry-After."""
        ceiling = min(self.max_delay, self.base_delay * (2**retry))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay))
        return delay


_RETRYABLE_STATUS = {408, 409, 429}
_FATAL_STATUS = {401, 403, 404}


def classify_error(exc: BaseException) -> str:
    """'retry', 'fatal' or 'fail' for an SDK exception (either SDK; duck-typed on status_code)."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        if status in _RETRYABLE_STATUS or status >= 500:
            return "retry"
        if status in _FATAL_STATUS:
            return "fatal"
        return "fail"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"APITimeoutError", "APIConnectionError", "TimeoutException", "TimeoutError", "ConnectError"}:
        return "retry"
    return "fail"


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class RetryingLLM:
    """Wraps a backend: retries transient failures, counts requests/retries, charges the budget."""

    def __init__(
        self,
        backend: LLMBackend,
        *,
        policy: RetryPolicy,
        budget: Budget,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.budget = budget
        self._sleep = sleep
        self.requests = 0
        self.retries = 0

    async def complete(self, *, system: str, messages: Sequence[ChatMessage], max_tokens: int,
                       response_schema: dict[str, Any] | None = None) -> Completion:
        extra = {"response_schema": response_schema} if response_schema is not None else {}
        return await self._with_retries(
            lambda: self.backend.complete(system=system, messages=messages, max_tokens=max_tokens, **extra)
        )

    async def complete_with_tools(self, *, system: str, messages: Sequence[AgentMessage],
                                  tools: Sequence[ToolDefinition], max_tokens: int) -> ToolCompletion:
        """One tool-use turn, retried like :meth:`complete` and charged to the budget."""
        return await self._with_retries(
            lambda: self.backend.complete_with_tools(system=system, messages=messages, tools=tools, max_tokens=max_tokens)
        )

    async def _with_retries(self, call: Callable[[], Awaitable[Any]]) -> Any:
        retry = 0
        while True:
            self.requests += 1
            try:
                completion = await call()
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = classify_error(exc)
                summary = _summarise(exc)
                if kind == "fatal":
                    raise FatalLLMError(f"LLM backend refused the request: {summary}") from None
                if kind == "retry" and retry < self.policy.max_retries:
                    delay = self.policy.delay(retry, _retry_after(exc))
                    log.info("LLM request failed (%s); retry %d in %.2fs", summary, retry + 1, delay)
                    self.retries += 1
                    retry += 1
                    await self._sleep(delay)
                    continue
                raise LLMRequestError(summary) from None
            self.budget.charge(completion.input_tokens, completion.output_tokens)
            return completion

    async def aclose(self) -> None:
        await self.backend.aclose()


def _summarise(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    return f"{name} (HTTP {status})" if status is not None else name
