"""Async jobs over HTTP, in process: the Prefer and Idempotency-Key headers (``gateway/job_headers.py``) and the job
document (``gateway/jobs.py``), checked against its schema (``schema.Job``, the one the OpenAPI document shows)."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from inferencehub.errors import InvalidInput
from inferencehub.gateway import schema
from inferencehub.gateway.job_headers import async_wait, idempotency
from inferencehub.gateway.jobs import finished_response, job_response
from inferencehub.jobqueue import CANCELLED, FAILED, QUEUED, SUCCEEDED, JobRecord
from inferencehub.metadata import HEADER_LENGTH
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb


@pytest.mark.parametrize(
    ("prefer", "wait"),
    [
        ([], None),
        (["wait=5"], None),  # waiting alone is no request for a job
        (["respond-async"], 0.0),
        (["Respond-Async; wait=3"], 3.0),
        (['respond-async, wait="2.5"'], 2.5),
        (["wait=4", "respond-async"], 4.0),  # several Prefer headers
        (["respond-async; wait=100"], 30.0),  # at most the gateway's deadline
        (["respond-async; wait=soon"], 0.0),  # a preference that cannot be honoured is ignored
        (["respond-async; wait=-1"], 0.0),
        (["handling=lenient"], None),
    ],
)
def test_the_prefer_header(prefer, wait):
    assert async_wait(prefer, max_wait=30.0) == wait


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "ünï"])
def test_an_idempotency_key_is_1_to_255_printable_ascii_characters(key):
    with pytest.raises(InvalidInput, match="Idempotency-Key must be 1 to 255 printable ASCII characters"):
        idempotency(key)


def test_an_idempotency_key_is_taken_as_it_is():
    assert idempotency(None) is None
    assert idempotency("order 42") == "order 42"
    assert idempotency("k" * 255) == "k" * 255


def result(binary: bool) -> JobRecord:
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    response.outputs.add(name="y", datatype="INT32", shape=[2])
    response.raw_output_contents.append(b"\x01\x00\x00\x00\x02\x00\x00\x00")
    return JobRecord(
        "a" * 32,
        "m",
        "1",
        SUCCEEDED,
        created=1_700_000_000.25,
        started=1_700_000_001.0,
        finished=1_700_000_002.5,
        attempts=1,
        binary_default=binary,
        result=response.SerializeToString(),
    )


def test_a_succeeded_job_carries_its_result_as_the_synchronous_route_would():
    response = job_response(result(binary=False))
    doc = msgspec.json.decode(response.body, type=schema.Job)
    assert (doc.status, doc.attempts, doc.created_at) == (SUCCEEDED, 1, "2023-11-14T22:13:20.250Z")
    assert doc.finished_at == "2023-11-14T22:13:22.500Z"
    assert doc.result == {
        "model_name": "m",
        "model_version": "1",
        "id": "r",
        "outputs": [{"name": "y", "datatype": "INT32", "shape": [2], "data": [1, 2]}],
    }
    assert finished_response(result(binary=False)).body == orjson.dumps(doc.result)


def test_binary_outputs_follow_the_job_document():
    response = job_response(result(binary=True))
    length = int(response.headers[HEADER_LENGTH])
    doc = msgspec.json.decode(response.body[:length], type=schema.Job)
    assert doc.result["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert response.body[length:] == b"\x01\x00\x00\x00\x02\x00\x00\x00"


@pytest.mark.parametrize(("status", "http"), [(FAILED, 400), (CANCELLED, 409)])
def test_a_failed_or_cancelled_job_says_why(status, http):
    record = JobRecord("b" * 32, "m", "", status, 1.0, finished=2.0, error="bad input", error_code="INVALID_ARGUMENT")
    doc = msgspec.json.decode(job_response(record).body, type=schema.Job)
    assert doc.error == "bad input" and doc.result is msgspec.UNSET and doc.started_at is None
    assert finished_response(record).status == http


def test_a_queued_job_has_no_result_or_error_yet():
    doc = msgspec.json.decode(job_response(JobRecord("c" * 32, "m", "", QUEUED, 1.0)).body, type=schema.Job)
    assert doc.status == QUEUED and doc.result is msgspec.UNSET and doc.error is msgspec.UNSET
