from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

LOCAL_EXPERIMENT = {
    "name": "tiny-local",
    "backend": "local",
    "model": {"name": "tiny", "path": "models/tiny"},
    "data": {"dataset": "data/chat", "sample_percent": 100},
}


def chat_row(prompt: str, *turns: str) -> dict:
    """A row in the ultrachat_200k schema: the prompt, then alternating replies and follow-ups."""
    messages = [{"role": "user", "content": prompt}]
    for index, text in enumerate(turns):
        messages.append({"role": "assistant" if index % 2 == 0 else "user", "content": text})
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_dataset(tmp_path: Path) -> Path:
    """A local dataset folder with the four ultrachat splits as JSONL."""
    folder = tmp_path / "data" / "chat"
    sizes = {"train_sft": 40, "test_sft": 10, "train_gen": 10, "test_gen": 10}
    for split, n in sizes.items():
        write_jsonl(folder / f"{split}.jsonl",
                    [chat_row(f"{split} question {i}?", f"Answer {i}.") for i in range(n)])
    return folder


def write_experiment(folder: Path, data: dict | str, name: str | None = None) -> Path:
    """Write an experiment file; a dict is dumped as YAML, a string written as is."""
    if isinstance(data, dict):
        name = name or data.get("name", "tiny-local")
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = data
    path = folder / f"{name or 'tiny-local'}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random chat model (tokenizer trained on the sample dataset), built once per session."""
    from automation.backends.local.tiny import build_tiny_model

    rows = [json.loads(line) for line in (REPO / "data" / "ultrachat-sample" / "train_sft.jsonl").open()]
    texts = [m["content"] for row in rows for m in row["messages"]]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts)


TINY_EXPERIMENT = {
    "name": "tiny-local",
    "backend": "local",
    "model": {"name": "tiny", "path": "PLACEHOLDER"},
    "data": {"dataset": str(REPO / "data" / "ultrachat-sample"), "sample_percent": 100},
    "training": {"max_steps": 6, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                 "learning_rate": 1.0e-2, "logging_steps": 2, "max_seq_length": 128, "save_total_limit": 1},
    "optimization": {"apply_lora": True, "lora_r": 4, "lora_alpha": 8},
    "deployment": {"max_new_tokens_cap": 64, "request_timeout_ms": 30000},
    "sample": {"parameters": {"max_new_tokens": 16}},
    "evaluation": {"prompts": 3, "max_new_tokens": 8},
}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty workspace (AUTOMATION_HOME) and a working directory for one test; every endpoint
    and standby started in it is stopped afterwards, whatever the test did."""
    monkeypatch.setenv("AUTOMATION_HOME", str(tmp_path / "ws"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "ws"
    from automation.serving import process

    for endpoint in process.list_endpoints():
        process.stop_endpoint(endpoint.name)
    process.stop_standby()  # a run's warm standby (prepare_deploy) that no deploy claimed


@pytest.fixture
def tiny_experiment(tmp_path, tiny_model_dir) -> Path:
    body = json.loads(json.dumps(TINY_EXPERIMENT))
    body["model"]["path"] = str(tiny_model_dir)
    return write_experiment(tmp_path / "experiments", body)


# -- the fake Azure workspace and registry, shared by the Azure backend's tests ------------------

@pytest.fixture(scope="module")
def component():
    """The real chat_completion_pipeline 0.0.82 spec, loaded by the SDK."""
    from azure.ai.ml import load_component

    from tests.fake_azure import COMPONENT_SPEC

    return load_component(COMPONENT_SPEC)


@pytest.fixture
def clients(component):
    """A fake workspace client and registry client holding the component and the current models."""
    from tests.fake_azure import reference_clients

    return reference_clients(component)

