"""The HTTP front end of `lm serve`: OpenAI's JSON in and out, over Starlette; the library does the work.

Routes: `GET /v1/models` (and `/v1/models/{id}`), `POST /v1/chat/completions` (runs with a chat format)
and `POST /v1/completions` (any run), each answered whole or streamed as server-sent events. A request
is parsed and checked here, rendered to ids by `lm.chat.render` (chat) or `lm.generate.encode_prompt`
(completions), and submitted to the run's `lm.serving.Scheduler`, which decodes on its own worker
thread; the updates it sends come back to this event loop through an asyncio queue
(`call_soon_threadsafe`), so the loop never waits on the model. A client that goes away cancels its
request: streamed ones when Starlette sees the disconnect, whole ones by a check every
`DISCONNECT_POLL_S`.

Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: 400 for a body that is
not JSON or a bad value (and a prompt that leaves no room in the context), 401 for a missing or
wrong key, 404 for an unknown model or route, 429 when the run's queue is full. Each request is
logged as one line: method, path, status, model, tokens and seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lm.chat import ChatFormat, chat_token_ids, conversation_problem, render
from lm.errors import InputError, UsageError
from lm.generate import encode_prompt
from lm.sampling import SamplingConfig
from lm.serving import ContextOverflow, GenerationRequest, QueueFull, Scheduler, Update
from lm.tokenizer import Tokenizer

LOG = logging.getLogger("lm.serve")
DISCONNECT_POLL_S = 0.5  # how often a whole (non-streamed) answer checks that its client is still there
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_STOPS = 4  # OpenAI's limit on `stop` strings
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ServedRun:
    """One model the server answers for, by `name` (the `model` of requests)."""

    name: str
    tokenizer: Tokenizer
    scheduler: Scheduler
    chat_format: ChatFormat | None  # None: a base run, completions only
    created: int = field(default_factory=lambda: int(time.time()))  # for /v1/models

    @property
    def context_length(self) -> int:
        return self.scheduler.context_length

    def stop_ids(self, chat: bool) -> frozenset[int]:
        """The tokens that end a reply: <|endoftext|> always, the end-of-turn token in a chat."""
        stops = {self.tokenizer.eot_id} if self.tokenizer.eot_id is not None else set()
        if chat and self.chat_format is not None:
            stops.add(chat_token_ids(self.tokenizer, self.chat_format).end)
        return frozenset(stops)


class ApiError(Exception):
    """A request the server refuses, with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass
class Call:
    """One accepted generation request and how to answer it."""

    run: ServedRun
    generation: GenerationRequest
    chat: bool
    stream: bool
    include_usage: bool
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object_name(self) -> str:
        if self.chat:
            return "chat.completion.chunk" if self.stream else "chat.completion"
        return "text_completion"

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.run.name,
                "system_fingerprint": None, "choices": choices}

    def choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        """One choice: a whole answer, or (streaming) a piece of one."""
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if not self.stream:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish_reason}


def usage(update: Update) -> dict[str, int]:
    return {"prompt_tokens": update.prompt_tokens, "completion_tokens": update.completion_tokens,
            "total_tokens": update.prompt_tokens + update.completion_tokens}


# The application ----------------------------------------------------------------------------------


def create_app(runs: Sequence[ServedRun], api_key: str | None = None) -> Starlette:
    """The ASGI application serving `runs`; their schedulers' worker threads start and stop with it."""
    served = {run.name: run for run in runs}
    if len(served) != len(runs):
        raise UsageError("two runs have the same name; serve runs whose folders are named differently")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threads = [run.scheduler.start() for run in runs]
        try:
            yield
        finally:
            for run in runs:
                run.scheduler.close()
            for thread in threads:
                thread.join(timeout=5)

    def endpoint(handler: Callable[[Request, Mapping[str, ServedRun]], Any]) -> Callable[[Request], Any]:
        async def answer(request: Request) -> Response:
            started = time.perf_counter()
            try:
                check_key(request, api_key)
                return await handler(request, served)
            except ApiError as err:
                log_request(request, err.status, started, detail=err.message)
                return err.response()
        return answer

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = (f"no route {request.method} {request.url.path}; this server answers GET /v1/models, "
                   "POST /v1/chat/completions and POST /v1/completions")
        error = ApiError(status, message, code="not_found" if status == 404 else "method_not_allowed")
        log_request(request, status, time.perf_counter(), detail=message)
        return error.response()

    routes = [
        Route("/v1/models", endpoint(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(show_model), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found})


def check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if not header:
        raise ApiError(401, "no API key: send the header 'Authorization: Bearer KEY' with the key `lm serve` "
                       "was started with", code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "wrong API key: send 'Authorization: Bearer KEY' with the key `lm serve` was started "
                       "with", code="invalid_api_key")


def log_request(request: Request, status: int, started: float, *, model: str | None = None,
                update: Update | None = None, detail: str | None = None) -> None:
    parts = [request.method, request.url.path, str(status)]
    if model is not None:
        parts.append(f"model={model}")
    if update is not None:
        parts.append(f"tokens={update.prompt_tokens}+{update.completion_tokens}")
    parts.append(f"{time.perf_counter() - started:.3f}s")
    if detail:
        parts.append(f"({detail})")
    LOG.info(" ".join(parts))


# Routes -------------------------------------------------------------------------------------------


async def list_models(request: Request, served: Mapping[str, ServedRun]) -> Response:
    started = time.perf_counter()
    log_request(request, 200, started)
    return JSONResponse({"object": "list", "data": [model_card(run) for run in served.values()]})


async def show_model(request: Request, served: Mapping[str, ServedRun]) -> Response:
    started = time.perf_counter()
    run = find_run(served, request.path_params["model"])
    log_request(request, 200, started, model=run.name)
    return JSONResponse(model_card(run))


def model_card(run: ServedRun) -> dict[str, Any]:
    return {"id": run.name, "object": "model", "created": run.created, "owned_by": "lm",
            "context_length": run.context_length, "chat": run.chat_format is not None}


async def chat_completions(request: Request, served: Mapping[str, ServedRun]) -> Response:
    started = time.perf_counter()
    body = await json_body(request)
    run = find_run(served, body.get("model"))
    if run.chat_format is None:
        raise ApiError(400, f"model {run.name!r} is a base model (its run has no chat format): fine-tune it on "
                       "conversations (messages records) first, or send its prompts to /v1/completions",
                       param="model", code="model_not_chat")
    messages = chat_messages(body.get("messages"))
    prompt = render(messages, run.tokenizer, add_generation_prompt=True, chat_format=run.chat_format).ids
    call = make_call(body, run, prompt, chat=True, param="messages")
    return await answer(request, call, started)


async def completions(request: Request, served: Mapping[str, ServedRun]) -> Response:
    started = time.perf_counter()
    body = await json_body(request)
    run = find_run(served, body.get("model"))
    prompt = completion_prompt(body.get("prompt"), run.tokenizer)
    if body.get("echo"):
        raise ApiError(400, "echo is not supported", param="echo")
    if body.get("suffix") is not None:
        raise ApiError(400, "suffix is not supported", param="suffix")
    call = make_call(body, run, prompt, chat=False, param="prompt")
    return await answer(request, call, started)


# Reading requests ---------------------------------------------------------------------------------


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not JSON ({err})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is {type(body).__name__} JSON, not an object")
    return body


def find_run(served: Mapping[str, ServedRun], name: object) -> ServedRun:
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"'model' must name one of the served models: {', '.join(served)}", param="model")
    if name not in served:
        raise ApiError(404, f"the model {name!r} does not exist; this server has {', '.join(served)}",
                       param="model", code="model_not_found")
    return served[name]


