"""Client-side load balancing behind an emulated headless Service, under both policies.

Replicas listen on 127.0.0.2, 127.0.0.3, ... with one port, as pods do; a small DNS
server in the test answers for their name (records changeable at run time, TTL 5 s as
CoreDNS gives a headless Service's records by default), and the gateway's upstream is
``dns://127.0.0.1:DNS_PORT/inference.test:PORT``, a target grpcio's resolver honours.
All traffic stays on loopback and every loop is bounded.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import time

import pytest

from conftest import (
    TEST_MODELS,
    Gateway,
    Load,
    Replica,
    dns_target,
    drill,
    health_status,
    model_repository,
    replicas_behind_dns,
    served_by,
    wait_for,
)

POLICIES = ["round_robin", "weighted_round_robin"]


@pytest.mark.parametrize("policy", POLICIES)
def test_spread_discovery_and_failure_drills(tmp_path, dns, policy):
    records, dns_port = dns
    args = ("--max-connection-age-seconds", "2", "--drain-seconds", "1.5")
    with replicas_behind_dns(tmp_path, records, *args) as replicas:
        port = replicas["r1"].port
        gateway = Gateway(dns_target(dns_port, port), "--balancing", policy)
        try:
            # Equal replicas: every replica serves, evenly, under either policy.
            wait_for(lambda: len(served_by(gateway, 6)) == 3, timeout=15, what="all three replicas to serve")
            spread = served_by(gateway, 90)
            assert set(spread) == {"r1", "r2", "r3"}
            assert min(spread.values()) >= 20, spread

            # A new replica added to the records gets traffic within a few seconds.
            repo = model_repository(tmp_path / "r4", TEST_MODELS / "fast")
            replicas["r4"] = Replica("--models", str(repo), *args, "--replica-name", "r4", host="127.0.0.5", port=port)
            replicas["r4"].wait_serving()
            records.addresses = [*records.addresses, "127.0.0.5"]
            added = time.monotonic()
            wait_for(lambda: "r4" in served_by(gateway, 8), timeout=20, interval=0.2, what="r4 to serve")
            assert time.monotonic() - added < 20

            # Failure drills under load: SIGKILL, SIGTERM, SIGSTOP.
            for name, sig in (("r1", signal.SIGKILL), ("r2", signal.SIGTERM), ("r3", signal.SIGSTOP)):
                drill(gateway, replicas[name].proc, sig)
            assert replicas["r2"].proc.wait(10) == 0  # SIGTERM drained and exited cleanly
            assert served_by(gateway, 10) == {"r4": 10}
        finally:
            gateway.stop()


@pytest.mark.parametrize("policy", POLICIES)
def test_a_replica_added_to_dns_serves_within_10_seconds(tmp_path, dns, policy):
    """With the replicas' default max connection age, a new address in DNS gets calls within 10 s."""
    records, dns_port = dns
    with replicas_behind_dns(tmp_path, records, count=2) as replicas:
        port = replicas["r1"].port
        gateway = Gateway(dns_target(dns_port, port), "--balancing", policy)
        try:
            wait_for(lambda: len(served_by(gateway, 4)) == 2, timeout=15, what="both replicas to serve")
            repo = model_repository(tmp_path / "r3", TEST_MODELS / "fast")
            replicas["r3"] = Replica("--models", str(repo), "--replica-name", "r3", host="127.0.0.4", port=port)
            replicas["r3"].wait_serving()
            records.addresses = [*records.addresses, "127.0.0.4"]
            added = time.monotonic()
            wait_for(lambda: "r3" in served_by(gateway, 4), timeout=15, interval=0.1, what="r3 to serve")
            took = time.monotonic() - added
            print(f"{policy}: r3 served {took:.1f}s after it appeared in DNS")
            assert took < 10, f"the new replica served only after {took:.1f}s"
        finally:
            gateway.stop()


def slow_model(tmp_path, ms: int):
    """The test model ``fast``, but sleeping ``ms`` per call."""
    folder = tmp_path / f"slow-{ms}" / "fast"
    folder.mkdir(parents=True)
    config = json.loads((TEST_MODELS / "fast" / "config.json").read_text())
    config["parameters"]["latency"] = {"distribution": "fixed", "ms": ms}
    (folder / "config.json").write_text(json.dumps(config))
    return folder.parent


