"""Who may call the gateway: API keys (plain and hashed, rotated without a restart) and rate limits, against a real
gateway process in front of a real replica."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from inferencehub.gateway.auth import KeyFileError, TokenBuckets, parse_keys

from conftest import Gateway, wait_for

ALICE = "ih_alice_2c1f0b7e5d9a4c3b8e6f1a2d3c4b5a69"
BOB = "ih_bob_9f8e7d6c5b4a39281706f5e4d3c2b1a0"  # stored only as its SHA-256
CAROL = "ih_carol_00112233445566778899aabbccddeeff"  # no name in the file
WRONG = "ih_mallory_ffffffffffffffffffffffffffffffff"
GATEWAY = [sys.executable, "-m", "inferencehub.gateway", "--host", "127.0.0.1", "--port", "0"]
INFER = "/v2/models/iris/infer"
BODY = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}


def sha256(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def write_atomically(path, text: str) -> None:
    """Replace the file as a Secret volume update does: a new inode renamed into place."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# the gateway's API keys\n{ALICE} alice\n\n{sha256(BOB)}\tbob the builder\n{CAROL}\n")
    return path


@pytest.fixture(scope="module")
def keyed(replica, keys_file):
    server = Gateway(f"ipv4:{replica.target}", "--api-keys-file", str(keys_file))
    try:
        yield server
    finally:
        server.stop()


def test_right_key_200_missing_or_wrong_key_401_with_the_header(keyed):
    for key in (ALICE, BOB, CAROL):
        response = keyed.request("POST", INFER, BODY, bearer(key))
        assert response.status == 200, response
        assert {o["name"]: o["data"] for o in response.json()["outputs"]}["label"] == [2]
    assert keyed.request("GET", "/v2/models/iris", headers=bearer(BOB)).status == 200

    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Basic {ALICE}"}, {"Authorization": ALICE}):
        response = keyed.request("POST", INFER, BODY, headers)
        assert response.status == 401, (headers, response)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "API key" in response.json()["error"]
    for key in (WRONG, sha256(BOB), ALICE + "x", ALICE[:-1], BOB.upper()):
        response = keyed.request("POST", INFER, BODY, bearer(key))
        assert response.status == 401, (key, response)
        assert response.headers["www-authenticate"] == 'Bearer realm="inferencehub", error="invalid_token"'
        assert response.json() == {"error": "the API key is not valid"}
    # Every other route is closed too, unknown ones included (nothing to learn without a key).
    for path in ("/v2", "/v2/health/ready", "/v2/models/iris/ready", "/openapi.json", "/no/such/route"):
        assert keyed.request("GET", path).status == 401, path


def test_health_readiness_and_metrics_stay_open_and_name_keys_never_show_them(keyed):
    keyed.request("POST", INFER, BODY, bearer(ALICE))
    keyed.request("POST", INFER, BODY, bearer(WRONG))
    assert keyed.request("GET", "/healthz").status == 200
    assert keyed.request("GET", "/readyz").status == 200
    metrics = keyed.request("GET", "/metrics")
    assert metrics.status == 200
    text = metrics.body.decode()
    assert re.search(r'inferencehub_gateway_authenticated_requests_total\{key="alice"\} [1-9]', text)
    assert re.search(r'inferencehub_gateway_authenticated_requests_total\{key="bob the builder"\} [1-9]', text)
    assert re.search(r'inferencehub_gateway_unauthenticated_requests_total\{reason="invalid"\} [1-9]', text)
    assert re.search(r'inferencehub_gateway_unauthenticated_requests_total\{reason="missing"\} [1-9]', text)
    unnamed = "key-" + hashlib.sha256(CAROL.encode()).hexdigest()[:8]
    assert f'{{key="{unnamed}"}}' in text
    for secret in (ALICE, BOB, CAROL, WRONG):
        assert secret not in text
        assert secret not in keyed.log


