"""Property tests: malformed and adversarial requests never get a 5xx, always get the OIP error shape,
and the malformed ones never reach the inference service."""

from __future__ import annotations

import json
import re
import socket
import urllib.parse
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ALL_DATATYPES as DATATYPES
from conftest import IRIS_ROW, Gateway

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def valid_request() -> dict:
    return {"inputs": [dict(IRIS_ROW)]}


@st.composite
def malformed_requests(draw) -> tuple[bytes, dict[str, str]]:
    """Requests that are wrong by construction, without asking the model."""
    kind = draw(st.sampled_from(["bytes", "json", "shape", "datatype", "data", "field", "binary", "header"]))
    request = valid_request()
    tensor = request["inputs"][0]
    headers: dict[str, str] = {}
    if kind == "bytes":
        body = draw(st.binary(max_size=64))
        try:
            decoded = json.loads(body)
            if isinstance(decoded, dict) and "inputs" in decoded:
                body = b"[" + body
        except ValueError:
            pass
        return body, headers
    if kind == "json":
        value = draw(json_values)
        if isinstance(value, dict):
            value.pop("inputs", None)  # without inputs it can never be a valid request
        return json.dumps(value).encode(), headers
    if kind == "shape":
        shape = draw(st.lists(st.integers(-3, 6), max_size=4).filter(lambda s: _product(s) != 4))
        tensor["shape"] = shape
    elif kind == "datatype":
        tensor["datatype"] = draw(st.text(max_size=8).filter(lambda t: t not in DATATYPES))
    elif kind == "data":
        bad = draw(st.lists(st.text(max_size=3) | st.none() | st.booleans(), min_size=4, max_size=4))
        tensor["data"] = bad
    elif kind == "field":
        key = draw(
            st.text(min_size=1, max_size=8).filter(
                lambda k: k not in {"id", "parameters", "inputs", "outputs", "model_name", "model_version"}
            )
        )
        request[key] = draw(json_values)
    elif kind == "binary":
        size = draw(st.integers(0, 64).filter(lambda n: n != 16))
        del tensor["data"]
        tensor["parameters"] = {"binary_data_size": size}
        head = json.dumps(request).encode()
        blob = draw(st.binary(min_size=size, max_size=size))
        return head + blob, {"Inference-Header-Content-Length": str(len(head))}
    else:
        body = json.dumps(request).encode()
        length = draw(st.text(max_size=6).filter(lambda t: not (t.strip().isdigit() and int(t) == len(body))))
        headers["Inference-Header-Content-Length"] = re.sub(r"[^\x21-\x7e]", "", length) or "-1"
        if headers["Inference-Header-Content-Length"].isdigit() and int(
            headers["Inference-Header-Content-Length"]
        ) == len(body):
            headers["Inference-Header-Content-Length"] = "-1"
        return body, headers
    return json.dumps(request).encode(), headers


def _product(shape: list[int]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result


def upstream_infer_calls(replica) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("inferencehub_inference_requests_total{")
    )


def assert_error_shape(response) -> None:
    assert response.status < 500, response
    if response.status >= 400:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), response


def test_malformed_requests_never_reach_the_replica(gateway, replica):
    before = upstream_infer_calls(replica)

    @FUZZ
    @given(malformed_requests())
    def check(request):
        body, headers = request
        response = gateway.request("POST", "/v2/models/iris/infer", body, headers)
        assert response.status == 400, (body, headers, response)
        assert_error_shape(response)

    check()
    assert upstream_infer_calls(replica) == before
    # The gateway still serves.
    assert gateway.request("POST", "/v2/models/iris/infer", valid_request()).status == 200


path_segments = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    segments=st.lists(
        st.sampled_from(["v2", "models", "iris", "versions", "1", "ready", "infer", "health"]) | path_segments,
        max_size=6,
    ),
    body=st.binary(max_size=32),
    request_id=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=200),
)
def test_adversarial_paths_and_headers_never_5xx(gateway, method, segments, body, request_id):
    path = "/" + "/".join(urllib.parse.quote(s, safe="") for s in segments)
    response = gateway.request(method, path, body if method != "GET" else None, {"X-Request-Id": request_id})
    assert_error_shape(response)
    if re.fullmatch(r"[A-Za-z0-9._:/=+-]{1,128}", request_id):
        assert response.headers["x-request-id"] == request_id
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


# --- headers and framing, on raw sockets ---------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_gateway(replica):
    """A gateway of its own (so its log can be read whole), with short read deadlines."""
    server = Gateway(f"ipv4:{replica.target}", "--header-timeout-seconds", "2", "--body-timeout-seconds", "2")
    try:
        yield server
    finally:
        server.stop()


header_names = st.sampled_from(
    [
        "Content-Length",
        "Transfer-Encoding",
        "Content-Type",
        "Content-Encoding",
        "Expect",
        "Connection",
        "Host",
        "X-Request-Id",
        "X-InferenceHub-Deadline-Ms",
        "Inference-Header-Content-Length",
        "Upgrade",
    ]
) | st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"), max_size=12)
header_values = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) | st.sampled_from(
    [b"chunked", b"gzip", b"100-continue", b"-1", b"99999999999999999999", b"0x10", b"5, 6", b"close", b"websocket"]
)


@st.composite
def raw_requests(draw) -> bytes:
    """An HTTP/1.1 request with arbitrary headers and framing: lengths that lie, duplicate or contradictory
    framing headers, broken chunks, stray bytes in header lines."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"BREW", b"POST"]))
    path = draw(st.sampled_from([b"/v2/models/iris/infer", b"/v2", b"/healthz", b"/v2/models/iris"]))
    body = draw(st.binary(max_size=40) | st.just(json.dumps(valid_request()).encode()))
    lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: gateway"]
    framing = draw(st.sampled_from(["length", "wrong-length", "two-lengths", "chunked", "bad-chunks", "both", "none"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "wrong-length":
        lines.append(b"Content-Length: %d" % draw(st.integers(0, max(len(body) - 1, 0))))
    elif framing == "two-lengths":
        lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
    elif framing in ("chunked", "bad-chunks", "both"):
        lines.append(b"Transfer-Encoding: chunked")
        if framing == "both":
            lines.append(b"Content-Length: %d" % len(body))
        size = b"%x" % len(body) if framing != "bad-chunks" else draw(st.sampled_from([b"zz", b"-1", b"ffffffffffff"]))
        body = size + b"\r\n" + body + b"\r\n0\r\n\r\n"
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=4)):
        lines.append(name.encode() + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def answer_to(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # nothing more is coming: incomplete framing ends now, not at a timeout
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_fuzzed_headers_and_framing_get_json_errors_never_5xx(raw_gateway):
    @settings(max_examples=120, deadline=None)
    @given(raw_requests())
    def check(request):
        received = answer_to(raw_gateway.port, request)
        for response in re.split(rb"(?=HTTP/1\.[01] \d{3} )", received):
            if not response:
                continue  # the server closed without an answer (the client's bytes ended mid-request)
            head, _, body = response.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            assert status < 500 or status == 503, (request, response[:300])
            if status >= 400:
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
                document = json.loads(body[:length])
                assert set(document) == {"error"} and isinstance(document["error"], str), (request, response)

    check()
    assert raw_gateway.request("POST", "/v2/models/iris/infer", valid_request()).status == 200
    assert "Traceback" not in raw_gateway.log and " ERROR " not in raw_gateway.log, raw_gateway.log[-3000:]
