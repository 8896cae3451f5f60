"""The ``DPCNN_FAULT`` hook the failure tests use to make a rank misbehave at a known point.

``DPCNN_FAULT="rank=R,step=S[,action=raise|stall|kill][,phase=step|backward|eval|end|setup][,attempt=A]"``:
rank R does ``action`` in ``phase`` once training has taken S steps (only in
attempt A of a job that ``launch/local.sh --max-restarts`` restarts, if given):

- ``step`` (the default): inside the gradient computation of step S;
- ``backward``: inside the backward pass of step S, once a gradient bucket's Allreduce is in
  flight (``trainer.overlap``);
- ``eval``: in the first end-of-epoch evaluation at or after step S (outside the step);
- ``end``: in rank 0's end phase (plots, model, flush), after training finished;
- ``setup``: while the data are loaded, before the first step (S is ignored).

``raise`` (the default) raises an exception; ``stall`` holds the rank until a
signal arrives, so a test can signal or kill a job at a known point instead of
racing a fast run; ``kill`` sends the rank SIGKILL (a crash no handler sees). Unset (the normal case), a check costs one dictionary look-up.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

from .errors import DpcnnError

ENV = "DPCNN_FAULT"
ACTIONS = ("raise", "stall", "kill")
PHASES = ("step", "backward", "eval", "end", "setup")


@dataclass
class Fault:
    rank: int
    step: int
    action: str = "raise"
    phase: str = "step"
    attempt: int | None = None
    fired: bool = False

    def fire(self, rank: int, interrupted: Callable[[], bool], stall_limit_s: float = 600.0) -> None:
        """Raise, or wait until ``interrupted()`` (or the limit)."""
        self.fired = True
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "raise":
            raise RuntimeError(f"injected fault on rank {rank} at step {self.step} ({self.phase})")
        end = time.monotonic() + stall_limit_s
        while not interrupted() and time.monotonic() < end:
            time.sleep(0.01)


def parse(spec: str) -> Fault:
    """A ``DPCNN_FAULT`` value as a `Fault`; a malformed one is a DpcnnError naming the format."""
    try:
        kv = dict(part.split("=", 1) for part in spec.split(","))
        fault = Fault(int(kv.get("rank", 0)), int(kv.get("step", 0)), kv.get("action", "raise"),
                      kv.get("phase", "step"), int(kv["attempt"]) if "attempt" in kv else None)
    except (KeyError, ValueError):
        fault = None
    if fault is None or fault.action not in ACTIONS or fault.phase not in PHASES:
        raise DpcnnError(f"{ENV}={spec!r}: expected rank=R,step=S[,action=raise|stall|kill]"
                         "[,phase=step|backward|eval|end|setup][,attempt=A]")
    return fault


_cache: dict[str, Fault | None] = {}


def check(phase: str, rank: int, step: int, interrupted: Callable[[], bool] = lambda: False) -> None:
    """Fire this rank's fault if it is set for ``phase`` and training has reached its step."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if spec not in _cache:
        _cache[spec] = parse(spec)
    fault = _cache[spec]
    if fault.rank != rank or fault.phase != phase or fault.fired:
        return
    if fault.attempt is not None and fault.attempt != int(os.environ.get("DPCNN_RESTARTS", "0")):
        return
    if phase == "setup" or step == fault.step or (phase != "step" and step >= fault.step):
        fault.fire(rank, interrupted)
