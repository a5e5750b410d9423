"""Serialization: the cost of moving an FP32 tensor through each wire format, in one process.

For tensors of 4 to 1,000,000 elements: JSON (the standard library and orjson, as OIP REST sends `data`),
protobuf typed contents (`fp32_contents`), protobuf raw bytes (`raw_input_contents`, what the gateway sends
upstream) and the HTTP binary tensor data extension (a JSON header, then the raw bytes). Encode is numpy array
to bytes on the wire; decode is back to a numpy array. Best of several repeats.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import orjson
from common import figure, table, write

from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb

NAME = "serialization"
TITLE = "Serialization: JSON vs protobuf vs binary, encode and decode"


def header(n: int) -> dict:
    return {"inputs": [{"name": "x", "shape": [n], "datatype": "FP32"}]}


def json_std(a: np.ndarray) -> tuple:
    doc = header(a.size)
    doc["inputs"][0]["data"] = a.tolist()
    wire = json.dumps(doc).encode()
    return wire, lambda w: np.array(json.loads(w)["inputs"][0]["data"], np.float32)


def json_orjson(a: np.ndarray) -> tuple:
    doc = header(a.size)
    doc["inputs"][0]["data"] = a
    wire = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return wire, lambda w: np.array(orjson.loads(w)["inputs"][0]["data"], np.float32)


def proto_typed(a: np.ndarray) -> tuple:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[a.size]).contents.fp32_contents.extend(a.tolist())
    wire = request.SerializeToString()

    def decode(w: bytes) -> np.ndarray:
        return np.array(pb.ModelInferRequest.FromString(w).inputs[0].contents.fp32_contents, np.float32)

    return wire, decode


def proto_raw(a: np.ndarray) -> tuple:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[a.size])
    request.raw_input_contents.append(a.tobytes())
    wire = request.SerializeToString()
    return wire, lambda w: np.frombuffer(pb.ModelInferRequest.FromString(w).raw_input_contents[0], np.float32)


def http_binary(a: np.ndarray) -> tuple:
    doc = header(a.size)
    doc["inputs"][0]["parameters"] = {"binary_data_size": a.nbytes}
    head = orjson.dumps(doc)
    wire = head + a.tobytes()

    def decode(w: bytes) -> np.ndarray:
        orjson.loads(w[: len(head)])
        return np.frombuffer(w, np.float32, offset=len(head))

    return wire, decode


FORMATS = {
    "JSON (json)": json_std,
    "JSON (orjson)": json_orjson,
    "protobuf typed": proto_typed,
    "protobuf raw": proto_raw,
    "HTTP binary": http_binary,
}


def best(fn, budget: float) -> float:
    """Best time of one call, in seconds, over repeats that fit in ``budget``."""
    times = []
    deadline = time.perf_counter() + budget
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(out: Path, quick: bool) -> str:
    sizes = [4, 1_000, 100_000] if quick else [4, 1_000, 100_000, 1_000_000]
    budget = 0.05 if quick else 0.5
    rng = np.random.default_rng(0)
    rows, costs = [], {}
    for n in sizes:
        a = rng.random(n, dtype=np.float32)
        for name, make in FORMATS.items():
            wire, decode = make(a)
            assert np.array_equal(decode(wire), a)
            encode_s = best(lambda make=make, a=a: make(a), budget)
            decode_s = best(lambda decode=decode, wire=wire: decode(wire), budget)
            costs[(name, n)] = encode_s + decode_s
            rows.append([f"{n:,}", name, encode_s * 1e6, decode_s * 1e6, len(wire), len(wire) / (4 * n)])
    n = sizes[-1]
    ratio = costs[("JSON (json)", n)] / costs[("HTTP binary", n)]
    ratio_orjson = costs[("JSON (orjson)", n)] / costs[("HTTP binary", n)]
    verdict = (
        f"At {n:,} elements the binary extension costs {ratio:.0f}x less than stdlib JSON and "
        f"{ratio_orjson:.0f}x less than orjson (goal: 50x less than JSON)."
    )
    body = table(["elements", "format", "encode µs", "decode µs", "bytes", "bytes per 4-byte value"], rows)
    write(out, NAME, TITLE, __doc__.split("\n\n", 1)[1].strip(), f"{body}\n\n{verdict}\n\n![plot]({NAME}.png)", quick)

    plt = figure()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in FORMATS:
        ax.plot(sizes, [costs[(name, s)] * 1e6 for s in sizes], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="FP32 elements", ylabel="encode + decode, µs", title="serialization cost")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict
