"""TLS: what mutual TLS between the gateway and the replicas (and API keys at the gateway) cost.

The same gateway and replica, `iris` model, run side by side in one run: plaintext gRPC to the replica, mutual TLS
to it (ECDSA P-256 certificates made for the run, `--tls-*` on the replica, `--upstream-tls-*` on the gateway),
and mutual TLS plus an API key checked on every request. Each concurrency is measured for every setup in turn, so
drift on the shared machine hits them alike. Connections are long-lived (HTTP/2 to the replica, keep-alive from the
load generator), so the handshake cost is paid rarely; what remains is the record encryption on each message.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import ROOT, SHIPPED, bench, figure, gateway, replica, repository, table, write

sys.path.insert(0, str(ROOT / "tests" / "system"))
from pki import CA  # the tests' certificate maker

NAME = "tls"
TITLE = "Mutual TLS to the replicas and API keys: throughput and p50 beside plaintext"
API_KEY = "ih_benchmark_key_0123456789abcdef0123456789abcdef"


def run(out: Path, quick: bool) -> str:
    concurrencies = [1, 8] if quick else [1, 8, 32]
    duration = 0.4 if quick else 5.0
    setups = ["plaintext", "mutual TLS", "mutual TLS + API key"]
    results: dict[str, dict[int, dict]] = {s: {} for s in setups}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ca = CA()
        ca_file = ca.write(folder / "ca.crt")
        server_pair = ca.write_pair(folder, "replica", dns=("localhost",), ips=("127.0.0.1",))
        client_pair = ca.write_pair(folder, "gateway")
        keys = folder / "api-keys"
        keys.write_text(f"{API_KEY} benchmark\n")
        models = repository(folder / "models", iris=SHIPPED / "iris")
        client_tls = (
            "--upstream-tls-ca",
            str(ca_file),
            "--upstream-tls-cert",
            str(client_pair.cert),
            "--upstream-tls-key",
            str(client_pair.key),
        )
        processes = []
        try:
            plain, plain_target = replica(models, "--replica-name", "plain")
            processes.append(plain)
            secure, secure_target = replica(
                models,
                "--replica-name",
                "tls",
                "--tls-cert",
                str(server_pair.cert),
                "--tls-key",
                str(server_pair.key),
                "--tls-client-ca",
                str(ca_file),
            )
            processes.append(secure)
            urls = {}
            front, urls["plaintext"] = gateway(f"ipv4:{plain_target}")
            processes.append(front)
            front, urls["mutual TLS"] = gateway(f"ipv4:{secure_target}", *client_tls)
            processes.append(front)
            front, urls["mutual TLS + API key"] = gateway(
                f"ipv4:{secure_target}", *client_tls, "--api-keys-file", str(keys)
            )
            processes.append(front)
            for setup in setups:  # warm up every path (connections, handshakes)
                key = API_KEY if "API key" in setup else None
                summary = bench("iris", url=urls[setup], concurrency=4, duration=0.5, api_key=key)
                assert summary["ok"] > 0 and not summary["errors"], (setup, summary["error_examples"])
            for c in concurrencies:
                for setup in setups:
                    key = API_KEY if "API key" in setup else None
                    results[setup][c] = bench("iris", url=urls[setup], concurrency=c, duration=duration, api_key=key)
        finally:
            for process in reversed(processes):
                process.stop()

    rows = []
    for c in concurrencies:
        base = results["plaintext"][c]
        for setup in setups:
            s = results[setup][c]
            rows.append(
                [
                    c,
                    setup,
                    s["throughput_rps"],
                    f"{100 * s['throughput_rps'] / max(base['throughput_rps'], 1e-9):.0f}%",
                    s["latency_ms"]["p50"],
                    s["latency_ms"]["p50"] - base["latency_ms"]["p50"],
                    sum(s["errors"].values()),
                ]
            )
    top = concurrencies[-1]
    tls_share = results["mutual TLS"][top]["throughput_rps"] / max(results["plaintext"][top]["throughput_rps"], 1e-9)
    added = results["mutual TLS"][1]["latency_ms"]["p50"] - results["plaintext"][1]["latency_ms"]["p50"]
    key_share = results["mutual TLS + API key"][top]["throughput_rps"] / max(
        results["mutual TLS"][top]["throughput_rps"], 1e-9
    )
    verdict = (
        f"At concurrency {top}, mutual TLS keeps {100 * tls_share:.0f}% of plaintext throughput, and API keys on top "
        f"keep {100 * key_share:.0f}% of that; at concurrency 1, TLS adds {added:.2f} ms to p50."
    )
    body = table(["concurrency", "setup", "req/s", "vs plaintext", "p50 ms", "p50 added ms", "errors"], rows)
    write(out, NAME, TITLE, __doc__.split("\n\n", 1)[1].strip(), f"{body}\n\n{verdict}\n\n![plot]({NAME}.png)", quick)

    plt = figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for setup in setups:
        left.plot(concurrencies, [results[setup][c]["throughput_rps"] for c in concurrencies], marker="o", label=setup)
        right.plot(
            concurrencies, [results[setup][c]["latency_ms"]["p50"] for c in concurrencies], marker="o", label=setup
        )
    left.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="throughput through the gateway")
    right.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="p50 latency")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=100)
    plt.close(fig)
    return verdict
