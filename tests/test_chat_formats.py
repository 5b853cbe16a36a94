"""Bring your own chat data: the formats (ultrachat, OpenAI, ShareGPT), detection, column mapping,
system prompts, row checks of each format, and the form handed to training and to Azure.

The fixtures of each format are written by data/chat-openai-sample/build.py from the project's
own conversations (`render(rows, format)`), so the same conversations exist in every format.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import pytest

from automation.chat_rows import ChatOptions, check_row
from automation.data import prepare_data, read_jsonl
from automation.errors import DataError
from tests.conftest import REPO, write_jsonl

SAMPLE = REPO / "data" / "chat-openai-sample"


def load_builder():
    spec = importlib.util.spec_from_file_location("build_chat_openai", SAMPLE / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILDER = load_builder()
ROWS = BUILDER.conversations()
SPLITS = {"train": ROWS[:40], "validation": ROWS[40:52]}
REQUIRED = {"train_split": "train", "test_split": "validation", "sample_split": "validation"}


def write_format(folder: Path, format: str, splits: dict[str, list[dict]] = SPLITS) -> Path:
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.jsonl").write_text(BUILDER.render(rows, format), encoding="utf-8")
    return folder


def run(folder: Path, out: Path, chat: ChatOptions | None = None, **kwargs):
    return prepare_data(dataset=str(folder), sample_percent=100, required_splits=REQUIRED, sft_splits={"train", "validation"},
                        out_dir=out, search_from=[Path.cwd()], progress=False, chat=chat, **kwargs)


def files(out: Path) -> dict[str, bytes]:
    return {name: (out / f"{name}.jsonl").read_bytes() for name in ("train", "validation")}


# ---------------------------------------------------------------------------------------------
# The committed sample


def test_sample_split_files_are_built_from_the_sources():
    for split, rows in BUILDER.splits(BUILDER.conversations()).items():
        assert (SAMPLE / f"{split}.jsonl").read_text(encoding="utf-8") == BUILDER.render(rows), (
            f"{split}.jsonl is stale: run python data/chat-openai-sample/build.py")


def test_sample_is_openai_format_with_system_prompts():
    rows = [row for split in ("train", "validation") for row in read_jsonl(SAMPLE / f"{split}.jsonl")]
    assert len(rows) == 260 and all(set(row) == {"messages"} for row in rows)
    with_system = [row for row in rows if row["messages"][0]["role"] == "system"]
    assert 0.6 < len(with_system) / len(rows) < 0.9, "most rows have a system prompt, some do not"
    assert len({row["messages"][0]["content"] for row in with_system}) == 12
    openai = ChatOptions().resolve("openai")
    assert all(check_row(row, sft=True, fmt=openai) == [] for row in rows)


# ---------------------------------------------------------------------------------------------
# One written form for every format


@pytest.mark.parametrize("format", ["openai", "sharegpt", "ultrachat"])
def test_every_format_is_detected_and_written_in_one_form(tmp_path, format, caplog):
    expected = {split: "".join(json.dumps(BUILDER.as_format(r, "ultrachat"), ensure_ascii=False) + "\n"
                               for r in rows).encode() for split, rows in SPLITS.items()}
    with caplog.at_level(logging.INFO, logger="automation.data"):
        result = run(write_format(tmp_path / format, format), tmp_path / "out")
    assert files(tmp_path / "out") == expected
    assert {s.format for s in result.splits.values()} == {format}
    assert f"split 'train' read in the {format} format" in caplog.text
    systems = sum(r["messages"][0]["role"] == "system" for r in SPLITS["train"])
    assert result.splits["train"].system_rows == systems > 0
    for row in read_jsonl(tmp_path / "out" / "train.jsonl"):
        assert row["prompt"] == next(m["content"] for m in row["messages"] if m["role"] == "user")
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        assert check_row(row, sft=True) == []


@pytest.mark.parametrize("format", ["openai", "sharegpt"])
def test_explicit_format_and_the_pool_give_the_same_output(tmp_path, format, monkeypatch):
    import automation.data as data

    folder = write_format(tmp_path / "d", format)
    run(folder, tmp_path / "auto")
    monkeypatch.setattr(data, "_usable_cpus", lambda: 2)
    result = run(folder, tmp_path / "pooled", ChatOptions(format=format), pool_min_bytes=0)
    assert files(tmp_path / "pooled") == files(tmp_path / "auto")
    assert result.splits["train"].format == format


def test_column_mapping_and_extra_role_names(tmp_path):
    """A Hugging Face dataset with its own names: `dialog` of `speaker`/`text`, `bot` for the
    assistant, the system prompt in an `instructions` column; as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def renamed(row):
        turns = [{"speaker": {"assistant": "bot"}.get(m["role"], m["role"]), "text": m["content"]}
                 for m in row["messages"] if m["role"] != "system"]
        system = [m["content"] for m in row["messages"] if m["role"] == "system"]
        return {"id": 7, "dialog": turns, "instructions": system[0] if system else None}

    folder = tmp_path / "hf"
    (folder / "data").mkdir(parents=True)
    for split, rows in SPLITS.items():
        pq.write_table(pa.Table.from_pylist([renamed(r) for r in rows]), folder / "data" / f"{split}-00000-of-00001.parquet")
    chat = ChatOptions(columns={"messages": "dialog", "role": "speaker", "content": "text", "system": "instructions"},
                       roles={"bot": "assistant"})
    result = run(folder, tmp_path / "out", chat)
    assert result.splits["train"].format == "openai"
    run(write_format(tmp_path / "openai", "openai"), tmp_path / "reference")
    assert files(tmp_path / "out") == files(tmp_path / "reference")
    # Without the mapping, nothing fits: the rows fail with what is missing, not silently.
    with pytest.raises(DataError, match=r"train row 0: .*messages must be a non-empty list"):
        run(folder, tmp_path / "unmapped")


