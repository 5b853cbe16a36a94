"""The local endpoint, for real: server processes on loopback serving a tiny random chat model."""

from __future__ import annotations

import json
import os
import shutil
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
    """The three servers the tests need, started at once: each spends seconds importing torch."""
    broken = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with ThreadPoolExecutor(3) as pool:
        return {
            "main": pool.submit(start_endpoint, "tiny-staging", tiny_model, tags=TAGS,
                                max_new_tokens_cap=CAP, ready_timeout_s=120),
            "short": pool.submit(start_endpoint, "tiny-short", tiny_model, tags={"pr": "9"},
                                 max_new_tokens_cap=2000, request_timeout_ms=2000, ready_timeout_s=120),
            "broken": pool.submit(start_endpoint, "tiny-broken", broken, tags={"pr": "9"}, ready_timeout_s=120),
        }


@pytest.fixture(scope="module")
def endpoint(starts) -> EndpointRecord:
    record = starts["main"].result()
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
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


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
    with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], stream=True)


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
    "ends with assistant": ("/score", {"json": _with(input_data={"input_string": _messages(2)})}, 422, "end with a user"),
    "too many messages": ("/score", {"json": _with(input_data={"input_string": _messages(65)})}, 422, "at most 64"),
    "temperature 3": ("/score", {"json": _with(temperature=3)}, 422, "temperature"),
    "top_p 0": ("/score", {"json": _with(top_p=0)}, 422, "top_p"),
    "max_new_tokens 0": ("/score", {"json": _with(max_new_tokens=0)}, 422, "max_new_tokens"),
    "unknown parameter": ("/score", {"json": _with(beam_width=4)}, 422, "beam_width"),
    "above the cap": ("/score", {"json": _with(max_new_tokens=CAP + 1)}, 400, f"cap of {CAP}"),
    "chat stream": ("/v1/chat/completions", {"json": {"messages": _messages(1), "stream": True}}, 400, "streaming"),
    "chat n=2": ("/v1/chat/completions", {"json": {"messages": _messages(1), "n": 2}}, 400, "n=1"),
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
    assert stats["largest_batch"] > 1 and stats["batches"] < stats["requests"]
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


def _arrivals(settings_kwargs: dict, every_s: float, count: int) -> list[int]:
    """Batch sizes the worker's collector forms when `count` requests arrive `every_s` apart."""
    import time

    from automation.serving.generator import Generator, Settings

    generator = Generator(Settings(model_dir="unused", api_key="k", **settings_kwargs))

    def produce() -> None:
        for _ in range(count):
            generator._queue.put(object())
            time.sleep(every_s)

    producer = threading.Thread(target=produce)
    producer.start()
    sizes = []
    while sum(sizes) < count:
        batch = generator._collect()
        if batch:
            sizes.append(len(batch))
    producer.join()
    return sizes


def test_requests_arriving_close_together_share_a_batch():
    # Clients released together reach the server spread out; each within the gap joins the batch,
    # even when the spread (16 x 4 ms) is longer than the gap.
    assert _arrivals({"batch_wait_ms": 40, "batch_window_ms": 2000}, every_s=0.004, count=16) == [16]
    # The window bounds how long the first request waits, however steady the arrivals.
    sizes = _arrivals({"batch_wait_ms": 200, "batch_window_ms": 60, "max_batch_size": 64},
                      every_s=0.02, count=20)
    assert len(sizes) >= 2 and max(sizes) < 20
    # And the batch size bounds it too.
    assert _arrivals({"batch_wait_ms": 500, "batch_window_ms": 5000, "max_batch_size": 4},
                     every_s=0.001, count=8) == [4, 4]
