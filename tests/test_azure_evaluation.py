"""The held-out evaluation on Azure, from the endpoints: chat_completion_pipeline 0.0.82 runs no
model evaluation, so after deploy the `evaluate` stage sends the held-out prompts to the staging
deployment (the candidate) and to the production endpoint when one serves a model (the baseline),
in the seed's request form, one greedy request per prompt, against the in-memory MLClient."""

from __future__ import annotations

import json

import pytest

from automation import naming
from automation.backends.azure.backend import AzureBackend, _model_name_version
from automation.errors import BackendError
from automation.evaluation import PolicyNotMet, check_policy, held_out_prompts
from automation.record import DataPart, FinetunePart, RunRecord
from automation.report import render
from automation.serving.contract import score_request
from automation.stages import Run, stage_deploy, stage_evaluate, stage_promote
from tests.fake_azure import (
    data_dir,
    experiment,
    http_error,
    unavailable,
)

REPO_NAME = "org/repo"
PROMPTS = 3
NAME = "phi4-ultrachat"


@pytest.fixture
def backend(clients):
    return AzureBackend(*clients, sleep=lambda s: None, poll_s=0,
                        metrics_reader=lambda uri, job: {"train_loss": 1.25, "eval_loss": 1.5})


def make_run(backend, tmp_path, *, job: str, version: str = "1732400000", **changes) -> Run:
    """A run whose job has completed: data prepared, fine-tune read back, then registered and deployed."""
    spec = experiment(**{"evaluation__prompts": PROMPTS, **changes})
    record = RunRecord(experiment=NAME, experiment_file="experiments/phi4-ultrachat.yaml", backend="azure",
                       config_hash="cfg", sha="abc1234def", repo=REPO_NAME, pr=7)
    folder = tmp_path / "data"
    if not folder.is_dir():
        data_dir(tmp_path)
    record.data = DataPart(out_dir=str(folder), source="test", rows={"train_sft": 3, "test_sft": 3, "test_gen": 3})
    record.finetune = FinetunePart(job_name=job, eval_loss=1.5, train_loss=1.25)
    run = Run(spec, tmp_path / "phi4-ultrachat.yaml", record, tmp_path / "record-7.json", backend)
    run.record.registration = backend.register(spec, run.record.finetune, model_name="phi4-uc",
                                               timestamp_version=version, tags=run.tags("register"))
    stage_deploy(run)
    return run


def prompts_of(run: Run):
    data = run.record.data
    return held_out_prompts(f"{data.out_dir}/test_gen.jsonl", PROMPTS, run.experiment.evaluation.seed)


def answering(replies: dict[str, object]):
    """A scoring endpoint per deployment: a function of the last user message, or an exception to raise."""

    def respond(endpoint: str, deployment: str | None, request: dict) -> str:
        conversation = request["input_data"]["input_string"][0]
        answer = replies[deployment](conversation[-1]["content"])
        return json.dumps({"output": answer})

    return respond


def reference_of(question: str) -> str:
    """What data_dir's rows answer: "test_gen question 2?" -> "Answer 2."."""
    return f"Answer {question.split()[-1].rstrip('?')}."


