"""Who may call the gateway: API keys and per-client rate limits, as one aiohttp middleware.

API keys (``--api-keys-file``): one key a line, either the key itself or ``sha256:<64 hex>`` (its SHA-256, so the
file or Secret need not hold the keys), then optionally whitespace and a name used in logs and metrics, then
(after a name, as the line's last word) optionally a role: ``admin`` (may also load and unload models,
``POST /v2/repository/models/{m}/load|unload``) or ``user`` (the default: everything else); blank lines and ``#``
comments are skipped. A non-admin key asking for an admin action gets 403 naming the action. Clients send
``Authorization: Bearer <key>``. The presented key is hashed and compared with every stored digest with
``hmac.compare_digest`` (constant time, no early exit). The key itself is never logged nor put in a metric; its
name is. The file is re-read when its inode, size or mtime changes (checked at most once a second, on requests); a
file that no longer parses, or holds no key, keeps the previous keys and logs a warning.

Rate limits (``--rate-limit`` requests a second, ``--rate-limit-burst``): a token bucket per key name, or per
client address when keys are off (the peer address: behind a proxy that is the proxy). Over the limit: 429 with
``Retry-After``, the whole seconds until a token is back. The per-address table is bounded (least recently seen
addresses are forgotten first), so many clients cannot grow the gateway's memory.

Open routes: ``/healthz``, ``/readyz`` and ``/metrics`` (probes and scrapers carry no key) skip both checks.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from inferencehub.errors import InferenceHubError
from inferencehub.gateway.http_errors import error_response
from inferencehub.watch import Watch

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
REALM = 'Bearer realm="inferencehub"'
HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
MAX_TRACKED_ADDRESSES = 10_000
ANONYMOUS = "-"  # the key-name label of requests when keys are off


class KeyFileError(InferenceHubError):
    """An API key file that cannot be used (the message names the file and line, never a key)."""


ROLES = ("user", "admin")
ADMIN_PATH = re.compile(r"^/v2/repository/models/([^/]+)/(load|unload)$")  # admin actions: model control


@dataclass(frozen=True)
class Key:
    digest: bytes  # SHA-256 of the key
    name: str
    role: str = "user"


def parse_keys(text: str, source: str = "the API key file") -> list[Key]:
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token, *rest = line.split(None, 1)
        name = rest[0].strip() if rest else ""
        role = "user"
        words = name.rsplit(None, 1)
        if len(words) == 2 and words[1] in ROLES:  # a name, then a role
            name, role = words[0].rstrip(), words[1]
        if token.lower().startswith("sha256:"):
            match = HASHED.match(token)
            if match is None:
                raise KeyFileError(f"{source}, line {number}: sha256: must be followed by 64 hex digits")
            digest = bytes.fromhex(match.group(1))
        else:
            digest = hashlib.sha256(token.encode()).digest()
        keys.append(Key(digest, name or f"key-{digest.hex()[:8]}", role))
    if not keys:
        raise KeyFileError(f"{source} holds no key")
    return keys


def read_keys(path: Path) -> list[Key]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the API key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_keys(text, str(path))


class KeyRing:
    """The accepted keys, re-read from their file when it changes."""

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.watch = Watch(path, interval=interval)
        self.keys = read_keys(path)
        log.info("API keys on: %d key(s) from %s", len(self.keys), path)

    def refresh(self) -> None:
        if not self.watch.changed():
            return
        try:
            keys = read_keys(self.path)
        except KeyFileError as exc:
            log.warning("keeping the %d API key(s) in use: %s", len(self.keys), exc)
            return
        self.keys = keys
        log.info("API keys reloaded: %d key(s) from %s", len(keys), self.path)

    def name_of(self, presented: str) -> str | None:
        """The name of the key ``presented``, or None; the time taken does not depend on which key matched."""
        key = self.key_of(presented)
        return key.name if key is not None else None

    def key_of(self, presented: str) -> Key | None:
        """The key ``presented``, or None; the time taken does not depend on which key matched."""
        self.refresh()
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found


class TokenBuckets:
    """A token bucket per client: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_TRACKED_ADDRESSES) -> None:
        self.rate = rate
        self.burst = float(burst if burst > 0 else max(1, math.ceil(rate)))
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: str, now: float | None = None) -> float:
        """Take a token for ``client``: 0.0 if allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        tokens, at = self.buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self.buckets[client] = (tokens, now)  # most recently seen last
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return wait


class AccessMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.allowed = Counter(
            "inferencehub_gateway_authenticated_requests",
            "Requests that presented a valid API key, by the key's name.",
            ["key"],
            registry=registry,
        )
        self.refused = Counter(
            "inferencehub_gateway_unauthenticated_requests",
            "Requests refused with 401, by reason (missing or invalid key).",
            ["reason"],
            registry=registry,
        )
        self.refused_admin = Counter(
            "inferencehub_gateway_forbidden_requests",
            "Admin actions (model load/unload) refused with 403 to a key without the admin role, by key name.",
            ["key"],
            registry=registry,
        )
        self.limited = Counter(
            "inferencehub_gateway_rate_limited_requests",
            "Requests refused with 429 by the rate limit, by key name ('-' when keys are off).",
            ["key"],
            registry=registry,
        )


class Access:
    """The access policy of one gateway: optional keys, optional rate limit."""

    def __init__(self, keys: KeyRing | None, buckets: TokenBuckets | None, metrics: AccessMetrics) -> None:
        self.keys = keys
        self.buckets = buckets
        self.metrics = metrics

    @classmethod
    def from_settings(cls, settings, registry: CollectorRegistry) -> Access | None:
        """None when neither keys nor a rate limit are configured. Raises KeyFileError for a bad key file."""
        if settings.rate_limit < 0 or settings.rate_limit_burst < 0:
            raise InferenceHubError("--rate-limit and --rate-limit-burst cannot be negative")
        keys = KeyRing(settings.api_keys_file) if settings.api_keys_file is not None else None
        buckets = TokenBuckets(settings.rate_limit, settings.rate_limit_burst) if settings.rate_limit > 0 else None
        if keys is None and buckets is None:
            return None
        if buckets is not None:
            log.info(
                "rate limit on: %g requests/s, burst %d, per %s",
                buckets.rate,
                buckets.burst,
                "API key name" if keys else "client address",
            )
        return cls(keys, buckets, AccessMetrics(registry))

    def middleware(self):
        @web.middleware
        async def access(request: web.Request, handler) -> web.StreamResponse:
            if request.path in OPEN_PATHS:
                return await handler(request)
            client = ANONYMOUS
            if self.keys is not None:
                scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
                presented = presented.strip()
                if scheme.lower() != "bearer" or not presented:
                    self.metrics.refused.labels("missing").inc()
                    return error_response(
                        401,
                        "this gateway needs an API key: send Authorization: Bearer <key>",
                        {"WWW-Authenticate": REALM},
                    )
                key = self.keys.key_of(presented)
                if key is None:
                    self.metrics.refused.labels("invalid").inc()
                    return error_response(
                        401,
                        "the API key is not valid",
                        {"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
                    )
                client = key.name
                admin = ADMIN_PATH.match(request.path)
                if admin is not None and key.role != "admin":
                    self.metrics.refused_admin.labels(client).inc()
                    action = f"{admin.group(2)} of model '{admin.group(1)}'"
                    return error_response(403, f"{action} is an admin action: API key '{client}' is not an admin's")
            if self.buckets is not None:
                wait = self.buckets.take(client if self.keys is not None else f"addr:{request.remote}")
                if wait > 0:
                    self.metrics.limited.labels(client).inc()
                    seconds = max(1, math.ceil(wait))
                    return error_response(
                        429,
                        f"rate limit exceeded ({self.buckets.rate:g} requests/s); retry in {seconds} s",
                        {"Retry-After": str(seconds)},
                    )
            if self.keys is not None:
                self.metrics.allowed.labels(client).inc()
            return await handler(request)

        return access
