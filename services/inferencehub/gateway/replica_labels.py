"""Per-replica metric labels that stay bounded while pods come and go.

Every replica that serves a call becomes a ``replica`` label value of the gateway's per-replica series.
On Kubernetes, pods are replaced all the time (rollouts, autoscaling, evictions), each with a new name,
so without care the gateway would keep series for every pod it ever saw. Here:

- the label sets of a replica that has served nothing for ``forget_after`` seconds are removed (its
  series disappear from /metrics; Prometheus marks them stale);
- at most ``limit`` replicas are tracked at once; calls served by further replicas are counted under
  ``replica="other"`` until some are forgotten.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from prometheus_client import Counter

OTHER = "other"


class ReplicaLabels:
    def __init__(
        self,
        counter: Counter,
        label_names: tuple[str, ...],
        *,
        forget_after: float = 300.0,
        limit: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counter = counter
        self.label_names = label_names
        self.forget_after = forget_after
        self.limit = limit
        self.clock = clock
        self.last_seen: dict[str, float] = {}
        self._next_sweep = 0.0

    def label(self, replica: str) -> str:
        """The label value to count a call served by ``replica`` under."""
        now = self.clock()
        if now >= self._next_sweep:
            self.sweep(now)
        if replica in self.last_seen or len(self.last_seen) < self.limit:
            self.last_seen[replica] = now
            return replica
        return OTHER

    def sweep(self, now: float | None = None) -> None:
        """Forget the replicas not seen for ``forget_after`` seconds, and their series."""
        now = self.clock() if now is None else now
        self._next_sweep = now + max(self.forget_after / 10, 0.1)
        gone = {name for name, seen in self.last_seen.items() if now - seen >= self.forget_after}
        if not gone:
            return
        for name in gone:
            del self.last_seen[name]
        for metric in self.counter.collect():
            for sample in metric.samples:
                if sample.labels.get("replica") in gone and sample.name.endswith("_total"):
                    values = tuple(sample.labels[n] for n in self.label_names)
                    with contextlib.suppress(KeyError):  # already removed
                        self.counter.remove(*values)
