"""The unit tier: the transport-free code, tested in this process (no servers, no sockets).

These tests may import ``inferencehub.protocol`` (the generated protobuf messages) because they never import
tritonclient, which registers the same ``inference.*`` protobuf symbols: one process cannot hold both. That is
why this tier runs in a pytest process of its own (``make test`` runs ``pytest tests/unit`` first, then the
system tests in ``tests/system``). The guards below keep it that way: a test that imports tritonclient, opens a
network connection or listens on a port fails.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb

# Properties are checked on shared, loaded machines: an example that takes long is slow, not wrong.
settings.register_profile("unit", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("unit")


def _no_network(*args, **kwargs):
    raise AssertionError("a unit test tried to open a network connection or listen on a port")


@pytest.fixture(scope="session", autouse=True)
def in_process_only() -> Iterator[None]:
    """No connect or bind for the whole session (asyncio's own socketpair still works), and no tritonclient."""
    with pytest.MonkeyPatch.context() as patch:
        for method in ("connect", "connect_ex", "bind"):
            patch.setattr(socket.socket, method, _no_network)
        yield
    loaded = sorted(name for name in sys.modules if name == "tritonclient" or name.startswith("tritonclient."))
    assert not loaded, f"the unit tier imported {loaded[0]}: its protobuf symbols clash with inferencehub.protocol"


@pytest.fixture(scope="session")
def run():
    """Run a coroutine to completion on a fresh event loop (the tier needs no asyncio plugin)."""

    def run(coroutine, timeout: float = 30.0):
        return asyncio.run(asyncio.wait_for(coroutine, timeout))

    return run


@pytest.fixture(scope="session")
def infer_request():
    """A ``ModelInferRequest`` from ``(name, datatype, shape, raw)`` inputs, every input in raw form."""

    def build(*inputs, model: str = "m", version: str = "", outputs=(), request_id: str = "") -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for name, datatype, shape, raw in inputs:
            message.inputs.add(name=name, datatype=datatype, shape=list(shape))
            message.raw_input_contents.append(raw)
        for name in outputs:
            message.outputs.add(name=name)
        return message

    return build