def test_no_production_endpoint_candidate_alone_with_no_baseline(backend, clients, workspace, tmp_path):
    ws, _ = clients
    run = make_run(backend, tmp_path, job="job-1")
    ws.online_endpoints.respond = answering({"demo": reference_of})
    part = stage_evaluate(run)

    assert set(part.models) == {"candidate"} and part.source == "endpoints"
    staging = run.record.deploy.endpoint_name
    prompts = prompts_of(run)
    sent = ws.online_endpoints.invocations
    assert [(e, d) for e, d, _ in sent] == [(staging, "demo")] * PROMPTS
    # the seed's request form, one conversation each, greedy, the experiment's reply cap
    assert [r for _, _, r in sent] == [score_request([p.messages], {"do_sample": False, "max_new_tokens": 96})
                                      for p in prompts]
    candidate = part.models["candidate"]
    assert candidate.model == run.record.registration.model_uri
    assert candidate.rouge_l == pytest.approx(1.0) and candidate.empty_rate == 0.0
    assert candidate.eval_loss == 1.5 and candidate.perplexity == pytest.approx(4.4817, abs=1e-3)  # the job's
    assert run.record.stages["evaluate"].status == "ok"
    assert json.loads(run.evaluation_file.read_text())["models"]["candidate"]["replies"] == candidate.replies
    assert RunRecord.load(run.record_path).finetune.evaluation == part  # kept in the record

    policy = check_policy(part, run.experiment.promotion, run.record.finetune)
    assert policy.baseline == "none" and policy.passed and not any(c.measured for c in policy.checks)
    text = render(run.record, run.experiment)
    assert ("**Promotion policy: ✅ passes** with no baseline (on the measured value). "
            "Evidence: nothing the policy limits was measured.") in text
    assert "No baseline to compare with" in text and "replies from the endpoints" in text
    assert "base model: not evaluated on Azure" in text
    assert f"no model serves `{naming.production_endpoint_name(REPO_NAME, NAME)}` that this run may read" in text
    assert "| | fine-tuned | change |" in text  # one column: no base model, no production


def test_production_endpoint_with_another_version_is_the_baseline(backend, clients, workspace, tmp_path):
    ws, _ = clients
    first = make_run(backend, tmp_path, job="job-old", version="1732300000")
    stage_promote(first, override="the first version: nothing to compare with")  # v1 serves production
    production = naming.production_endpoint_name(REPO_NAME, NAME)
    old_version = first.record.registration.version
    run = make_run(backend, tmp_path, job="job-new")
    assert run.record.registration.version != old_version
    ws.online_endpoints.invocations.clear()
    ws.online_endpoints.respond = answering({"demo": reference_of, f"v{old_version}": lambda q: "I do not know."})
    (run.dir / "evaluation" / "replies.json").unlink()  # the in-place evaluation of v1 kept its replies
    part = stage_evaluate(run)

    assert set(part.models) == {"candidate", "production"} and part.production_version == old_version
    sent = [(e, d) for e, d, _ in ws.online_endpoints.invocations]
    assert sent == [(run.record.deploy.endpoint_name, "demo")] * PROMPTS + [(production, f"v{old_version}")] * PROMPTS
    prod = part.models["production"]
    assert prod.model == f"azureml:{first.record.registration.model_name}:{old_version}"
    assert prod.eval_loss is None and prod.rouge_l < 0.5  # an endpoint answers replies, not losses
    policy = check_policy(part, run.experiment.promotion, run.record.finetune)
    assert policy.baseline == "production" and policy.passed
    rules = {c.rule.split(".")[-1]: c for c in policy.checks}
    assert rules["min_rouge_l_delta"].value == pytest.approx(1.0 - prod.rouge_l)
    assert not rules["max_eval_loss_increase"].measured  # said so, not enforced

    text = render(run.record, run.experiment)
    assert "**Promotion policy: ✅ passes** against the production (on the measured value). Evidence:" in text
    assert rules["min_rouge_l_delta"].interval.n == PROMPTS, "the change carries its n and interval"
    assert f"| fine-tuned | production v{old_version} | change |" in text
    rouge_row = next(line for line in text.splitlines() if line.startswith("| ROUGE-L vs reference"))
    assert rouge_row.endswith(f"| {1.0 - prod.rouge_l:+.3f} |")
    assert "Change = fine-tuned − production v" in text and "I do not know." in text
    assert "max_eval_loss_increase` is not checked against it" in text

    # The same prompts, the candidate now worse than production: the policy says so and promote refuses.
    # At promotion the candidate is deployed beside production and asked there, in place.
    new = f"v{run.record.registration.version}"
    ws.online_endpoints.respond = answering({"demo": lambda q: "", new: lambda q: "", f"v{old_version}": reference_of})
    (run.dir / "evaluation" / "replies.json").unlink()  # forget the kept replies: new answers
    part = stage_evaluate(run)
    assert part.models["candidate"].empty_rate == 1.0
    ws.online_endpoints.invocations.clear()
    with pytest.raises(PolicyNotMet, match="not met against the production:\n  ROUGE-L change vs production: -1"):
        stage_promote(run)
    asked = {(e, d) for e, d, _ in ws.online_endpoints.invocations}
    assert asked == {(production, new)}, "in place: the candidate on the production endpoint (v1's replies kept)"
    assert "❌ not met** against the production" in render(run.record, run.experiment)
    assert ws.online_endpoints.items[production].traffic == {f"v{old_version}": 100}  # nothing moved
    assert ws.online_deployments.of(production) == [f"v{old_version}"]  # the candidate removed


