"""The local endpoint server: the Azure ML scoring contract and an OpenAI-compatible chat API.

Request handlers validate the body, tokenise the conversation, submit a job to the
continuous-batching engine (`generator.py`) and read its events: all at once (`/score`, a chat
completion) or as server-sent events (`stream: true`). A client that disconnects has its job
cancelled, and the engine drops it at the next decoding step. Bad input always gets a JSON error
with a 4xx status, so a client mistake never costs a 5xx or the process; `/openapi.json`
describes every route, body and answer (see `openapi.py`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from automation.serving.contract import (
    IGNORED_CHAT_FIELDS,
    NEUTRAL_CHAT_VALUES,
    NOT_BLANK,
    ChatBody,
    Message,
    ScoreBody,
)
from automation.serving.generator import (  # noqa: F401  (re-exported for callers)
    GENERATION_SHARE_OF_TIMEOUT,
    ApiError,
    Generator,
    Job,
    Reply,
    Settings,
)
from automation.serving.openapi import openapi_document
from automation.serving.sampling import Sampling

log = logging.getLogger("automation.serving")


class ClientGone(Exception):
    """The client closed the connection; its generation was cancelled."""


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, settings: Settings) -> Any:
    """The body as JSON, refusing wrong content types, oversized bodies and malformed JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}",
                       "unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > settings.max_body_bytes:
            raise _too_large(settings)
    body = bytearray()
    # Count the bytes really read too: a chunked body has no Content-Length to trust.
    async for chunk in request.stream():
        body += chunk
        if len(body) > settings.max_body_bytes:
            raise _too_large(settings)
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply", "invalid_json") from None
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON: {exc}", "invalid_json") from None


def _too_large(settings: Settings) -> ApiError:
    return ApiError(413, f"body larger than {settings.max_body_bytes} bytes", "request_too_large")


def _parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, _validation_message(exc), "invalid_request_error") from None


def check_conversation(messages: list[Message], settings: Settings) -> list[dict[str, str]]:
    """The conversation as plain messages: text parts joined, `developer` served as `system`."""
    if not messages:
        raise ApiError(422, "the conversation has no messages")
    if len(messages) > settings.max_messages:
        raise ApiError(422, f"the conversation has {len(messages)} messages; "
                            f"this endpoint takes at most {settings.max_messages}")
    plain = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            kinds = sorted({part.type for part in content if part.type != "text"})
            if kinds:
                raise ApiError(400, f"messages.{index}.content: only text parts are supported, not {', '.join(kinds)}")
            if any(part.text is None for part in content):
                raise ApiError(422, f"messages.{index}.content: a text part needs its text")
            content = "".join(part.text or "" for part in content)
        if not re.search(NOT_BLANK, content):
            raise ApiError(422, f"messages.{index}.content: must not be empty")
        plain.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    # Whatever role comes last, the reply is the assistant's next turn (as OpenAI's API does).
    return plain


def check_cap(max_new_tokens: int, name: str, settings: Settings) -> int:
    if max_new_tokens > settings.max_new_tokens_cap:
        raise ApiError(400, f"{name} {max_new_tokens} is above this endpoint's cap of "
                            f"{settings.max_new_tokens_cap}")
    return max_new_tokens


def check_auth(request: Request, settings: Settings) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not tell how much of a guessed key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                       "authentication_error", headers={"WWW-Authenticate": "Bearer"})


def check_unhonoured(body: ChatBody) -> None:
    """A field this endpoint cannot honour is a 400, never silently ignored."""
    if body.n not in (None, 1):
        raise ApiError(400, "n: only n=1 is supported")
    for name, value in (body.model_extra or {}).items():
        if value is None or name in IGNORED_CHAT_FIELDS or _as_json(value) in map(_as_json, NEUTRAL_CHAT_VALUES.get(name, [])):
            continue
        raise ApiError(400, f"{name}: not supported by this endpoint", "unsupported_parameter")


def _as_json(value: Any) -> str:
    # JSON's equality, not Python's: false is not 0, and [] is not {}.
    return json.dumps(value, sort_keys=True)


async def _reply_of(job: Job) -> Reply:
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise value


