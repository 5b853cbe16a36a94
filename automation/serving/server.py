"""The local endpoint server: the Azure ML scoring contract and an OpenAI-compatible chat API.

One worker thread owns the model. Request handlers validate the body, put a job on a queue and
await its future; the worker collects the jobs that arrive within a few milliseconds, groups the
ones with the same sampling settings and answers each group with one left-padded `generate` call.
Bad input always gets a JSON error with a 4xx status, so a client mistake never costs a 5xx or
the process.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("automation.serving")

# Generation must end before the client's request timeout, so a long reply comes back cut short
# (finish_reason "length") instead of as a timeout.
GENERATION_SHARE_OF_TIMEOUT = 0.8


@dataclass(frozen=True)
class Settings:
    model_dir: str
    api_key: str = field(repr=False)  # repr=False: logging the settings never shows the key
    device: str = "auto"
    max_new_tokens_cap: int = 512
    request_timeout_ms: int = 90_000
    max_batch_size: int = 16
    max_body_bytes: int = 1_000_000
    max_messages: int = 64
    batch_wait_ms: float = 10.0

    @property
    def max_queue(self) -> int:
        return self.max_batch_size * 16


class ApiError(Exception):
    """An error answered to the client as `{"error": {"message", "type"}}` with its status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


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


@dataclass(frozen=True)
class Sampling:
    """The settings that must be equal for requests to share one `generate` call."""

    do_sample: bool
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    @classmethod
    def make(cls, do_sample: bool, temperature: float, top_p: float, top_k: int | None = None,
             repetition_penalty: float | None = None) -> Sampling:
        # Temperature 0 means greedy; all greedy requests batch together whatever else they say.
        if not do_sample or temperature == 0:
            return cls(False, repetition_penalty=repetition_penalty)
        return cls(True, temperature, top_p, top_k, repetition_penalty)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"do_sample": self.do_sample}
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs


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
        max_new = check_cap(p.max_new_tokens, "max_new_tokens", settings)
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


# --------------------------------------------------------------------------------------------
# The batching generator

@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


@dataclass
class Job:
    messages: list[dict[str, str]]
    max_new_tokens: int
    sampling: Sampling
    seed: int | None
    deadline: float  # time.monotonic() by which generation must have stopped
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def resolve(self, value: Reply | ApiError) -> None:
        """Settle the future from the worker thread; a request that timed out is left alone."""
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(value, ApiError):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop closed during shutdown; nobody is waiting
            pass


