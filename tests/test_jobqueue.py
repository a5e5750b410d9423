"""The job queue's shared pieces, in process: the record codec and names (its pre-queue checks are the replica's:
tests/unit/test_request_checks.py)."""

from __future__ import annotations

import pytest

from inferencehub import jobqueue
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
