"""Build this dataset: the sample conversations in OpenAI's chat fine-tuning format, with system prompts.

    python data/chat-openai-sample/build.py

The conversations are those of data/ultrachat-sample/sources (written for this project). Each
gets a system prompt chosen by its topic file and its position (three of every four; the fourth
has none, so the model also sees conversations without one), in the form OpenAI and Azure OpenAI
fine-tuning take: `{"messages": [{"role": "system", ...}, {"role": "user", ...}, ...]}`, with no
prompt or prompt_id (the data stage derives them). Conversations are ordered by the sha256 of
their first user turn and dealt 4:1 into train.jsonl and validation.jsonl, so the result does not
depend on file order.

`render(rows, format)` also writes the same conversations in the ultrachat and sharegpt formats:
the tests build their fixtures of each format with it. tests/test_chat_formats.py fails when the
split files and the sources disagree.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCES = HERE.parent / "ultrachat-sample" / "sources"
SPLITS = ("train", "validation")
DEAL = ["train"] * 4 + ["validation"]

# By topic file, rotated over its conversations; None: no system prompt.
SYSTEM_PROMPTS = {
    "general": ["You are a friendly, practical assistant. Give clear answers that a busy person can act on.",
                "You are a helpful assistant. Be accurate, and say so when something depends on the situation.",
                "You are a patient helper who explains things step by step."],
    "knowledge": ["You are a knowledgeable tutor. Explain ideas plainly and correct common misconceptions.",
                  "You are a helpful assistant for questions about science, history and how things work.",
                  "You are a careful teacher: explain the reasoning, not just the answer."],
    "life": ["You are a supportive assistant for everyday life: money, work, health habits, home and travel.",
             "You are a practical advisor. Give concrete steps and mention when to ask a professional.",
             "You are a warm, down-to-earth assistant who gives balanced advice."],
    "tech": ["You are a senior software engineer helping a colleague. Be precise and show code when it helps.",
             "You are a programming assistant. Explain the cause of a problem before the fix.",
             "You are a concise technical assistant for developers."],
}


def conversations(sources: Path = SOURCES) -> list[dict]:
    """Every conversation as `{"messages": [...]}` in OpenAI's format, ordered by the sha256 of its
    first user turn."""
    rows = []
    for file in sorted(sources.glob("*.yaml")):
        prompts = SYSTEM_PROMPTS[file.stem]
        for index, item in enumerate(yaml.safe_load(file.read_text(encoding="utf-8"))):
            messages = [{"role": m["role"], "content": m["content"].strip()} for m in item["messages"]]
            system = None if index % 4 == 3 else prompts[index % len(prompts)]
            if system is not None:
                messages.insert(0, {"role": "system", "content": system})
            rows.append({"messages": messages})
    return sorted(rows, key=lambda row: _prompt_id(row["messages"]))


def _prompt_id(messages: list[dict]) -> str:
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def splits(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for index, row in enumerate(rows):
        out[DEAL[index % len(DEAL)]].append(row)
    return out


def as_format(row: dict, format: str) -> dict:
    """One OpenAI-format row in another format: `ultrachat` (prompt and prompt_id added, the form
    the data stage writes) or `sharegpt` (`conversations` of from/value, the system prompt in a
    `system` column as LLaMA-Factory keeps it)."""
    messages = row["messages"]
    if format == "openai":
        return row
    if format == "ultrachat":
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        return {"prompt": prompt, "prompt_id": _prompt_id(messages), "messages": messages}
    if format == "sharegpt":
        names = {"user": "human", "assistant": "gpt"}
        turns = [{"from": names[m["role"]], "value": m["content"]} for m in messages if m["role"] != "system"]
        system = [m["content"] for m in messages if m["role"] == "system"]
        return {"conversations": turns, **({"system": system[0]} if system else {})}
    raise ValueError(f"unknown format {format!r}")


def render(rows: list[dict], format: str = "openai") -> str:
    return "".join(json.dumps(as_format(row, format), ensure_ascii=False) + "\n" for row in rows)


def main() -> int:
    for name, rows in splits(conversations()).items():
        (HERE / f"{name}.jsonl").write_text(render(rows), encoding="utf-8")
        with_system = sum(row["messages"][0]["role"] == "system" for row in rows)
        print(f"{name}: {len(rows)} conversations, {with_system} with a system prompt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
