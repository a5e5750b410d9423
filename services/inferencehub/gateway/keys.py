"""The gateway app's typed keys: what ``create_app`` puts in the ``web.Application``.

A module of its own so that route modules (jobs.py, ...) read the app's resources without importing
app.py, which imports them: no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from inferencehub.gateway.body_budget import BodyBudget
from inferencehub.gateway.coalescer import Coalescer
from inferencehub.gateway.job_queue import JobQueue
from inferencehub.gateway.metrics import GatewayMetrics
from inferencehub.gateway.replicas import ReplicaSet
from inferencehub.gateway.status import Traffic
from inferencehub.gateway.upstream import Upstream
from inferencehub.settings import GatewaySettings
from inferencehub.tracing import Tracing


@dataclass
class GatewayState:
    started: bool = False
    draining: bool = False


SETTINGS = web.AppKey("settings", GatewaySettings)
METRICS = web.AppKey("metrics", GatewayMetrics)
STATE = web.AppKey("state", GatewayState)
UPSTREAM = web.AppKey("upstream", Upstream)
REPLICAS = web.AppKey("replicas", ReplicaSet)
TRAFFIC = web.AppKey("traffic", Traffic)
TRACING: web.AppKey[Tracing | None] = web.AppKey("tracing")  # None when tracing is off
COALESCER = web.AppKey("coalescer", Coalescer)
BODY_BUDGET = web.AppKey("body_budget", BodyBudget)
JOBS = web.AppKey("jobs", JobQueue)  # only when a job queue is configured (--nats)
