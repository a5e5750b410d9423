"""Mutual TLS between the gateway and the inference replicas, with gRPC's own TLS (no mesh needed).

Replica (server): ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca`` together. The gRPC port then speaks only
TLS and completes a handshake only with clients whose certificate that CA signed
(``grpc.dynamic_ssl_server_credentials`` with ``require_client_authentication=True``). The three files are
re-read when they change: gRPC asks for the certificate configuration at each new handshake, and gets the new
one once the files' inode, size or mtime moved (checked at most once a second); connections already open keep
the certificate they started with until they close (``--max-connection-age-seconds`` bounds that). A new set
that does not load (a key that does not match the certificate, a half-written file) is logged and the previous
set is kept.

Who may call: a certificate the client CA signed is not enough when that CA signs for more than the gateway (a
cluster-wide issuer signs every workload's certificate). ``--tls-client-names`` lists the identities the replica
serves: a call whose client certificate carries none of them gets PERMISSION_DENIED (see ``ClientNames``). A
certificate's identities are its subject alternative names (DNS names, URIs such as SPIFFE ids, IP addresses), or
its subject's common name when it has none. Empty: any certificate the CA signed (the check TLS itself makes). The
plaintext health-only port carries only grpc.health.v1, for probes, and checks no identity.

Gateway (client): ``--upstream-tls-ca`` (the CA that signed the replicas' certificates), and
``--upstream-tls-cert`` / ``--upstream-tls-key`` (the gateway's own certificate, which the replicas ask for).
gRPC checks that the replica's certificate carries the target's host name (for ``dns:///name:port``, ``name``:
behind a headless Service, its DNS names must be SANs of the replicas' certificates); ``--upstream-tls-server-name``
names another one to expect, e.g. for ``ipv4:`` address lists. The gateway re-reads its files the same way and
moves to a new channel when they change (see ``Upstream``).
"""

from __future__ import annotations

import inspect
import logging
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from inferencehub.errors import InferenceHubError
from inferencehub.watch import Watch

log = logging.getLogger(__name__)


class TlsError(InferenceHubError):
    """TLS files that are missing, unreadable, or do not fit together (the message says which)."""


@dataclass(frozen=True)
class Pem:
    cert: bytes | None
    key: bytes | None
    ca: bytes | None


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{flag} {path}: not a PEM file")
    return data


def load(cert: Path | None, key: Path | None, ca: Path | None, flags: tuple[str, str, str]) -> Pem:
    """Read and check the files: the key matches the certificate, the CA bundle parses."""
    pem = Pem(_read(cert, flags[0]), _read(key, flags[1]), _read(ca, flags[2]))
    if cert is not None and key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

        def encrypted() -> bytes:  # never prompt on a terminal for a passphrase
            raise TlsError(f"{flags[1]} {key}: the key is encrypted; give an unencrypted PEM key")

        try:
            context.load_cert_chain(cert, key, password=encrypted)
        except ssl.SSLError as exc:
            raise TlsError(f"{flags[0]} {cert} and {flags[1]} {key} do not load together: {exc.reason}") from None
    if ca is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as exc:
            raise TlsError(f"{flags[2]} {ca}: not a CA bundle: {exc.reason}") from None
    return pem


# --- the replica's side -------------------------------------------------------------------------

SERVER_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca")


def server_enabled(settings) -> bool:
    given = [settings.tls_cert, settings.tls_key, settings.tls_client_ca]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise TlsError("mutual TLS needs --tls-cert, --tls-key and --tls-client-ca together")
    return all(v is not None for v in given)


def server_credentials(settings, interval: float = 1.0) -> grpc.ServerCredentials:
    """Credentials that require a client certificate from the client CA, re-read when the files change."""
    paths = (settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    watch = Watch(*paths, interval=interval)

    def configuration(pem: Pem):
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], root_certificates=pem.ca)

    initial = configuration(load(*paths, SERVER_FLAGS))

    def fetch():
        # Called by gRPC at each new handshake: None keeps the configuration in use.
        if not watch.changed():
            return None
        try:
            pem = load(*paths, SERVER_FLAGS)
        except TlsError as exc:
            log.warning("keeping the TLS certificate in use: %s", exc)
            return None
        log.info("TLS certificate files changed: new connections use the new ones")
        return configuration(pem)

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


