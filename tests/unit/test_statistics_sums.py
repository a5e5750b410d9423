"""Triton's statistics: a replica's own (``inference/statistics.py``) and the gateway's sum over replicas
(``gateway/statistics.summed``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from inferencehub.gateway.statistics import BATCH_DURATIONS, DURATIONS, summed
from inferencehub.inference.statistics import ModelStats, Timing
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb


def stats(name="m", version="1", *, count=0, executions=0, last=0, success=(0, 0), batches=()) -> pb.ModelStatistics:
    s = pb.ModelStatistics(
        name=name, version=version, last_inference=last, inference_count=count, execution_count=executions
    )
    s.inference_stats.success.count, s.inference_stats.success.ns = success
    for size, n, ns in batches:
        b = s.batch_stats.add(batch_size=size)
        b.compute_infer.count, b.compute_infer.ns = n, ns
    return s


def response(*model_stats: pb.ModelStatistics) -> pb.ModelStatisticsResponse:
    return pb.ModelStatisticsResponse(model_stats=list(model_stats))


def test_one_replica_is_rendered_as_triton_writes_it():
    doc = summed([response(stats(count=3, executions=2, last=1700, success=(3, 900), batches=[(2, 1, 50)]))])
    [entry] = doc["model_stats"]
    assert (entry["name"], entry["version"], entry["last_inference"]) == ("m", "1", 1700)
    assert (entry["inference_count"], entry["execution_count"]) == (3, 2)
    assert set(entry["inference_stats"]) == set(DURATIONS)
    assert entry["inference_stats"]["success"] == {"count": 3, "ns": 900}
    assert entry["inference_stats"]["fail"] == {"count": 0, "ns": 0}
    assert entry["batch_stats"] == [
        {"batch_size": 2, "compute_input": {"count": 0, "ns": 0}, "compute_infer": {"count": 1, "ns": 50},
         "compute_output": {"count": 0, "ns": 0}}
    ]  # fmt: skip
    assert entry["memory_usage"] == []


def test_replicas_add_up_and_the_last_inference_is_the_latest():
    doc = summed(
        [
            response(stats(count=3, executions=2, last=500, success=(3, 900), batches=[(1, 1, 10), (4, 1, 40)])),
            response(stats(count=5, executions=5, last=700, success=(5, 100), batches=[(1, 4, 20), (2, 1, 30)])),
        ]
    )
    [entry] = doc["model_stats"]
    assert (entry["inference_count"], entry["execution_count"], entry["last_inference"]) == (8, 7, 700)
    assert entry["inference_stats"]["success"] == {"count": 8, "ns": 1000}
    assert [(b["batch_size"], b["compute_infer"]) for b in entry["batch_stats"]] == [
        (1, {"count": 5, "ns": 30}),
        (2, {"count": 1, "ns": 30}),
        (4, {"count": 1, "ns": 40}),
    ]


def test_models_and_versions_are_summed_apart_and_sorted():
    doc = summed(
        [
            response(stats("b", "1", count=1), stats("a", "2", count=2)),
            response(stats("a", "1", count=4), stats("a", "2", count=8)),
        ]
    )
    assert [(e["name"], e["version"], e["inference_count"]) for e in doc["model_stats"]] == [
        ("a", "1", 4),
        ("a", "2", 10),
        ("b", "1", 1),
    ]


def test_nothing_sums_to_no_models():
    assert summed([]) == {"model_stats": []}
    assert summed([response()]) == {"model_stats": []}


replica = st.builds(
    lambda count, last, ns, sizes: stats(
        count=count, executions=count, last=last, success=(count, ns), batches=[(s, 1, ns) for s in sizes]
    ),
    st.integers(0, 10**6),
    st.integers(0, 10**12),
    st.integers(0, 10**9),
    st.lists(st.integers(1, 8), unique=True, max_size=4),
)


@given(st.lists(replica, min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_the_sum_is_the_sum_whatever_the_order(replicas, random):
    responses = [response(s) for s in replicas]
    [entry] = summed(responses)["model_stats"]
    assert entry["inference_count"] == sum(s.inference_count for s in replicas)
    assert entry["last_inference"] == max(s.last_inference for s in replicas)
    assert entry["inference_stats"]["success"]["ns"] == sum(s.inference_stats.success.ns for s in replicas)
    for b in entry["batch_stats"]:
        assert b["compute_infer"]["count"] == sum(
            1 for s in replicas for x in s.batch_stats if x.batch_size == b["batch_size"]
        )
        assert set(b) == {"batch_size", *BATCH_DURATIONS}
    shuffled = list(responses)
    random.shuffle(shuffled)
    assert summed(shuffled) == summed(responses)


# --- one replica's own statistics ------------------------------------------------------------------------------


def test_model_stats_record_calls_and_requests():
    s = ModelStats("m", "2")
    s.executed(size=2, inferences=5, stacked=100, started=110, finished=160, split=165)
    s.executed(size=2, inferences=3, stacked=200, started=205, finished=215, split=216)
    s.executed(size=1, inferences=1, stacked=300, started=300, finished=330, split=330)
    s.succeeded(Timing(received=0, decoded=5, enqueued=6, taken=16, dispatched=20, started=22, finished=40), done=50)
    s.failed(Timing(received=100), done=130)
    m = s.message()
    assert (m.name, m.version, m.inference_count, m.execution_count) == ("m", "2", 9, 3)
    assert (m.inference_stats.success.count, m.inference_stats.success.ns) == (1, 50)
    assert (m.inference_stats.fail.count, m.inference_stats.fail.ns) == (1, 30)
    assert m.inference_stats.queue.ns == 10
    assert m.inference_stats.compute_input.ns == 5 + 2  # decoding, plus stacking its batch
    assert m.inference_stats.compute_infer.ns == 18
    assert m.inference_stats.compute_output.ns == 10
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in m.batch_stats] == [
        (1, 1, 30),
        (2, 2, 60),
    ]
    assert m.last_inference > 0


def test_a_replicas_message_sums_like_triton_json():
    s = ModelStats("m", "1")
    s.executed(size=4, inferences=4, stacked=0, started=1, finished=3, split=6)
    [entry] = summed([pb.ModelStatisticsResponse(model_stats=[s.message()])])["model_stats"]
    assert entry["batch_stats"][0]["compute_output"] == {"count": 1, "ns": 3}
    assert entry["inference_count"] == 4