def test_a_failing_prompt_is_named_and_the_replies_so_far_are_kept(backend, clients, workspace, tmp_path):
    ws, _ = clients
    run = make_run(backend, tmp_path, job="job-1")
    second = prompts_of(run)[1].messages[-1]["content"]

    def flaky(question: str) -> str:
        if question == second:
            raise http_error(400, "BadRequest", "input is too long for the model")  # not transient
        return reference_of(question)

    ws.online_endpoints.respond = answering({"demo": flaky})
    ws.fail("online_endpoints.invoke", unavailable())  # a transient 503 first: retried, not an error
    with pytest.raises(BackendError) as caught:
        stage_evaluate(run)
    message = str(caught.value)
    assert "the fine-tuned model (" in message and "failed on held-out prompt 2 of 3" in message
    assert "input is too long for the model" in message and "a rerun asks only for the rest" in message
    assert run.record.stages["evaluate"].status == "failed" and run.record.finetune.evaluation is None
    kept = json.loads((run.dir / "evaluation" / "replies.json").read_text())
    (replies,) = kept.values()
    assert list(replies.values()) == [reference_of(prompts_of(run)[0].messages[-1]["content"])]

    ws.online_endpoints.respond = answering({"demo": reference_of})
    ws.online_endpoints.invocations.clear()
    part = stage_evaluate(run)
    asked = [r["input_data"]["input_string"][0][-1]["content"] for _, _, r in ws.online_endpoints.invocations]
    assert asked == [p.messages[-1]["content"] for p in prompts_of(run)[1:]]  # only the missing ones
    assert part.models["candidate"].replies == [reference_of(p.messages[-1]["content"]) for p in prompts_of(run)]


def test_an_answer_without_text_is_refused(backend, clients, workspace, tmp_path):
    ws, _ = clients
    run = make_run(backend, tmp_path, job="job-1")
    ws.online_endpoints.replies["demo"] = json.dumps({"error": "model failed to load"})
    with pytest.raises(BackendError, match="answered held-out prompt 1 of 3 without a text output"):
        stage_evaluate(run)


def test_no_prompts_means_no_request(backend, clients, workspace, tmp_path):
    ws, _ = clients
    run = make_run(backend, tmp_path, job="job-1", evaluation__prompts=0)
    ws.online_endpoints.invocations.clear()
    part = stage_evaluate(run)
    assert ws.online_endpoints.invocations == [] and part.models["candidate"].rouge_l is None
    assert part.models["candidate"].eval_loss == 1.5


@pytest.mark.parametrize("model_id, expected", [
    ("azureml:phi3-uc:1732400000", ("phi3-uc", "1732400000")),
    ("/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws/models/"
     "phi3-uc/versions/1732400000", ("phi3-uc", "1732400000")),
    ("azureml://registries/prod/models/phi3-uc/versions/3", ("phi3-uc", "3")),
    ("azureml:phi3-uc@latest", (None, None)),
])
def test_the_production_version_is_read_from_the_deployment_model_id(model_id, expected):
    assert _model_name_version(model_id) == expected


def test_scoring_a_deployment_the_endpoint_lacks_names_it(backend, clients, workspace, tmp_path):
    run = make_run(backend, tmp_path, job="job-1")
    with pytest.raises(BackendError, match="has no deployment blue: Deployment name blue not found"):
        backend.invoke(run.record.deploy.endpoint_name, {"input_data": {}}, deployment="blue")