def test_a_rotated_key_file_takes_effect_without_a_restart_and_a_bad_one_is_ignored(replica, tmp_path):
    path = tmp_path / "api-keys"
    path.write_text(f"{ALICE} alice\n")
    gateway = Gateway(f"ipv4:{replica.target}", "--api-keys-file", str(path))
    try:
        assert gateway.request("GET", "/v2/models/iris", headers=bearer(ALICE)).status == 200
        assert gateway.request("GET", "/v2/models/iris", headers=bearer(BOB)).status == 401

        write_atomically(path, f"{sha256(BOB)} bob\n")  # Alice's key revoked, Bob's added
        wait_for(
            lambda: gateway.request("GET", "/v2/models/iris", headers=bearer(BOB)).status == 200,
            timeout=10,
            what="the new key to be accepted",
        )
        assert gateway.request("GET", "/v2/models/iris", headers=bearer(ALICE)).status == 401

        # Rewritten in place, same size: the mtime still tells.
        path.write_text(f"{sha256(CAROL)} bob\n")
        wait_for(
            lambda: gateway.request("GET", "/v2/models/iris", headers=bearer(CAROL)).status == 200,
            timeout=10,
            what="the rewritten key to be accepted",
        )

        # A broken file keeps the keys in use, with a warning that names the line but not a key.
        write_atomically(path, f"{ALICE} alice\nsha256:nothex bad\n")
        wait_for(lambda: _poke(gateway) and "keeping the 1 API key(s) in use" in gateway.log, 10, what="the warning")
        assert "line 2" in gateway.log and ALICE not in gateway.log
        assert gateway.request("GET", "/v2/models/iris", headers=bearer(CAROL)).status == 200
        assert gateway.request("GET", "/v2/models/iris", headers=bearer(ALICE)).status == 401
        # An emptied file too (a half-written one looks like this).
        write_atomically(path, "")
        wait_for(lambda: _poke(gateway) and "holds no key" in gateway.log, 10, what="the empty-file warning")
        assert gateway.request("GET", "/v2/models/iris", headers=bearer(CAROL)).status == 200
    finally:
        gateway.stop()


