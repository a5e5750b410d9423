"""The models loaded or unloaded at run time, kept in NATS JetStream so that a replica starting later serves them too.

Only with a job queue (``--nats``): the gateway, after a load or unload through it succeeded on at least one
replica, writes the model's desired state to the key-value bucket ``inferencehub-models`` (one key per model,
no expiry): ``{"name", "loaded": true|false, "config": <the JSON config override, or null>}``. A replica in
``explicit`` mode reads the bucket once at start, before loading: a model recorded as loaded is loaded (with its
config override), one recorded as unloaded is not, whatever ``--load`` says; models not in the bucket follow
``--load``. If NATS does not answer within ``READ_TIMEOUT`` seconds, the replica logs a warning and starts with
what ``--load`` says. In ``none`` and ``poll`` modes the folder decides, and the bucket is not read.

Without NATS nothing is shared: each replica serves what its own flags and model control mode say, and a load
through the gateway reaches only the replicas running at that moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from inferencehub import jobqueue

log = logging.getLogger(__name__)

BUCKET = "inferencehub-models"
READ_TIMEOUT = 5.0


@dataclass(frozen=True)
class Desired:
    name: str
    loaded: bool
    config: str | None = None  # a config override given with the load


def key(model: str) -> str:
    return "model." + jobqueue.model_token(model)


async def bucket(js, replicas: int = 1):
    """The bucket, created if missing."""
    from nats.js import api
    from nats.js.errors import BucketNotFoundError

    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        config = api.KeyValueConfig(
            bucket=BUCKET,
            description="InferenceHub: models loaded or unloaded at run time",
            history=1,
            replicas=replicas,
            storage=api.StorageType.FILE,
        )
        return await js.create_key_value(config)


async def record(js, desired: Desired, replicas: int = 1) -> None:
    kv = await bucket(js, replicas)
    document = {"name": desired.name, "loaded": desired.loaded, "config": desired.config}
    await kv.put(key(desired.name), json.dumps(document).encode())


async def read(url: str, timeout: float = READ_TIMEOUT) -> dict[str, Desired] | None:
    """Every model's desired state, or None if NATS did not answer in time (then the flags decide)."""
    try:
        return await asyncio.wait_for(_read(url), timeout)
    except Exception as exc:  # unreachable, timed out, or a bucket that cannot be read
        log.warning(
            "model state: NATS at %s did not answer (%s); starting with the models --load names",
            url,
            exc or type(exc).__name__,
        )
        return None


async def _read(url: str) -> dict[str, Desired]:
    import nats
    from nats.js.errors import BucketNotFoundError, NoKeysError

    nc = await nats.connect(
        [server.strip() for server in url.split(",") if server.strip()],
        name="inferencehub-replica model state",
        allow_reconnect=False,
        connect_timeout=2,
    )
    try:
        js = nc.jetstream(timeout=2.0)
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            return {}
        try:
            keys = await kv.keys()
        except NoKeysError:
            return {}
        found: dict[str, Desired] = {}
        for name in keys:
            entry = await kv.get(name)
            try:
                doc = json.loads(entry.value or b"")  # no value (None) is unreadable too
                desired = Desired(str(doc["name"]), bool(doc["loaded"]), doc.get("config"))
            except (ValueError, KeyError, TypeError):
                log.warning("model state: entry %s is not readable; ignored", name)
                continue
            found[desired.name] = desired
        return found
    finally:
        await nc.close()
