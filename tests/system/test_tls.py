"""Mutual TLS between the gateway and the replicas, with real certificates made here (tests/system/pki.py): the replica
refuses plaintext and foreign clients, serves only the gateway's identity (--tls-client-names) when the CA signs
for others too, serves probes on its plaintext health-only port, picks up new certificates without a restart; the
gateway checks the replicas' names, serves every route over TLS, and keeps its load balancing and failure
guarantees (the SIGKILL and SIGTERM drills of test_load_balancing.py, over TLS)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import CA

from conftest import FAST_BODY as BODY
from conftest import HEADLESS_NAME as NAME
from conftest import (
    SHIPPED,
    TEST_MODELS,
    Gateway,
    Replica,
    dns_target,
    drill,
    health_status,
    model_repository,
    replicas_behind_dns,
    served_by,
    wait_for,
)

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
IRIS = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}
REPLICA = [sys.executable, "-m", "inferencehub.inference", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
HOSTS = tuple(f"127.0.0.{i}" for i in range(1, 6))
# The gateway's identity (a DNS SAN of its client certificate), the one the replicas here serve.
GATEWAY_NAME = "inferencehub-gateway.demo.svc.cluster.local"


class Pki:
    def __init__(self, folder) -> None:
        self.folder = folder
        self.ca, self.other = CA(), CA("another CA")
        self.ca_file = self.ca.write(folder / "ca.crt")
        self.other_file = self.other.write(folder / "other-ca.crt")
        self.replica = self.ca.write_pair(folder, "replica", dns=(NAME.rstrip("."), "localhost"), ips=HOSTS)
        self.gateway = self.ca.write_pair(folder, "gateway", dns=(GATEWAY_NAME,))
        self.rogue = self.other.write_pair(folder, "rogue")
        # Same CA, another workload: what a cluster-wide issuer signs for everyone.
        self.neighbour = self.ca.write_pair(folder, "neighbour", dns=("batch-job.other.svc.cluster.local",))

    def replica_args(self, pair=None, ca=None) -> tuple[str, ...]:
        pair = pair or self.replica
        return (
            "--tls-cert",
            str(pair.cert),
            "--tls-key",
            str(pair.key),
            "--tls-client-ca",
            str(ca or self.ca_file),
            "--tls-client-names",
            GATEWAY_NAME,
            "--health-port",
            "0",
        )

    def gateway_args(self, pair=None, ca=None) -> tuple[str, ...]:
        pair = pair or self.gateway
        return (
            "--upstream-tls-ca",
            str(ca or self.ca_file),
            "--upstream-tls-cert",
            str(pair.cert),
            "--upstream-tls-key",
            str(pair.key),
        )

    def credentials(self, pair=None, ca=None, client: bool = True) -> grpc.ChannelCredentials:
        pair = pair or self.gateway
        return grpc.ssl_channel_credentials(
            (ca or self.ca_file).read_bytes(),
            pair.key.read_bytes() if client else None,
            pair.cert.read_bytes() if client else None,
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


class TlsReplica(Replica):
    """A replica with mutual TLS on its gRPC port; readiness is read on its plaintext health-only port."""

    def __init__(self, *args: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(*args, host=host, port=port)
        self.health_target = self.addresses["health"]

    def _status(self) -> str | None:
        self.check_running()
        try:
            return health_status(self.health_target)
        except grpc.RpcError:
            return None


def secure_health(target: str, credentials: grpc.ChannelCredentials, service: str = "") -> str:
    with grpc.secure_channel(target, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def refused(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return None


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def tls_replica(pki, tmp_path_factory):
    repo = model_repository(tmp_path_factory.mktemp("models"), *sorted(SHIPPED.iterdir()))
    server = TlsReplica("--models", str(repo), "--replica-name", "tls-replica", *pki.replica_args())
    try:
        yield server.wait_serving()
    finally:
        server.stop()


def test_a_tls_replica_refuses_plaintext_and_clients_without_a_certificate_from_its_ca(pki, tls_replica):
    target = tls_replica.target
    assert secure_health(target, pki.credentials()) == "SERVING"
    assert refused(lambda: health_status(target)) == grpc.StatusCode.UNAVAILABLE  # plaintext
    for name, credentials in [
        ("no client certificate", pki.credentials(client=False)),
        ("a certificate from another CA", pki.credentials(pki.rogue)),
    ]:
        assert refused(lambda c=credentials: secure_health(target, c)) == grpc.StatusCode.UNAVAILABLE, name
    # The gateway side checks the replica too: a replica whose CA it does not trust is refused.
    assert refused(lambda: secure_health(target, pki.credentials(ca=pki.other_file))) == grpc.StatusCode.UNAVAILABLE


def secure_call(target: str, credentials: grpc.ChannelCredentials, method: str, streaming: bool = False):
    """A call with empty request bytes: health Check (unary) or Watch (a response stream)."""
    with grpc.secure_channel(target, credentials) as channel:
        if streaming:
            return next(iter(channel.unary_stream(method)(b"", timeout=5)))
        return channel.unary_unary(method)(b"", timeout=5)


def denial(call) -> tuple[grpc.StatusCode, str] | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return None


def test_a_replica_serves_only_the_gateways_identity(pki, tls_replica):
    """A certificate the same CA signed for another workload completes the handshake, and is refused every
    method with PERMISSION_DENIED and a message saying why; the gateway's identity is served."""
    target = tls_replica.target
    assert secure_health(target, pki.credentials(pki.gateway)) == "SERVING"
    for method, streaming in [
        ("/grpc.health.v1.Health/Check", False),
        ("/grpc.health.v1.Health/Watch", True),
        ("/inference.GRPCInferenceService/ServerLive", False),
    ]:
        code, details = denial(lambda m=method, s=streaming: secure_call(target, pki.credentials(pki.neighbour), m, s))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
        assert "--tls-client-names" in details and "batch-job.other.svc.cluster.local" in details, details
    # Reflection and inference through grpcurl, as a person would try them with that certificate.
    neighbour = ("-cacert", str(pki.ca_file), "-cert", str(pki.neighbour.cert), "-key", str(pki.neighbour.key))
    for flags, args in (([], ["list"]), (["-d", "{}"], ["inference.GRPCInferenceService/ServerLive"])):
        done = grpcurl(*neighbour, *flags, f"localhost:{tls_replica.port}", *args)
        assert done.returncode != 0 and "PermissionDenied" in done.stderr, done.stderr
    gateway = ("-cacert", str(pki.ca_file), "-cert", str(pki.gateway.cert), "-key", str(pki.gateway.key))
    assert "inference.GRPCInferenceService" in grpcurl(*gateway, f"localhost:{tls_replica.port}", "list").stdout
    # Probes are unaffected: the plaintext health-only port checks no identity.
    assert health_status(tls_replica.health_target, "inference.GRPCInferenceService") == "SERVING"
    wait_for(
        lambda: "refused a client certificate naming batch-job.other.svc.cluster.local" in tls_replica.log,
        timeout=10,
        what="the replica to log the refusal",
    )
    assert tls_replica.log.count("refused a client certificate naming batch-job") == 1  # once, not per call