class Generator:
    """Owns the model in one thread; requests reach it through a queue."""

    def __init__(self, settings: Settings, on_fatal: Callable[[], None] = lambda: None):
        self.settings = settings
        self.ready = threading.Event()
        self.failed = False
        self._on_fatal = on_fatal
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="generator", daemon=True)
        self._stats = {"requests": 0, "replies": 0, "errors": 0, "batches": 0, "largest_batch": 0}
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self._stats, "queued": self._queue.qsize(), "ready": self.ready.is_set()}

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def _count_batch(self, size: int) -> None:
        with self._lock:
            self._stats["batches"] += 1
            self._stats["largest_batch"] = max(self._stats["largest_batch"], size)

    async def run(self, messages: list[dict[str, str]], max_new_tokens: int, sampling: Sampling,
                  seed: int | None) -> Reply:
        if not self.ready.is_set():
            raise ApiError(503, "the model is still loading; retry when GET /ready answers 200",
                           "not_ready", headers={"Retry-After": "5"})
        if self._queue.qsize() >= self.settings.max_queue:
            raise ApiError(503, "too many requests waiting; retry shortly", "overloaded",
                           headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        timeout_s = self.settings.request_timeout_ms / 1000
        job = Job(messages, max_new_tokens, sampling, seed,
                  time.monotonic() + timeout_s * GENERATION_SHARE_OF_TIMEOUT, loop, loop.create_future())
        self._count("requests")
        self._queue.put(job)
        try:
            return await asyncio.wait_for(job.future, timeout_s)
        except TimeoutError:
            raise ApiError(504, f"no reply within the request timeout of {timeout_s:g} s",
                           "timeout") from None

    # -- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except BaseException:
            log.exception("could not load the model from %s", self.settings.model_dir)
            self.failed = True
            self._on_fatal()
            return
        self.ready.set()
        log.info("model loaded from %s on %s; ready", self.settings.model_dir, self._device)
        while not self._stop.is_set():
            batch = self._collect()
            if batch:
                self._serve(batch)

    def _load(self) -> None:
        folder = Path(self.settings.model_dir)
        if not (folder / "config.json").is_file():  # checked first: fails before seconds of imports
            raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        device = self.settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # fp32 on a CPU: bf16 matmuls there are about 100x slower.
        dtype = torch.float32
        if device == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        if not self._tokenizer.chat_template:
            raise ValueError(f"the tokenizer in {folder} has no chat template")
        self._model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self._device, self._torch = device, torch
        self._eos_ids = self._end_of_turn_ids()
        self._pad_id = self._tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self._eos_ids[0]
        self._max_positions = getattr(self._model.config, "max_position_embeddings", None)

    def _end_of_turn_ids(self) -> list[int]:
        configured = self._model.generation_config.eos_token_id
        ids = list(configured) if isinstance(configured, list) else [configured]
        ids.append(self._tokenizer.eos_token_id)
        im_end = self._tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self._tokenizer.unk_token_id:
            ids.append(im_end)
        unique = list(dict.fromkeys(i for i in ids if i is not None))
        if not unique:
            raise ValueError("the model has no end-of-sequence token")
        return unique

    def _collect(self) -> list[Job]:
        """The first waiting job and whatever joins it within batch_wait_ms."""
        try:
            batch = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        until = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(batch) < self.settings.max_batch_size:
            remaining = until - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _serve(self, batch: list[Job]) -> None:
        groups: dict[tuple[Sampling, int | None], list[Job]] = {}
        for job in batch:
            if not job.future.done():  # skip requests that already timed out
                groups.setdefault((job.sampling, job.seed), []).append(job)
        for group in groups.values():
            try:
                replies = self._generate(group)
            except Exception:
                log.exception("generation failed for a batch of %d", len(group))
                replies = {id(job): ApiError(500, "generation failed; see the endpoint log", "server_error")
                           for job in group}
            for job in group:
                reply = replies[id(job)]
                self._count("errors" if isinstance(reply, ApiError) else "replies")
                job.resolve(reply)

    def _encode(self, job: Job) -> list[int]:
        try:
            text = self._tokenizer.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a template may refuse a conversation (e.g. no system role)
            raise ApiError(422, f"the model's chat template refused the conversation: {exc}") from None
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        if self._max_positions and len(ids) >= self._max_positions:
            raise ApiError(422, f"the conversation is {len(ids)} tokens; this model reads at most "
                                f"{self._max_positions - 1} plus the reply")
        return ids

    def _generate(self, group: list[Job]) -> dict[int, Reply | ApiError]:
        results: dict[int, Reply | ApiError] = {}
        rows: list[tuple[Job, list[int]]] = []
        for job in group:
            try:
                rows.append((job, self._encode(job)))
            except ApiError as exc:
                results[id(job)] = exc
        if not rows:
            return results
        torch = self._torch
        width = max(len(ids) for _, ids in rows)
        # Left padding: every row's prompt ends at the same column, where generation starts.
        input_ids = torch.tensor([[self._pad_id] * (width - len(ids)) + ids for _, ids in rows])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in rows])
        max_new = max(job.max_new_tokens for job, _ in rows)
        if self._max_positions:
            max_new = max(1, min(max_new, self._max_positions - width))
        max_time = max(0.05, min(job.deadline for job, _ in rows) - time.monotonic())
        seed = rows[0][0].seed
        if seed is not None:
            torch.manual_seed(seed)
        try:
            with torch.inference_mode():
                output = self._model.generate(
                    input_ids=input_ids.to(self._device), attention_mask=mask.to(self._device),
                    max_new_tokens=max_new, max_time=max_time, eos_token_id=self._eos_ids,
                    pad_token_id=self._pad_id, **rows[0][0].sampling.generate_kwargs())
        finally:
            if seed is not None:
                torch.seed()  # so the next unseeded request is not predictable from this seed
        self._count_batch(len(rows))
        for index, (job, ids) in enumerate(rows):
            results[id(job)] = self._reply(output[index, width:].tolist()[: job.max_new_tokens], len(ids))
        return results

    def _reply(self, tokens: list[int], prompt_tokens: int) -> Reply:
        """Cut a row at its first end-of-turn token; no end-of-turn means it ran out of length or time."""
        ends = [i for i, token in enumerate(tokens) if token in self._eos_ids]
        finish: Literal["stop", "length"] = "stop" if ends else "length"
        kept = tokens[: ends[0]] if ends else tokens
        text = self._tokenizer.decode(kept, skip_special_tokens=True)
        return Reply(text, prompt_tokens, len(kept), finish)
