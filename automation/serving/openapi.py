"""The endpoint's OpenAPI 3.1 document, built from the same pydantic models that check the bodies.

The handlers read their bodies themselves (to answer 413/415/400 before parsing), so FastAPI's
generated document would show no request bodies; this one names each body, each answer with its
status, the `Retry-After` of 429/503, the stream of `stream: true`, and the bearer key. The
server's own limits (the max_new_tokens cap, messages per conversation, conversations per request)
are written into the schemas it publishes: a body the document admits is a body the server serves
(schemathesis checks both ways in tests/test_serving.py).
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from automation.serving.contract import (
    ChatBody,
    ChatCompletion,
    ErrorBody,
    ModelList,
    ScoreBody,
    ScoreReply,
    Stats,
    Status,
)

ERRORS = {
    "400": "bad value (a field it cannot honour, a token cap, a prompt too long, malformed JSON)",
    "401": "missing or wrong key",
    "413": "body too large",
    "415": "not application/json",
    "422": "the body does not match the schema",
    "429": "full: too many tokens in flight; retry after Retry-After seconds",
    "503": "loading, or too many requests waiting; retry after Retry-After seconds",
    "504": "no reply within the request timeout",
}


def openapi_document(settings, model_name: str) -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in (ScoreBody, ChatBody)]
        + [(m, "serialization") for m in (ScoreReply, ChatCompletion, ModelList, ErrorBody, Status, Stats)],
        ref_template="#/components/schemas/{model}")
    schemas = defs["$defs"]
    cap = settings.max_new_tokens_cap
    schemas["ScoreParameters"]["properties"]["max_new_tokens"]["maximum"] = cap
    schemas["ScoreParameters"]["properties"]["max_new_tokens"]["default"] = min(200, cap)
    chat = schemas["ChatBody"]["properties"]
    for name, most in (("max_tokens", cap), ("max_completion_tokens", cap), ("n", 1)):
        for option in chat[name]["anyOf"]:
            if option.get("type") == "integer":
                option["maximum"] = most
    # The server's own limits on a conversation and on the conversations of one /score request.
    chat["messages"]["maxItems"] = settings.max_messages
    nested, flat = schemas["ScoreInput"]["properties"]["input_string"]["anyOf"]
    nested["maxItems"] = settings.max_conversations
    nested["items"]["maxItems"] = flat["maxItems"] = settings.max_messages

    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def json_body(schema: dict[str, Any], description: str, headers: dict | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
        if headers:
            answer["headers"] = headers
        return answer

    retry = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}, "required": True}}
    unauthorized = {"401": json_body(ref("ErrorBody"), ERRORS["401"])}

    def errors() -> dict[str, Any]:
        return {code: json_body(ref("ErrorBody"), text, retry if code in ("429", "503") else None)
                for code, text in ERRORS.items()}

    bearer = [{"bearer": []}]
    chat_ok = json_body(ref("ChatCompletion"), "the completion; with stream=true, server-sent chat.completion.chunk "
                                               "events ending with `data: [DONE]`")
    # OpenAPI 3.1 has no itemSchema (3.2): for an event stream, `schema` describes each event.
    chat_ok["content"]["text/event-stream"] = {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": "a chat.completion.chunk as JSON; the last: [DONE]"},
                       "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "automation local endpoint", "version": "1",
                 "description": f"serves {model_name}: the Azure ML chat-completion scoring contract and an "
                                f"OpenAI-compatible chat API; max_new_tokens cap {cap}"},
        "paths": {
            "/health": {"get": {"operationId": "health", "summary": "the process is up",
                                "responses": {"200": json_body(ref("Status"), "up")}}},
            "/ready": {"get": {"operationId": "ready", "summary": "the model is loaded",
                               "responses": {"200": json_body(ref("Status"), "ready"),
                                             "503": json_body(ref("Status"), "still loading", retry)}}},
            "/stats": {"get": {"operationId": "stats", "summary": "engine counters", "security": bearer,
                               "responses": {"200": json_body(ref("Stats"), "counters"), **unauthorized}}},
            "/v1/models": {"get": {"operationId": "listModels", "summary": "the one model served",
                                   "security": bearer,
                                   "responses": {"200": json_body(ref("ModelList"), "models"), **unauthorized}}},
            "/score": {"post": {
                "operationId": "score", "summary": "Azure ML chat-completion scoring", "security": bearer,
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref("ScoreBody")}}},
                "responses": {"200": json_body(ref("ScoreReply"), "one output per conversation"), **errors()}}},
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion", "summary": "OpenAI chat completion", "security": bearer,
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref("ChatBody")}}},
                "responses": {"200": chat_ok, **errors()}}},
        },
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