def test_client_names_match_uris_and_the_common_name_only_without_sans(pki, tmp_path):
    spiffe = "spiffe://cluster.local/ns/demo/sa/inferencehub-gateway"
    repo = model_repository(tmp_path / "models", TEST_MODELS / "fast")
    args = list(pki.replica_args())
    args[args.index("--tls-client-names") + 1] = f" {spiffe} , legacy-gateway "
    replica = TlsReplica("--models", str(repo), *args).wait_serving()
    try:
        by_uri = pki.ca.write_pair(tmp_path, "by-uri", uris=(spiffe,))
        by_cn = pki.ca.write_pair(tmp_path, "legacy-gateway")  # no SAN: its CN is its identity
        cn_and_other_san = pki.ca.write_pair(tmp_path, "legacy-gateway-2", dns=("batch-job.test",))
        assert secure_health(replica.target, pki.credentials(by_uri)) == "SERVING"
        assert secure_health(replica.target, pki.credentials(by_cn)) == "SERVING"
        for pair in (pki.gateway, cn_and_other_san):  # SANs, when there are any, are the identity
            code, _ = denial(lambda p=pair: secure_health(replica.target, pki.credentials(p)))
            assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        replica.stop()


def test_the_health_only_port_is_plaintext_and_carries_nothing_else(tls_replica):
    for service in ("", "inference.GRPCInferenceService", "inferencehub.liveness", "iris"):
        assert health_status(tls_replica.health_target, service) == "SERVING"
    with grpc.insecure_channel(tls_replica.health_target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        assert refused(lambda: call(b"", timeout=3)) == grpc.StatusCode.UNIMPLEMENTED
    done = grpcurl("-plaintext", tls_replica.health_target, "list")
    assert done.returncode != 0  # no reflection there either


def test_grpcurl_with_the_client_certificate_as_the_readme_shows(pki, tls_replica):
    port = tls_replica.port
    cert = ("-cacert", str(pki.ca_file), "-cert", str(pki.gateway.cert), "-key", str(pki.gateway.key))
    assert "inference.GRPCInferenceService" in grpcurl(*cert, f"localhost:{port}", "list").stdout
    request = {
        "model_name": "iris",
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [1, 4],
                "contents": {"fp32_contents": [6.3, 3.3, 6.0, 2.5]},
            }
        ],
    }
    done = grpcurl(*cert, "-d", json.dumps(request), f"localhost:{port}", "inference.GRPCInferenceService/ModelInfer")
    assert done.returncode == 0, done.stderr
    outputs = {o["name"]: o for o in json.loads(done.stdout)["outputs"]}
    assert outputs["label"]["contents"]["int64_contents"] == ["2"]
    assert grpcurl("-plaintext", f"localhost:{port}", "list").returncode != 0
    without = grpcurl("-cacert", str(pki.ca_file), f"localhost:{port}", "list")
    assert without.returncode != 0