def test_system_message_goes_first_where_there_is_none(tmp_path):
    folder = write_format(tmp_path / "d", "ultrachat")
    chat = ChatOptions(system_message="You are the Example Corp assistant.")
    result = run(folder, tmp_path / "out", chat)
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert result.splits["train"].system_rows == len(rows) == len(SPLITS["train"])
    for row, source in zip(rows, SPLITS["train"], strict=True):
        own = source["messages"][0]["content"] if source["messages"][0]["role"] == "system" else None
        assert row["messages"][0] == {"role": "system", "content": own or chat.system_message}
        assert row["prompt_id"] == BUILDER.as_format(source, "ultrachat")["prompt_id"]
    assert run(folder, tmp_path / "out", chat).reused  # same options: reused
    assert not run(folder, tmp_path / "out", ChatOptions(system_message="Other.")).reused


# ---------------------------------------------------------------------------------------------
# Row checks of each format: split, row number and what is wrong; --drop-invalid

GOOD_OPENAI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello."}]}
BROKEN = {
    "openai": [
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"},
                       {"role": "assistant", "content": "x"}]},
         "messages[1].role is 'system': a system message may only come first"),
        ({"messages": [{"role": "system", "content": "Only a system prompt."}]},
         "messages has no user turn after the system message"),
        ({"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "x"}]},
         "messages[1].role is 'assistant', expected 'user' (turns alternate, starting with the user)"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "weight": 0}]},
         "messages[1].weight is 0: only weight 1 is supported"),
        ({"messages": [{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function"}]},
                       {"role": "tool", "content": "42"}]},
         "messages[1].tool_calls: tool and function calls are not supported"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                       {"role": "assistant", "content": "x"}]},
         "messages[0].content must be a non-empty string (lists of content parts are not supported)"),
        ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]},
         "SFT rows must end with an assistant message"),
    ],
    "sharegpt": [
        ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "Hi"}]},
         "conversations[0].from is 'gpt', expected 'human' (turns alternate, starting with the user)"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},
         "conversations[1].from is 'bot', expected one of 'system', 'human', 'gpt' (data.roles maps other names)"),
        ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                            {"from": "gpt", "value": "x"}], "system": "Also S"},
         "the row has a system prompt in system and another in conversations[0]; keep one"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
         "conversations[1].value must be a non-empty string"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}], "system": 3},
         "system must be a string (the row's system prompt) or absent"),
    ],
    "ultrachat": [
        ({"prompt": "Hi", "prompt_id": "abc", "messages": [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "x"}]},
         "prompt_id must be a 64-character lowercase hex sha256"),
        ({"prompt": "Hi", "prompt_id": "0" * 64, "messages": [
            {"role": "system", "content": "S"}, {"role": "system", "content": "T"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "x"}]},
         "messages[1].role is 'system': a system message may only come first"),
    ],
}


