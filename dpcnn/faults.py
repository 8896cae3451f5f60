"""The ``DPCNN_FAULT`` hook the failure tests use to make a rank misbehave at a known step.

``DPCNN_FAULT="rank=R,step=S[,action=raise|stall]"``: ``raise`` (the default)
fails rank R's step S; ``stall`` holds rank R there until a signal arrives, so
a test can signal or kill a job at a known step instead of racing a fast run.
Unset (the normal case), it costs one comparison per step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from .errors import DpcnnError

ENV = "DPCNN_FAULT"
ACTIONS = ("raise", "stall")


@dataclass(frozen=True)
class Fault:
    step: int
    action: str = "raise"

    def maybe_fire(self, rank: int, step: int, interrupted: Callable[[], bool], stall_limit_s: float = 600.0) -> None:
        """Do the fault if this is its step: raise, or wait until ``interrupted()`` (or the limit)."""
        if step != self.step:
            return
        if self.action == "raise":
            raise RuntimeError(f"injected fault on rank {rank} at step {step}")
        end = time.monotonic() + stall_limit_s
        while not interrupted() and time.monotonic() < end:
            time.sleep(0.01)


def from_env(rank: int) -> Fault | None:
    """This rank's fault from ``DPCNN_FAULT``, or None."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    kv = dict(part.split("=") for part in spec.split(","))
    if kv.get("action", "raise") not in ACTIONS:
        raise DpcnnError(f"{ENV}={spec!r}: action must be raise or stall")
    return Fault(int(kv["step"]), kv.get("action", "raise")) if int(kv.get("rank", 0)) == rank else None