@pytest.mark.parametrize("policy", POLICIES)
def test_a_loaded_replica_gets_less_and_a_draining_one_none(tmp_path, policy):
    """r3 takes 4x longer per call: its reported utilization is 4x its share, so it gets less traffic
    (under weighted_round_robin only). r2 drains (NOT_SERVING): it gets no new calls at all."""
    fast = model_repository(tmp_path / "fast", TEST_MODELS / "fast")
    replicas = {
        "r1": Replica("--models", str(fast), "--replica-name", "r1"),
        "r2": Replica("--models", str(fast), "--replica-name", "r2", "--drain-seconds", "20"),
        "r3": Replica("--models", str(slow_model(tmp_path, 80)), "--replica-name", "r3"),
    }
    gateway = None
    try:
        for replica in replicas.values():
            replica.wait_serving()
        targets = ",".join(r.target for r in replicas.values())
        gateway = Gateway(f"ipv4:{targets}", "--balancing", policy)
        Load(gateway, threads=6, seconds=2).finish()  # reports arrive, weights settle
        load = Load(gateway, threads=6, seconds=4)
        load.finish()
        assert set(load.statuses) == {200}, load.statuses
        total = sum(load.replicas.values())
        share = {name: load.replicas[name] / total for name in replicas}
        print(f"{policy}: shares {share}")
        if policy == "weighted_round_robin":
            assert share["r3"] < 0.5 * min(share["r1"], share["r2"]), share
        else:
            assert share["r3"] > 0.25, share  # round robin: a third each, whatever r3 does

        replicas["r2"].proc.send_signal(signal.SIGTERM)
        wait_for(lambda: health_status(replicas["r2"].target) == "NOT_SERVING", timeout=10, what="r2 to drain")
        wait_for(lambda: "r2" not in served_by(gateway, 10), timeout=10, what="r2 to get no calls")
        seen = served_by(gateway, 60)
        assert "r2" not in seen, seen
        replicas["r2"].check_running()  # still draining, not gone: health checking alone kept calls away
        assert seen["r1"] > 0 and seen["r3"] > 0
    finally:
        if gateway is not None:
            gateway.stop()
        for replica in replicas.values():
            replica.kill()


def replica_series(gateway: Gateway) -> collections.Counter[str]:
    """Calls counted per replica label in the gateway's /metrics."""
    counts: collections.Counter[str] = collections.Counter()
    text = gateway.request("GET", "/metrics").body.decode()
    for match in re.finditer(r"^inferencehub_gateway_upstream_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        counts[labels["replica"]] += int(float(match.group(2)))
    return counts


def test_per_replica_metric_labels_stay_bounded(tmp_path):
    fast = model_repository(tmp_path, TEST_MODELS / "fast")
    replicas = {name: Replica("--models", str(fast), "--replica-name", name) for name in ("r1", "r2", "r3")}
    gateway = None
    try:
        for replica in replicas.values():
            replica.wait_serving()
        targets = ",".join(r.target for r in replicas.values())
        gateway = Gateway(f"ipv4:{targets}", "--replica-metrics-limit", "2", "--replica-metrics-seconds", "2")
        wait_for(lambda: len(served_by(gateway, 6)) == 3, timeout=15, what="all three replicas to serve")
        served_by(gateway, 30)
        counts = replica_series(gateway)
        named = sorted(set(counts) - {"other"})
        assert len(named) == 2 and counts["other"] > 0, counts  # at most 2 replicas get their own series

        # One named replica goes away for good: its series go; the replica counted as "other" gets its own.
        gone = named[0]
        replicas[gone].kill()
        wait_for(
            lambda: served_by(gateway, 5) and gone not in replica_series(gateway),
            timeout=20,
            interval=0.2,
            what=f"{gone}'s series to be dropped",
        )
        wait_for(
            lambda: served_by(gateway, 5) and len(set(replica_series(gateway)) - {"other"}) == 2,
            timeout=20,
            interval=0.2,
            what="the third replica to get its own series",
        )
        assert gone not in replica_series(gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        for replica in replicas.values():
            replica.kill()