@pytest.mark.parametrize("format", sorted(BROKEN))
def test_bad_rows_of_each_format_are_named_and_can_be_dropped(tmp_path, format):
    good = [BUILDER.as_format(GOOD_OPENAI, format)] * 3
    bad = [row for row, _ in BROKEN[format]]
    folder = tmp_path / format
    write_jsonl(folder / "train.jsonl", good[:1] + bad + ["{not json"] + good[1:])
    write_jsonl(folder / "validation.jsonl", good)
    with pytest.raises(DataError) as caught:
        run(folder, tmp_path / "out", ChatOptions(format=format))
    message = str(caught.value)
    assert f"{len(bad) + 1} invalid row(s) in split 'train' ({format} format, as data.format says)" in message
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in message.splitlines()[1:-1]}
    for number, (_, problem) in enumerate(BROKEN[format], start=1):
        assert problem in lines[f"train row {number}"], (number, message)
    assert f"train row {len(bad) + 1}: not valid JSON" in message
    assert not (tmp_path / "out" / "train.jsonl").exists(), "nothing half-written"

    result = run(folder, tmp_path / "out", ChatOptions(format=format), drop_invalid=True)
    assert result.splits["train"].rows == 3 and result.splits["train"].dropped == len(bad) + 1
    assert all(check_row(row, sft=True) == [] for row in read_jsonl(tmp_path / "out" / "train.jsonl"))


def test_auto_detection_follows_the_first_rows_and_says_when_it_cannot(tmp_path):
    folder = tmp_path / "d"
    rows = BUILDER.render(SPLITS["train"], "sharegpt").splitlines()
    write_jsonl(folder / "train.jsonl", ["[1, 2]", "{broken", *rows])  # not a row, not JSON, then sharegpt
    write_jsonl(folder / "validation.jsonl", [{"text": "no turns here"}])
    with pytest.raises(DataError) as caught:
        run(folder, tmp_path / "out")
    message = str(caught.value)
    assert "2 invalid row(s) in split 'train' (sharegpt format, 'conversations' turns with 'from' keys" in message
    assert "train row 0: row is a list, expected an object with conversations" in message
    assert "split 'validation' (ultrachat format, undetected in 1 row(s); checked as ultrachat)" in message
    assert "validation row 0: prompt must be a non-empty string" in message


def test_a_wrong_explicit_format_fails_clearly(tmp_path):
    folder = write_format(tmp_path / "d", "openai")
    with pytest.raises(DataError, match=r"train row 0: prompt must be a non-empty string; prompt_id must be"):
        run(folder, tmp_path / "out", ChatOptions(format="ultrachat"))
    with pytest.raises(DataError, match=r"train row 0: conversations must be a non-empty list"):
        run(folder, tmp_path / "out", ChatOptions(format="sharegpt"))


# ---------------------------------------------------------------------------------------------
# The experiment file


