"""The continuous-batching engine of the local endpoint: one thread owns the model.

Iteration-level batching: every step the worker admits waiting requests (prefilling them
together, left-padded, and merging their key/value cache into the running batch's), then decodes
one token for every running request at once, hands each its new text, and drops the rows that
finished, were cancelled (their client went away) or ran out of time. A short request next to a
long one therefore leaves as soon as it is done instead of waiting for the whole batch, and a
request arriving mid-batch starts at the next step instead of after it.

Why our own scheduler and not transformers' `ContinuousBatchingManager`: on this CPU its paged
attention decoded slower than plain `generate` (bench/RESULTS.md, serving), and it samples with
one GenerationConfig for all requests, while every request here brings its own sampling
parameters, seed and stop strings.

Admission is bounded by tokens in flight (prompt + max_new_tokens of every admitted or waiting
request) and by prompt length, so a burst of long prompts gets 429 / 400 instead of more memory
than the machine has.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from automation.serving.sampling import Sampling, next_token

log = logging.getLogger("automation.serving")

# Generation must end before the client's request timeout, so a long reply comes back cut short
# (finish_reason "length") instead of as a timeout.
GENERATION_SHARE_OF_TIMEOUT = 0.8
REPLACEMENT = "\ufffd"  # what decoding half of a multi-byte character gives
# A shared prompt prefix shorter than this is prefilled with each prompt: a separate pass over a
# few tokens costs more than it saves.
MIN_SHARED_PREFIX = 16
# Up to this many rows, a decoding step takes every usable CPU (the prefill threads) instead of
# leaving one to the HTTP loop, which then streams only a few chunks a step; unless the decoding
# threads were set (--threads, OMP_NUM_THREADS). One row on the 2-core VM: 37 ms a step on one
# thread, 31 on two (bench/RESULTS.md, issue 23).
FEW_ROWS = 4


def _common_length(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    for index in range(min(limit, len(a), len(b))):
        if a[index] != b[index]:
            return index
    return min(limit, len(a), len(b))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _omp_threads() -> int:
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() else 0


def default_threads() -> int:
    """torch threads for decoding more than FEW_ROWS rows: the CPUs this process may use, less one
    for the HTTP loop (tokenising, JSON, streaming a chunk per token per request), never under one.
    OMP_NUM_THREADS, when set, wins."""
    return _omp_threads() or max(1, usable_cpus() - 1)


def default_prefill_threads() -> int:
    """torch threads for prefilling new prompts: every usable CPU. A prefill is one large,
    compute-bound pass during which the HTTP loop has nothing to stream, and every waiting request's
    time to first token is the length of that pass. OMP_NUM_THREADS, when set, wins."""
    return _omp_threads() or usable_cpus()


def serving_precision(requested: str, device: str):
    """(precision.Precision, torch dtype) of the weights the endpoint serves: bf16 where the device
    does bf16 natively (on a CPU: AMX-BF16 or AVX512-BF16 and oneDNN agreeing), fp32 elsewhere
    (emulated bf16 on a CPU can be ~100x slower), as training and evaluation choose. On a GPU
    without bf16, fp16 rather than fp32, unless fp32 is forced."""
    import torch

    from automation.backends.local.precision import Precision, choose

    chosen = choose(requested, device)
    if chosen.bf16:
        return chosen, torch.bfloat16
    if device == "cuda" and requested != "fp32":
        return Precision("fp16", chosen.reason), torch.float16
    return chosen, torch.float32


@dataclass(frozen=True)
class Settings:
    model_dir: str
    api_key: str = field(repr=False)  # repr=False: logging the settings never shows the key
    device: str = "auto"
    max_new_tokens_cap: int = 512
    request_timeout_ms: int = 90_000
    max_batch_size: int = 16  # requests decoded together in one step
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step; a longer prompt goes in chunks
    max_body_bytes: int = 1_000_000
    max_messages: int = 64
    max_conversations: int = 16  # in one /score request
    max_prompt_tokens: int = 4096  # also bounded by the model's context
    max_tokens_in_flight: int = 65_536  # prompt + max_new_tokens over all admitted requests
    threads: int = 0  # torch threads while decoding; 0 = default_threads()
    prefill_threads: int = 0  # torch threads while prefilling; 0 = default_prefill_threads()
    # "auto": bf16 weights where the device does bf16 natively (precision.choose), else fp32;
    # "bf16" / "fp32" force it (a deployment carries its experiment's compute.precision).
    precision: str = "auto"

    @property
    def max_queue(self) -> int:
        return self.max_batch_size * 16


class ApiError(Exception):
    """An error answered to the client as `{"error": {"message", "type"}}` with its status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


