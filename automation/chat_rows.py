"""Chat rows: the formats the data stage reads, how it tells them apart, and the checks of a row.

Every format is brought to one form, the ultrachat_200k row with an optional system message
first, which is what the data stage writes and everything downstream reads:

    {"prompt": str, "prompt_id": 64-hex sha256, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

`messages` holds at most one system message, first; then turns alternate user/assistant starting
with the user; rows of an SFT split (train, test) end with the assistant.

The formats (`data.format`):

- `ultrachat`: that form already (HuggingFaceH4/ultrachat_200k), `prompt` and `prompt_id` given;
- `openai`: OpenAI / Azure OpenAI fine-tuning JSONL and Hugging Face chat datasets:
  `{"messages": [{"role": ..., "content": ...}]}`; `prompt` (the first user turn) and `prompt_id`
  (its sha256, as ultrachat's) are derived;
- `sharegpt`: `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`, optionally a
  `system` column (LLaMA-Factory's sharegpt layout); `prompt` and `prompt_id` derived;
- `auto`: detected from each split's first rows.

`data.columns` renames the columns and message keys of a dataset that uses other names, and
`data.roles` adds speaker names (e.g. `bot: assistant`); both as LLaMA-Factory's dataset_info.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

FORMATS = ("ultrachat", "openai", "sharegpt")
ROLES = ("system", "user", "assistant")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
DETECT_ROWS = 100  # rows looked at to tell the format of a split, at most

# Where each format keeps things, and its speakers' names (dataset value -> ours).
_IDENTITY_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ultrachat": {"messages": "messages", "role": "role", "content": "content", "roles": _IDENTITY_ROLES},
    "openai": {"messages": "messages", "role": "role", "content": "content", "roles": _IDENTITY_ROLES},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value", "system": "system",
                 "roles": {"system": "system", "human": "user", "gpt": "assistant"}},
}


@dataclass(frozen=True)
class ChatFormat:
    """One format with its names resolved: how to read a row of the dataset. Picklable."""

    name: str
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    system: str | None = None  # a column with the row's system prompt, apart from the turns
    prompt: str = "prompt"
    prompt_id: str = "prompt_id"
    roles: tuple[tuple[str, str], ...] = tuple(_IDENTITY_ROLES.items())
    system_message: str | None = None  # put first in every row that has no system prompt

    @property
    def derives_prompt(self) -> bool:
        return self.name != "ultrachat"

    @cached_property
    def is_canonical(self) -> bool:
        """Rows in this format are written as they are (no renaming, nothing added)."""
        return (self.name == "ultrachat" and self.messages == "messages" and self.role == "role"
                and self.content == "content" and self.system is None and self.prompt == "prompt"
                and self.prompt_id == "prompt_id" and dict(self.roles) == _IDENTITY_ROLES
                and self.system_message is None)

    @cached_property
    def role_names(self) -> dict[str, str]:
        """Ours -> the dataset's name for it (the first given), to word problems in its own terms."""
        names: dict[str, str] = {}
        for theirs, ours in self.roles:
            names.setdefault(ours, theirs)
        return names

    @cached_property
    def known_roles(self) -> frozenset[str]:
        return frozenset(theirs for theirs, _ in self.roles)

    @cached_property
    def role_map(self) -> dict[str, str] | None:
        """The dataset's speaker names -> ours; None when they are ours already (nothing to map,
        and the turns are read as they are: the common case, kept fast)."""
        roles = dict(self.roles)
        return None if roles == _IDENTITY_ROLES else roles