def _poke(gateway: Gateway) -> bool:
    """A request: the key file is looked at on requests (at most once a second)."""
    return gateway.request("GET", "/v2", headers=bearer(CAROL)).status in (200, 401)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("# only a comment\n\n", "holds no key"),
        (f"{ALICE} alice\nsha256:abc short\n", "line 2: sha256: must be followed by 64 hex digits"),
        (None, "cannot read the API key file"),
    ],
)
def test_a_bad_key_file_stops_start_up_with_a_clear_error(tmp_path, content, words):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    done = subprocess.run(
        [*GATEWAY, "--api-keys-file", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "inferencehub gateway: error:" in done.stderr and words in done.stderr
    assert "Traceback" not in done.stderr and ALICE not in done.stderr


def test_key_file_parsing():
    keys = parse_keys(f"{ALICE}   alice  smith \n  {sha256(BOB).upper().replace('SHA256', 'sha256')} bob\n")
    assert [k.name for k in keys] == ["alice  smith", "bob"]
    assert keys[0].digest == hashlib.sha256(ALICE.encode()).digest()
    assert keys[1].digest == hashlib.sha256(BOB.encode()).digest()
    with pytest.raises(KeyFileError, match="line 1"):
        parse_keys("sha256:" + "g" * 64)


# --- rate limits ---------------------------------------------------------------------------------


class Burst:
    """Requests as fast as a few threads can send them, for ``seconds``: statuses and Retry-After values."""

    def __init__(self, gateway: Gateway, headers: dict[str, str], seconds: float, threads: int = 4) -> None:
        self.statuses: list[int] = []
        self.retry_after: list[str] = []
        self.lock = threading.Lock()
        start = time.monotonic()
        self.deadline = start + seconds
        workers = [threading.Thread(target=self._run, args=(gateway, headers)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(seconds + 60)
        self.elapsed = time.monotonic() - start

    def _run(self, gateway: Gateway, headers: dict[str, str]) -> None:
        while time.monotonic() < self.deadline:
            response = gateway.request("GET", "/v2/models/mock", headers=headers)
            with self.lock:
                self.statuses.append(response.status)
                if response.status == 429:
                    self.retry_after.append(response.headers.get("retry-after", ""))
                    assert "rate limit" in response.json()["error"]


def test_rate_limit_per_key_answers_429_with_retry_after_at_the_configured_rate(replica, keys_file):
    rate, burst = 20, 5
    gateway = Gateway(
        f"ipv4:{replica.target}",
        "--api-keys-file",
        str(keys_file),
        "--rate-limit",
        str(rate),
        "--rate-limit-burst",
        str(burst),
    )
    try:
        run = Burst(gateway, bearer(ALICE), seconds=3.0)
        ok, limited = run.statuses.count(200), run.statuses.count(429)
        assert set(run.statuses) == {200, 429}, set(run.statuses)
        # A token bucket lets through at most burst + rate * elapsed; sending faster than the rate, close to it.
        allowed = burst + rate * run.elapsed
        assert ok <= allowed + 1, (ok, allowed)
        assert ok >= 0.8 * allowed, (ok, allowed, len(run.statuses))
        assert limited > ok  # the load was well above the rate
        assert run.retry_after and all(value == "1" for value in run.retry_after), set(run.retry_after)

        # Another key has a bucket of its own; health and metrics are never limited.
        assert gateway.request("GET", "/v2/models/mock", headers=bearer(BOB)).status == 200
        assert all(gateway.request("GET", "/healthz").status == 200 for _ in range(30))
        text = gateway.request("GET", "/metrics").body.decode()
        assert f'inferencehub_gateway_rate_limited_requests_total{{key="alice"}} {limited}.0' in text
        assert 'rate_limited_requests_total{key="bob the builder"}' not in text
    finally:
        gateway.stop()


def test_rate_limit_per_client_address_when_keys_are_off_and_retry_after_from_the_bucket(replica):
    # One request every 5 seconds, no burst beyond one: the second request must wait the 5 seconds.
    gateway = Gateway(f"ipv4:{replica.target}", "--rate-limit", "0.2", "--rate-limit-burst", "1")
    try:
        assert gateway.request("GET", "/v2/models/mock").status == 200
        response = gateway.request("GET", "/v2/models/mock")
        assert response.status == 429, response
        assert response.headers["retry-after"] in ("4", "5")
        assert response.json()["error"].startswith("rate limit exceeded (0.2 requests/s)")
        assert gateway.request("GET", "/readyz").status == 200
        assert (
            'inferencehub_gateway_rate_limited_requests_total{key="-"} 1.0'
            in gateway.request("GET", "/metrics").body.decode()
        )
    finally:
        gateway.stop()


def test_the_per_address_table_is_bounded():
    buckets = TokenBuckets(rate=1.0, burst=1, max_clients=100)
    for i in range(10_000):
        assert buckets.take(f"addr:10.0.{i // 256}.{i % 256}", now=0.0) == 0.0
    assert len(buckets.buckets) == 100
    # The most recently seen are the ones kept; a kept client's empty bucket still refuses.
    assert buckets.take("addr:10.0.39.15", now=0.5) == pytest.approx(0.5)
    assert math.isclose(buckets.take("addr:10.0.39.15", now=1.5), 0.0)


# --- the CLI against a protected gateway ---------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "INFERENCEHUB_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "inferencehub", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **(env or {})},
    )


def test_infer_and_bench_take_an_api_key_by_flag_or_env(keyed):
    url = f"http://{keyed.url}"
    iris = ("infer", "iris", "--data", "[[6.3, 3.3, 6.0, 2.5]]", "--url", url)
    done = cli(*iris, "--api-key", ALICE)
    assert done.returncode == 0, done.stderr
    assert "label int64 [1]" in done.stdout and "[2]" in done.stdout
    done = cli(*iris, env={"INFERENCEHUB_API_KEY": BOB})
    assert done.returncode == 0, done.stderr
    refused = cli(*iris)
    assert refused.returncode == 2 and "401" in refused.stderr and "API key" in refused.stderr, refused.stderr
    refused = cli(*iris, "--api-key", WRONG)
    assert refused.returncode == 2 and "the API key is not valid" in refused.stderr, refused.stderr

    bench = cli(
        "bench",
        "--model",
        "mock",
        "--url",
        url,
        "--duration",
        "1",
        "--concurrency",
        "2",
        "--json",
        env={"INFERENCEHUB_API_KEY": CAROL},
    )
    assert bench.returncode == 0, bench.stderr
    summary = json.loads(bench.stdout)
    assert summary["ok"] > 0 and summary["errors"] == {}
    assert CAROL not in bench.stdout + bench.stderr

    helped = cli("infer", "--help", env={"INFERENCEHUB_API_KEY": ALICE})
    assert "--api-key" in helped.stdout and "INFERENCEHUB_API_KEY" in helped.stdout and ALICE not in helped.stdout


def test_the_readme_api_key_commands_work_as_written(replica, tmp_path):
    """The security page's API key block, run as one script: make a key, store its hash, start a gateway, call it."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    section = page.split("**API keys at the gateway.**", 1)[1].split("**Rate limits.**", 1)[0]
    script = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    port = free_port()
    started = "inferencehub gateway --api-keys-file api-keys &"
    assert started in script and "localhost:8080" in script
    script = script.replace(
        started,
        f"{started[:-2]} --host 127.0.0.1 --port {port} --upstream ipv4:{replica.target} 2>gateway.log &\n"
        f"trap 'kill %1' EXIT\n"
        f"for i in $(seq 100); do curl -sf localhost:{port}/readyz >/dev/null && break; sleep 0.1; done",
    ).replace("localhost:8080", f"localhost:{port}")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "INFERENCEHUB_URL": f"http://127.0.0.1:{port}"}
    env.pop("INFERENCEHUB_API_KEY", None)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"name":"iris"' in done.stdout.replace(" ", "")  # the metadata call, with the key
    assert "label int64 [1]" in done.stdout  # inferencehub infer --api-key
    (line,) = (tmp_path / "api-keys").read_text().splitlines()
    assert re.fullmatch(r"sha256:[0-9a-f]{64} team-a", line)  # only the hash was stored


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_negative_rate_limit_stops_start_up_with_a_clear_error():
    done = subprocess.run([*GATEWAY, "--rate-limit", "-1"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--rate-limit and --rate-limit-burst cannot be negative" in done.stderr
    assert "Traceback" not in done.stderr
