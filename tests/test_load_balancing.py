"""Client-side load balancing behind an emulated headless Service.

Replicas listen on 127.0.0.2, 127.0.0.3, ... with one port, as pods do; a small DNS
server in the test answers for their name (records changeable at run time), and the
gateway's upstream is ``dns://127.0.0.1:DNS_PORT/inference.test:PORT``, a target
grpcio's resolver honours. All traffic stays on loopback and every loop is bounded.
"""

from __future__ import annotations

import collections
import signal
import threading
import time

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from conftest import TEST_MODELS, Gateway, Replica, model_repository, wait_for

NAME = "inference.test."
BODY = {"inputs": [{"name": "input", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}


class Records(BaseResolver):
    """A-records for one name, changeable while the server runs."""

    def __init__(self) -> None:
        self.addresses: list[str] = []

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname) == NAME and request.q.qtype == QTYPE.A:
            for address in list(self.addresses):
                reply.add_answer(RR(NAME, QTYPE.A, rdata=A(address), ttl=1))
        return reply


@pytest.fixture
def dns():
    records = Records()
    server = DNSServer(records, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda *_: None))
    server.start_thread()
    try:
        yield records, server.server.server_address[1]
    finally:
        server.stop()


class Load:
    """Requests through the gateway from a few threads until stopped (bounded by ``seconds``)."""

    def __init__(self, gateway: Gateway, threads: int = 8, seconds: float = 30.0) -> None:
        self.gateway = gateway
        self.statuses: collections.Counter[int] = collections.Counter()
        self.replicas: collections.Counter[str] = collections.Counter()
        self.stopping = threading.Event()
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            try:
                response = self.gateway.request("POST", "/v2/models/fast/infer", BODY, timeout=40)
                status, replica = response.status, response.headers.get("x-inferencehub-replica", "")
            except OSError:
                status, replica = -1, ""
            with self.lock:
                self.statuses[status] += 1
                self.replicas[replica] += 1

    def stop(self) -> collections.Counter[int]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)
        return self.statuses


def served_by(gateway: Gateway, count: int) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        response = gateway.request("POST", "/v2/models/fast/infer", BODY)
        assert response.status == 200, response
        seen[response.headers["x-inferencehub-replica"]] += 1
    return seen


def test_spread_discovery_and_failures_cost_nothing(tmp_path, dns):
    records, dns_port = dns
    repo = model_repository(tmp_path, TEST_MODELS / "fast")
    args = (
        "--models",
        str(repo),
        "--max-connection-age-seconds",
        "2",
        "--max-connection-age-grace-seconds",
        "5",
        "--drain-seconds",
        "1.5",
    )
    replicas: dict[str, Replica] = {}
    gateway = None
    try:
        first = Replica(*args, "--replica-name", "r1", host="127.0.0.2")
        replicas["r1"] = first
        for i in (2, 3):
            replicas[f"r{i}"] = Replica(*args, "--replica-name", f"r{i}", host=f"127.0.0.{i + 1}", port=first.port)
        for replica in replicas.values():
            replica.wait_serving()
        records.addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        gateway = Gateway(f"dns://127.0.0.1:{dns_port}/{NAME.rstrip('.')}:{first.port}")

        # round_robin: every replica serves, evenly.
        wait_for(lambda: len(served_by(gateway, 6)) == 3, timeout=15, what="all three replicas to serve")
        spread = served_by(gateway, 90)
        assert set(spread) == {"r1", "r2", "r3"}
        assert min(spread.values()) >= 20, spread

        # A new replica added to the records gets traffic within a few seconds.
        replicas["r4"] = Replica(*args, "--replica-name", "r4", host="127.0.0.5", port=first.port).wait_serving()
        records.addresses = [*records.addresses, "127.0.0.5"]
        added = time.monotonic()
        wait_for(lambda: "r4" in served_by(gateway, 8), timeout=20, interval=0.2, what="r4 to serve")
        assert time.monotonic() - added < 20

        # Failure drills under load: SIGKILL, SIGTERM, SIGSTOP. No client request may fail.
        for name, sig in (("r1", signal.SIGKILL), ("r2", signal.SIGTERM), ("r3", signal.SIGSTOP)):
            load = Load(gateway)
            time.sleep(1.0)
            replicas[name].proc.send_signal(sig)
            time.sleep(4.0)
            statuses = load.stop()
            assert set(statuses) == {200}, f"{name} {sig.name}: {statuses}"
            assert statuses[200] > 50
        assert replicas["r2"].proc.wait(10) == 0  # SIGTERM drained and exited cleanly
        assert served_by(gateway, 10) == {"r4": 10}
    finally:
        if gateway is not None:
            gateway.stop()
        for replica in replicas.values():
            replica.kill()
