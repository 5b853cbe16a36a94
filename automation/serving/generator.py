"""The batching generator of the local endpoint: one thread owns the model.

Requests reach it through a queue; it collects the jobs that arrive close together (each within
`batch_wait_ms` of the one before, for at most `batch_window_ms` in all), groups the ones with the
same sampling settings and answers each group with one left-padded `generate` call, resolving
each request's asyncio future from its thread. The window slides with the arrivals because
concurrent clients do not send at the same instant: sixteen clients released together reach the
server spread over ~20-30 ms on a busy 2-core machine, and a fixed 10 ms window split them into
two batches that then took turns (bench/RESULTS.md, item 3).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    batch_wait_ms: float = 10.0  # the gap after a request within which another may join its batch
    batch_window_ms: float = 100.0  # the most a batch waits for joiners, from its first request

    @property
    def max_queue(self) -> int:
        return self.max_batch_size * 16


class ApiError(Exception):
    """An error answered to the client as `{"error": {"message", "type"}}` with its status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


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
        """The first waiting job and those that follow it, each within batch_wait_ms of the one
        before, until the batch is full or batch_window_ms has passed since the first."""
        try:
            batch = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        gap, window = self.settings.batch_wait_ms / 1000, self.settings.batch_window_ms / 1000
        closes = time.monotonic() + window
        while len(batch) < self.settings.max_batch_size:
            remaining = min(gap, closes - time.monotonic())
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
