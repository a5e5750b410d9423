"""The output plan: which outputs go back as binary data (the binary tensor data extension).

The REST codec reads it from a request (``binary_data_output`` on the request, ``binary_data`` on an output) and
writes the response by it; a job carries it in its message's header and its record, so the result read later is
rendered as the synchronous call would have been.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

HEADER = "Inferencehub-Output-Plan"  # the job message's header that carries the plan


@dataclass(frozen=True)
class OutputPlan:
    """Which outputs go back as binary data: those named in ``binary``, the others as ``binary_default`` says."""

    binary_default: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)

    def header(self) -> str:
        """The plan as compact JSON, for a job message's header."""
        return json.dumps({"binary_default": self.binary_default, "binary": self.binary}, separators=(",", ":"))

    @classmethod
    def from_header(cls, text: str) -> OutputPlan:
        """The plan ``header()`` wrote; the default plan (JSON outputs) for a header that is missing or unreadable."""
        try:
            doc = json.loads(text)
            return cls(bool(doc.get("binary_default")), {str(k): bool(v) for k, v in (doc.get("binary") or {}).items()})
        except (ValueError, TypeError, AttributeError):
            return cls()