async def _until_disconnect(request: Request) -> None:
    # The body is read, so the next ASGI message is http.disconnect, whenever the client leaves
    # (what Starlette's StreamingResponse listens for too).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, jobs: list[Job], timeout_s: float) -> list[Reply]:
    """The jobs' replies, in order; if the client goes away first, the jobs are cancelled."""
    replies = asyncio.ensure_future(asyncio.gather(*(_reply_of(job) for job in jobs)))
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({replies, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if replies.done():
            return replies.result()
        if gone.done():
            raise ClientGone()
        raise ApiError(504, f"no reply within the request timeout of {timeout_s:g} s", "timeout")
    finally:
        gone.cancel()
        if not replies.done():
            replies.cancel()
            replies.add_done_callback(lambda future: future.cancelled() or future.exception())
            for job in jobs:
                job.cancelled = True


# --------------------------------------------------------------------------------------------
# The app

def create_app(settings: Settings, generator: Generator) -> FastAPI:
    app = FastAPI(title="automation local endpoint", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.generator = settings, generator
    _install_error_handlers(app)
    timeout_s = settings.request_timeout_ms / 1000
    document = openapi_document(settings, generator.model_name)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(document)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if generator.ready.is_set():
            return JSONResponse({"status": "ready", **generator.info()})  # and what it computes in, and why
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        check_auth(request, settings)
        return generator.snapshot()

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request, settings)
        return {"object": "list", "data": [{"id": generator.model_name, "object": "model",
                                            "created": int(app.state.started), "owned_by": "automation"}]}

    @app.post("/score")
    async def score(request: Request) -> Any:
        check_auth(request, settings)
        body = _parse(ScoreBody, await read_json(request, settings)).input_data
        items = body.input_string
        nested = bool(items) and isinstance(items[0], list)
        conversations = items if nested else [items]
        if not conversations:
            raise ApiError(422, "input_data.input_string: no conversations")
        if len(conversations) > settings.max_conversations:
            raise ApiError(422, f"input_data.input_string: {len(conversations)} conversations; this endpoint "
                                f"takes at most {settings.max_conversations} in one request")
        prompts = [generator.encode(check_conversation(c, settings)) for c in conversations]
        p = body.parameters
        # An omitted max_new_tokens takes the default, lowered to the cap rather than refused.
        if "max_new_tokens" in p.model_fields_set:
            max_new = check_cap(p.max_new_tokens, "max_new_tokens", settings)
        else:
            max_new = min(p.max_new_tokens, settings.max_new_tokens_cap)
        sampling = Sampling.make(p.do_sample, p.temperature, p.top_p, top_k=p.top_k,
                                 repetition_penalty=p.repetition_penalty)
        jobs: list[Job] = []
        try:
            for prompt in prompts:
                jobs.append(generator.submit(prompt, max_new, sampling, None))
            replies = await collect(request, jobs, timeout_s)
        except BaseException:
            for job in jobs:
                job.cancelled = True
            raise
        outputs = [reply.text for reply in replies]
        return {"output": outputs if nested and len(outputs) > 1 else outputs[0]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        check_auth(request, settings)
        body = _parse(ChatBody, await read_json(request, settings))
        check_unhonoured(body)
        prompt = generator.encode(check_conversation(body.messages, settings))
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        asked = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens_cap
        max_new = check_cap(asked, name, settings)
        temperature = 1.0 if body.temperature is None else body.temperature
        sampling = Sampling.make(True, temperature, 1.0 if body.top_p is None else body.top_p,
                                 presence_penalty=body.presence_penalty or 0.0,
                                 frequency_penalty=body.frequency_penalty or 0.0)
        stop = tuple([body.stop] if isinstance(body.stop, str) else body.stop or [])
        job = generator.submit(prompt, max_new, sampling, body.seed, stop)
        model = body.model or generator.model_name
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(job, model, usage, timeout_s), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        [reply] = await collect(request, [job], timeout_s)
        return _completion(model, reply)

    app.state.started = time.time()
    return app


def _usage(reply: Reply) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def _completion(model: str, reply: Reply) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "finish_reason": reply.finish_reason}],
        "usage": _usage(reply),
    }


async def _stream(job: Job, model: str, include_usage: bool, timeout_s: float) -> AsyncIterator[str]:
    """OpenAI's chat.completion.chunk events; a disconnect cancels the generator, and the job with it."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    until = time.monotonic() + timeout_s
    try:
        yield event({"role": "assistant", "content": ""})
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), max(0.01, until - time.monotonic()))
            except TimeoutError:
                yield f"data: {json.dumps({'error': {'message': 'no reply within the request timeout', 'type': 'timeout', 'code': 504}})}\n\n"
                break
            if kind == "text":
                yield event({"content": value})
            elif kind == "error":
                yield f"data: {json.dumps({'error': {'message': value.message, 'type': value.kind, 'code': value.status}})}\n\n"
                break
            else:
                yield event({}, value.finish_reason)
                if include_usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(value)})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # no effect once it is done; stops it if the client left


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        # Nobody reads this; 499 (nginx's "client closed request") keeps the access log honest.
        return _error(499, "the client closed the connection", "client_closed")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; see the endpoint log", "server_error")