def chat_messages(messages: object) -> list[dict[str, str]]:
    """The request's messages as {"role", "content"} with text content ("developer" is a system message)."""
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' must be a list of {role, content} objects", param="messages")
    plain = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ApiError(400, f"message {number} is not an object with role and content", param="messages")
        role = message.get("role")
        role = CHAT_ROLES.get(role, role) if isinstance(role, str) else role
        plain.append({"role": role, "content": message_text(message.get("content"), number)})
    problem = conversation_problem(plain, for_training=False)
    if problem:
        raise ApiError(400, f"the messages are not a conversation this model can answer: {problem}",
                       param="messages")
    return plain


def message_text(content: object, number: int) -> object:
    """A message's content as a string: text parts joined; anything else is left for the check to name."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"message {number} has a content part that is not text; only text is supported",
                           param="messages")
        texts.append(part["text"])
    return "".join(texts)


def completion_prompt(prompt: object, tokenizer: Tokenizer) -> list[int]:
    """The prompt's ids after <|endoftext|> (as `lm generate` starts): a string, or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list
    if isinstance(prompt, str):
        try:
            return encode_prompt(tokenizer, prompt)
        except InputError as err:
            raise ApiError(400, str(err), param="prompt") from None
    if isinstance(prompt, list) and prompt and all(type(token) is int for token in prompt):
        outside = [token for token in prompt if not 0 <= token < tokenizer.vocab_size]
        if outside:
            raise ApiError(400, f"prompt token {outside[0]} is outside the vocabulary "
                           f"(0..{tokenizer.vocab_size - 1})", param="prompt")
        return list(prompt)
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")


