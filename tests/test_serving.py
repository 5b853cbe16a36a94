"""The local endpoint, for real: server processes on loopback serving a tiny random chat model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from automation.errors import BackendError
from automation.serving.process import (
    EndpointRecord,
    get_endpoint,
    invoke,
    list_endpoints,
    read_key,
    start_endpoint,
    stop_endpoint,
)

REPO = Path(__file__).resolve().parent.parent
CAP = 64
LONG_BUDGET = 3000
TAGS = {"repo": "org/repo", "pr": "7", "stage": "staging"}


def score_body(*messages: tuple[str, str], **parameters) -> dict:
    params = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 16, **parameters}
    return {"input_data": {"input_string": [{"role": r, "content": c} for r, c in messages],
                           "parameters": params}, "params": {}}


HELLO = score_body(("user", "How do I boil an egg?"))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> Path:
    return tiny_model_dir  # conftest builds it once per session


@pytest.fixture(scope="module")
def serving_home(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("workspace")
        patch.setenv("AUTOMATION_HOME", str(folder))
        patch.setenv("HF_HUB_OFFLINE", "1")
        # One torch thread per server: several servers and pytest share two cores here, and
        # oversubscribed OpenMP threads make the tiny model's generation ten times slower.
        patch.setenv("OMP_NUM_THREADS", "1")
        yield folder
        for record in list_endpoints():  # whatever a failing test left running
            stop_endpoint(record.name)


@pytest.fixture(scope="module")
def starts(serving_home, tiny_model, tmp_path_factory) -> dict[str, Future]:
    """The five servers the tests need, started at once: each spends seconds importing torch."""
    broken = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with ThreadPoolExecutor(5) as pool:
        return {
            # Long replies, a small token budget and a short prompt limit: continuous batching,
            # cancellation and admission control.
            "long": pool.submit(start_endpoint, "tiny-long", tiny_model, tags={"pr": "9"}, max_new_tokens_cap=4000,
                                request_timeout_ms=120_000, max_tokens_in_flight=LONG_BUDGET, max_prompt_tokens=256,
                                ready_timeout_s=120, threads=1, prefill_threads=2, precision="fp32"),
            "main": pool.submit(start_endpoint, "tiny-staging", tiny_model, tags=TAGS,
                                max_new_tokens_cap=CAP, ready_timeout_s=120),
            "short": pool.submit(start_endpoint, "tiny-short", tiny_model, tags={"pr": "9"},
                                 max_new_tokens_cap=2000, request_timeout_ms=2000, ready_timeout_s=120),
            "broken": pool.submit(start_endpoint, "tiny-broken", broken, tags={"pr": "9"}, ready_timeout_s=120),
            # The fuzzer's: the smallest cap keeps hundreds of replies cheap.
            "fuzz": pool.submit(start_endpoint, "tiny-fuzz", tiny_model, tags={"pr": "9"}, max_new_tokens_cap=4,
                                ready_timeout_s=120),
        }


@pytest.fixture(scope="module")
def endpoint(starts) -> EndpointRecord:
    record = starts["main"].result()
    yield record
    stop_endpoint(record.name)


@pytest.fixture(scope="module")
def fuzz_endpoint(starts) -> EndpointRecord:
    record = starts["fuzz"].result()
    yield record
    stop_endpoint(record.name)


@pytest.fixture(scope="module")
def client(endpoint) -> httpx.Client:
    with httpx.Client(base_url=endpoint.url, timeout=60, trust_env=False) as http:
        yield http


def auth(endpoint: EndpointRecord) -> dict[str, str]:
    return {"Authorization": f"Bearer {read_key(endpoint)}"}


def test_health_and_ready_need_no_key(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    # what the endpoint computes in, and why (the CPU's flags, or what forced it)
    assert ready.json()["precision"] in ("bf16", "fp32") and ready.json()["precision_reason"]


def test_score_takes_the_reference_form_and_the_flat_form(endpoint):
    from automation.serving.contract import score_request

    params = {"max_new_tokens": 12, "do_sample": False}
    one = invoke(endpoint, score_request([[{"role": "user", "content": "How do I boil an egg?"}]], params))
    flat = invoke(endpoint, score_body(("user", "How do I boil an egg?"), **params))
    assert isinstance(one["output"], str) and one == flat  # same conversation, greedy: same reply
    two = invoke(endpoint, score_request([[{"role": "user", "content": "How do I boil an egg?"}],
                                          [{"role": "user", "content": "Name a fruit."}]], params))
    assert isinstance(two["output"], list) and len(two["output"]) == 2 and two["output"][0] == one["output"]


def test_extreme_sampling_values_the_schema_allows_never_give_5xx(endpoint):
    for extreme in (1e-38, 5e-324):
        assert isinstance(invoke(endpoint, _with(temperature=extreme, repetition_penalty=extreme, top_k=1,
                                                 max_new_tokens=4))["output"], str)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 1e-38,
            "top_p": 1e-38, "presence_penalty": 2, "frequency_penalty": -2}
    assert invoke(endpoint, chat, path="/v1/chat/completions")["choices"][0]["finish_reason"] in ("stop", "length")


def test_what_the_document_admits_is_served(endpoint):
    """Bodies the published document admits and the server once refused (issue 25)."""
    ends_with_assistant = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert isinstance(invoke(endpoint, score_body(*[(m["role"], m["content"]) for m in ends_with_assistant],
                                                  max_new_tokens=4))["output"], str)
    # 4.0 is an integer to JSON Schema, and to the server now
    assert isinstance(invoke(endpoint, _with(max_new_tokens=4.0, top_k=2.0))["output"], str)
    chat = {"messages": [{"role": "system", "content": "Be brief."}], "max_tokens": 4.0, "n": 1.0, "seed": 7.0}
    assert invoke(endpoint, chat, path="/v1/chat/completions")["choices"][0]["finish_reason"] in ("stop", "length")


def test_score_answers_with_output(endpoint):
    reply = invoke(endpoint, HELLO)
    assert set(reply) == {"output"} and isinstance(reply["output"], str)
    conversation = score_body(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"),
                              ("user", "Name a fruit."), do_sample=False, repetition_penalty=1.2, top_k=5)
    assert isinstance(invoke(endpoint, conversation)["output"], str)
    defaults = {"input_data": {"input_string": [{"role": "user", "content": "Hi"}]}}  # default 200 > cap
    assert isinstance(invoke(endpoint, defaults)["output"], str)


def test_openai_client_works(endpoint):
    client = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key=read_key(endpoint), max_retries=0,
                           http_client=httpx.Client(trust_env=False))
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0, seed=3)
    choice = completion.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "developer", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}],
        max_completion_tokens=8, temperature=0, seed=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    same = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
        max_completion_tokens=8, temperature=0)
    assert streamed == same.choices[0].message.content  # developer = system, parts joined, stream = whole
    assert [m.id for m in client.models.list()] == [Path(endpoint.model_dir).name]


def test_stop_sequences_end_the_reply_before_them(endpoint):
    body = {"messages": [{"role": "user", "content": "Tell me about eggs."}], "max_tokens": 40, "temperature": 0}
    full = invoke(endpoint, body, path="/v1/chat/completions")["choices"][0]["message"]["content"]
    assert len(full) > 4, full
    stop = full[len(full) // 2:len(full) // 2 + 2]  # the tiny random model's text: any two characters of it
    cut = invoke(endpoint, {**body, "stop": [stop, "never-in-the-reply"]}, path="/v1/chat/completions")["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == full[: full.index(stop)]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic abc"}])
def test_requests_without_the_key_get_401(client, headers):
    for method, path in (("POST", "/score"), ("POST", "/v1/chat/completions"), ("GET", "/stats")):
        response = client.request(method, path, json=HELLO, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"


def _messages(n: int) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(n)]


def _with(**changes) -> dict:
    body = json.loads(json.dumps(HELLO))
    body["input_data"].update(changes.pop("input_data", {}))
    body["input_data"]["parameters"].update(changes)
    return body


BAD_INPUTS = {
    # case: (path, request keyword arguments, status, words the message must contain)
    "malformed json": ("/score", {"content": b'{"input_data": [', "headers": {"content-type": "application/json"}}, 400, "malformed"),
    "nan": ("/score", {"content": b'{"input_data": NaN}', "headers": {"content-type": "application/json"}}, 400, "NaN"),
    "deep nesting": ("/score", {"content": b"[" * 200_000, "headers": {"content-type": "application/json"}}, 400, "malformed"),
    "too large": ("/score", {"content": b" " * 1_000_001, "headers": {"content-type": "application/json"}}, 413, "larger"),
    "too large, chunked": ("/score", {"content": iter([b" " * 600_000] * 2), "headers": {"content-type": "application/json"}}, 413, "larger"),
    "text/plain": ("/score", {"content": json.dumps(HELLO).encode(), "headers": {"content-type": "text/plain"}}, 415, "application/json"),
    "no content type": ("/score", {"content": json.dumps(HELLO).encode()}, 415, "application/json"),
    "not an object": ("/score", {"json": [HELLO]}, 422, "dictionary"),
    "missing input_data": ("/score", {"json": {"params": {}}}, 422, "input_data"),
    "unknown role": ("/score", {"json": _with(input_data={"input_string": [{"role": "bot", "content": "hi"}]})}, 422, "role"),
    "empty content": ("/score", {"json": _with(input_data={"input_string": [{"role": "user", "content": "  "}]})}, 422, "empty"),
    "non-string content": ("/score", {"json": _with(input_data={"input_string": [{"role": "user", "content": 5}]})}, 422, "content"),
    "no messages": ("/score", {"json": _with(input_data={"input_string": []})}, 422, "no messages"),
    "chat no messages": ("/v1/chat/completions", {"json": {"messages": []}}, 422, "at least 1 item"),
    "score empty conversation": ("/score", {"json": _with(input_data={"input_string": [[]]})}, 422, "no messages"),
    "blank text parts": ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [{"type": "text", "text": " \n"}]}]}}, 422, "empty"),
    "chat logprobs 0": ("/v1/chat/completions", {"json": {"messages": _messages(1), "logprobs": 0}}, 400, "logprobs"),
    "too many messages": ("/score", {"json": _with(input_data={"input_string": _messages(65)})}, 422, "at most 64"),
    "temperature 3": ("/score", {"json": _with(temperature=3)}, 422, "temperature"),
    "top_p 0": ("/score", {"json": _with(top_p=0)}, 422, "top_p"),
    "max_new_tokens 0": ("/score", {"json": _with(max_new_tokens=0)}, 422, "max_new_tokens"),
    "unknown parameter": ("/score", {"json": _with(beam_width=4)}, 422, "beam_width"),
    "above the cap": ("/score", {"json": _with(max_new_tokens=CAP + 1)}, 400, f"cap of {CAP}"),
    "chat n=2": ("/v1/chat/completions", {"json": {"messages": _messages(1), "n": 2}}, 400, "n=1"),
    "chat tools": ("/v1/chat/completions", {"json": {"messages": _messages(1), "tools": [{"type": "function", "function": {"name": "f"}}]}}, 400, "tools: not supported"),
    "chat json format": ("/v1/chat/completions", {"json": {"messages": _messages(1), "response_format": {"type": "json_object"}}}, 400, "response_format"),
    "chat logprobs": ("/v1/chat/completions", {"json": {"messages": _messages(1), "logprobs": True}}, 400, "logprobs"),
    "chat image part": ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}}, 400, "only text parts"),
    "chat five stops": ("/v1/chat/completions", {"json": {"messages": _messages(1), "stop": list("abcde")}}, 422, "at most 4"),
    "score too many conversations": ("/score", {"json": _with(input_data={"input_string": [_messages(1)] * 17})}, 422, "at most 16"),
    "chat above the cap": ("/v1/chat/completions", {"json": {"messages": _messages(1), "max_tokens": CAP + 1}}, 400, f"cap of {CAP}"),
    "chat seed too big": ("/v1/chat/completions", {"json": {"messages": _messages(1), "seed": 2**64}}, 422, "seed"),
    "chat bad role": ("/v1/chat/completions", {"json": {"messages": [{"role": "tool", "content": "x"}]}}, 422, "role"),
    "unknown route": ("/nope", {"json": {}}, 404, "Not Found"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_a_clear_4xx_and_the_server_lives_on(endpoint, client, case):
    path, kwargs, status, words = BAD_INPUTS[case]
    kwargs = dict(kwargs)
    headers = {**auth(endpoint), **kwargs.pop("headers", {})}
    response = client.post(path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"]
    assert client.get("/health").status_code == 200


def test_concurrent_requests_are_batched(endpoint, client):
    # Half the clients use /score, half the chat route with the same sampling settings but each its
    # own length: they can share a batch, and each reply is cut at its own limit.
    replies: dict[int, dict] = {}
    barrier = threading.Barrier(8)

    def ask(i: int) -> None:
        barrier.wait()
        if i % 2:
            body = {"messages": [{"role": "user", "content": f"Question {i}?"}], "max_tokens": 4 + i,
                    "temperature": 0.6, "top_p": 0.9}
            replies[i] = invoke(endpoint, body, path="/v1/chat/completions")
        else:
            replies[i] = invoke(endpoint, score_body(("user", f"Question number {i}?"), max_new_tokens=24))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(replies) == list(range(8))
    for i, reply in replies.items():
        if i % 2:
            assert reply["usage"]["completion_tokens"] <= 4 + i
        else:
            assert isinstance(reply["output"], str)
    stats = client.get("/stats", headers=auth(endpoint)).json()
    assert stats["largest_batch"] > 1 and stats["mean_batch"] > 1
    assert invoke(endpoint, HELLO)["output"] is not None  # still serving after the burst


def test_key_is_private_and_never_logged(endpoint):
    key_file = Path(endpoint.key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = read_key(endpoint)
    assert len(key) >= 32
    log_text = Path(endpoint.log_file).read_text()
    assert "POST /score" in log_text and key not in log_text
    assert key not in Path(endpoint.key_file).with_suffix(".json").read_text()


def test_start_is_idempotent_and_records_round_trip(endpoint, tiny_model):
    again = start_endpoint(endpoint.name, tiny_model, tags=TAGS, max_new_tokens_cap=CAP)
    assert again.pid == endpoint.pid and again.port == endpoint.port
    found = get_endpoint(endpoint.name)
    assert found is not None and found.alive and found.created_at == endpoint.created_at
    assert EndpointRecord.model_validate_json(found.model_dump_json()) == found
    assert [r.name for r in list_endpoints({"pr": "7", "stage": "staging"})] == [endpoint.name]
    assert list_endpoints({"pr": "8"}) == []


def test_the_server_says_what_precision_it_computes_in_and_why(starts, endpoint):
    """auto: bf16 weights where this CPU has native bf16, else fp32; forced fp32 stays fp32. The
    choice and its reason (the CPU flags seen) are in the server's startup log."""
    from automation.backends.local.precision import choose

    forced = starts["long"].result()
    assert forced.precision == "fp32" and endpoint.precision == "auto"
    assert "in fp32 (forced by compute.precision: fp32 (CPU flags" in Path(forced.log_file).read_text()
    native = choose("auto", "cpu").bf16
    expected = "in bf16 (native bf16 on this CPU (CPU flags" if native else "in fp32 (no native bf16 on this CPU"
    assert expected in Path(endpoint.log_file).read_text()
    assert f"weights {'bfloat16' if native else 'float32'})" in Path(endpoint.log_file).read_text()


