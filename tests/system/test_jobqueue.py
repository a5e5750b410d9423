"""The job queue's shared pieces, in process: the record codec, names, and the pre-queue checks."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from inferencehub import jobqueue
from inferencehub.errors import InvalidInput
from inferencehub.jobqueue import JobRecord


def test_a_record_round_trips_with_binary_result_bytes():
    record = JobRecord(
        id=jobqueue.new_job_id(),
        model="iris",
        version="1",
        status=jobqueue.SUCCEEDED,
        created=1.5,
        started=2.0,
        finished=3.25,
        attempts=2,
        seq=7,
        binary_default=True,
        binary={"label": False},
        result=bytes(range(256)) * 3,
    )
    assert JobRecord.decode(record.encode()) == record
    with pytest.raises(ValueError):
        JobRecord.decode(b"{}")


def test_job_ids_are_128_random_bits():
    ids = {jobqueue.new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(jobqueue.JOB_ID.match(i) for i in ids)


def test_model_names_become_one_subject_token_and_back():
    for name in ("iris", "mock-heavy", "a_b", "odd.name", "with space", "*", ">", "ünï"):
        token = jobqueue.model_token(name)
        assert not set(token) & set(". *>\t"), token
        assert jobqueue.model_of_subject(jobqueue.subject(name)) == name
        assert jobqueue.consumer_name(name) == "inferencehub-" + token
    assert jobqueue.subject("iris") == "inferencehub.jobs.iris"


def test_idempotency_keys_are_hashed_into_valid_bucket_keys():
    key = jobqueue.idempotency_key("order 42 / ünï *")
    assert key.startswith("idem.") and len(key) == 5 + 64 and key == jobqueue.idempotency_key("order 42 / ünï *")


METADATA = NS(
    name="iris",
    inputs=[NS(name="features", datatype="FP32", shape=[-1, 4])],
    outputs=[NS(name="probabilities"), NS(name="label")],
)


def request(*inputs, outputs=()):
    return NS(inputs=[NS(name=n, datatype=d, shape=s) for n, d, s in inputs], outputs=[NS(name=o) for o in outputs])


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (request(("petals", "FP32", [1, 4])), "model 'iris' has no input 'petals' (its inputs: features)"),
        (request(("features", "INT32", [1, 4])), "input 'features': datatype INT32, expected FP32"),
        (request(("features", "FP32", [1, 3])), "input 'features': shape [1, 3], expected [-1, 4] (-1: any size)"),
        (request(("features", "FP32", [4])), "input 'features': shape [4], expected [-1, 4] (-1: any size)"),
        (
            request(("features", "FP32", [1, 4]), ("features", "FP32", [1, 4])),
            "input 'features' is given more than once",
        ),
        (request(), "model 'iris': missing input 'features' (FP32 [-1, 4])"),
        (
            request(("features", "FP32", [2, 4]), outputs=["nope"]),
            "model 'iris' has no output 'nope' (its outputs: probabilities, label)",
        ),
    ],
)
def test_requests_are_checked_against_the_metadata_with_the_replica_s_messages(given, message):
    with pytest.raises(InvalidInput) as caught:
        jobqueue.check_request(given, METADATA)
    assert str(caught.value) == message


def test_a_batch_over_max_batch_size_is_refused_as_the_scheduler_does():
    with pytest.raises(InvalidInput) as caught:
        jobqueue.check_request(request(("features", "FP32", [65, 4])), METADATA, max_batch_size=64)
    assert str(caught.value) == "model 'iris': a request of 65 rows is over its max_batch_size (64); split it"
    jobqueue.check_request(request(("features", "FP32", [64, 4])), METADATA, max_batch_size=64)


def test_a_valid_request_passes():
    jobqueue.check_request(request(("features", "FP32", [3, 4]), outputs=["label"]), METADATA)
