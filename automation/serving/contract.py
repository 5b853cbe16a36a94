"""What the local endpoint accepts and answers: the Azure ML scoring contract and the OpenAI chat API.

`score_request` builds the reference's scoring request; every caller that scores an endpoint
(the score stage, the Azure backend's smoke test, the evaluation) builds it here, so the request
sent is the request the seed sends. Importing this module imports only pydantic.

The published OpenAPI document (openapi.py) is built from these models, so it must admit exactly
what the server serves: a rule the handlers check themselves (to answer with a clearer message, or
with 400 for a field it cannot honour) is written into the model's JSON Schema here, beside the
field it constrains (`json_schema_extra`). tests/test_serving.py holds the two together with
schemathesis' positive and negative checks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# OpenAI fields that change nothing in a reply from this endpoint: accepted and ignored.
IGNORED_CHAT_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier",
                                 "prompt_cache_key", "parallel_tool_calls"})
# OpenAI fields accepted only with the value that asks for nothing (the client's own default).
NEUTRAL_CHAT_VALUES: dict[str, list[Any]] = {
    "response_format": [{"type": "text"}], "logprobs": [False], "logit_bias": [{}], "tools": [[]],
    "tool_choice": ["none"], "modalities": [["text"]], "functions": [[]],
}


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds: int) -> Any:
    """An integer as JSON Schema counts them: 16.0 is one too (strict mode alone would refuse it);
    a string or a boolean still is not. The bounds go inside, so the schema shows them as bounds."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]

# Message content must hold a character other than ASCII whitespace. Written as a class, not `\S`:
# Python's, Rust's (pydantic) and ECMAScript's (OpenAPI tools) ideas of Unicode whitespace differ.
NOT_BLANK = r"[^ \t\n\r\f\v]"


def score_request(conversations: list[list[dict[str, str]]], parameters: dict[str, Any]) -> dict[str, Any]:
    """The scoring request exactly as the reference builds it: `input_string` is a list of
    conversations (one per reply wanted), each a list of `{"role", "content"}` messages."""
    return {"input_data": {"input_string": [[{"role": m["role"], "content": m["content"]} for m in conversation]
                                            for conversation in conversations],
                           "parameters": dict(parameters)},
            "params": {}}


def _text_part_schema(schema: dict[str, Any]) -> None:
    # Parsed loosely so that an image part gets a clear 400 (server.check_conversation); served:
    # only a text part with its text.
    schema["properties"]["type"] = {"const": "text", "description": 'only "text" parts are served'}
    schema["properties"]["text"] = {"type": "string"}
    schema["required"] = ["type", "text"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_text_part_schema)
    type: str
    text: str | None = None


CONTENT_SCHEMA = {"anyOf": [
    {"type": "string", "pattern": NOT_BLANK},
    {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}, "minItems": 1,
     "contains": {"type": "object", "properties": {"text": {"type": "string", "pattern": NOT_BLANK}},
                  "required": ["text"]}},
], "description": "the text, or text parts (joined); not blank"}


class Message(BaseModel):
    # extra="ignore": OpenAI clients may send fields such as "name" that change nothing here.
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(json_schema_extra=CONTENT_SCHEMA)


class ScoreParameters(BaseModel):
    # The ranges of the experiment file's sample.parameters; unknown keys are typos, so refused.
    model_config = ConfigDict(extra="forbid", strict=True)
    temperature: float = Field(0.6, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: json_int(ge=0) | None = None
    do_sample: bool = True
    max_new_tokens: json_int(ge=1) = 200
    repetition_penalty: float | None = Field(None, gt=0, le=10)


class ScoreInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # At least one conversation of at least one message (the server says which is missing); the
    # most of each, a server setting, is written into the document by openapi.py.
    input_string: list[list[Message]] | list[Message] = Field(
        description="the reference's form, a list of conversations (one output each), or one conversation "
                    "as a flat list of messages (LangChain's AzureMLChatOnlineEndpoint sends this)",
        union_mode="left_to_right",
        json_schema_extra={"anyOf": [
            {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1,
                                                        "items": {"$ref": "#/components/schemas/Message"}}},
            {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Message"}},
        ]})
    parameters: ScoreParameters = ScoreParameters()


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input_data: ScoreInput
    params: dict[str, Any] = {}


class ScoreReply(BaseModel):
    output: str | list[str] = Field(description="one conversation: its reply; several: one reply each, in order")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


def _chat_body_schema(schema: dict[str, Any]) -> None:
    # extra="allow" parses every other field; what the server then serves (server.check_unhonoured):
    # the ignored ones with any value, the others only with the value that asks for nothing, or null.
    for name in sorted(IGNORED_CHAT_FIELDS):
        schema["properties"][name] = {"description": "accepted and ignored"}
    for name, values in NEUTRAL_CHAT_VALUES.items():
        schema["properties"][name] = {"enum": [*values, None], "description": "only the value that asks for nothing"}
    schema["additionalProperties"] = {"type": "null"}


NonEmptyText = Annotated[str, Field(min_length=1)]


class ChatBody(BaseModel):
    # extra="allow": every other OpenAI field is looked at, and refused (400) unless it asks for nothing.
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_chat_body_schema)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)  # as OpenAI's own description: minItems 1
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: json_int(ge=1) | None = None
    max_completion_tokens: json_int(ge=1) | None = None
    n: json_int(ge=1) | None = Field(None, description="only 1 is served; more is a 400")  # maximum: openapi.py
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings; the reply ends before the first")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: json_int(ge=0, le=2**63 - 1) | None = None  # what torch.Generator.manual_seed takes


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str
    precision: str | None = None  # /ready: bf16 or fp32 (fp16 on a GPU without bf16)
    precision_reason: str | None = None  # why: the CPU flags seen, or what forced it
    dtype: str | None = None  # the weights' dtype


class Stats(BaseModel):
    """`GET /stats`: the engine's counters since the server started, and its state now."""

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(description="requests admitted")
    replies: int = Field(description="replies finished (stop or length)")
    errors: int = Field(description="requests failed inside the engine")
    cancelled: int = Field(description="requests whose client went away before the reply")
    steps: int = Field(description="decoding steps")
    largest_batch: int = Field(description="most requests decoded in one step")
    decoded_rows: int = Field(description="tokens decoded over all steps and rows")
    mean_batch: float = Field(description="decoded_rows / steps")
    prefill_chunks: int = Field(description="chunks of prompts above the per-step prefill budget")
    prefix_tokens_reused: int = Field(description="prompt tokens whose cache came from a shared prefix")
    queued: int = Field(description="requests waiting to be admitted")
    running: int = Field(description="requests being decoded")
    tokens_in_flight: int = Field(description="prompt + max_new_tokens reserved by admitted and waiting requests")
    max_tokens_in_flight: int = Field(description="beyond it a request gets 429")
    threads: int = Field(description="torch threads while decoding more than a few rows")
    few_rows_threads: int = Field(description="torch threads while decoding a few rows (up to 4)")
    prefill_threads: int = Field(description="torch threads while prefilling")
    ready: bool = Field(description="the model is loaded")