def test_long_generation_is_cut_before_the_timeout_then_stop(starts):
    record = starts["short"].result()
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 2000, "temperature": 0}
    # 2000 tokens take several seconds here; generation stops at 80 % of the 2 s request timeout
    # and answers 200 with what it has (a timeout would be a 504, which invoke raises).
    reply = invoke(record, body, path="/v1/chat/completions", timeout_s=30)
    assert reply["choices"][0]["finish_reason"] == "length"
    assert 0 < reply["usage"]["completion_tokens"] < 2000

    assert stop_endpoint("tiny-short") is True
    with pytest.raises(ProcessLookupError):
        os.kill(record.pid, 0)
    assert get_endpoint("tiny-short") is None
    assert not Path(record.key_file).exists() and Path(record.log_file).exists()
    assert stop_endpoint("tiny-short") is False  # already gone is success


def _processes_using(key_file: str) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if key_file in (proc / "cmdline").read_bytes().decode(errors="replace").split("\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_broken_model_fails_with_the_log_tail_and_leaves_nothing(serving_home, starts):
    with pytest.raises(BackendError) as failure:
        starts["broken"].result()
    message = str(failure.value)
    assert "exited with code 1" in message and "last lines" in message
    assert "could not load the model" in message
    assert get_endpoint("tiny-broken") is None
    key_file = str(serving_home / "endpoints" / "tiny-broken.key")
    assert not Path(key_file).exists()
    if Path("/proc").is_dir():
        assert _processes_using(key_file) == []


def _chat(text: str, max_tokens: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0, **extra}


def _stats(record: EndpointRecord) -> dict:
    with httpx.Client(trust_env=False) as http:
        return http.get(f"{record.url}/stats", headers=auth(record)).json()


def test_short_request_leaves_a_long_batch_early_and_full_server_answers_429(starts):
    record = starts["long"].result()
    long_reply: dict = {}
    # 1500 tokens of the tiny model take seconds; the short request joins at the next step and leaves
    # after its own 4 tokens, while the long one is still generating.
    long_thread = threading.Thread(target=lambda: long_reply.update(
        invoke(record, _chat("Tell me everything.", 1500), path="/v1/chat/completions")))
    long_thread.start()
    try:
        for _ in range(200):
            if _stats(record)["running"] == 1:
                break
            threading.Event().wait(0.02)
        short = invoke(record, _chat("Hi", 4), path="/v1/chat/completions")
        assert short["usage"]["completion_tokens"] <= 4
        assert long_thread.is_alive(), "the short request waited for the long one"
        stats = _stats(record)
        assert stats["largest_batch"] == 2
        # The short prompt was prefilled with 2 threads and the decoding went back to 1.
        assert (stats["threads"], stats["prefill_threads"]) == (1, 2)
        # Admission: 1500 + its prompt are in flight; 2000 more would pass the budget of 3000.
        with httpx.Client(trust_env=False) as http:
            full = http.post(f"{record.url}/v1/chat/completions", json=_chat("Hi", 2000), headers=auth(record))
        assert full.status_code == 429 and full.headers["retry-after"] == "1", full.text
        assert "tokens in flight" in full.json()["error"]["message"]
    finally:
        long_thread.join(120)
    assert long_reply["usage"]["completion_tokens"] > 4
    assert _stats(record)["tokens_in_flight"] == 0


def test_prompt_over_the_limit_gets_400(starts):
    record = starts["long"].result()
    with httpx.Client(trust_env=False) as http:
        response = http.post(f"{record.url}/v1/chat/completions", headers=auth(record),
                             json=_chat("egg " * 600, 4))
    assert response.status_code == 400 and response.json()["error"]["type"] == "context_length_exceeded"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_its_generation(starts, stream):
    record = starts["long"].result()
    before = _stats(record)["cancelled"]
    body = _chat("Tell me everything.", 2000, stream=stream)
    # The client gives up mid-reply: 2,000 tokens take the tiny model a second or more even on an idle
    # machine (about 1,000 tokens/s), and it leaves after 0.5 s (at 2 s an idle machine had finished).
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(2, read=0.5)) as http:
        if stream:
            with http.stream("POST", f"{record.url}/v1/chat/completions", json=body, headers=auth(record)) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # the first chunk: generation has started
        else:
            with pytest.raises(httpx.ReadTimeout):  # closes the connection
                http.post(f"{record.url}/v1/chat/completions", json=body, headers=auth(record))
    for _ in range(600):  # the engine drops the job at its next step; poll (up to 30 s on a loaded machine)
        stats = _stats(record)
        if stats["cancelled"] > before and stats["running"] == 0:
            break
        threading.Event().wait(0.05)
    assert stats["cancelled"] == before + 1 and stats["running"] == 0 and stats["tokens_in_flight"] == 0