def test_the_gateway_over_tls_serves_every_route(pki, tls_replica):
    gateway = Gateway(f"localhost:{tls_replica.port}", *pki.gateway_args())
    try:
        for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/openapi.json"):
            assert gateway.request("GET", path).status == 200, path
        for prefix in ("/v2/models/iris", "/v2/models/iris/versions/1"):
            for suffix in ("", "/ready", "/config"):
                assert gateway.request("GET", prefix + suffix).status == 200, prefix + suffix
            response = gateway.request("POST", prefix + "/infer", IRIS)
            assert response.status == 200, response
            assert {o["name"]: o["data"] for o in response.json()["outputs"]}["label"] == [2]
            assert response.headers["x-inferencehub-replica"] == "tls-replica"
        assert gateway.request("GET", "/v2/models/nope").status == 404
        metrics = gateway.request("GET", "/metrics").body.decode()
        assert 'method="ModelInfer",replica="tls-replica"' in metrics
    finally:
        gateway.stop()


@pytest.mark.parametrize(
    "who", ["no client certificate", "a certificate from another CA", "another identity from the CA", "plaintext"]
)
def test_a_gateway_without_the_right_certificate_gets_nothing(pki, tls_replica, who):
    args = {
        "no client certificate": ("--upstream-tls-ca", str(pki.ca_file)),
        "a certificate from another CA": pki.gateway_args(pki.rogue),
        "another identity from the CA": pki.gateway_args(pki.neighbour),
        "plaintext": (),
    }[who]
    gateway = Gateway(f"localhost:{tls_replica.port}", "--deadline-seconds", "3", *args)
    try:
        response = gateway.request("POST", "/v2/models/iris/infer", IRIS)
        assert response.status in (503, 504), response
        assert "Traceback" not in gateway.log
    finally:
        gateway.stop()


def test_the_gateway_checks_the_replicas_names(pki, tmp_path):
    wrong = pki.ca.write_pair(tmp_path, "elsewhere", dns=("elsewhere.test",))
    repo = model_repository(tmp_path / "models", TEST_MODELS / "fast")
    replica = TlsReplica("--models", str(repo), *pki.replica_args(wrong)).wait_serving()
    gateways = []
    try:
        strict = Gateway(f"localhost:{replica.port}", "--deadline-seconds", "3", *pki.gateway_args())
        gateways.append(strict)
        assert strict.request("POST", "/v2/models/fast/infer", BODY).status in (503, 504)
        named = Gateway(
            f"localhost:{replica.port}", *pki.gateway_args(), "--upstream-tls-server-name", "elsewhere.test"
        )
        gateways.append(named)
        assert named.request("POST", "/v2/models/fast/infer", BODY).status == 200
    finally:
        for gateway in gateways:
            gateway.stop()
        replica.stop()


