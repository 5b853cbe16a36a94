"""The local endpoint server: the Azure ML scoring contract and an OpenAI-compatible chat API.

One worker thread owns the model. Request handlers validate the body, put a job on a queue and
await its future; the worker collects the jobs that arrive within a few milliseconds, groups the
ones with the same sampling settings and answers each group with one left-padded `generate` call.
Bad input always gets a JSON error with a 4xx status, so a client mistake never costs a 5xx or
the process.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from automation.serving.generator import (  # noqa: F401  (re-exported for callers)
    GENERATION_SHARE_OF_TIMEOUT,
    ApiError,
    Generator,
    Job,
    Reply,
    Sampling,
    Settings,
)

log = logging.getLogger("automation.serving")

# --------------------------------------------------------------------------------------------
# Request bodies

class Message(BaseModel):
    # extra="ignore": OpenAI clients may send fields such as "name" that change nothing here.
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class ScoreParameters(BaseModel):
    # The ranges of the experiment file's sample.parameters; unknown keys are typos, so refused.
    model_config = ConfigDict(extra="forbid", strict=True)
    temperature: float = Field(0.6, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    do_sample: bool = True
    max_new_tokens: int = Field(200, ge=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)


class ScoreInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input_string: list[Message]
    parameters: ScoreParameters = ScoreParameters()


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input_data: ScoreInput
    params: dict[str, Any] = {}


class ChatBody(BaseModel):
    # extra="ignore": the OpenAI API has many optional fields; the ones we honour are below.
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[Message]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # what torch.manual_seed takes


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
    if not messages:
        raise ApiError(422, "the conversation has no messages")
    if len(messages) > settings.max_messages:
        raise ApiError(422, f"the conversation has {len(messages)} messages; "
                            f"this endpoint takes at most {settings.max_messages}")
    if messages[-1].role != "user":
        raise ApiError(422, f"the conversation must end with a user message, not {messages[-1].role}")
    return [{"role": m.role, "content": m.content} for m in messages]


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


# --------------------------------------------------------------------------------------------
# The app

def create_app(settings: Settings, generator: Generator) -> FastAPI:
    app = FastAPI(title="automation local endpoint", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.generator = settings, generator
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if generator.ready.is_set():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        check_auth(request, settings)
        return generator.snapshot()

    @app.post("/score")
    async def score(request: Request) -> dict[str, str]:
        check_auth(request, settings)
        body = _parse(ScoreBody, await read_json(request, settings)).input_data
        messages = check_conversation(body.input_string, settings)
        p = body.parameters
        # An omitted max_new_tokens takes the default, lowered to the cap rather than refused.
        if "max_new_tokens" in p.model_fields_set:
            max_new = check_cap(p.max_new_tokens, "max_new_tokens", settings)
        else:
            max_new = min(p.max_new_tokens, settings.max_new_tokens_cap)
        sampling = Sampling.make(p.do_sample, p.temperature, p.top_p, p.top_k, p.repetition_penalty)
        reply = await generator.run(messages, max_new, sampling, None)
        return {"output": reply.text}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        check_auth(request, settings)
        body = _parse(ChatBody, await read_json(request, settings))
        if body.stream:
            raise ApiError(400, "streaming is not supported; send stream=false")
        if body.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported")
        messages = check_conversation(body.messages, settings)
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        asked = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens_cap
        max_new = check_cap(asked, name, settings)
        temperature = 1.0 if body.temperature is None else body.temperature
        sampling = Sampling.make(True, temperature, 1.0 if body.top_p is None else body.top_p)
        reply = await generator.run(messages, max_new, sampling, body.seed)
        return _completion(body.model or Path(settings.model_dir).name, reply)

    return app


def _completion(model: str, reply: Reply) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "finish_reason": reply.finish_reason}],
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                  "total_tokens": reply.prompt_tokens + reply.completion_tokens},
    }


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; see the endpoint log", "server_error")