def test_a_cut_reply_never_ends_in_a_broken_character(tiny_model):
    """Decoding part of a multi-byte character gives U+FFFD; the engine holds it back and drops it at a cut."""
    import asyncio

    from transformers import AutoTokenizer

    from automation.serving.generator import Generator, Job, Settings
    from automation.serving.sampling import Sampling

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer("naïve café, 東京 ☕ and more", add_special_tokens=False)["input_ids"]
    generator = Generator(Settings(model_dir=str(tiny_model), api_key="k"))
    generator._detok = tokenizer
    loop = asyncio.new_event_loop()
    broken, sent = 0, []
    try:
        job = Job([], 100, Sampling(), None, (), 0.0, loop, events=None)
        job.emit = lambda kind, value: sent.append(value)
        for cut in range(1, len(ids) + 1):  # the tokens arrive one a step, and the reply may be cut after any
            job.tokens.append(ids[cut - 1])
            broken += tokenizer.decode(ids[:cut]).endswith("\ufffd")
            generator._send(job, generator._visible(job)[0])
            reply = generator._reply(job, "length")
            assert "\ufffd" not in reply.text and "".join(sent) == reply.text
            assert tokenizer.decode(ids[:cut]).startswith(reply.text)
    finally:
        loop.close()
    assert reply.text == tokenizer.decode(ids)
    assert broken > 0  # the text does split inside characters, so the check above means something