@dataclass
class Job:
    """One conversation in generation. The worker thread writes its events to `events` (an
    asyncio queue on the request's loop): ("text", str) pieces, then ("done", Reply) or
    ("error", ApiError)."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int | None
    stop: tuple[str, ...]
    deadline: float  # time.monotonic() by which generation must have stopped
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set from the event loop when the client goes away
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the reply's text, whole characters only
    prefix_at: int = 0  # incremental decoding: tokens[prefix_at:read_at] decode to the end of `text`
    read_at: int = 0
    sent: int = 0  # characters of the reply already handed out
    generator: Any = None  # torch.Generator of a seeded request

    @property
    def cost(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop closed during shutdown; nobody is listening
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
        self._lock = threading.Lock()
        self._in_flight = 0  # tokens reserved by admitted and waiting jobs
        self._stats = {"requests": 0, "replies": 0, "errors": 0, "cancelled": 0, "steps": 0,
                       "largest_batch": 0, "decoded_rows": 0, "prefill_chunks": 0,
                       "prefix_tokens_reused": 0}
        self._threads = settings.threads or default_threads()
        self._prefill_threads = settings.prefill_threads or default_prefill_threads()
        pinned = bool(settings.threads or _omp_threads())
        self._few_rows_threads = self._threads if pinned else self._prefill_threads
        self._current_threads = 0
        self._running: list[Job] = []
        self._waiting: collections.deque[Job] = collections.deque()  # taken from the queue, not yet admitted
        self._chunked: Job | None = None  # a prompt above the per-step budget, prefilled a chunk per step
        self._chunk_cache: Any = None
        self._chunk_done = 0  # its prompt tokens already in `_chunk_cache`
        self._prefix: tuple[list[int], list] | None = None  # a shared prompt prefix and its key/value cache
        self._recent: collections.deque[list[int]] = collections.deque(maxlen=16)  # the last prompts prefilled
        self.tokenizer: Any = None
        self.model_name = Path(settings.model_dir).name
        self.precision: Any = None  # precision.Precision, once the model is loaded
        self.dtype = ""  # the weights' dtype, once loaded ("bfloat16", "float32", "float16")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(self._stats)
            stats["mean_batch"] = round(stats["decoded_rows"] / stats["steps"], 2) if stats["steps"] else 0.0
            return {**stats, "queued": self._queue.qsize() + len(self._waiting) + (self._chunked is not None),
                    "running": len(self._running),
                    "tokens_in_flight": self._in_flight, "max_tokens_in_flight": self.settings.max_tokens_in_flight,
                    "threads": self._threads, "few_rows_threads": self._few_rows_threads,
                    "prefill_threads": self._prefill_threads,
                    "ready": self.ready.is_set()}

    def info(self) -> dict[str, str]:
        """What the endpoint computes in and why (empty while the model loads): for /ready and the log."""
        if self.precision is None or not self.ready.is_set():
            return {}
        return {"precision": self.precision.name, "precision_reason": self.precision.reason, "dtype": self.dtype}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    # -- the event loop's side -----------------------------------------------------------------

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation as prompt tokens, refusing what cannot be served (400)."""
        self._require_ready()
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
        except Exception as exc:  # a template may refuse a conversation (e.g. no system role)
            raise ApiError(422, f"the model's chat template refused the conversation: {exc}") from None
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(400, f"the conversation is {len(ids)} tokens; this endpoint reads at most "
                                f"{self.max_prompt_tokens}", "context_length_exceeded")
        return ids

    def submit(self, prompt: list[int], max_new_tokens: int, sampling: Sampling, seed: int | None,
               stop: tuple[str, ...] = ()) -> Job:
        """Queue a job, or refuse it at once when the server is full (429/503 with Retry-After)."""
        self._require_ready()
        if self._max_positions:
            max_new_tokens = max(1, min(max_new_tokens, self._max_positions - len(prompt)))
        loop = asyncio.get_running_loop()
        timeout_s = self.settings.request_timeout_ms / 1000
        job = Job(prompt, max_new_tokens, sampling, seed, stop,
                  time.monotonic() + timeout_s * GENERATION_SHARE_OF_TIMEOUT, loop)
        budget = self.settings.max_tokens_in_flight
        if job.cost > budget:
            raise ApiError(400, f"prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) is above "
                                f"this endpoint's {budget} tokens in flight", "context_length_exceeded")
        with self._lock:
            if self._queue.qsize() + len(self._waiting) >= self.settings.max_queue:
                raise ApiError(503, "too many requests waiting; retry shortly", "overloaded",
                               headers={"Retry-After": "1"})
            if self._in_flight + job.cost > budget:
                raise ApiError(429, f"the endpoint is full ({self._in_flight} of {budget} tokens in flight); "
                                    "retry shortly", "rate_limit_exceeded", headers={"Retry-After": "1"})
            self._in_flight += job.cost
            self._stats["requests"] += 1
        self._queue.put(job)
        return job

    def _require_ready(self) -> None:
        if not self.ready.is_set():
            raise ApiError(503, "the model is still loading; retry when GET /ready answers 200",
                           "not_ready", headers={"Retry-After": "5"})

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
        log.info("model loaded from %s on %s in %s (%s; weights %s) with %d torch threads; ready",
                 self.settings.model_dir, self._device, self.precision.name, self.precision.reason, self.dtype,
                 self._threads)
        with self._torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception:
                    log.exception("generation failed; failing the %d running requests", len(self._running))
                    failed = self._running + ([self._chunked] if self._chunked else [])
                    for job in failed:
                        self._finish(job, ApiError(500, "generation failed; see the endpoint log", "server_error"))
                    self._running, self._cache, self._mask, self._lengths = [], None, None, None
                    self._chunked, self._chunk_cache, self._chunk_done = None, None, 0

    def _load(self) -> None:
        folder = Path(self.settings.model_dir)
        if not (folder / "config.json").is_file():  # checked first: fails before seconds of imports
            raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from automation.backends.local.precision import prepack_linears

        hf_logging.disable_progress_bar()
        self._torch = torch
        self._set_threads(self._threads)
        try:
            torch.set_num_interop_threads(1)  # the worker is the only thread that runs torch
        except RuntimeError:  # already set, or parallel work already ran in this process
            pass
        device = self.settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision, dtype = serving_precision(self.settings.precision, device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if not tokenizer.chat_template:
            raise ValueError(f"the tokenizer in {folder} has no chat template")
        # The weights themselves in the chosen dtype (not autocast per call): a bf16 decoding step
        # reads half the bytes and runs oneDNN's bf16 kernels; logits are taken in fp32 to sample.
        self._model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        # On a CPU: the linears' weights prepacked for oneDNN once (the plain copies dropped), not
        # handed over in their stored layout at every step.
        prepack_linears(self._model, release=True)
        self.dtype = str(dtype).removeprefix("torch.")
        self._device = device
        self.tokenizer = tokenizer
        # A second tokenizer for the worker: a Rust tokenizer used from two threads at once can
        # fail with "Already borrowed"; the event loop encodes, the worker decodes. A copy, not a
        # second load (half the time: the files are not read and parsed again).
        self._detok = copy.deepcopy(tokenizer)
        self._eos_ids = set(self._end_of_turn_ids())
        self._max_positions = getattr(self._model.config, "max_position_embeddings", None)
        self.max_prompt_tokens = self.settings.max_prompt_tokens
        if self._max_positions:
            self.max_prompt_tokens = min(self.max_prompt_tokens, self._max_positions - 1)
        self._cache = self._mask = self._lengths = None

    def _end_of_turn_ids(self) -> list[int]:
        configured = self._model.generation_config.eos_token_id
        ids = list(configured) if isinstance(configured, list) else [configured]
        ids.append(self.tokenizer.eos_token_id)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.append(im_end)
        unique = list(dict.fromkeys(i for i in ids if i is not None))
        if not unique:
            raise ValueError("the model has no end-of-sequence token")
        return unique

    def _step(self) -> None:
        """Admit what fits, prefill it (a long prompt one chunk a step), then decode one token for
        every running request.

        Prefill is bounded per step (`max_prefill_tokens`): the running requests wait for at most
        one budget's worth of prompt processing between two of their tokens, and a prompt above the
        budget is prefilled in chunks over several steps (its own cache, merged into the batch when
        complete) instead of stalling every stream for its whole length."""
        gone = {row for row, job in enumerate(self._running) if self._drop_if_gone(job)}
        if gone:
            rows = [row for row in range(len(self._running)) if row not in gone]
            self._running = [self._running[row] for row in rows]
            self._keep_rows(rows)
        if self._chunked is not None and self._drop_if_gone(self._chunked):
            self._chunked, self._chunk_cache, self._chunk_done = None, None, 0
        budget = self.settings.max_prefill_tokens
        joining = self._admit(budget)
        matched = [self._stored_match(job.prompt) for job in joining]
        used = sum(len(job.prompt) - match for job, match in zip(joining, matched, strict=True))
        # Prompts that start with the stored prefix are prefilled on top of it, the others together.
        reusing = [job for job, match in zip(joining, matched, strict=True) if match]
        fresh = [job for job, match in zip(joining, matched, strict=True) if not match]
        for group in (reusing, fresh):
            if group:
                self._prefill(group)
        if self._chunked is not None:  # what short prompts left of the budget, and at least a quarter of it
            self._prefill_chunk(max(budget - used, budget // 4))
        if self._running:
            self._decode()

    def _pull(self) -> None:
        """Move what the event loop queued into `_waiting`; block briefly only when there is no work."""
        idle = not self._running and not self._waiting and self._chunked is None
        try:
            self._waiting.append(self._queue.get(timeout=0.2) if idle else self._queue.get_nowait())
            while True:
                self._waiting.append(self._queue.get_nowait())
        except queue.Empty:
            pass

    def _admit(self, budget: int) -> list[Job]:
        """The waiting jobs that join this step, in arrival order, within the batch size and the step's
        prefill budget. The first waiting prompt above the budget starts a chunked prefill when none
        is in progress; shorter prompts behind it may go first."""
        self._pull()
        room = self.settings.max_batch_size - len(self._running) - (self._chunked is not None)
        joining: list[Job] = []
        kept: collections.deque[Job] = collections.deque()
        while self._waiting:
            job = self._waiting.popleft()
            if self._drop_if_gone(job):
                continue
            size = len(job.prompt) - self._stored_match(job.prompt)  # what its prefill will compute
            if room <= 0:
                kept.append(job)
            elif size <= budget:
                joining.append(job)
                budget -= size
                room -= 1
            elif self._chunked is None and size > self.settings.max_prefill_tokens:
                self._chunked, self._chunk_cache, self._chunk_done = job, None, 0
                room -= 1
            else:
                kept.append(job)
        self._waiting = kept
        return joining

    def _drop_if_gone(self, job: Job) -> bool:
        """Finish a job whose client left (no reply: nobody reads it) or whose time ran out."""
        if job.cancelled:
            self._count("cancelled")
            self._release(job)
            return True
        if time.monotonic() >= job.deadline:
            self._finish(job, self._reply(job, "length"))
            return True
        return False

    def _set_threads(self, count: int) -> None:
        if count != self._current_threads:
            self._torch.set_num_threads(count)
            self._current_threads = count

    def _with_prefill_threads(self, forward):
        before = self._current_threads
        self._set_threads(self._prefill_threads)
        try:
            return forward()
        finally:
            self._set_threads(before)

    def _prefill_chunk(self, budget: int) -> None:
        """Prefill the next chunk (up to `budget` tokens, at least one) of the chunked prompt into its
        own cache; on its last chunk it joins the batch."""
        torch = self._torch

        job, done = self._chunked, self._chunk_done
        if self._chunk_cache is None:
            done, layers = self._stored_prefix([job])
            self._count("prefix_tokens_reused", done)
            self._recent.append(job.prompt)
            self._chunk_cache = self._cache_from(layers if done else None, rows=1)
            if job.seed is not None:
                job.generator = torch.Generator(device="cpu").manual_seed(job.seed)
        size = max(1, min(budget, len(job.prompt) - done))
        ids = torch.tensor([job.prompt[done:done + size]], device=self._device)
        mask = torch.ones((1, done + size), dtype=torch.long, device=self._device)
        positions = torch.arange(done, done + size, device=self._device)[None, :]
        out = self._with_prefill_threads(lambda: self._model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._chunk_cache,
            use_cache=True, logits_to_keep=1))
        self._chunk_done = done + size
        self._count("prefill_chunks")
        if self._chunk_done == len(job.prompt):
            cache = self._chunk_cache
            self._chunked, self._chunk_cache, self._chunk_done = None, None, 0
            self._running.append(job)
            self._merge(cache, mask, [len(job.prompt)])
            self._advance([job], out.logits[:, -1, :], offset=len(self._running) - 1)

    def _prefill(self, jobs: list[Job]) -> None:
        """One forward pass over the new prompts (left-padded), then merge their cache into the batch.

        A prompt prefix the jobs share (a system prompt, the chat template's own default one) is
        not computed once per row: its key/value cache comes from the stored prefix, or from one
        pass over it, and only the rest of each prompt is prefilled. A row is then
        [prefix][padding][rest], the padding masked out, the positions counted over prefix and rest."""
        torch = self._torch

        shared, layers = self._shared_prefix(jobs)
        rests = [job.prompt[shared:] for job in jobs]
        width = max(len(rest) for rest in rests)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rests], device=self._device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], device=self._device)
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._cache_from(layers if shared else None, rows=len(jobs))
        if shared:
            mask = torch.cat([torch.ones((len(jobs), shared), dtype=mask.dtype, device=self._device), mask], dim=1)
        self._running.extend(jobs)  # first: if the pass fails, the worker fails them with the rest
        out = self._with_prefill_threads(lambda: self._model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
            logits_to_keep=1))
        for job in jobs:
            if job.seed is not None:
                job.generator = torch.Generator(device="cpu").manual_seed(job.seed)
        self._merge(cache, mask, [len(j.prompt) for j in jobs])
        self._advance(jobs, out.logits[:, -1, :], offset=len(self._running) - len(jobs))

    def _cache_from(self, layers: list | None, rows: int):
        """A new cache for `rows` rows: empty, or each row a copy of one row's per-layer (keys, values)."""
        from transformers import DynamicCache

        if not layers:
            return DynamicCache(config=self._model.config)
        return DynamicCache(ddp_cache_data=[(k.repeat(rows, 1, 1, 1), v.repeat(rows, 1, 1, 1)) for k, v in layers],
                            config=self._model.config)

    def _stored_match(self, prompt: list[int]) -> int:
        if self._prefix is None:
            return 0
        common = _common_length(self._prefix[0], prompt, len(prompt) - 1)
        return common if common >= MIN_SHARED_PREFIX else 0

    def _stored_prefix(self, jobs: list[Job]) -> tuple[int, list | None]:
        """How much of the stored prefix every job's prompt starts with (leaving each at least one
        token of its own to prefill), and its cache cut to that length."""
        if self._prefix is None:
            return 0, None
        tokens, layers = self._prefix
        common = min(len(tokens), *(len(job.prompt) - 1 for job in jobs))
        for job in jobs:
            common = _common_length(tokens, job.prompt, common)
        if common < MIN_SHARED_PREFIX:
            return 0, None
        return common, [(k[..., :common, :], v[..., :common, :]) for k, v in layers]

    def _shared_prefix(self, jobs: list[Job]) -> tuple[int, list | None]:
        """(length, per-layer (keys, values) of one row) of a prefix all the jobs share, or (0, None).

        The stored prefix when it matches. Otherwise the longest prefix the jobs share with each
        other (two or more jobs) or, for one job, with one of the recent prompts: computed in a pass
        of its own (no more tokens than prefilling it with the rest) and stored for what comes after."""
        shared, layers = self._stored_prefix(jobs)
        if shared:
            self._count("prefix_tokens_reused", shared * len(jobs))
        else:
            shared = self._new_prefix(jobs)
            if shared:
                layers = self._prefix[1]
                self._count("prefix_tokens_reused", shared * (len(jobs) - 1))
        self._recent.extend(job.prompt for job in jobs)
        return shared, layers

    def _new_prefix(self, jobs: list[Job]) -> int:
        torch = self._torch
        from transformers import DynamicCache

        first = jobs[0].prompt
        common = min(len(job.prompt) - 1 for job in jobs)
        if len(jobs) > 1:
            for job in jobs[1:]:
                common = _common_length(first, job.prompt, common)
        else:
            common = max((_common_length(first, recent, common) for recent in self._recent), default=0)
        if common < MIN_SHARED_PREFIX:
            return 0
        cache = DynamicCache(config=self._model.config)
        self._with_prefill_threads(lambda: self._model(
            input_ids=torch.tensor([first[:common]], device=self._device),
            position_ids=torch.arange(common, device=self._device)[None, :], cache=cache, use_cache=True,
            logits_to_keep=1))
        self._prefix = (first[:common], [(layer.keys, layer.values) for layer in cache.layers])
        return common

    def _merge(self, cache, mask, lengths: list[int]) -> None:
        torch = self._torch
        from transformers import DynamicCache

        lengths_t = torch.tensor(lengths, device=self._device)
        if self._cache is None:
            self._cache, self._mask, self._lengths = cache, mask, lengths_t
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def pad(t, dim_len):  # left-pad the sequence axis (-2 for k/v, -1 for masks) to `width`
            missing = width - dim_len
            return t if missing == 0 else torch.nn.functional.pad(t, (0, 0, missing, 0) if t.dim() == 4 else (missing, 0))

        layers = []
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            layers.append((torch.cat([pad(old.keys, old.keys.shape[-2]), pad(new.keys, new.keys.shape[-2])]),
                           torch.cat([pad(old.values, old.values.shape[-2]), pad(new.values, new.values.shape[-2])])))
        self._cache = DynamicCache(ddp_cache_data=layers, config=self._model.config)
        self._mask = torch.cat([pad(self._mask, self._mask.shape[1]), pad(mask, mask.shape[1])])
        self._lengths = torch.cat([self._lengths, lengths_t])

    def _decode(self) -> None:
        torch = self._torch
        self._set_threads(self._few_rows_threads if len(self._running) <= FEW_ROWS else self._threads)
        last = torch.tensor([[job.tokens[-1]] for job in self._running], device=self._device)
        self._mask = torch.cat([self._mask, torch.ones((len(self._running), 1), dtype=self._mask.dtype,
                                                       device=self._device)], dim=1)
        out = self._model(input_ids=last, attention_mask=self._mask, position_ids=self._lengths[:, None],
                          cache=self._cache, use_cache=True)
        self._lengths = self._lengths + 1
        with self._lock:
            self._stats["steps"] += 1
            self._stats["decoded_rows"] += len(self._running)
            self._stats["largest_batch"] = max(self._stats["largest_batch"], len(self._running))
        self._advance(list(self._running), out.logits[:, -1, :], offset=0)

    def _advance(self, jobs: list[Job], logits, offset: int) -> None:
        """Sample each job's next token from its row, hand out new text, and retire finished jobs."""
        finished = []
        rows = logits.float().cpu()
        for index, job in enumerate(jobs):
            token = next_token(self._torch, rows[index], job.sampling, job.prompt + job.tokens, job.tokens,
                               job.generator)
            if token in self._eos_ids:
                finished.append((offset + index, self._reply(job, "stop")))
                continue
            job.tokens.append(token)
            text, stopped = self._visible(job)
            if stopped:
                finished.append((offset + index, self._reply(job, "stop", text)))
            elif len(job.tokens) >= job.max_new_tokens or time.monotonic() >= job.deadline:
                finished.append((offset + index, self._reply(job, "length", text)))
            else:
                self._send(job, text)
        if finished:
            gone = {row for row, _ in finished}
            for row, reply in finished:
                self._finish(self._running[row], reply)
            self._running = [job for row, job in enumerate(self._running) if row not in gone]
            self._keep_rows([row for row in range(len(self._running) + len(gone)) if row not in gone])

    def _visible(self, job: Job) -> tuple[str, bool]:
        """The reply's text so far and whether a stop string ended it (the text then stops before it).

        Incremental: only the tokens since the last complete character are decoded each step (as
        text-generation-inference does), so a step costs the same at token 2,000 as at token 2, and
        text ending in a half-decoded character (U+FFFD) waits for the tokens that complete it."""
        prefix = self._detok.decode(job.tokens[job.prefix_at:job.read_at], skip_special_tokens=True)
        fresh = self._detok.decode(job.tokens[job.prefix_at:], skip_special_tokens=True)
        if len(fresh) > len(prefix) and not fresh.endswith(REPLACEMENT):
            searched_from = len(job.text)
            job.text += fresh[len(prefix):]
            job.prefix_at, job.read_at = job.read_at, len(job.tokens)
            for stop in job.stop:
                at = job.text.find(stop, max(0, searched_from - len(stop) + 1))
                if at >= 0:
                    job.text = job.text[:at]
                    return job.text, True
        return job.text, False

    def _send(self, job: Job, text: str) -> None:
        """Hand out the new text, holding back a half-decoded character and any tail that may be the
        start of a stop string."""
        safe = len(text)
        for stop in job.stop:
            for size in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:size]):
                    safe -= size
                    break
        if safe > job.sent:
            job.emit("text", text[job.sent:safe])
            job.sent = safe

    def _reply(self, job: Job, finish: Literal["stop", "length"], text: str | None = None) -> Reply:
        # `job.text` holds whole characters only: a reply cut inside one drops its first bytes.
        return Reply(job.text if text is None else text, len(job.prompt), len(job.tokens), finish)

    def _finish(self, job: Job, value: Reply | ApiError) -> None:
        # Released and counted first: a client that has its answer sees /stats without it.
        self._release(job)
        self._count("replies" if isinstance(value, Reply) else "errors")
        if isinstance(value, Reply):
            if len(value.text) > job.sent:
                job.emit("text", value.text[job.sent:])
                job.sent = len(value.text)
            job.emit("done", value)
        else:
            job.emit("error", value)

    def _release(self, job: Job) -> None:
        with self._lock:
            self._in_flight -= job.cost

    def _keep_rows(self, rows: list[int]) -> None:
        if not rows:
            self._cache = self._mask = self._lengths = None
            return
        index = self._torch.tensor(rows, device=self._device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._lengths = self._lengths[index]
        self._compact()

    def _compact(self) -> None:
        """Drop leading cache columns that no running row uses (left padding of rows now gone)."""
        if self._mask is None:
            return
        if not self._running:
            self._cache = self._mask = self._lengths = None
            return
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start > 0:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            self._mask = self._mask[:, start:]