def make_call(body: dict[str, Any], run: ServedRun, prompt: list[int], *, chat: bool, param: str) -> Call:
    """Check the request's options against OpenAI's ranges and the run's context; build what to generate."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported (send the request again for another answer)", param="n")
    stream = option(body, "stream", bool, False)
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    include_usage = option(stream_options or {}, "include_usage", bool, False, "stream_options.include_usage")
    temperature = number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = option(body, "top_k", int, 0)
    if top_k < -1:
        raise ApiError(400, f"top_k must be 0 or -1 (off) or a positive count, got {top_k}", param="top_k")
    seed = option(body, "seed", int, None)
    limit = max_tokens(body)
    room = run.context_length - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt):,} tokens but the model {run.name!r} reads at most "
                       f"{run.context_length:,}: nothing is left for the reply; shorten the {param}",
                       param=param, code="context_length_exceeded")
    default = COMPLETIONS_MAX_TOKENS if not chat else room
    sampling = SamplingConfig(temperature=temperature, top_k=max(top_k, 0),
                              top_p=top_p if top_p > 0 else 1.0)
    if top_p == 0:  # only the likeliest token is left: greedy, as OpenAI documents 0
        sampling = SamplingConfig(temperature=0.0)
    generation = GenerationRequest(
        prompt=tuple(prompt), max_tokens=min(limit if limit is not None else default, room), sampling=sampling,
        seed=seed, stop=stop_strings(body.get("stop")), stop_ids=run.stop_ids(chat))
    prefix = "chatcmpl" if chat else "cmpl"
    return Call(run, generation, chat, stream, include_usage, f"{prefix}-{secrets.token_hex(12)}")


def option(body: Mapping[str, Any], name: str, kind: type, default: Any, param: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, not in JSON: true is no count and 1 is no flag.
    if type(value) is not kind:
        expected = {bool: "true or false", int: "an integer"}.get(kind, kind.__name__)
        raise ApiError(400, f"{param or name} must be {expected}, got {json.dumps(value)}", param=param or name)
    return value


def number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if type(value) not in (int, float) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}, got {json.dumps(value)}", param=name)
    return float(value)


def max_tokens(body: Mapping[str, Any]) -> int | None:
    """max_completion_tokens (OpenAI's newer name) or max_tokens; None when neither is given."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = option(body, name, int, None)
        if value is not None:
            if value < 1:
                raise ApiError(400, f"{name} must be at least 1, got {value}", param=name)
            return value
    return None


def stop_strings(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(item, str) for item in stops):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
    return tuple(item for item in stops if item)


# Answering ----------------------------------------------------------------------------------------


def submit(call: Call) -> tuple[Callable[[], None], asyncio.Queue[Update | None]]:
    """Hand the call to its run's scheduler; its updates arrive on the returned queue, on this event loop."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[Update | None] = asyncio.Queue()  # None: the client went away

    def deliver(update: Update) -> None:  # on the scheduler's worker thread
        loop.call_soon_threadsafe(updates.put_nowait, update)

    try:
        ticket = call.run.scheduler.submit(call.generation, deliver)
    except QueueFull as err:
        raise ApiError(429, f"the model {call.run.name!r} is busy: {err}", code="queue_full",
                       kind="rate_limit_error") from None
    except ContextOverflow as err:
        raise ApiError(400, str(err), code="context_length_exceeded") from None
    except (InputError, UsageError) as err:
        raise ApiError(400, str(err)) from None
    return ticket.cancel, updates


async def answer(request: Request, call: Call, started: float) -> Response:
    cancel, updates = submit(call)
    if call.stream:
        return EventStream(stream_events(request, call, cancel, updates, started), on_close=cancel,
                           media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    pieces = []
    watcher = asyncio.create_task(watch_for_disconnect(request, updates))
    try:
        while True:
            update = await updates.get()
            if update is None:
                log_request(request, 499, started, model=call.run.name, detail="the client went away")
                return Response(status_code=499)  # nobody reads it; 499 is what nginx logs for this
            if update.error is not None:
                raise ApiError(500, update.error, kind="server_error")
            pieces.append(update.text)
            if update.finished:
                break
    finally:
        watcher.cancel()
        cancel()  # frees the row at once when the client left or the step failed; nothing once finished
    log_request(request, 200, started, model=call.run.name, update=update)
    body = call.envelope([call.choice("".join(pieces), update.finish_reason)])
    return JSONResponse({**body, "usage": usage(update)})


async def watch_for_disconnect(request: Request, updates: asyncio.Queue[Update | None]) -> None:
    """Put None on `updates` once the client has gone away (checked every DISCONNECT_POLL_S)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    updates.put_nowait(None)


async def stream_events(request: Request, call: Call, cancel: Callable[[], None],
                        updates: asyncio.Queue[Update | None],
                        started: float) -> AsyncIterator[str]:
    """The answer as server-sent events: chunks of text, the finish reason, usage if asked, [DONE]."""
    update, outcome = None, "the client went away"
    try:
        if call.chat:  # OpenAI's first chat chunk gives the role
            first = call.choice("", None)
            first["delta"] = {"role": "assistant", "content": ""}
            yield event(call.envelope([first]), call)
        while True:
            update = await updates.get()
            if update is None:  # only a whole answer's watcher sends it; a stream learns of a disconnect from Starlette
                return
            if update.error is not None:
                outcome = update.error
                yield "data: " + json.dumps(ApiError(500, update.error, kind="server_error").body()) + "\n\n"
                return
            if update.text:
                yield event(call.envelope([call.choice(update.text, None)]), call)
            if update.finished:
                break
        yield event(call.envelope([call.choice(None if call.chat else "", update.finish_reason)]), call)
        if call.include_usage:
            yield event({**call.envelope([]), "usage": usage(update)}, call)
        yield "data: [DONE]\n\n"
        outcome = None
    finally:
        cancel()
        log_request(request, 200, started, model=call.run.name, update=update, detail=outcome)


def event(payload: dict[str, Any], call: Call) -> str:
    if call.include_usage and "usage" not in payload:
        payload["usage"] = None  # OpenAI's chunks say usage: null until the last one
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class EventStream(StreamingResponse):
    """A streamed response that runs `on_close` however it ends: finished, or cut off by the client."""

    def __init__(self, content: AsyncIterator[str], *, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