def test_certificates_are_reread_when_they_change(pki, tmp_path):
    """Rotate the replica to a new CA and the gateway to a new client certificate, in place: no restart."""
    folder = tmp_path / "live"
    folder.mkdir()
    live_cert, live_key, live_ca = folder / "tls.crt", folder / "tls.key", folder / "ca.crt"
    live_cert.write_bytes(pki.replica.cert.read_bytes())
    live_key.write_bytes(pki.replica.key.read_bytes())
    live_ca.write_bytes(pki.ca_file.read_bytes())
    gw_cert, gw_key, gw_ca = folder / "gw.crt", folder / "gw.key", folder / "gw-ca.crt"
    gw_cert.write_bytes(pki.gateway.cert.read_bytes())
    gw_key.write_bytes(pki.gateway.key.read_bytes())
    gw_ca.write_bytes(pki.ca_file.read_bytes())

    repo = model_repository(tmp_path / "models", TEST_MODELS / "fast")
    args = ("--tls-cert", str(live_cert), "--tls-key", str(live_key), "--tls-client-ca", str(live_ca))
    replica = TlsReplica(
        "--models", str(repo), *args, "--health-port", "0", "--max-connection-age-seconds", "1"
    ).wait_serving()
    gateway = Gateway(
        f"localhost:{replica.port}",
        "--upstream-tls-ca",
        str(gw_ca),
        "--upstream-tls-cert",
        str(gw_cert),
        "--upstream-tls-key",
        str(gw_key),
    )
    try:
        assert gateway.request("POST", "/v2/models/fast/infer", BODY).status == 200

        def put(target, source) -> None:
            temporary = target.with_suffix(".tmp")
            temporary.write_bytes(source.read_bytes())
            os.replace(temporary, target)

        # The gateway given a key that does not match its certificate keeps the set in use, and keeps serving.
        put(gw_key, pki.rogue.key)
        wait_for(
            lambda: (
                gateway.request("POST", "/v2/models/fast/infer", BODY).status == 200
                and "keeping the upstream TLS certificate in use" in gateway.log
            ),
            timeout=15,
            interval=0.3,
            what="the gateway to refuse the broken set",
        )
        put(gw_key, pki.gateway.key)
        new_ca = CA("the next CA")
        new_ca_file = new_ca.write(tmp_path / "next-ca.crt")
        new_replica = new_ca.write_pair(tmp_path / "next", "replica", dns=("localhost",), ips=HOSTS)
        new_gateway = new_ca.write_pair(tmp_path / "next", "gateway")

        # A half-done rotation (a key that does not match the certificate) is refused; the old set stays.
        put(live_key, new_replica.key)
        wait_for(
            lambda: _handshake(replica.target, pki) is None and "keeping the TLS certificate in use" in replica.log,
            timeout=15,
            what="the replica to keep its certificate",
        )
        put(live_cert, new_replica.cert)
        put(live_ca, new_ca_file)
        new_client = grpc.ssl_channel_credentials(
            new_ca_file.read_bytes(), new_gateway.key.read_bytes(), new_gateway.cert.read_bytes()
        )
        wait_for(
            lambda: _secure_ok(replica.target, new_client), timeout=15, what="the replica to use the new certificate"
        )
        assert refused(lambda: secure_health(replica.target, pki.credentials())) == grpc.StatusCode.UNAVAILABLE

        # The gateway's old client certificate is now refused; its new files are picked up without a restart.
        for target, source in ((gw_cert, new_gateway.cert), (gw_key, new_gateway.key), (gw_ca, new_ca_file)):
            put(target, source)
        wait_for(
            lambda: gateway.request("POST", "/v2/models/fast/infer", BODY).status == 200,
            timeout=20,
            interval=0.3,
            what="the gateway to call over its new certificate",
        )
        assert "upstream TLS files changed" in gateway.log
        statuses = [gateway.request("POST", "/v2/models/fast/infer", BODY).status for _ in range(20)]
        assert set(statuses) == {200}
    finally:
        gateway.stop()
        replica.stop()


def _handshake(target: str, pki: Pki) -> str | None:
    """None when the old credentials still work."""
    try:
        secure_health(target, pki.credentials())
    except grpc.RpcError as exc:
        return exc.code().name
    return None


