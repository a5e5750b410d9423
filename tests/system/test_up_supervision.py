"""`inferencehub up` looks after its children: restarts, crash loops, signals, and nothing left behind.

Real processes on loopback: `up` with its gateway, replicas and NATS, killed and signalled by pid.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from conftest import CLI, alive, descendants, health_status, wait_for

ANY_PORTS = ("--port", "0", "--inference-port", "0", "--inference-metrics-port", "0")
NOTICED = 1.0  # seconds after a kill by which the gateway must have stopped sending calls to the dead replica
MOCK_BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]})


@dataclass
class Call:
    started: float
    ended: float
    status: int  # 0: no HTTP answer at all
    replica: str
    body: str


class Load:
    """A closed loop of requests to the gateway from a few threads, on loopback, until stopped (at most
    ``limit`` seconds): every call's times, status and replica kept."""

    def __init__(self, address: str, threads: int = 4, limit: float = 120.0) -> None:
        self.host, self.port = address.rsplit(":", 1)
        self.calls: list[Call] = []
        self.done = threading.Event()
        self.until = time.monotonic() + limit
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _loop(self) -> None:
        while not self.done.is_set() and time.monotonic() < self.until:
            started = time.monotonic()
            conn = http.client.HTTPConnection(self.host, int(self.port), timeout=10)
            try:
                conn.request("POST", "/v2/models/mock/infer", MOCK_BODY, {"Content-Type": "application/json"})
                answer = conn.getresponse()
                call = Call(started, 0, answer.status, answer.getheader("x-inferencehub-replica", ""), "")
                call.body = answer.read().decode(errors="replace")
            except OSError as exc:
                call = Call(started, 0, 0, "", repr(exc))
            finally:
                conn.close()
            call.ended = time.monotonic()
            self.calls.append(call)

    def served(self, replica: str, since: float) -> int:
        return sum(1 for c in list(self.calls) if c.status == 200 and c.replica == replica and c.started > since)

    def stop(self) -> list[Call]:
        self.done.set()
        for thread in self.threads:
            thread.join(15)
        return list(self.calls)


def test_a_killed_replica_comes_back_on_its_address_while_the_gateway_serves_through_the_other(start_up):
    up = start_up("--replicas", "2", *ANY_PORTS)
    address = up.wait_up()
    before = up.announced()
    victim = before["pids"]["inference-1"]
    assert re.search(rf"inference-1 +{before['inference-1']} .*/metrics\) +pid {victim}\n", up.log)  # the banner
    workers = descendants(victim)  # mock-heavy runs in model worker processes
    assert workers, "the shipped models include a process-executed one: the replica should have workers"
    up.snapshot()

    load = Load(address)
    try:
        wait_for(lambda: load.served("inference-1", 0) >= 5, 30, what="traffic on both replicas")
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        up.wait_line("inference-1 exited unexpectedly (killed by SIGKILL); restarting it in", 30)
        gone = lambda: not [pid for pid in workers if alive(pid)]  # noqa: E731
        wait_for(gone, 10, what="the killed replica's model worker processes to end with it")

        back = up.wait_line("inference-1 is back: SERVING on", 90)
        back_at = time.monotonic()
        after = up.announced()
        assert after["inference-1"] == before["inference-1"] and after["inference-1"] in back  # the same address
        assert after["pids"]["inference-1"] != victim
        assert health_status(after["inference-1"]) == "SERVING"
        # The gateway's fixed upstream list finds it again: traffic comes back to it.
        wait_for(lambda: load.served("inference-1", back_at) >= 5, 30, what="traffic on the restarted replica")
    finally:
        calls = load.stop()
    assert up.running

    after_notice = [c for c in calls if c.started > killed + NOTICED]
    assert len(after_notice) > 20
    assert not [c for c in after_notice if c.status != 200], [c for c in after_notice if c.status != 200][:5]
    during = [c for c in after_notice if c.ended < back_at]
    assert sum(c.replica == "inference-2" for c in during) >= 5  # the other one served meanwhile
    # Calls in flight at the kill may fail, but only with a clear error from the gateway.
    early = [c for c in calls if c.status != 200]
    assert all(c.status in (503, 504) and '"error"' in c.body for c in early), early[:5]


def test_up_killed_leaves_no_process_behind(start_up):
    up = start_up("--replicas", "1", *ANY_PORTS)
    up.wait_up()
    pids = up.announced()["pids"]
    everything = up.snapshot()
    assert set(pids.values()) <= everything and set(pids) == {"gateway", "inference-1", "nats"}
    assert len(everything) > len(pids)  # the replica's model worker processes too

    os.kill(up.pid, signal.SIGKILL)
    left = lambda: [pid for pid in everything if alive(pid)]  # noqa: E731
    wait_for(lambda: not left(), 10, what="every process up started to end with it")