def test_data_section_of_the_experiment(tmp_path):
    from automation.errors import ExperimentInvalid
    from automation.spec import load_experiment
    from tests.conftest import LOCAL_EXPERIMENT, write_experiment

    body = json.loads(json.dumps(LOCAL_EXPERIMENT))
    body["data"].update(format="sharegpt", columns={"messages": "dialog", "system": "sys"}, roles={"bot": "assistant"},
                        system_message="Be kind.")
    exp = load_experiment(write_experiment(tmp_path, body))
    chat = ChatOptions.of(exp.data)
    assert chat == ChatOptions(format="sharegpt", columns={"messages": "dialog", "system": "sys"},
                               roles={"bot": "assistant"}, system_message="Be kind.")
    fmt = chat.resolve("sharegpt")
    assert (fmt.messages, fmt.role, fmt.content, fmt.system) == ("dialog", "from", "value", "sys")

    for data, expected in [
        ({"format": "alpaca"}, "data.format at "),
        ({"format": "openai", "columns": {"prompt_id": "id"}}, "data.columns.prompt_id at "),
        ({"columns": {"turns": "x"}}, "data.columns.turns at "),
        ({"roles": {"bot": "robot"}}, "data.roles.bot at "),
        ({"system_message": "   "}, "data.system_message at "),
    ]:
        broken = json.loads(json.dumps(LOCAL_EXPERIMENT))
        broken["data"].update(data)
        with pytest.raises(ExperimentInvalid) as caught:
            load_experiment(write_experiment(tmp_path, broken))
        assert expected in str(caught.value), (data, str(caught.value))


def test_committed_experiment_uses_the_openai_sample():
    from automation.spec import load_experiment

    exp = load_experiment(REPO / "experiments" / "smollm2-chat-openai-local.yaml")
    assert exp.data.format == "openai" and exp.data.dataset == "data/chat-openai-sample"
    assert (exp.data.train_split, exp.data.test_split, exp.data.sample_split) == ("train", "validation", "validation")


# ---------------------------------------------------------------------------------------------
# Downstream: the files handed to Azure's chat_completion_datapreprocess


def azure_preprocess_problems(rows: list[dict], split: str) -> list[str]:
    """The checks of Azure ML's chat-completion preprocess (azureml-acft-contrib-hf-nlp 0.0.91,
    tasks/chat_completion/preprocess: ChatCompletionPreprocessArgs, ChatCompletionDataset.validate,
    _validate_system_role) on a split file's rows, as data.

    - only the `messages` column is read (chat_key "messages"; other columns are removed, `tools`
      kept); every row must have it;
    - rows whose messages are "" or hold a single message are filtered out;
    - when the model's finetune config says `system_role_supported: "false"`: one system message
      at most, at index 0, and a user message with it ("Only one system role should be present and
      should be at the beginning of messages", "messages should contain user role to process system
      message"); it is then merged into the first user message;
    - the train split needs at least 10 rows left (MIN_TRAINING_SAMPLE_GENERATIVE_TASKS).
    """
    problems = []
    kept = 0
    for index, row in enumerate(rows):
        messages = row.get("messages")
        if messages is None:
            problems.append(f"row {index}: no messages column")
            continue
        if messages == "" or (isinstance(messages, list) and len(messages) <= 1):
            continue
        kept += 1
        roles = [m.get("role") for m in messages]
        if "system" in roles[1:]:
            problems.append(f"row {index}: Only one system role should be present and should be at the beginning of messages")
        if "system" in roles and "user" not in roles:
            problems.append(f"row {index}: messages should contain user role to process system message")
        if any(set(m) - {"role", "content"} for m in messages):
            problems.append(f"row {index}: message keys beyond role/content")
    if split == "train" and kept < 10:
        problems.append(f"Training dataset has {kept} non-null samples, which is fewer than 10 samples")
    return problems


def test_files_handed_to_azure_pass_its_preprocess_checks(tmp_path):
    from automation.backends.azure.pipeline import data_files
    from automation.spec import load_experiment

    exp = load_experiment(REPO / "experiments" / "smollm2-chat-openai-local.yaml")
    for format in ("openai", "sharegpt"):
        out = tmp_path / format / "out"
        run(write_format(tmp_path / format / "d", format), out)
        handed = data_files(exp, out)
        # the test split goes in as the validation file too (so the component trains on all of train)
        assert set(handed) == {"train_file_path", "validation_file_path", "test_file_path"}
        for key, path in handed.items():
            rows = read_jsonl(path)
            assert azure_preprocess_problems(rows, "train" if key == "train_file_path" else "test") == []
            assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert azure_preprocess_problems([{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}],
                                     "test") != []  # the checker is not a rubber stamp


# ---------------------------------------------------------------------------------------------
# Downstream: training, evaluation, the sample request, serving