# --------------------------------------------------------------------------------------------
# The published OpenAPI document, fuzzed with schemathesis against the running server

def test_openapi_document_describes_bodies_answers_and_auth(client):
    document = client.get("/openapi.json").json()
    score = document["paths"]["/score"]["post"]
    assert score["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ScoreBody"}
    assert {"200", "401", "422", "429"} <= set(score["responses"]) and score["security"] == [{"bearer": []}]
    assert "Retry-After" in score["responses"]["429"]["headers"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream"}
    params = document["components"]["schemas"]["ScoreParameters"]["properties"]
    assert params["max_new_tokens"]["maximum"] == CAP  # the server's own cap, not a generic one
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}


def test_the_document_admits_no_empty_conversation(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    messages = schemas["ChatBody"]["properties"]["messages"]
    assert messages["minItems"] == 1 and messages["maxItems"] == 64  # OpenAI's own minItems; the server's --max-messages
    nested, flat = schemas["ScoreInput"]["properties"]["input_string"]["anyOf"]
    assert nested["minItems"] == flat["minItems"] == nested["items"]["minItems"] == 1
    assert nested["maxItems"] == 16 and flat["maxItems"] == nested["items"]["maxItems"] == 64
    content = schemas["Message"]["properties"]["content"]["anyOf"]
    assert content[0]["pattern"] and content[1]["minItems"] == 1


def test_schemathesis_with_every_check_finds_nothing(fuzz_endpoint, tmp_path):
    """schemathesis' own CLI, every check (`--checks all`: no 5xx, answers on their schema, and both
    ways between the document and the server: a body it admits is served, a body it refuses is
    refused), its coverage phase and a few fuzzed cases per operation. Against a server with a
    max_new_tokens cap of 4, so that the ~600 cases take seconds of generation, not minutes."""
    st = Path(sys.executable).with_name("schemathesis")
    done = subprocess.run(
        [str(st), "run", f"{fuzz_endpoint.url}/openapi.json", "--checks", "all", "--max-examples", "20",
         "--seed", "25", "--no-color", "--request-timeout", "60",
         "--header", f"Authorization: Bearer {read_key(fuzz_endpoint)}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    assert "No issues found" in done.stdout
