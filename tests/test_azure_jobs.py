"""One table of Azure ML job statuses (the REST enum), used by the reconcile loop and by the waits;
NotResponding and Paused are not an end, but a job that stays there past its deadline is stuck; and
every wait for a job is bounded."""

from __future__ import annotations

import pytest

from automation.backends.azure import jobs
from automation.backends.azure.backend import AzureBackend
from automation.backends.base import IN_FLIGHT, JOB_FAILED, JOB_RUNNING, JOB_WAITING
from automation.errors import BackendError
from automation.record import DataPart
from tests.fake_azure import data_dir, experiment

TAGS = {"repo": "org/repo", "pr": "7", "experiment": "phi4-ultrachat"}


def test_the_table_is_the_rest_enum():
    from azure.ai.ml._restclient.arm_ml_service.models._enums import JobStatus

    enum = [s.value for s in JobStatus]
    statuses = enum[:enum.index("Paused") + 1]  # the generated enum goes on with unrelated values
    assert statuses == [s.status for s in jobs.JOB_STATES.values()]
    assert {s.status for s in jobs.JOB_STATES.values() if s.terminal} == {"Completed", "Failed", "Canceled"}
    for status in ("NotResponding", "Paused"):
        assert not jobs.is_terminal(status) and jobs.job_state(status).state in IN_FLIGHT
        assert jobs.stall_deadline_s(status) > 0
    assert jobs.job_state("NotResponding").state == JOB_RUNNING and jobs.job_state("paused").state == JOB_WAITING
    assert jobs.job_state("Cancelled").status == "Canceled" and jobs.job_state("Unknown").state == JOB_WAITING