SYSTEM_ROW = {"messages": [
    {"role": "system", "content": "You are a terse kitchen assistant."},
    {"role": "user", "content": "What is a kettle?"},
    {"role": "assistant", "content": "A pot for boiling water."},
    {"role": "user", "content": "And a whisk?"},
    {"role": "assistant", "content": "A tool for beating eggs."}]}


def test_training_and_evaluation_supervise_assistant_tokens_only(tmp_path, tiny_model_dir):
    """The loss of a system-prompted row is on the assistant replies (and their end-of-turn), never
    on the system prompt or the user turns; in the train batches and the eval batches alike."""
    from automation.backends.local.train import build_trainer
    from automation.spec import Experiment
    from tests.conftest import TINY_EXPERIMENT

    folder = tmp_path / "d"
    write_jsonl(folder / "train.jsonl", [SYSTEM_ROW])
    write_jsonl(folder / "validation.jsonl", [SYSTEM_ROW])
    run(folder, tmp_path / "out")
    body = json.loads(json.dumps(TINY_EXPERIMENT))
    body["model"]["path"] = str(tiny_model_dir)
    body["training"]["max_seq_length"] = 1024
    trainer, tokenizer, _, _ = build_trainer(
        Experiment.model_validate(body), base_model=tiny_model_dir, train_file=tmp_path / "out" / "train.jsonl",
        test_file=tmp_path / "out" / "validation.jsonl", output_dir=tmp_path / "ckpt")
    for batch in (next(iter(trainer.get_train_dataloader())), next(iter(trainer.get_eval_dataloader()))):
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        assert tokenizer.decode(ids).startswith("<|im_start|>system\nYou are a terse kitchen assistant.<|im_end|>\n"
                                                "<|im_start|>user\nWhat is a kettle?<|im_end|>")
        assert tokenizer.decode(ids[labels != -100]) == "A pot for boiling water.<|im_end|>A tool for beating eggs.<|im_end|>"


def test_local_flow_with_system_prompts(workspace, tiny_model_dir, tmp_path):
    """OpenAI-format data with system prompts through the whole local flow: the sample request
    carries the row's system prompt, the endpoint answers it, the report shows it."""
    from automation.cli import main
    from automation.record import RunRecord
    from automation.serving import process
    from tests.conftest import TINY_EXPERIMENT, write_experiment

    system = "You are a terse kitchen assistant."
    rows = [{"messages": [{"role": "system", "content": system}, *r["messages"][1 if r["messages"][0]["role"] == "system" else 0:]]}
            for r in ROWS[:60]]
    folder = tmp_path / "chat"
    write_jsonl(folder / "train.jsonl", rows[:48])
    write_jsonl(folder / "validation.jsonl", rows[48:])
    body = json.loads(json.dumps(TINY_EXPERIMENT))
    body["model"]["path"] = str(tiny_model_dir)
    body["data"] = {"dataset": str(folder), "format": "openai", "train_split": "train", "test_split": "validation",
                    "sample_split": "validation", "sample_percent": 100}
    body["training"]["max_steps"] = 2
    assert main(["run", str(write_experiment(tmp_path / "experiments", body)), "--keep-endpoint"]) == 0
    record = RunRecord.load(workspace / "runs" / "tiny-local" / "record.json")
    assert record.finetune.base_eval_loss is not None and record.finetune.eval_loss is not None
    assert record.score.messages[0] == {"role": "system", "content": system}
    request = json.loads(Path(record.score.request_file).read_text())
    (conversation,) = request["input_data"]["input_string"]  # the seed's form: a list of conversations
    assert conversation[0] == {"role": "system", "content": system}
    assert record.score.prompt_id == hashlib.sha256(record.score.messages[1]["content"].encode()).hexdigest()
    assert isinstance(record.score.reply, str)
    assert f"[system] {system}" in Path(record.report_file).read_text()
    # The served model formats the system prompt as training did (the template saved with it).
    from transformers import AutoTokenizer

    served = process.get_endpoint(record.deploy.endpoint_name)
    assert served is not None
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)  # the folder the server loaded
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_start|>assistant\n")
