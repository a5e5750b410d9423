"""Async jobs: a burst of `mock-heavy` calls against saturated replicas, sent as jobs and sent synchronously.

`mock-heavy` burns a CPU core for 500 ms a call; the replica runs one call per worker process (one per core), so
its capacity is a few calls a second, measured first (closed loop through the gateway, 2 calls per slot in flight).
The same burst of 1,000 calls, offered open loop at 200 a second (about 50x capacity), then goes two ways through
one gateway: synchronously with a 10 s deadline (`X-InferenceHub-Deadline-Ms: 10000`, 10 s client timeout), and
as jobs (`Prefer: respond-async`) on a local single-node NATS JetStream, whose submits answer at once and whose
results are collected when the queue is empty. Submit latency is from sending a request to its answer; job
throughput is the jobs finished per second from the first job's start to the last one's end (the records' times).
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
from pathlib import Path

from common import SHIPPED, bench, figure, gateway, replica, repository, table, write

from inferencehub.processes import NatsChild

NAME = "async_jobs"
TITLE = "Async jobs: a 1,000-call burst of a 500 ms CPU-bound model, as jobs and synchronously"
DEADLINE_S = 10.0


def nats_server(store: str) -> tuple[NatsChild, str]:
    process = NatsChild("nats", store)
    url = process.wait_listening(60)["nats"]
    process.wait_log("Server is ready")  # JetStream up
    return process, url


def body() -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
    ).encode()


async def burst(url: str, model: str, count: int, rate: float, headers: dict[str, str], timeout: float) -> list:
    """``count`` POSTs, open loop at ``rate`` a second: (status, latency s, answer) each."""
    import aiohttp

    payload = body()
    results: list = [None] * count
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            sent = loop.time()
            try:
                async with session.post(f"{url}/v2/models/{model}/infer", data=payload, headers=headers) as response:
                    answer = await response.read()
                    results[i] = (response.status, loop.time() - sent, answer)
            except (TimeoutError, aiohttp.ClientError):
                results[i] = ("timeout", loop.time() - sent, b"")

        await asyncio.gather(*(one(i) for i in range(count)))
    return results


async def collect(url: str, ids: list[str], model: str, limit: float) -> list[dict]:
    """Wait until the model's queue is empty (the gateway's metric), then read every job once."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            await asyncio.sleep(2.0)
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
            match = re.search(rf'^inferencehub_jobs_queue_depth{{model="{model}"}} (\S+)$', text, re.M)
            if match and float(match.group(1)) == 0:
                break
        docs = []
        for job_id in ids:
            async with session.get(f"{url}/v2/jobs/{job_id}") as response:
                docs.append(json.loads(await response.read()))
        return docs


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def stamp(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run(out: Path, quick: bool) -> str:
    count, rate = (20, 40.0) if quick else (1000, 200.0)
    model = "mock-heavy"
    with tempfile.TemporaryDirectory() as tmp:
        config = json.loads((SHIPPED / model / "config.json").read_text())
        if quick:  # the same model, 50 ms a call, so the check takes seconds
            config["parameters"]["latency"] = {"distribution": "normal", "mean_ms": 50, "stddev_ms": 2}
        config.pop("name")
        repo = repository(Path(tmp) / "models", **{model: config})
        nats, nats_url = nats_server(str(Path(tmp) / "nats"))
        server, target = replica(repo, "--nats", nats_url)
        front, url = gateway(target, "--nats", nats_url, "--deadline-seconds", str(DEADLINE_S))
        try:
            front.wait_log("job queue ready")
            server.wait_log("jobs: pulling")
            capacity = bench(model, url=url, concurrency=4, duration=0.5 if quick else 20.0)["throughput_rps"]
            deadline = {"X-InferenceHub-Deadline-Ms": str(int(DEADLINE_S * 1000))}
            sync = asyncio.run(burst(url, model, count, rate, deadline, DEADLINE_S))
            submits = asyncio.run(burst(url, model, count, rate, {"Prefer": "respond-async"}, 30.0))
            ids = [json.loads(answer)["id"] for status, _, answer in submits if status == 202]
            docs = asyncio.run(collect(url, ids, model, limit=60 + 3 * count / max(capacity, 0.1)))
        finally:
            front.stop()
            server.stop()
            nats.stop()

    sync_ok = [s for s in sync if s[0] == 200]
    sync_refused = sum(1 for s in sync if s[0] == 429)
    sync_timeout = sum(1 for s in sync if s[0] in ("timeout", 504))
    sync_other = len(sync) - len(sync_ok) - sync_refused - sync_timeout
    submit_latency = [s[1] * 1000 for s in submits if s[0] == 202]
    succeeded = [d for d in docs if d.get("status") == "succeeded"]
    starts = [stamp(d["started_at"]) for d in succeeded]
    ends = sorted(stamp(d["finished_at"]) for d in succeeded)
    span = (max(ends) - min(starts)) if succeeded else float("nan")
    job_rate = len(succeeded) / span if succeeded else 0.0
    rows = [
        [
            "synchronous, 10 s deadline",
            count,
            len(sync_ok),
            sync_refused,
            sync_timeout + sync_other,
            percentile([s[1] * 1000 for s in sync], 50),
            percentile([s[1] * 1000 for s in sync], 99),
            "-",
            "-",
        ],
        [
            "jobs (Prefer: respond-async)",
            count,
            len(succeeded),
            count - len(submit_latency),
            len(ids) - len(succeeded),
            percentile(submit_latency, 50),
            percentile(submit_latency, 99),
            span,
            job_rate,
        ],
    ]
    ratio = job_rate / capacity if capacity else float("nan")
    verdict = (
        f"{count} calls at {rate:.0f}/s: synchronously {len(sync_ok)} succeed, {sync_refused} are refused (429) and "
        f"{sync_timeout + sync_other} fail or time out; as jobs every submit answers (p99 "
        f"{percentile(submit_latency, 99):.1f} ms) and {len(succeeded)}/{count} finish, at {job_rate:.2f}/s = "
        f"{100 * ratio:.0f}% of the synchronous capacity ({capacity:.2f}/s)."
    )
    body_text = f"Measured synchronous capacity: {capacity:.2f} calls/s.\n\n" + table(
        [
            "path",
            "calls",
            "succeeded",
            "refused at once",
            "failed / timed out",
            "p50 ms (answer)",
            "p99 ms (answer)",
            "jobs' span s",
            "jobs/s",
        ],
        rows,
    )
    write(
        out, NAME, TITLE, __doc__.split("\n\n", 1)[1].strip(), f"{body_text}\n\n{verdict}\n\n![plot]({NAME}.png)", quick
    )

    plt = figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(
        [[s[1] * 1000 for s in sync], submit_latency],
        bins=30,
        label=["synchronous (answer or timeout)", "job submit (202)"],
        log=True,
    )
    left.set(xlabel="ms from request to answer", ylabel="calls", title="answers")
    left.legend()
    if ends:
        first = min(starts)
        right.plot([e - first for e in ends], range(1, len(ends) + 1), label="jobs finished")
        right.plot([0, span], [0, capacity * span], "--", label=f"synchronous capacity {capacity:.2f}/s")
    right.plot([0, DEADLINE_S], [len(sync_ok), len(sync_ok)], ":", label=f"synchronous successes ({len(sync_ok)})")
    right.set(xlabel="s since the first job started", ylabel="calls finished", title="completions")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict
