"""Never wait forever: a thread on every rank that watches the rank's collectives.

A rank that is alive but stuck (SIGSTOP, a dead NFS mount, a swapping node, a
deadlock) leaves the others blocked in the step's Allreduce; MPI notices a dead
process, not a stuck one. So every rank marks, with two attribute writes, when
it enters and leaves a collective (`Watchdog.watch`), and a daemon thread
checks every quarter second how long the current one has waited:

- after ``notice`` seconds (1 s, or ``stall_warning`` if that is shorter) the
  rank tells every other rank "I am waiting at step s" with a non-blocking
  send on a communicator of the watchdog's own; nothing is sent while
  collectives return promptly, so a healthy step costs nothing but the two
  writes;
- after ``stall_warning`` seconds the lowest waiting rank prints one line
  naming the ranks that have not reached the collective (and their hosts), and
  again at doubling intervals;
- after ``collective_timeout`` (the step) or ``setup_timeout`` (set-up, data,
  evaluation, checkpoints, the end) every waiting rank prints the one
  ``dpcnn: error:`` line; rank 0 runs the ``on_timeout`` hook (the MLflow run
  becomes FAILED), then aborts the job (exit 1); the others give rank 0 a few
  seconds to do so, then abort themselves (rank 0 may be the stuck one).

mpi4py releases the GIL inside blocking MPI calls, and dpcnn asks for
MPI_THREAD_MULTIPLE (mpi4py's default), so the thread runs while the main
thread waits.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from typing import Callable

import numpy as np
from mpi4py import MPI

from .errors import EXIT_FAILED

TAG = 7707
POLL_S = 0.25
GRACE_S = 10.0  # a non-root rank's wait for rank 0 to mark the run and abort the job


class Watchdog:
    """One per process (`get`). ``waiting`` is written by the main thread, read by the watchdog thread."""

    def __init__(self, comm):
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.hosts = self.comm.allgather(socket.gethostname())
        self.stall_warning: float | None = 60.0
        self.collective_timeout: float | None = 600.0
        self.setup_timeout: float | None = 1800.0
        self.step = 0
        self.seq = 0  # collectives entered so far: the same count on every rank, since collectives match in order
        self.waiting: tuple[str, int, int, float] | None = None  # (what, step, seq, since); None between them
        self.advice: Callable[[], str] = lambda: ""
        self.on_timeout: Callable[[], None] = lambda: None
        self.notes: dict[int, int] = {}  # rank -> the seq of the collective it said it waits in
        # The notes need MPI calls from this thread; without MPI_THREAD_MULTIPLE (some builds) the
        # watchdog still ends a stalled job, it just cannot name the missing ranks.
        self.talk = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._recv = [(r, np.zeros(1, np.int64)) for r in range(self.size) if r != self.rank and self.talk]
        self._reqs = [self.comm.Irecv([buf, MPI.INT64_T], source=r, tag=TAG) for r, buf in self._recv]
        self._sent: list = []
        threading.Thread(target=self._run, name="dpcnn-watchdog", daemon=True).start()

    def configure(self, stall_warning: float | None, collective_timeout: float | None,
                  setup_timeout: float | None) -> None:
        """Seconds (None: never) — from ``trainer.stall_warning`` / ``collective_timeout`` / ``setup_timeout``."""
        self.stall_warning, self.collective_timeout, self.setup_timeout = stall_warning, collective_timeout, \
            setup_timeout

    @contextlib.contextmanager
    def watch(self, what: str = "set-up"):
        """Mark a collective: ``what`` is "step" for the step's reduction, else the phase it belongs to."""
        self.seq += 1
        self.waiting = (what, self.step, self.seq, time.monotonic())
        try:
            yield
        finally:
            self.waiting = None

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        noted = warned_at = None
        next_warning = 0.0
        while True:
            time.sleep(POLL_S)
            try:
                self._receive()
                waiting = self.waiting
                if waiting is None:
                    continue
                what, step, seq, since = waiting
                waited = time.monotonic() - since
                if noted != seq and waited >= min(1.0, self.stall_warning or 1.0):
                    self._tell_others(seq)
                    noted = seq
                if warned_at != seq:
                    warned_at, next_warning = seq, self.stall_warning or float("inf")
                if waited >= next_warning:
                    missing = self._missing(seq)
                    if self.rank == min(set(range(self.size)) - set(missing)):
                        _say(f"dpcnn: warning: {self._stall(what, step, missing, waited)}")
                    next_warning *= 2
                limit = self.collective_timeout if what == "step" else self.setup_timeout
                if limit is not None and waited >= limit and self.waiting == waiting:
                    self._expire(what, step, self._missing(seq), limit)
            except Exception as e:  # noqa: BLE001 - the watchdog must never take a healthy job down
                _say(f"dpcnn: warning: the watchdog stopped: {type(e).__name__}: {e}")
                return

    def _tell_others(self, seq: int) -> None:
        if not self.talk:
            return
        note = np.array([seq], np.int64)
        self._sent = [self.comm.Isend([note, MPI.INT64_T], dest=r, tag=TAG) for r in range(self.size)
                      if r != self.rank] + [note]  # keep the buffer alive until the sends complete

    def _receive(self) -> None:
        for i, (r, buf) in enumerate(self._recv):
            if self._reqs[i].Test():
                self.notes[r] = int(buf[0])
                self._reqs[i] = self.comm.Irecv([buf, MPI.INT64_T], source=r, tag=TAG)

    def _missing(self, seq: int) -> list[int]:
        """The ranks that have not said they wait in collective ``seq`` (a later note counts: it got past)."""
        return [r for r in range(self.size) if r != self.rank and self.notes.get(r, 0) < seq]

    def _stall(self, what: str, step: int, missing: list[int], waited: float) -> str:
        where = f"step {step}" if what == "step" else f"the {what} collective (after step {step})"
        if not self.talk:
            return f"some rank has not reached {where} for {waited:.0f} s (no MPI thread support to name it)"
        if not missing:
            return f"every rank has reached {where} but it has not completed for {waited:.0f} s (the network?)"
        names = ", ".join(f"rank {r} (host {self.hosts[r]})" for r in missing)
        return f"{names} {'has' if len(missing) == 1 else 'have'} not reached {where} for {waited:.0f} s"

    def _expire(self, what: str, step: int, missing: list[int], limit: float) -> None:
        advice = self.advice()
        advice = advice[:1].upper() + advice[1:]
        _say(f"dpcnn: error: {self._stall(what, step, missing, limit)}; aborting."
             f"{' ' + advice if advice else ''}")
        if self.rank == 0:
            _bounded(self.on_timeout, 20.0)
        else:
            time.sleep(GRACE_S)  # rank 0 marks the run FAILED and aborts the job; if it is the stuck one, we do
        MPI.COMM_WORLD.Abort(EXIT_FAILED)


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _bounded(fn: Callable[[], None], seconds: float) -> None:
    """Run ``fn`` in a thread for at most ``seconds`` (marking a run must not hold up the abort)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)


class NullWatchdog:
    """A single process has no one to wait for."""

    step = 0
    advice = on_timeout = None

    def configure(self, *args) -> None:
        pass

    @contextlib.contextmanager
    def watch(self, what: str = "set-up"):
        yield


_instance: Watchdog | NullWatchdog | None = None


def get(comm) -> Watchdog | NullWatchdog:
    """The process's watchdog on ``comm`` (created by the first caller, which every rank is)."""
    global _instance
    if _instance is None:
        _instance = Watchdog(comm) if comm.Get_size() > 1 else NullWatchdog()
    return _instance
