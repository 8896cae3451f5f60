"""Everything MPI, in one place. The only module that imports mpi4py.

Data parallelism needs only a handful of collectives: broadcast the initial
parameters, one in-place SUM Allreduce of the flat gradient buffer per step,
and a few small agreements (is everyone OK? where is the run directory?).
The same code runs as a single process without ``mpirun`` (world size 1).
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from . import errors, watchdog

_MPI_DTYPES = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}


_SIDE_COMMS: dict = {}  # communicator handle -> its duplicate (`Dist.side_comm`): one per process, not per trial


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Dist:
    """Rank, world size and the collectives the trainer uses."""

    def __init__(self, comm=None):
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_root = self.rank == 0
        # Ranks on this host. With more ranks than cores a rank that spins inside
        # MPI while waiting steals the core a computing rank needs, so we poll a
        # non-blocking Allreduce and sleep between polls instead.
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()
        node.Free()
        self.oversubscribed = self.local_size > _cores()
        policy = os.environ.get("DPCNN_MPI_WAIT", "auto")
        self.polite_wait = policy in ("yield", "sleep") or (policy == "auto" and self.oversubscribed)
        self._sleep = policy == "sleep"
        # Every collective below is watched: a rank that stops arriving is named, and past a limit
        # the job ends instead of waiting forever (dpcnn.watchdog).
        self.watchdog = watchdog.get(self.comm)

    @property
    def hosts(self) -> list[str]:
        """The host name of every rank (this one's alone at world size 1)."""
        return getattr(self.watchdog, "hosts", None) or [os.uname().nodename]

    def pin_blas_threads(self) -> int:
        """Give each rank its share of this host's cores for BLAS (at least one thread).

        Ranks that share cores and each start a full BLAS thread pool fight over
        them; im2col convolutions also got slower with more threads per rank.
        An explicit OMP_NUM_THREADS / OPENBLAS_NUM_THREADS from the user wins.
        """
        if any(v in os.environ for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")):
            return 0
        threads = max(1, _cores() // self.local_size)
        threadpool_limits(threads, user_api="blas")
        return threads

    # --- the step ---------------------------------------------------------
    def allreduce_sum_(self, buf: np.ndarray, what: str = "step") -> None:
        """In-place SUM over ranks of a contiguous float buffer (the step's one collective)."""
        if self.size == 1:
            return
        mpi_type = _MPI_DTYPES[buf.dtype]
        with self.watchdog.watch(what):
            if not self.polite_wait:
                self.comm.Allreduce(MPI.IN_PLACE, [buf, mpi_type], op=MPI.SUM)
                return
            req = self.comm.Iallreduce(MPI.IN_PLACE, [buf, mpi_type], op=MPI.SUM)
            while not req.Test():
                if self._sleep:
                    time.sleep(20e-6)
                else:
                    os.sched_yield()  # give the core to a rank that is still computing

    # --- the step, in buckets (dpcnn.buckets) ---------------------------------------
    def start_sum_(self, buf: np.ndarray, wire: str | None = None, comm=None, tag: int = 0):
        """Start an in-place SUM over ranks of ``buf``; returns something with ``Test()`` (None at size 1).

        ``wire`` None: ``buf`` is float32/float64, summed by MPI's own ``Iallreduce``. ``"fp16"`` /
        ``"bf16"``: ``buf`` holds 16-bit floats as uint16, summed by `dpcnn.ring.Ring16` on ``comm``
        (a communicator of the caller's own) with ``tag``. Nothing waits here: `wait_sums_` completes it.
        """
        if self.size == 1:
            return None
        if wire is None:
            return self.comm.Iallreduce(MPI.IN_PLACE, [buf, _MPI_DTYPES[buf.dtype]], op=MPI.SUM)
        from .buckets import CODECS
        from .ring import Ring16

        return Ring16(comm, buf, *CODECS[wire], tag=tag)

    def side_comm(self):
        """A duplicate of the communicator for dpcnn's own point-to-point traffic (the 16-bit rings), made
        once per process (a collective: the first call is made on every rank at the same point)."""
        key = self.comm.py2f()
        if key not in _SIDE_COMMS:
            _SIDE_COMMS[key] = self.comm.Dup()
        return _SIDE_COMMS[key]

    def wait_sums_(self, reqs: list, what: str = "step") -> None:
        """Wait for every sum of `start_sum_` (watched like any collective; polite when oversubscribed)."""
        reqs = [r for r in reqs if r is not None]
        if not reqs:
            return
        with self.watchdog.watch(what):
            if not self.polite_wait and all(isinstance(r, MPI.Request) for r in reqs):
                MPI.Request.Waitall(reqs)
                return
            while not all([r.Test() for r in reqs]):  # (a list: every request is tested, each time)
                if self.polite_wait and self._sleep:
                    time.sleep(20e-6)
                elif self.polite_wait:
                    os.sched_yield()

    def gather_rows(self, row: np.ndarray, what: str = "checkpoint") -> np.ndarray | None:
        """Every rank's ``row`` stacked ``(size, *row.shape)`` on rank 0 (None elsewhere)."""
        if self.size == 1:
            return row[None].copy()
        out = np.empty((self.size, *row.shape), row.dtype) if self.is_root else None
        with self.watchdog.watch(what):
            self.comm.Gather([np.ascontiguousarray(row), _MPI_DTYPES[row.dtype]],
                             [out, _MPI_DTYPES[row.dtype]] if self.is_root else None, root=0)
        return out

    def scatter_rows(self, rows: np.ndarray | None, out: np.ndarray, what: str = "set-up") -> None:
        """Rank r gets ``rows[r]`` (given on rank 0, shape ``(size, *out.shape)``) into ``out``."""
        if self.size == 1:
            out[...] = rows[0]
            return
        with self.watchdog.watch(what):
            self.comm.Scatter([rows, _MPI_DTYPES[out.dtype]] if self.is_root else None,
                              [out, _MPI_DTYPES[out.dtype]], root=0)

    def allreduce_(self, buf: np.ndarray, op: str = "sum", what: str = "evaluation") -> None:
        """In-place SUM or MIN over ranks of a small float buffer (end-of-epoch figures)."""
        if self.size > 1:
            with self.watchdog.watch(what):
                self.comm.Allreduce(MPI.IN_PLACE, [buf, _MPI_DTYPES[buf.dtype]], op=MPI.MIN if op == "min" else MPI.SUM)

    def broadcast_(self, buf: np.ndarray, root: int = 0) -> None:
        """Overwrite ``buf`` on every rank with root's copy."""
        if self.size > 1:
            with self.watchdog.watch("set-up"):
                self.comm.Bcast([buf, _MPI_DTYPES.get(buf.dtype, MPI.BYTE)], root=root)

    # --- small agreements ------------------------------------------------------
    def bcast(self, obj, root: int = 0, what: str = "set-up"):
        """Root's Python object on every rank (small things only: strings, dicts)."""
        if self.size == 1:
            return obj
        with self.watchdog.watch(what):
            return self.comm.bcast(obj, root=root)

    def allgather(self, obj, what: str = "set-up") -> list:
        if self.size == 1:
            return [obj]
        with self.watchdog.watch(what):
            return self.comm.allgather(obj)

    def agree(self, fn, catch: type[BaseException] = Exception, raise_as=None, what: str = "set-up"):
        """Run ``fn`` on every rank; if it raises ``catch`` on any rank, raise it on all of them.

        Every rank reaches the allgather, so a bad config or a missing file ends the
        job with the same one-line error everywhere instead of a hang. The error is
        rebuilt from the first failing rank's (type name, message): as the dpcnn error
        class of that name, or as ``raise_as(f"{type}: {message}")`` when given.
        """
        try:
            result, err = fn(), None
        except catch as e:
            result, err = None, _describe(e, self.rank, raise_as)
        failed = [e for e in self.allgather(err, what) if e]
        if failed:
            raise _rebuild(*failed[0], raise_as)
        return result

    def from_root(self, fn, catch: type[BaseException] = Exception, raise_as=None):
        """``fn()`` on rank 0 only; its result, or its error (rebuilt as in `agree`), on every rank."""
        msg = None
        if self.is_root:
            try:
                msg = (None, fn())
            except catch as e:
                msg = (_describe(e, self.rank, raise_as), None)
        err, result = self.bcast(msg)
        if err:
            raise _rebuild(*err, raise_as)
        return result

    def wait_all(self, what: str = "end") -> None:
        """A barrier that sleeps while it waits: ranks done early must not steal a working rank's core."""
        if self.size > 1:
            with self.watchdog.watch(what):
                req = self.comm.Ibarrier()
                while not req.Test():
                    time.sleep(0.005)

    def barrier(self) -> None:
        if self.size > 1:
            with self.watchdog.watch("set-up"):
                self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """Kill every rank of the job (used when ranks can no longer agree)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size > 1:
            self.comm.Abort(code)
        os._exit(code)

    # --- facts for the record ----------------------------------------------------
    @staticmethod
    def library_version() -> str:
        return MPI.Get_library_version().strip().splitlines()[0].strip()

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, size={self.size}, local={self.local_size}, polite_wait={self.polite_wait})"


def _describe(e: BaseException, rank: int, raise_as=None) -> tuple[str, str]:
    """(type name, message) of an error to share. Without ``raise_as`` an error that is not a
    `DpcnnError` is a bug: its traceback is printed here and the message names the rank."""
    if isinstance(e, errors.DpcnnError) or raise_as is not None:
        return type(e).__name__, str(e)
    traceback.print_exc()
    return type(e).__name__, f"rank {rank} failed: {type(e).__name__}: {e} (traceback above)"


def _rebuild(kind: str, message: str, raise_as=None) -> BaseException:
    """The exception another rank raised, as far as a (type name, message) pair can carry it."""
    if raise_as is not None:
        return raise_as(f"{kind}: {message}")
    for cls in (errors.DpcnnError, *errors.DpcnnError.__subclasses__()):
        if cls.__name__ == kind:
            return cls(message)
    return errors.DpcnnError(message)


def world_rank_and_size() -> tuple[int, int]:
    """(rank, size) of COMM_WORLD."""
    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