def test_a_second_sigterm_while_stopping_kills_the_rest_at_once(start_up):
    up = start_up("--replicas", "2", *ANY_PORTS)
    up.wait_up()
    everything = up.snapshot()

    up.proc.send_signal(signal.SIGTERM)
    up.wait_line("stopping: the gateway first", 30)
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(30) == 0
    up.terminate()  # collects the rest of its log
    assert "a second signal: killing what is left at once" in up.log
    assert up.log.rstrip().endswith("all stopped")
    assert not [pid for pid in everything if alive(pid)]


def test_children_gone_while_stopping_do_not_hang_up(start_up):
    up = start_up("--replicas", "1", *ANY_PORTS)
    up.wait_up()
    pids = up.announced()["pids"]
    everything = up.snapshot()

    up.proc.send_signal(signal.SIGTERM)
    up.wait_line("stopping: the gateway first", 30)
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    assert up.proc.wait(30) == 0
    up.terminate()
    assert up.log.rstrip().endswith("all stopped")
    wait_for(lambda: not [pid for pid in everything if alive(pid)], 10, what="nothing left")


FLAKY = '''
from pathlib import Path

from inferencehub.model import Model


class Flaky(Model):
    """Loads until the file named by its break_file parameter exists: a replica that cannot come back."""

    def load(self) -> None:
        if Path(self.config.parameters["break_file"]).exists():
            raise RuntimeError("broken on purpose: the break file exists")

    def predict(self, inputs):
        return {"output": inputs["input"]}
'''


def test_a_crash_looping_replica_ends_up_with_the_reason(start_up, tmp_path):
    model = tmp_path / "models" / "flaky"
    model.mkdir(parents=True)
    (model / "flaky.py").write_text(FLAKY)
    config = {
        "name": "flaky",
        "runtime": "python",
        "execution": "thread",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1]}],
        "parameters": {"class": "flaky:Flaky", "break_file": str(tmp_path / "broken")},
    }
    (model / "config.json").write_text(json.dumps(config))
    up = start_up("--replicas", "1", *ANY_PORTS, "--models", str(model.parent), "--restart-limit", "2")
    up.wait_up()
    everything = up.snapshot()

    (tmp_path / "broken").touch()
    os.kill(up.announced()["pids"]["inference-1"], signal.SIGKILL)
    assert up.proc.wait(90) == 2
    up.terminate()
    log = up.log
    assert "inference-1 exited unexpectedly (killed by SIGKILL); restarting it in 0.5s" in log
    assert "inference-1 did not come back: inference-1 exited while loading its models (code 2); restarting" in log
    assert "broken on purpose" in log  # the replica's own words, prefixed with its name
    error = log.rsplit("inferencehub up: error: ", 1)[1]
    assert "3 exit(s) within 60s, more than --restart-limit 2; inference-1 is crash-looping" in error
    assert "all stopped" in log and "Traceback" not in log
    wait_for(lambda: not [pid for pid in everything if alive(pid)], 10, what="nothing left")


def test_nats_is_restarted_on_its_port_with_its_store(start_up):
    up = start_up("--replicas", "1", *ANY_PORTS)
    address = up.wait_up()
    before = up.announced()
    url = f"http://{address}"
    first = subprocess.run(
        [*CLI, "infer", "iris", "--async", "--data", "[[6.3, 3.3, 6.0, 2.5]]", "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0, first.stderr
    job = re.search(r"job ([0-9a-f]{32}) submitted", first.stderr).group(1)

    os.kill(before["pids"]["nats"], signal.SIGKILL)
    up.wait_line("nats exited unexpectedly (killed by SIGKILL); restarting it in", 30)
    up.wait_line(f"nats is back: listening on {before['nats']}", 60)
    assert up.announced()["nats"] == before["nats"]

    # The gateway reconnects by itself (its client retries every 0.5 s); until it has, the queue answers a clear
    # 503 and nothing else. Then the job stored before the restart is still there (same store folder).
    def get_job():
        shown = subprocess.run([*CLI, "jobs", "get", job, "--url", url], capture_output=True, text=True, timeout=60)
        if shown.returncode != 0:
            assert "503: the job queue" in shown.stderr, shown.stderr
            return None
        return shown

    shown = wait_for(get_job, 20, interval=0.5, what="the gateway to reconnect to the restarted NATS")
    assert json.loads(shown.stdout)["status"] == "succeeded", shown.stdout
    again = subprocess.run(
        [*CLI, "infer", "iris", "--async", "--data", "[[5.1, 3.5, 1.4, 0.2]]", "--url", url, "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert again.returncode == 0 and "label int64 [1]" in again.stdout, again.stderr
    assert up.running