def _secure_ok(target: str, credentials) -> bool:
    try:
        return secure_health(target, credentials) == "SERVING"
    except grpc.RpcError:
        return False


@pytest.mark.parametrize(
    ("which", "words"),
    [
        ("only a certificate", "needs --tls-cert, --tls-key and --tls-client-ca together"),
        ("a key that does not match", "do not load together"),
        ("a CA that is no PEM", "not a PEM file"),
        ("an encrypted key", "the key is encrypted; give an unencrypted PEM key"),
        ("client names without TLS", "--tls-client-names needs mutual TLS"),
    ],
)
def test_bad_tls_settings_stop_start_up_with_a_clear_error(pki, tmp_path, which, words):
    other = pki.ca.write_pair(tmp_path, "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    args = {
        "only a certificate": ["--tls-cert", str(pki.replica.cert)],
        "a key that does not match": [*pki.replica_args()[:6]],
        "a CA that is no PEM": [*pki.replica_args()[:5], str(junk)],
        "an encrypted key": [*pki.replica_args()[:6]],
        "client names without TLS": ["--tls-client-names", GATEWAY_NAME],
    }[which]
    if which == "a key that does not match":
        args[3] = str(other.key)
    if which == "an encrypted key":
        args[3] = str(encrypt(pki.replica.key, tmp_path / "encrypted.key"))
    done = subprocess.run(
        [*REPLICA, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "inferencehub inference: error:" in done.stderr and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_load_balancing_and_failure_drills_over_tls(pki, tmp_path, dns):
    """test_load_balancing.py's spread and SIGKILL/SIGTERM drills, every hop over mutual TLS."""
    records, dns_port = dns
    args = ("--max-connection-age-seconds", "2", "--drain-seconds", "1.5", *pki.replica_args())
    with replicas_behind_dns(tmp_path, records, *args, kind=TlsReplica) as replicas:
        # The name the gateway checks is the one it resolves, as with a headless Service.
        gateway = Gateway(dns_target(dns_port, replicas["r1"].port), *pki.gateway_args())
        try:
            wait_for(lambda: len(served_by(gateway, 6)) == 3, timeout=15, what="all three replicas to serve")
            spread = served_by(gateway, 90)
            assert set(spread) == {"r1", "r2", "r3"}
            assert min(spread.values()) >= 20, spread

            for name, sig in (("r1", signal.SIGKILL), ("r2", signal.SIGTERM)):
                drill(gateway, replicas[name].proc, sig)
            assert replicas["r2"].proc.wait(10) == 0
            assert served_by(gateway, 10) == {"r3": 10}
        finally:
            gateway.stop()


def test_the_readme_grpcurl_commands_work_as_written(pki, tls_replica, tmp_path):
    page = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    section = page.split("grpcurl against a TLS replica", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]
    assert len(commands) == 3
    for name, source in (("ca.crt", pki.ca_file), ("client.crt", pki.gateway.cert), ("client.key", pki.gateway.key)):
        (tmp_path / name).write_bytes(source.read_bytes())
    outputs = []
    for command in commands:
        command = command.replace("localhost:8081", f"localhost:{tls_replica.port}").replace(
            "grpcurl ", GRPCURL + " ", 1
        )
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        outputs.append(done.stdout)
    assert "inference.GRPCInferenceService" in outputs[0]
    assert json.loads(outputs[1]) == {"status": "SERVING"}
    assert json.loads(outputs[2])["outputs"]


def encrypt(key: Path, out: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    out.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    return out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--upstream-tls-cert", "x.crt"], "need --upstream-tls-ca"),
        (["--upstream-tls-ca", "CA", "--upstream-tls-cert", "CERT"], "go together"),
        (["--upstream-tls-ca", "missing.crt"], "--upstream-tls-ca missing.crt: No such file or directory"),
    ],
)
def test_bad_gateway_tls_settings_stop_start_up_with_a_clear_error(pki, args, words):
    args = [{"CA": str(pki.ca_file), "CERT": str(pki.gateway.cert)}.get(a, a) for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "inferencehub.gateway", "--host", "127.0.0.1", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "inferencehub gateway: error:" in done.stderr and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
