"""Streaming: time to first token and per-token overhead, through the gateway against direct gRPC and Triton.

`mock-llm` with a fixed timing (first token after {first:.0f} ms, then one every {each:.0f} ms, {count} tokens a
stream, the same prompt every time) behind four paths: InferenceHub's gateway `/v2/models/mock-llm/generate_stream`
(server-sent events, one gRPC `ModelStreamInfer` call to the replica per stream), the replica's `ModelStreamInfer`
directly, and Triton 2.51 serving a decoupled Python-backend mock of the same timing and text
(`triton_llm.py`) on its own `generate_stream` and its `ModelStreamInfer`. Each path runs at concurrency {levels}:
that many clients, each opening a stream, reading it to its final token and opening the next, for
{duration:.0f} s; all paths in turn, {rounds} round(s) alternating, so a noisy neighbour hits them alike. The
clients (aiohttp for SSE; grpc.aio, one call per stream with one request, for gRPC) run in the benchmark's process
on the same cores as the servers and stamp each token when it is read. Time to first token is from sending the
request to reading the first token; per-token overhead is the mean gap between a stream's tokens minus the
model's {each:.0f} ms; both pool every stream of every round.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import peers
from common import SHIPPED, figure, gateway, quiet_stderr, replica, table, write

from inferencehub import eventloop
from inferencehub.inference.runtimes import mock_llm

NAME = "streaming"
TITLE = "Streaming: time to first token and per-token overhead"
FIRST_MS, TOKEN_MS, TOKENS = 20.0, 5.0, 32
PROMPT = "Explain how a token stream crosses two hops"
MODEL = "mock-llm"
HERE = Path(__file__).resolve().parent

GATEWAY = "InferenceHub gateway, SSE"
DIRECT = "InferenceHub replica, direct gRPC"
TRITON_SSE = "Triton, SSE"
TRITON_GRPC = "Triton, gRPC"

TRITON_CONFIG = """name: "mock-llm"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] }},
  {{ name: "max_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true }},
  {{ name: "stop", data_type: TYPE_STRING, dims: [ -1 ], optional: true }}
]
output [ {{ name: "text_output", data_type: TYPE_STRING, dims: [ 1 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters {{ key: "first_token_ms", value: {{ string_value: "{first}" }} }}
parameters {{ key: "token_ms", value: {{ string_value: "{each}" }} }}
parameters {{ key: "vocabulary", value: {{ string_value: "{vocabulary}" }} }}
"""


def ours_repository(folder: Path) -> Path:
    """The shipped `mock-llm`, its timing made fixed."""
    config = json.loads((SHIPPED / MODEL / "config.json").read_text())
    config["parameters"]["first_token_latency"] = {"distribution": "fixed", "ms": FIRST_MS}
    config["parameters"]["token_latency"] = {"distribution": "fixed", "ms": TOKEN_MS}
    model = folder / "ours" / MODEL
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(config))
    return folder / "ours"


def triton_repository(folder: Path) -> Path:
    """``triton_llm.py`` as a decoupled Python-backend model with the same timing and mock-llm's vocabulary."""
    model = folder / "triton" / MODEL
    (model / "1").mkdir(parents=True)
    shutil.copy2(HERE / "triton_llm.py", model / "1" / "model.py")
    config = TRITON_CONFIG.format(first=FIRST_MS, each=TOKEN_MS, vocabulary=" ".join(mock_llm.VOCABULARY))
    (model / "config.pbtxt").write_text(config)
    return folder / "triton"


class Recorder:
    """What one load run saw: per stream, the time to its first token and the gaps between its tokens."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.per_stream_gap: list[float] = []
        self.tokens = 0
        self.errors: dict[str, int] = {}
        self.texts: set[str] = set()

    def add(self, sent: float, stamps: list[float], text: str) -> None:
        if len(stamps) != TOKENS:
            self.error(f"{len(stamps)} tokens instead of {TOKENS}")
            return
        self.ttft.append(stamps[0] - sent)
        gaps = np.diff(stamps)
        self.gaps.extend(gaps.tolist())
        self.per_stream_gap.append(float(gaps.mean()))
        self.tokens += len(stamps)
        self.texts.add(text)

    def error(self, what: str) -> None:
        self.errors[what[:600]] = self.errors.get(what[:600], 0) + 1

    def merge(self, other: Recorder) -> None:
        self.ttft += other.ttft
        self.gaps += other.gaps
        self.per_stream_gap += other.per_stream_gap
        self.tokens += other.tokens
        self.texts |= other.texts
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v

    @property
    def streams(self) -> int:
        return len(self.ttft)


async def sse_streams(url: str, concurrency: int, seconds: float, recorder: Recorder) -> None:
    """``concurrency`` clients, each posting a generate_stream request and reading its events, for ``seconds``."""
    import aiohttp

    body = json.dumps({"text_input": PROMPT, "max_tokens": TOKENS}).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        end = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < end:
                stamps: list[float] = []
                text: list[str] = []
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as answer:
                        if answer.status != 200:
                            recorder.error(f"HTTP {answer.status}: {(await answer.text())[:80]}")
                            continue
                        async for line in answer.content:
                            if not line.startswith(b"data:"):
                                continue
                            now = time.perf_counter()
                            payload = line[5:].strip()
                            if payload == b"[DONE]":
                                continue
                            event = json.loads(payload)
                            if "error" in event:
                                raise ValueError(f"error event: {event['error']}")
                            if "text_output" in event:
                                stamps.append(now)
                                text.append(event["text_output"])
                except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                    recorder.error(f"{type(exc).__name__}: {exc}")
                    continue
                recorder.add(sent, stamps, "".join(text))

        await asyncio.gather(*(client() for _ in range(concurrency)))


def _text(response) -> str:
    """The one BYTES element of ``text_output`` in a ModelInferResponse, raw (length-prefixed) or typed."""
    for i, output in enumerate(response.outputs):
        if output.name != "text_output":
            continue
        if i < len(response.raw_output_contents):
            raw = response.raw_output_contents[i]
            return raw[4 : 4 + int.from_bytes(raw[:4], "little")].decode()
        return output.contents.bytes_contents[0].decode()
    return ""


async def grpc_streams(target: str, concurrency: int, seconds: float, recorder: Recorder) -> None:
    """``concurrency`` clients on one channel, each making a ModelStreamInfer call with one request and reading
    its responses to the final one, for ``seconds``."""
    import grpc

    from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb

    async with grpc.aio.insecure_channel(target) as channel:
        call_stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        request = pb.ModelInferRequest(model_name=MODEL)
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        text_input = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        text_input.contents.bytes_contents.append(PROMPT.encode())
        max_tokens = request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
        max_tokens.contents.int_contents.append(TOKENS)
        end = time.perf_counter() + seconds

        async def client(n: int) -> None:
            count = 0
            while time.perf_counter() < end:
                count += 1
                request.id = f"{n}-{count}"
                stamps: list[float] = []
                text: list[str] = []
                sent = time.perf_counter()
                call = call_stream(timeout=60)
                try:
                    await call.write(request)
                    while True:
                        response = await call.read()
                        now = time.perf_counter()
                        if response is grpc.aio.EOF:
                            raise ValueError("the stream ended before its final response")
                        if response.error_message:
                            raise ValueError(f"error_message: {response.error_message}")
                        token = _text(response.infer_response)
                        if response.infer_response.outputs:
                            stamps.append(now)
                            text.append(token)
                        if response.infer_response.parameters["triton_final_response"].bool_param:
                            break
                    await call.done_writing()
                    while await call.read() is not grpc.aio.EOF:
                        pass
                except grpc.aio.AioRpcError as exc:
                    recorder.error(f"{exc.code().name}: {exc.details()}")
                    continue
                except ValueError as exc:
                    recorder.error(str(exc))
                    call.cancel()
                    continue
                recorder.add(sent, stamps, "".join(text))

        await asyncio.gather(*(client(n) for n in range(concurrency)))


def load(kind: str, target: str, concurrency: int, seconds: float) -> Recorder:
    recorder = Recorder()
    streams = sse_streams if kind == "sse" else grpc_streams
    with quiet_stderr():
        eventloop.run(streams(target, concurrency, seconds, recorder), "uvloop")  # the servers' loop too
    return recorder


def measure(processes: dict, kind: str, target: str, concurrency: int, seconds: float) -> tuple[Recorder, dict]:
    """One load run; what it saw and the CPU seconds each process (and this one, the clients) spent in it."""
    import resource

    def own() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    before = {name: p.cpu_seconds() for name, p in processes.items()}
    client = own()
    recorder = load(kind, target, concurrency, seconds)
    spent = {name: p.cpu_seconds() - before[name] for name, p in processes.items()}
    spent["clients"] = own() - client
    return recorder, spent


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def summarise(recorder: Recorder, cpu: dict[str, float], rounds: list[Recorder]) -> dict:
    mean_gap = float(np.mean(recorder.gaps) * 1000) if recorder.gaps else float("nan")
    return {
        "streams": recorder.streams,
        "ttft_p50": ms(recorder.ttft, 50),
        "ttft_p99": ms(recorder.ttft, 99),
        "gap_mean": mean_gap,
        "gap_p50": ms(recorder.gaps, 50),
        "gap_p99": ms(recorder.gaps, 99),
        "overhead": mean_gap - TOKEN_MS,
        "each_round": [float(np.mean(r.gaps) * 1000) - TOKEN_MS if r.gaps else float("nan") for r in rounds],
        "cpu_per_stream": {k: v * 1000 / max(recorder.streams, 1) for k, v in cpu.items()},
        "errors": sum(recorder.errors.values()),
        "error_kinds": recorder.errors,
        "texts": recorder.texts,
    }


def compare(paths: dict[str, tuple[dict, str, str]], levels: tuple[int, ...], rounds: int, seconds: float) -> dict:
    """Every path at every level, ``rounds`` times alternating; per path and level, the pooled summary."""
    for _, kind, target in paths.values():  # warm every path (connections, first calls) once
        load(kind, target, 4, min(seconds, 1.0))
    seen: dict[str, dict[int, list[tuple[Recorder, dict]]]] = {name: {c: [] for c in levels} for name in paths}
    for _ in range(rounds):
        for name, (processes, kind, target) in paths.items():
            for c in levels:
                seen[name][c].append(measure(processes, kind, target, c, seconds))
    result: dict[str, dict[int, dict]] = {}
    for name in paths:
        result[name] = {}
        for c in levels:
            pooled, cpu = Recorder(), {}
            for recorder, spent in seen[name][c]:
                pooled.merge(recorder)
                for k, v in spent.items():
                    cpu[k] = cpu.get(k, 0.0) + v
            result[name][c] = summarise(pooled, cpu, [r for r, _ in seen[name][c]])
    return result


def plot(result: dict, levels: tuple[int, ...], out: Path) -> None:
    plt = figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, by_level in result.items():
        left.plot(levels, [by_level[c]["ttft_p50"] for c in levels], marker="o", label=name)
        right.plot(levels, [by_level[c]["overhead"] for c in levels], marker="o", label=name)
    left.axhline(FIRST_MS, color="grey", linestyle=":", label=f"model: {FIRST_MS:.0f} ms")
    right.axhline(0, color="grey", linestyle=":")
    left.set(xscale="log", xlabel="concurrent streams", ylabel="ms", title="time to first token, p50")
    right.set(
        xscale="log",
        xlabel="concurrent streams",
        ylabel="ms",
        title=f"per-token overhead (mean gap - {TOKEN_MS:.0f} ms)",
    )
    for axes in (left, right):
        axes.set_xticks(levels, [str(c) for c in levels])
        axes.minorticks_off()
        axes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)


def verdict(result: dict, levels: tuple[int, ...], load: tuple, load_after: tuple) -> str:
    """Per level: the gateway's time to first token and per-token overhead, what the hop adds over direct gRPC,
    and against Triton's generate_stream (the goal: no worse than Triton's, on its own ground)."""
    ours, direct, triton = result[GATEWAY], result[DIRECT], result.get(TRITON_SSE)

    def against(key: str, c: int) -> str:
        if triton is None:
            return ""
        met = ours[c][key] <= triton[c][key]
        return f"; Triton {triton[c][key]:.2f}, goal no worse: {'met' if met else 'NOT met'}"

    parts = [
        f"c{c}: TTFT p50 {ours[c]['ttft_p50']:.1f} ms ({ours[c]['ttft_p50'] - direct[c]['ttft_p50']:+.1f} over "
        f"direct gRPC{against('ttft_p50', c)}), per-token overhead {ours[c]['overhead']:.2f} ms "
        f"({ours[c]['overhead'] - direct[c]['overhead']:+.2f} over direct{against('overhead', c)})"
        for c in levels
    ]
    errors = sum(by_level[c]["errors"] for by_level in result.values() for c in levels)
    return (
        f"Through the gateway's generate_stream, streams of {TOKENS} tokens ({FIRST_MS:.0f} ms to the first, "
        f"{TOKEN_MS:.0f} ms each after; load average {load[0]:.1f} before, {load_after[0]:.1f} after, on "
        f"{os.cpu_count()} cores): " + "; ".join(parts) + f". {errors} failed streams in all paths."
    )


def run(out: Path, quick: bool) -> str:
    levels, rounds, seconds = ((1, 4), 1, 0.5) if quick else ((1, 16, 64), 3, 5.0)
    load_before = os.getloadavg()
    started: list = []
    paths: dict[str, tuple[dict, str, str]] = {}
    missing = peers.triton_missing()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            server, target = replica(ours_repository(Path(tmp)))
            started.append(server)
            front, url = gateway(f"ipv4:{target}")
            started.append(front)
            paths[GATEWAY] = ({"gateway": front, "replica": server}, "sse", f"{url}/v2/models/{MODEL}/generate_stream")
            paths[DIRECT] = ({"replica": server}, "grpc", target)
            if not missing:
                triton, triton_url, triton_target = peers.triton_serving(triton_repository(Path(tmp)), MODEL)
                started.append(triton)
                paths[TRITON_SSE] = ({"Triton": triton}, "sse", f"{triton_url}/v2/models/{MODEL}/generate_stream")
                paths[TRITON_GRPC] = ({"Triton": triton}, "grpc", triton_target)
            result = compare(paths, levels, rounds, seconds)
        finally:
            for process in reversed(started):
                process.stop()
    load_after = os.getloadavg()
    rows = []
    for name, by_level in result.items():
        for c in levels:
            s = by_level[c]
            rows.append(
                [
                    name,
                    c,
                    s["streams"],
                    s["ttft_p50"],
                    s["ttft_p99"],
                    s["ttft_p50"] - FIRST_MS,
                    s["gap_mean"],
                    s["gap_p99"],
                    s["overhead"],
                    " / ".join(f"{v:.2f}" for v in s["each_round"]),
                    ", ".join(f"{k} {v:.1f}" for k, v in s["cpu_per_stream"].items()),
                    s["errors"],
                ]
            )
    headers = [
        "path",
        "streams at once",
        "streams",
        "TTFT p50 ms",
        "TTFT p99 ms",
        f"TTFT p50 - {FIRST_MS:.0f} ms",
        "token gap mean ms",
        "token gap p99 ms",
        "per-token overhead ms",
        "overhead each round",
        "CPU ms per stream",
        "failed",
    ]
    texts = {name: by_level[levels[0]]["texts"] for name, by_level in result.items()}
    same = len(set().union(*texts.values())) == 1
    body = table(headers, rows)
    body += "\n\n" + (
        "Every path streamed the same text for the prompt."
        if same
        else "The paths streamed DIFFERENT text: " + "; ".join(f"{n}: {sorted(t)[:2]}" for n, t in texts.items())
    )
    failures = {f"{name} c{c}": by_level[c]["error_kinds"] for name, by_level in result.items() for c in levels}
    failures = {k: v for k, v in failures.items() if v}
    if failures:
        body += "\n\nFailures: " + "; ".join(f"{k}: {v}" for k, v in failures.items())
    if missing:
        body += f"\n\nNo Triton rows in this run: {missing}."
    said = verdict(result, levels, load_before, load_after)
    intro = (
        __doc__.split("\n\n", 1)[1]
        .strip()
        .format(
            first=FIRST_MS,
            each=TOKEN_MS,
            count=TOKENS,
            levels=", ".join(map(str, levels)),
            duration=seconds,
            rounds=rounds,
        )
    )
    print(table(headers, rows), flush=True)
    write(out, NAME, TITLE, intro, f"{body}\n\n{said}\n\n![plot]({NAME}.png)", quick)
    plot(result, levels, out)
    return said
