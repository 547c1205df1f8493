"""A local stand-in LLM server for tests and benchmarks (no network, no API key needed).

:class:`StandInLLMServer` is a real HTTP server on ``127.0.0.1`` (port 0 by default) that speaks
enough of the Anthropic Messages API (``POST /v1/messages``) and the OpenAI chat completions API
(``POST /v1/chat/completions``) for the official SDKs pointed at ``base_url``:

    with StandInLLMServer(latency=0.05) as server:
        client = anthropic.Anthropic(base_url=server.base_url, api_key="test", max_retries=0)
        server.fail_next("429", "500")          # scripted failures, consumed in order
        ...
        server.requests                          # every request seen (path, unit, pass, status)

Answers come from ``responder(request) -> str | StandInReply``. The default, :func:`labeler_responder`,
answers labeller prompts (``Task: output|input`` / ``Neuron: L{l}/N{i}``) with a valid JSON label
that names the neuron, and anything else with a short fixed text. Tool use works in both APIs: the
request's ``tools`` are recorded, :meth:`StandInRequest.tool_exchanges` reads the calls and results
of the conversation so far, and a :class:`StandInReply` with ``tool_calls`` is sent back as
Anthropic ``tool_use`` blocks or OpenAI ``tool_calls``. :class:`ScriptedScientist` is a responder
that investigates a neuron through the neuron scientist's tools. Faults: ``"429"``, ``"500"``,
``"503"``, ``"400"``, ``"401"``, ``"malformed"`` (HTTP 200 whose text is not JSON), ``"timeout"``
(hold the connection ``hang_seconds``). Token usage is ``len(text) // 4 + 1`` per side.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_UNIT = re.compile(r"Neuron: L(\d+)/N(\d+)")
_TASK = re.compile(r"Task: (output|input|score)")
_MARKED = re.compile(r"\[\[(.*?)\]\]")
_EXPLANATION = re.compile(r"^Explanation: (.*)$", re.MULTILINE)
_SNIPPET = re.compile(r"^\d+\. (\".*\")$", re.MULTILINE)
FAULTS = ("429", "500", "503", "400", "401", "malformed", "timeout")


@dataclass(frozen=True, slots=True, kw_only=True)
class StandInReply:
    """A scripted answer: text and tool calls ``(name, arguments)``; arguments that are not a dict
    are sent as they are (a malformed call)."""

    text: str = ""
    tool_calls: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolExchange:
    """One tool call of the conversation so far, with the result sent back for it ("" if none yet)."""

    name: str
    arguments: Any
    result: str = ""
    is_error: bool = False

    def result_json(self) -> Any:
        """The result parsed as JSON (None when it is not JSON)."""
        try:
            return json.loads(self.result)
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True, kw_only=True)
class StandInRequest:
    """One request as the stand-in saw it."""

    api: str  # "anthropic" | "openai"
    model: str
    system: str
    messages: tuple[dict, ...]
    #: (layer, neuron) named in the first user message, if any.
    unit: tuple[int, int] | None
    #: "output" | "input" | None
    label_pass: str | None
    #: HTTP status sent back ("timeout" requests record 0).
    status: int = 200
    fault: str | None = None
    auth: str = ""
    #: The OpenAI ``response_format`` the client asked for, if any.
    response_format: dict | None = None
    #: Names of the tools the request offered (empty: no tool use).
    tools: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        first = self.messages[0]["content"] if self.messages else ""
        return first if isinstance(first, str) else json.dumps(first)

    def tool_exchanges(self) -> list[ToolExchange]:
        """Every tool call made so far in the conversation, in order, with its result."""
        calls: list[tuple[str, str, Any]] = []
        results: dict[str, tuple[str, bool]] = {}
        for message in self.messages:
            content = message.get("content")
            if self.api == "anthropic":
                for block in content if isinstance(content, list) else ():
                    if block.get("type") == "tool_use":
                        calls.append((str(block.get("id")), str(block.get("name")), block.get("input")))
                    elif block.get("type") == "tool_result":
                        text = block.get("content")
                        if isinstance(text, list):
                            text = "".join(part.get("text", "") for part in text)
                        results[str(block.get("tool_use_id"))] = (str(text or ""), bool(block.get("is_error")))
            else:
                for call in message.get("tool_calls") or ():
                    function = call.get("function") or {}
                    raw = function.get("arguments", "")
                    try:
                        arguments = json.loads(raw) if isinstance(raw, str) else raw
                    except ValueError:
                        arguments = raw
                    calls.append((str(call.get("id")), str(function.get("name")), arguments))
                if message.get("role") == "tool":
                    text = str(content or "")
                    error = text.startswith("ERROR: ")
                    results[str(message.get("tool_call_id"))] = (text.removeprefix("ERROR: "), error)
        out = []
        for call_id, name, arguments in calls:
            text, error = results.get(call_id, ("", False))
            out.append(ToolExchange(name=name, arguments=arguments, result=text, is_error=error))
        return out


def count_tokens(text: str) -> int:
    return len(text) // 4 + 1


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^\w]+", text.lower()) if w}


def scorer_answer(prompt: str) -> str:
    """A deterministic keyword scorer: for each snippet, 10 when its marked token is a word of the
    explanation, else 0. (A correct "fires on 'cat'" label then predicts the cat neuron; a label
    about something else predicts nothing.)"""
    match = _EXPLANATION.search(prompt)
    explanation = _words(json.loads(match[1])) if match else set()
    predictions = []
    for snippet in _SNIPPET.findall(prompt):
        marked = _MARKED.search(json.loads(snippet))
        token = marked[1].strip().lower() if marked else ""
        predictions.append(10 if token and token in explanation else 0)
    return json.dumps({"predictions": predictions})


def labeler_responder(request: StandInRequest) -> str:
    """A valid JSON answer for labeller prompts; plain text for anything else.

    Input-pass prompts that show corpus exemplars get the label ``fires on the token <token>`` naming the
    most frequent marked token among them (ties: first seen); scoring prompts get
    :func:`scorer_answer`."""
    if request.label_pass == "score":
        return scorer_answer(request.prompt)
    if request.unit is None or request.label_pass is None:
        return "Stand-in analysis: the circuit routes the prompt's subject to the answer token."
    layer, neuron = request.unit
    marked = [m.strip() for m in _MARKED.findall(request.prompt) if m.strip() and m != "like this"]
    if request.label_pass == "input" and marked:
        token = max(dict.fromkeys(marked), key=marked.count)
        return json.dumps({
            "label": f"fires on the token {token}",
            "description": f"Fires on the token {token!r} in the corpus contexts shown.",
            "type": "token-pattern",
            "confidence": "high",
        })
    kind = "semantic" if request.label_pass == "output" else "context"
    return json.dumps({
        "label": f"{request.label_pass} L{layer}/N{neuron}",
        "description": f"Stand-in {request.label_pass} description of L{layer}/N{neuron}.",
        "type": kind,
        "confidence": "medium",
    })


def _tool_name(tool: dict) -> str:
    function = tool.get("function")
    return str((function or {}).get("name") if isinstance(function, dict) else tool.get("name", ""))


class StandInLLMServer:
    """Threaded HTTP stand-in for the Anthropic and OpenAI chat APIs (see module docstring)."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        responder: Callable[[StandInRequest], str | StandInReply] = labeler_responder,
        hang_seconds: float = 5.0,
        fault_for: Callable[[StandInRequest], str | None] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.latency = latency
        self.responder = responder
        self.hang_seconds = hang_seconds
        self.fault_for = fault_for
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self.requests: list[StandInRequest] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                outer._handle(self)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # many concurrent clients connect at once
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that went away (killed, timed out) are part of the script

        self._httpd = Server((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """Anthropic SDK base_url (the SDK appends /v1/messages)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """OpenAI SDK base_url (the SDK appends /chat/completions)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> StandInLLMServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="standin-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> StandInLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting ---------------------------------------------------------------------------------
    def fail_next(self, *faults: str) -> None:
        """Apply these faults to the next requests, one each, in order."""
        for fault in faults:
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; use one of {FAULTS}")
        with self._lock:
            self._faults.extend(faults)

    def answered(self, *, label_pass: str | None = None) -> list[StandInRequest]:
        """Requests answered with HTTP 200 (optionally of one pass)."""
        with self._lock:
            return [r for r in self.requests if r.status == 200 and (label_pass is None or r.label_pass == label_pass)]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._faults.clear()

    # -- handling ----------------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        length = int(handler.headers.get("content-length") or 0)
        try:
            body = json.loads(handler.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._send(handler, 400, {"error": {"type": "invalid_request_error", "message": "body is not JSON"}})
            return
        if path.endswith("/v1/messages"):
            api = "anthropic"
            system = body.get("system") or ""
            if isinstance(system, list):
                system = "".join(part.get("text", "") for part in system)
            messages = tuple(body.get("messages") or ())
        elif path.endswith("/chat/completions"):
            api = "openai"
            all_messages = list(body.get("messages") or ())
            system = "".join(m.get("content", "") for m in all_messages if m.get("role") == "system")
            messages = tuple(m for m in all_messages if m.get("role") != "system")
        else:
            self._send(handler, 404, {"error": {"type": "not_found_error", "message": f"no route {path}"}})
            return
        first = messages[0].get("content", "") if messages else ""
        first = first if isinstance(first, str) else json.dumps(first)
        unit_match, task_match = _UNIT.search(first), _TASK.search(first)
        request = StandInRequest(
            api=api,
            model=str(body.get("model", "")),
            system=system,
            messages=messages,
            unit=(int(unit_match[1]), int(unit_match[2])) if unit_match else None,
            label_pass=task_match[1] if task_match else None,
            auth="present" if (handler.headers.get("x-api-key") or handler.headers.get("authorization")) else "",
            response_format=body.get("response_format") if isinstance(body.get("response_format"), dict) else None,
            tools=tuple(_tool_name(t) for t in body.get("tools") or () if isinstance(t, dict)),
        )
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is None and self.fault_for is not None:
            fault = self.fault_for(request)
        if self.latency:
            time.sleep(self.latency)
        if fault == "timeout":
            self._record(request, 0, fault)
            time.sleep(self.hang_seconds)
            try:
                handler.close_connection = True
                self._send(handler, 504, {"error": {"type": "timeout", "message": "stand-in hung"}})
            except OSError:
                pass
            return
        if fault in ("429", "500", "503", "400", "401"):
            status = int(fault)
            self._record(request, status, fault)
            kind = {429: "rate_limit_error", 401: "authentication_error", 400: "invalid_request_error"}.get(status, "api_error")
            headers = {"retry-after": "0"} if status == 429 else {}
            self._send(handler, status, {"type": "error", "error": {"type": kind, "message": f"stand-in {status}"}}, headers)
            return
        answer = "I think this neuron is about things." if fault == "malformed" else self.responder(request)
        reply = answer if isinstance(answer, StandInReply) else StandInReply(text=str(answer))
        self._record(request, 200, fault)
        prompt_text = system + json.dumps(body.get("tools") or "") + "".join(json.dumps(m.get("content", "")) for m in messages)
        calls = [(f"call_{uuid.uuid4().hex[:16]}", name, arguments) for name, arguments in reply.tool_calls]
        in_tok = count_tokens(prompt_text)
        out_tok = count_tokens(reply.text + "".join(json.dumps(a) if not isinstance(a, str) else a for _i, _n, a in calls))
        if api == "anthropic":
            content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text or not calls else []
            content += [{"type": "tool_use", "id": i, "name": n, "input": a} for i, n, a in calls]
            payload = {
                "id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
                "model": request.model, "content": content,
                "stop_reason": "tool_use" if calls else "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": in_tok, "output_tokens": out_tok},
            }
        else:
            message: dict[str, Any] = {"role": "assistant", "content": reply.text or (None if calls else "")}
            if calls:
                message["tool_calls"] = [
                    {"id": i, "type": "function",
                     "function": {"name": n, "arguments": a if isinstance(a, str) else json.dumps(a)}}
                    for i, n, a in calls
                ]
            payload = {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": request.model,
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
                "usage": {"prompt_tokens": in_tok, "completion_tokens": out_tok, "total_tokens": in_tok + out_tok},
            }
        self._send(handler, 200, payload)

    def _record(self, request: StandInRequest, status: int, fault: str | None) -> None:
        from dataclasses import replace

        with self._lock:
            self.requests.append(replace(request, status=status, fault=fault))

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()


def _tool_payload(exchange: ToolExchange) -> Any:
    """The JSON part of a neuron-scientist tool result (the text after the summary line)."""
    _summary, _, body = exchange.result.partition("\n")
    try:
        return json.loads(body)
    except ValueError:
        return None


class ScriptedScientist:
    """A responder that investigates a neuron through every neuron-scientist tool, deciding each
    step from the tool results so far (so it works on any model, and resumes from any point):

    context (atlas_info, exemplars, projections) -> run_prompts(``probes``) -> hypothesis "fires on
    the token T" (T = the token of the largest activation measured) -> predict (``fillers`` with
    and without T) -> test_prediction -> intervene (ablate on a firing prompt, steer on a silent
    one) -> patch -> attribute -> hypothesis update -> finish (label ``fires on the token T``,
    confidence from the score). ``preamble`` replies are sent first (one per assistant turn), to
    inject malformed or unknown calls. For real models, ``contexts`` (sentences with one ``{}``)
    and ``alternatives`` (words put in place of T) replace the filler-word prompts.
    """

    def __init__(self, *, probes: list[str], fillers: list[str], preamble: list[StandInReply] | None = None,
                 contexts: list[str] | None = None, alternatives: list[str] | None = None) -> None:
        self.probes = list(probes)
        self.fillers = list(fillers)
        self.preamble = list(preamble or [])
        self.contexts = list(contexts or [])
        self.alternatives = list(alternatives or [])

    def _prompts(self, token: str) -> tuple[list[str], list[str], str, str]:
        """(fire prompts, silent prompts, prompt ending in the token, the same ending in another word)."""
        if self.contexts and self.alternatives:
            fire = [c.format(token) for c in self.contexts][:4]
            silent = [c.format(a) for c, a in zip(self.contexts, self.alternatives)][:4]
            head = self.contexts[0].split("{}")[0]
            return fire, silent, head + token, head + self.alternatives[0]
        f = self.fillers
        fire = [f"{a} {token} {b}" for a, b in zip(f, f[1:] + f[:1])][:4]
        silent = [f"{a} {b}" for a, b in zip(f, f[2:] + f[:2])][:4]
        return fire, silent, f"{f[0]} {token}", f"{f[0]} {f[1]}"

    def __call__(self, request: StandInRequest) -> StandInReply:
        turns = sum(1 for m in request.messages if m.get("role") == "assistant")
        if turns < len(self.preamble):
            return self.preamble[turns]
        done: dict[str, list[ToolExchange]] = {}
        seen = set()
        for ex in request.tool_exchanges():
            seen.add(ex.name)
            if not ex.is_error:
                done.setdefault(ex.name, []).append(ex)
        if not {"atlas_info", "exemplars", "projections"} & seen and "run_prompts" not in done:
            return StandInReply(text="Looking at what is known first.",
                                tool_calls=(("atlas_info", {}), ("exemplars", {"count": 8}), ("projections", {"top_k": 5})))
        if "run_prompts" not in done:
            return StandInReply(text="Probing with varied prompts.", tool_calls=(("run_prompts", {"prompts": self.probes}),))
        token = self._token(done)
        fire, silent, ending, other = self._prompts(token)
        if "hypothesis" not in done:
            return StandInReply(text=f"The largest activation was on {token!r}.",
                                tool_calls=(("hypothesis", {"statement": f"fires on the token {token}"}),))
        if "predict" not in done:
            return StandInReply(text="Pre-registering predictions.",
                                tool_calls=(("predict", {"hypothesis_id": "H1", "fires_on": fire, "silent_on": silent}),))
        if "test_prediction" not in done:
            pid = (_tool_payload(done["predict"][-1]) or {}).get("prediction_id", "P1")
            return StandInReply(tool_calls=(("test_prediction", {"prediction_id": pid}),))
        if len(done.get("intervene", [])) < 2:
            top = max((_tool_payload(done["run_prompts"][0]) or {}).get("prompts", []) or [{}],
                      key=lambda r: r.get("max_activation") or 0.0).get("max_activation") or 1.0
            return StandInReply(text="Ablating and steering.", tool_calls=(
                ("intervene", {"prompt": fire[0], "mode": "zero", "generate_tokens": 4}),
                ("intervene", {"prompt": silent[0], "mode": "set", "value": round(2 * top, 4), "generate_tokens": 4}),
            ))
        if "patch" not in done:
            return StandInReply(tool_calls=(("patch", {"source_prompt": ending, "target_prompt": other}),))
        if "attribute" not in done:
            return StandInReply(tool_calls=(("attribute", {"prompt": ending}),))
        score = _tool_payload(done["test_prediction"][-1]) or {}
        correct, total = score.get("correct", 0), score.get("total", 0)
        if len(done["hypothesis"]) < 2:
            status = "supported" if total and correct == total else "refuted"
            return StandInReply(tool_calls=(("hypothesis", {"id": "H1", "status": status,
                                                            "note": f"{correct}/{total} predictions came true"}),))
        return StandInReply(text="Done.", tool_calls=(("finish", {
            "label": f"fires on the token {token}",
            "description": f"The neuron fires on the token {token!r}; {correct} of {total} pre-registered predictions "
                           "came true.",
            "confidence": "high" if total and correct == total else "low",
            "hypothesis_id": "H1",
        }),))

    @staticmethod
    def _token(done: dict[str, list[ToolExchange]]) -> str:
        rows = (_tool_payload(done["run_prompts"][0]) or {}).get("prompts", [])
        best = max(rows, key=lambda r: r.get("max_activation") or float("-inf"), default={})
        return str(best.get("max_token", "")).strip() or "?"
