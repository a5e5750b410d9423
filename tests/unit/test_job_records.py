"""The job queue's layout and record (``jobqueue.py``): subject and consumer names, keys, the record codec."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferencehub.jobqueue import (
    BUCKET,
    FINAL,
    JOB_ID,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    consumer_name,
    idempotency_key,
    job_key,
    model_of_subject,
    model_token,
    new_job_id,
    subject,
)
from inferencehub.oip.plan import OutputPlan

TOKEN = re.compile(r"^[A-Za-z0-9_=-]+$")  # one NATS subject token: no '.', '*', '>' or whitespace


def test_a_plain_model_name_is_its_own_token():
    assert model_token("iris-v2_b") == "iris-v2_b"
    assert subject("iris") == "inferencehub.jobs.iris"
    assert consumer_name("iris") == "inferencehub-iris"


def test_other_names_become_hex_after_an_equals_sign():
    assert model_token("a.b") == "=" + b"a.b".hex()
    assert subject("team/model") == "inferencehub.jobs.=" + b"team/model".hex()
    assert model_token("x" * 101).startswith("=")  # too long for a token as it is


@given(st.text(min_size=1, max_size=40))
def test_the_model_comes_back_from_its_subject(model):
    name = subject(model)
    assert TOKEN.match(name.removeprefix("inferencehub.jobs."))
    assert model_of_subject(name) == model
    assert TOKEN.match(consumer_name(model))


def test_a_token_that_is_not_hex_is_taken_as_it_is():
    assert model_of_subject("inferencehub.jobs.=zz") == "=zz"


def test_keys():
    assert job_key("ab") == "job.ab"
    assert idempotency_key("k") == "idem." + hashlib.sha256(b"k").hexdigest()
    assert idempotency_key("k") != idempotency_key("K")
    assert BUCKET == "INFERENCEHUB_JOB_STATE"


def test_job_ids_are_128_random_bits():
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(JOB_ID.match(i) for i in ids)
    assert not JOB_ID.match("G" * 32)


def test_final_states():
    assert SUCCEEDED in FINAL and QUEUED not in FINAL and RUNNING not in FINAL


def test_the_plan_header_is_compact_json_and_reads_back():
    plan = OutputPlan(True, {"y": False})
    header = plan.header()
    assert header == '{"binary_default":true,"binary":{"y":false}}'
    assert json.loads(header) == {"binary_default": True, "binary": {"y": False}}
    assert OutputPlan.from_header(header) == plan
    assert OutputPlan.from_header(header).is_binary("z") and not plan.is_binary("y")


@pytest.mark.parametrize("header", ["", "not json", "[1]", '{"binary": 3}', "null"])
def test_an_unreadable_plan_header_is_the_default_plan(header):
    assert OutputPlan.from_header(header) == OutputPlan(False, {})


def test_a_record_carries_its_plan():
    record = JobRecord("a" * 32, "m", "", QUEUED, 1.0, binary_default=True, binary={"y": False})
    assert record.plan == OutputPlan(True, {"y": False})


records = st.builds(
    JobRecord,
    id=st.text(max_size=32),
    model=st.text(max_size=20),
    version=st.text(max_size=4),
    status=st.sampled_from([QUEUED, RUNNING, SUCCEEDED, "failed", "cancelled"]),
    created=st.floats(0, 2e9),
    started=st.none() | st.floats(0, 2e9),
    finished=st.none() | st.floats(0, 2e9),
    attempts=st.integers(0, 10),
    seq=st.integers(0, 2**63),
    replica=st.text(max_size=10),
    error=st.text(max_size=50),
    error_code=st.sampled_from(["", "INVALID_ARGUMENT", "INTERNAL"]),
    binary_default=st.booleans(),
    binary=st.dictionaries(st.text(max_size=5), st.booleans(), max_size=3),
    result=st.binary(max_size=200),
)


@given(records)
def test_a_record_decodes_to_what_was_encoded(record):
    data = record.encode()
    assert data.startswith(b"IHJ1")
    assert data.endswith(record.result)
    assert JobRecord.decode(data) == record


def test_the_result_stays_binary_outside_the_json_header():
    record = JobRecord("j", "m", "1", SUCCEEDED, 1.0, result=b'\x00\xff{"x"}')
    data = record.encode()
    length = int.from_bytes(data[4:8], "big")
    header = json.loads(data[8 : 8 + length])
    assert "result" not in header and header["status"] == SUCCEEDED
    assert data[8 + length :] == b'\x00\xff{"x"}'
    assert JobRecord.decode(data).result == b'\x00\xff{"x"}'


def test_something_else_is_not_a_record():
    with pytest.raises(ValueError, match="not a job record"):
        JobRecord.decode(b'{"id": "j"}')


def test_evolve_changes_only_what_it_names():
    record = JobRecord("j", "m", "1", QUEUED, 1.0, binary={"y": True})
    running = record.evolve(status=RUNNING, attempts=1, started=2.0)
    assert (running.status, running.attempts, running.started) == (RUNNING, 1, 2.0)
    assert running.binary == {"y": True} and running.created == 1.0
    assert record.status == QUEUED