class Clock:
    """Time that moves only when the backend sleeps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def submitted(clients, tmp_path):
    workspace, registry = clients
    clock = Clock()
    backend = AzureBackend(workspace, registry, sleep=clock.sleep, clock=clock, poll_s=60, max_wait_s=10 * 3600,
                           metrics_reader=lambda uri, job: {})
    data = DataPart(out_dir=str(data_dir(tmp_path)), source="test", rows={"train_sft": 3})
    backend.submit_finetune(experiment(), data, job_name="job-1", tags=TAGS)
    return backend, workspace, clock


def _statuses(workspace, name: str, sequence: list[str]):
    """jobs.get answers these statuses in turn (then the last one for ever)."""
    original = workspace.jobs.get

    def get(job_name: str):
        job = original(job_name)
        if job_name == name:
            job._status = sequence.pop(0) if len(sequence) > 1 else sequence[0]
        return job

    workspace.jobs.get = get


def test_not_responding_is_waited_on_and_may_recover(submitted):
    backend, workspace, clock = submitted
    _statuses(workspace, "job-1", ["Running", "NotResponding", "NotResponding", "Running", "Completed"])
    part = backend.wait_finetune(experiment(), "job-1", stream=False)
    assert part.status == "completed" and clock.now == 3 * 60  # the first read is wait_finetune's own


def test_not_responding_past_its_deadline_is_stuck(submitted):
    """Before, NotResponding counted as an end and the job was reported "ended NotResponding" at
    once; now it is waited on, and past its deadline it is a failure that says so."""
    backend, workspace, clock = submitted
    _statuses(workspace, "job-1", ["Running", "NotResponding"])
    with pytest.raises(BackendError, match=r"job-1 has been NotResponding for 120 min, past the 2 h .* stuck"):
        backend.wait_finetune(experiment(), "job-1", stream=False)
    assert clock.now == jobs.STALL_DEADLINES_S["notresponding"]


def test_paused_past_its_deadline_is_stuck(submitted):
    backend, workspace, clock = submitted
    backend._max_wait_s = 48 * 3600
    _statuses(workspace, "job-1", ["Queued", "Paused"])
    with pytest.raises(BackendError, match="has been Paused for 1440 min, past the 24 h"):
        backend.wait_finetune(experiment(), "job-1", stream=False)


def test_every_wait_is_bounded(submitted):
    backend, workspace, clock = submitted
    _statuses(workspace, "job-1", ["Running"])
    with pytest.raises(BackendError, match="job-1 is still Running after waiting 10 h; it goes on in Azure ML"):
        backend.wait_finetune(experiment(), "job-1", stream=False)
    assert clock.now == 10 * 3600


def test_the_sdk_stream_stopping_at_not_responding_is_not_an_end(submitted):
    """azure-ai-ml's jobs.stream returns on NotResponding and Paused (RunHistoryConstants
    .TERMINAL_STATUSES); the wait goes on polling."""
    from azure.ai.ml.operations._run_history_constants import RunHistoryConstants

    assert "NotResponding" in RunHistoryConstants.TERMINAL_STATUSES
    backend, workspace, clock = submitted
    _statuses(workspace, "job-1", ["NotResponding", "Running", "Completed"])
    workspace.jobs.stream = lambda name: None  # returned because the job stopped responding
    assert backend.wait_finetune(experiment(), "job-1").status == "completed"


def test_the_reconcile_loop_sees_not_responding_and_paused_in_flight(submitted):
    backend, workspace, _ = submitted
    for status in ("NotResponding", "Paused"):
        workspace.jobs.items["job-1"]._status = status
        info = backend.get_job("job-1")
        assert info.state in IN_FLIGHT and info.backend_status == status
    workspace.jobs.items["job-1"]._status = "Failed"
    assert backend.get_job("job-1").state == JOB_FAILED


def test_statuses_come_as_the_sdks_enums_and_are_read_by_value():
    """azure-ai-ml 1.35 returns job statuses and provisioning states as the REST models' enums, whose
    str() is "JobStatus.COMPLETED": read so, a Completed job was never seen as completed."""
    from azure.ai.ml._restclient.arm_ml_service.models import JobBase
    from azure.ai.ml.entities import Job

    body = {"id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws/jobs/j",
            "name": "j", "properties": {"jobType": "Command", "status": "Completed", "command": "echo",
                                        "environmentId": "azureml:env:1", "computeId": "c", "experimentName": "e"}}
    job = Job._from_rest_object(JobBase._deserialize(body, []))
    assert str(job.status) == "JobStatus.COMPLETED"  # the trap
    assert jobs.state_text(job.status) == "Completed" and jobs.is_terminal(job.status)
    info = jobs.job_info(job)
    assert info.backend_status == "Completed" and info.state == "completed"


def test_an_updating_endpoint_read_from_the_sdk_is_waited_for():
    from azure.ai.ml._restclient.arm_ml_service.models import OnlineEndpoint
    from azure.ai.ml.entities import ManagedOnlineEndpoint

    from automation.backends.azure.endpoints import wait_until_settled

    def endpoint(state: str):
        body = {"id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws/"
                      "onlineEndpoints/ep", "name": "ep", "location": "westeurope", "identity": {"type": "None"},
                "properties": {"authMode": "Key", "provisioningState": state, "traffic": {}}}
        return ManagedOnlineEndpoint._from_rest_object(OnlineEndpoint._deserialize(body, []))

    answers = [endpoint("Updating"), endpoint("Updating"), endpoint("Succeeded")]
    sleeps: list[float] = []
    settled = wait_until_settled(lambda: answers.pop(0), "endpoint ep", sleep=sleeps.append, poll_s=15)
    assert jobs.state_text(settled.provisioning_state) == "Succeeded" and sleeps == [15, 15]


def test_a_failed_cluster_read_from_the_sdk_is_refused(clients):
    from automation.errors import ConfigError

    workspace, registry = clients
    workspace.compute.clusters["gpu-a100"]._provisioning_state = "Failed"  # read back as ProvisioningState.FAILED
    with pytest.raises(ConfigError, match="gpu-a100 is in a failed state"):
        AzureBackend(workspace, registry, sleep=lambda s: None).validate_compute(experiment())