def client_names(settings) -> frozenset[str]:
    """The identities ``--tls-client-names`` allows (empty: any certificate the client CA signed)."""
    names = frozenset(name.strip() for name in settings.tls_client_names.split(",") if name.strip())
    if names and not server_enabled(settings):
        raise TlsError("--tls-client-names needs mutual TLS: give --tls-cert, --tls-key and --tls-client-ca too")
    return names


def identities(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """A TLS peer's identities from gRPC's auth context: the certificate's subject alternative names (DNS, URI and
    IP entries alike), or its subject's common name when it has none, as host name checks do."""
    sans = [value.decode(errors="replace") for value in auth_context.get("x509_subject_alternative_name", ())]
    return sans or [value.decode(errors="replace") for value in auth_context.get("x509_common_name", ())]


class ClientNames(grpc.aio.ServerInterceptor):
    """Serves a call only when the client certificate carries one of ``names``; PERMISSION_DENIED otherwise.

    grpc's server credentials check that the CA signed the certificate, not whose it is, and the interceptor
    cannot see the certificate before the handler runs: it wraps each method's handler, which reads the call's
    auth context first. Every method on the port is covered: inference, health and reflection alike."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.refused: set[tuple[str, ...]] = set()  # identities already logged (a refused caller usually retries)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: UNIMPLEMENTED, as without the check
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(handler.stream_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(handler.unary_stream))
        return handler._replace(stream_stream=self._streaming(handler.stream_stream))

    async def check(self, context) -> None:
        presented = identities(context.auth_context())
        if not self.names.isdisjoint(presented):
            return
        key = tuple(presented)
        if key not in self.refused and len(self.refused) < 1000:
            self.refused.add(key)
            log.warning(
                "refused a client certificate naming %s: --tls-client-names allows only %s",
                ", ".join(presented) or "nothing",
                ", ".join(sorted(self.names)),
            )
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "this replica serves only the identities in its --tls-client-names; the client certificate names "
            + (", ".join(presented) or "nothing"),
        )

    def _unary(self, behavior):
        async def checked(request, context):
            await self.check(context)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

        return checked

    def _streaming(self, behavior):
        async def checked(request, context):
            await self.check(context)
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            elif inspect.isawaitable(result):
                await result  # a handler that writes with context.write()
            else:
                for response in result:
                    yield response

        return checked


# --- the gateway's side -------------------------------------------------------------------------

CLIENT_FLAGS = ("--upstream-tls-cert", "--upstream-tls-key", "--upstream-tls-ca")


def client_paths(settings) -> tuple[Path, ...] | None:
    """The gateway's TLS files, or None when TLS to the replicas is off."""
    cert, key, ca = settings.upstream_tls_cert, settings.upstream_tls_key, settings.upstream_tls_ca
    if ca is None:
        if cert is not None or key is not None:
            raise TlsError("--upstream-tls-cert and --upstream-tls-key need --upstream-tls-ca")
        return None
    if (cert is None) != (key is None):
        raise TlsError("--upstream-tls-cert and --upstream-tls-key go together")
    return tuple(p for p in (cert, key, ca) if p is not None)


class ClientTls:
    """The gateway's channel credentials, re-read when their files change."""

    def __init__(self, settings, paths: tuple[Path, ...], interval: float = 1.0) -> None:
        self.settings = settings
        self.watch = Watch(*paths, interval=interval)
        self.credentials = self._load()
        name = settings.upstream_tls_server_name
        self.options: list[tuple[str, str]] = [("grpc.ssl_target_name_override", name)] if name else []

    @classmethod
    def from_settings(cls, settings) -> ClientTls | None:
        paths = client_paths(settings)
        return cls(settings, paths) if paths is not None else None

    def _load(self) -> grpc.ChannelCredentials:
        s = self.settings
        pem = load(s.upstream_tls_cert, s.upstream_tls_key, s.upstream_tls_ca, CLIENT_FLAGS)
        return grpc.ssl_channel_credentials(root_certificates=pem.ca, private_key=pem.key, certificate_chain=pem.cert)

    def reloaded(self) -> bool:
        """True when the files changed and the new ones load: then ``credentials`` are the new ones."""
        if not self.watch.changed():
            return False
        try:
            self.credentials = self._load()
        except TlsError as exc:
            log.warning("keeping the upstream TLS certificate in use: %s", exc)
            return False
        log.info("upstream TLS files changed: new calls go over a new channel")
        return True