@dataclass(frozen=True)
class ChatOptions:
    """What the experiment asks for (`data.format`, `data.columns`, `data.roles`,
    `data.system_message`); `resolve` and `detect` turn it into a `ChatFormat`."""

    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # our name -> the dataset's
    roles: dict[str, str] = field(default_factory=dict)  # the dataset's speaker -> ours
    system_message: str | None = None

    @classmethod
    def of(cls, data_spec) -> ChatOptions:
        """From the experiment's `data:` section."""
        columns = {k: v for k, v in data_spec.columns.model_dump().items() if v is not None}
        return cls(format=data_spec.format, columns=columns, roles=dict(data_spec.roles),
                   system_message=data_spec.system_message)

    def fingerprint(self) -> dict[str, Any]:
        return {"format": self.format, "columns": dict(sorted(self.columns.items())),
                "roles": dict(sorted(self.roles.items())), "system_message": self.system_message}

    def resolve(self, name: str) -> ChatFormat:
        defaults = _DEFAULTS[name]
        roles = {**defaults["roles"], **self.roles}
        names = {key: self.columns.get(key, defaults.get(key, key))
                 for key in ("messages", "role", "content", "prompt", "prompt_id")}
        return ChatFormat(name=name, system=self.columns.get("system", defaults.get("system")),
                          roles=tuple(roles.items()),
                          system_message=self.system_message, **names)

    def detect(self, rows: Iterable[Any]) -> tuple[ChatFormat, str]:
        """The format of a split, told from its first rows (up to DETECT_ROWS); with the reason.
        An explicit `format` is taken as given."""
        if self.format != "auto":
            return self.resolve(self.format), "as data.format says"
        looked = 0
        for looked, row in enumerate(rows, start=1):
            found = self._detect_row(row)
            if found:
                return found
            if looked >= DETECT_ROWS:
                break
        return self.resolve("ultrachat"), f"undetected in {looked} row(s); checked as ultrachat"

    def _detect_row(self, row: Any) -> tuple[ChatFormat, str] | None:
        if not isinstance(row, dict):
            return None
        candidates = [self.columns["messages"]] if "messages" in self.columns else ["messages", "conversations"]
        column = next((c for c in candidates if isinstance(row.get(c), list) and row[c]), None)
        if column is None:
            return None
        first = row[column][0]
        if not isinstance(first, dict):
            return None
        role_keys = [self.columns["role"]] if "role" in self.columns else ["role", "from"]
        key = next((k for k in role_keys if k in first), None)
        if key is None:
            return None
        if key == "from":
            name = "sharegpt"
        else:
            has_ids = all(self.columns.get(k, k) in row for k in ("prompt", "prompt_id"))
            name = "ultrachat" if has_ids else "openai"
        fmt = self.resolve(name)
        if fmt.messages != column:
            fmt = replace(fmt, messages=column)
        why = {"ultrachat": f"{column!r} turns with {key!r} keys, and prompt/prompt_id columns",
               "openai": f"{column!r} turns with {key!r} keys, no prompt/prompt_id (derived)",
               "sharegpt": f"{column!r} turns with {key!r} keys (prompt/prompt_id derived)"}[name]
        return fmt, why


# ---------------------------------------------------------------------------------------------
# Checking a row


def check_row(row: Any, *, sft: bool, fmt: ChatFormat | None = None) -> list[str]:
    """Problems of one row (empty list: the row is fine); by default against the written form."""
    return check(row, fmt or CANONICAL, sft=sft)[0]


def check(row: Any, fmt: ChatFormat, *, sft: bool) -> tuple[list[str], int, int, str | None]:
    """(problems, characters of the contents, user turns, the row's system prompt from the
    `system` column). Counts are meaningful only when there are no problems."""
    if fmt.is_canonical:
        problems, chars, turns, _ = check_written(row, sft)
        return problems, chars, turns, None
    if not isinstance(row, dict):
        expected = (f"{fmt.prompt}, {fmt.prompt_id}, {fmt.messages}" if not fmt.derives_prompt
                    else fmt.messages)
        return [f"row is a {type(row).__name__}, expected an object with {expected}"], 0, 0, None
    problems: list[str] = []
    if not fmt.derives_prompt:
        prompt, prompt_id = row.get(fmt.prompt), row.get(fmt.prompt_id)
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{fmt.prompt} must be a non-empty string")
        if not isinstance(prompt_id, str) or not _HEX64.match(prompt_id):
            problems.append(f"{fmt.prompt_id} must be a 64-character lowercase hex sha256")
    if fmt.derives_prompt:
        for key in ("tools", "functions"):
            if row.get(key):
                problems.append(f"{key}: tool and function definitions are not supported")
    system_text = None
    if fmt.system is not None:
        value = row.get(fmt.system)
        if isinstance(value, str) and value.strip():
            system_text = value
        elif value is not None and not isinstance(value, str):
            problems.append(f"{fmt.system} must be a string (the row's system prompt) or absent")
    messages = row.get(fmt.messages)
    if not isinstance(messages, list) or not messages:
        problems.append(f"{fmt.messages} must be a non-empty list")
        return problems, 0, 0, system_text
    chars, turns = _check_messages(messages, fmt, sft, problems, has_system=system_text is not None)
    if system_text is not None:
        chars += len(system_text)
    return problems, chars, turns, system_text


def check_written(row: Any, sft: bool) -> tuple[list[str], int, int, bool]:
    """`check` for rows already in the written form: the same rules and words as the general
    path, in one tight pass (this is the data stage's hot loop on ultrachat-sized data, where the
    general path's name lookups cost ~10 % of the stage). (problems, characters, user turns,
    whether a system message comes first)."""
    if not isinstance(row, dict):
        return [f"row is a {type(row).__name__}, expected an object with prompt, prompt_id, messages"], 0, 0, False
    problems = []
    prompt, prompt_id, messages = row.get("prompt"), row.get("prompt_id"), row.get("messages")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("prompt must be a non-empty string")
    if not isinstance(prompt_id, str) or not _hex64(prompt_id):
        problems.append("prompt_id must be a 64-character lowercase hex sha256")
    if not isinstance(messages, list) or not messages:
        problems.append("messages must be a non-empty list")
        return problems, 0, 0, False
    # The speaker expected at each place, looked up rather than worked out per message; a system
    # message first switches to the table that starts with it (no cost to rows without one).
    count = len(messages)
    order = _USER_FIRST if count <= _TABLED else _speakers(False, count)
    system = False
    chars = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"messages[{index}] must be an object with role and content")
            continue
        role, content = message.get("role"), message.get("content")
        if role != order[index]:
            if index == 0 and role == "system":
                order = _SYSTEM_FIRST if count <= _TABLED else _speakers(True, count)
                system = True
            else:
                problems.append(_misplaced(CANONICAL, index, role, order[index]))
        if not isinstance(content, str) or not content.strip():
            problems.append(f"messages[{index}].content must be a non-empty string"
                            + (" (lists of content parts are not supported)" if isinstance(content, list) else ""))
        else:
            chars += len(content)
    turns = count - system
    if turns == 0:
        problems.append("messages has no user turn after the system message")
    elif sft and turns % 2 == 1 and not problems:
        problems.append("SFT rows must end with an assistant message")
    return problems, chars, (turns + 1) // 2, system


