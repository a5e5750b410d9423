"""A model's tensor specs and the one check of a request against them.

The replica (before decoding a call or a job), the gateway (before queueing a job) and the client (before sending)
all check with ``Signature``, so the same request is refused the same way, with the same words, wherever it is
caught. The signature comes from the model's config (the replica), its ``ModelMetadata`` answer (the gateway) or
its metadata JSON (the client); it is built once per model, not per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from inferencehub.errors import InvalidInput
from inferencehub.model import ModelConfig, TensorSpec


def shape_matches(shape: Sequence[int], spec: TensorSpec) -> bool:
    """``shape`` fits the spec's: the same rank, and each dimension equal or the spec's -1 (any size)."""
    expected = spec.shape
    return len(shape) == len(expected) and all(d == -1 or s == d for s, d in zip(shape, expected, strict=True))


def describe(spec: TensorSpec) -> str:
    return f"{spec.datatype} {list(spec.shape)}"


def check_rows(model: str, rows: int, max_batch_size: int) -> None:
    """A batching model takes at most ``max_batch_size`` rows in one request (0: no limit)."""
    if max_batch_size and rows > max_batch_size:
        raise InvalidInput(
            f"model '{model}': a request of {rows} rows is over its max_batch_size ({max_batch_size}); split it"
        )


class Signature:
    """A model's inputs and outputs (and batch limit), with the checks a request must pass."""

    __slots__ = ("_inputs", "_outputs", "inputs", "max_batch_size", "name", "outputs")

    def __init__(
        self, name: str, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec], max_batch_size: int = 0
    ) -> None:
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.max_batch_size = max_batch_size
        self._inputs = {s.name: s for s in self.inputs}
        self._outputs = {s.name: s for s in self.outputs}

    @classmethod
    def of_config(cls, config: ModelConfig) -> Signature:
        """The replica's: the batch limit is left to its scheduler, which counts the rows of the decoded arrays."""
        return cls(config.name, config.inputs, config.outputs)

    @classmethod
    def of_metadata(cls, metadata: Any, max_batch_size: int = 0) -> Signature:
        """From a ``ModelMetadataResponse`` (the gateway's, with the ``max_batch_size`` of the model's config)."""

        def specs(items) -> list[TensorSpec]:
            return [TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in items]

        return cls(metadata.name, specs(metadata.inputs), specs(metadata.outputs), max_batch_size)

    @classmethod
    def of_json(cls, metadata: dict) -> Signature:
        """From the metadata JSON of ``GET /v2/models/{m}``."""

        def specs(items) -> list[TensorSpec]:
            return [TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in items]

        return cls(metadata["name"], specs(metadata["inputs"]), specs(metadata.get("outputs", ())))

    # --- the checks, in the order a request meets them --------------------------------------------------------

    def input_named(self, name: str) -> TensorSpec:
        spec = self._inputs.get(name)
        if spec is None:
            known = ", ".join(self._inputs)
            raise InvalidInput(f"model '{self.name}' has no input '{name}' (its inputs: {known})")
        return spec

    def input(self, name: str, datatype: str, shape: Sequence[int]) -> TensorSpec:
        """The spec of an input, after checking the request's datatype and shape against it."""
        spec = self.input_named(name)
        if datatype != spec.datatype:
            raise InvalidInput(f"input '{name}': datatype {datatype}, expected {spec.datatype}")
        if not shape_matches(shape, spec):
            raise InvalidInput(f"input '{name}': shape {list(shape)}, expected {list(spec.shape)} (-1: any size)")
        return spec

    def check_complete(self, names: Sequence[str]) -> None:
        """Each input given once, and none missing."""
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise InvalidInput(f"input '{duplicate}' is given more than once")
        if len(names) != len(self.inputs):
            for spec in self.inputs:
                if spec.name not in names:
                    raise InvalidInput(f"model '{self.name}': missing input '{spec.name}' ({describe(spec)})")

    def output_specs(self, requested: Sequence[str]) -> list[TensorSpec]:
        """The outputs to return: those requested, in order, or all of them."""
        if not requested:
            return list(self.outputs)
        specs = []
        for name in requested:
            spec = self._outputs.get(name)
            if spec is None:
                known = ", ".join(self._outputs)
                raise InvalidInput(f"model '{self.name}' has no output '{name}' (its outputs: {known})")
            specs.append(spec)
        return specs

    def check(self, request: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Check a ``ModelInferRequest`` (its names, datatypes and shapes; its rows against the batch limit, if
        the signature has one). Returns the spec of each input, in request order, and the outputs to return.

        The replica's ``oip.codec.decode_inputs`` makes the same checks in the same order, decoding each input
        after its own check; its scheduler counts the rows."""
        tensors = request.inputs
        specs = [self.input(t.name, t.datatype, t.shape) for t in tensors]
        self.check_complete([t.name for t in tensors])
        outputs = self.output_specs([o.name for o in request.outputs])
        if self.max_batch_size and tensors and tensors[0].shape:
            check_rows(self.name, tensors[0].shape[0], self.max_batch_size)
        return specs, outputs