def _speakers(system: bool, count: int) -> tuple[str, ...]:
    """The speakers expected in a row of `count` messages: the system first when it has one, then
    the user and the assistant in turn."""
    turns = tuple("user" if i % 2 == 0 else "assistant" for i in range(count - system))
    return ("system", *turns) if system else turns


_hex64 = _HEX64.match
_TABLED = 256  # messages in a row whose speakers are looked up in a table made once
_USER_FIRST, _SYSTEM_FIRST = _speakers(False, _TABLED), _speakers(True, _TABLED)


def _misplaced(fmt: ChatFormat, index: int, raw: Any, expected: str) -> str:
    """The problem of a turn whose speaker is not the one expected at its place."""
    where = f"{fmt.messages}[{index}].{fmt.role}"
    role = fmt.role_map.get(raw) if fmt.role_map is not None and isinstance(raw, str) else raw
    if role == "system":
        return f"{where} is {raw!r}: a system message may only come first"
    if not isinstance(raw, str) or raw not in fmt.known_roles:
        known = ", ".join(repr(r) for r in dict(fmt.roles))
        return f"{where} is {raw!r}, expected one of {known} (data.roles maps other names)"
    return f"{where} is {raw!r}, expected {fmt.role_names[expected]!r} (turns alternate, starting with the user)"


def _check_messages(messages: list, fmt: ChatFormat, sft: bool, problems: list[str], *,
                    has_system: bool) -> tuple[int, int]:
    """Append the turns' problems; (characters, user turns). The rules of `check_written`, read
    through the format's names."""
    where, role_key, content_key = fmt.messages, fmt.role, fmt.content
    roles = fmt.role_map
    extras = fmt.name != "ultrachat"
    first = messages[0]
    first_role = first.get(role_key) if isinstance(first, dict) else None
    if roles is not None:
        first_role = roles.get(first_role) if isinstance(first_role, str) else None
    offset = 1 if first_role == "system" else 0
    if offset and has_system:
        problems.append(f"the row has a system prompt in {fmt.system} and another in {where}[0]; keep one")
    chars = turns = 0
    last = None
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"{where}[{index}] must be an object with {role_key} and {content_key}")
            last = None
            continue
        raw, content = message.get(role_key), message.get(content_key)
        role = raw if roles is None else (roles.get(raw) if isinstance(raw, str) else None)
        if index < offset:
            pass  # the system message, first
        else:
            expected = "user" if (index - offset) % 2 == 0 else "assistant"
            if role != expected:
                problems.append(_misplaced(fmt, index, raw, expected))
            elif role == "user":
                turns += 1
        if not isinstance(content, str) or not content.strip():
            problems.append(f"{where}[{index}].{content_key} must be a non-empty string"
                            + (" (lists of content parts are not supported)" if isinstance(content, list) else ""))
        else:
            chars += len(content)
        if extras:
            _check_extras(message, f"{where}[{index}]", problems)
        last = role
    if offset == len(messages):
        problems.append(f"{where} has no user turn after the system message")
    elif sft and last != "assistant" and not problems:
        problems.append("SFT rows must end with an assistant message")
    return chars, turns


def _check_extras(message: dict, where: str, problems: list[str]) -> None:
    """Fields of OpenAI's fine-tuning format that this project cannot honour: refused, not dropped."""
    for key in ("tool_calls", "function_call"):
        if message.get(key):
            problems.append(f"{where}.{key}: tool and function calls are not supported")
    if "weight" in message and message["weight"] not in (1, None):
        problems.append(f"{where}.weight is {message['weight']!r}: only weight 1 is supported "
                        "(every assistant message is trained on); drop the message or the weight")


def canonical(row: dict, fmt: ChatFormat, system_text: str | None) -> dict:
    """The written form of a row that passed `check` in `fmt`."""
    roles = dict(fmt.roles)
    messages = [{"role": roles.get(m[fmt.role], m[fmt.role]), "content": m[fmt.content]}
                for m in row[fmt.messages]]
    system = system_text if system_text is not None else fmt.system_message
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if fmt.derives_prompt:
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        prompt_id = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    else:
        prompt, prompt_id = row[fmt.prompt], row[fmt.prompt_id]
    return {"prompt": prompt, "prompt_id": prompt_id, "messages": messages}


CANONICAL = ChatFormat(name="ultrachat")
