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

import numpy as np
from mpi4py import MPI

_MPI_DTYPES = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}


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
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = self.node.Get_size()
        self.oversubscribed = self.local_size > _cores()
        policy = os.environ.get("DPCNN_MPI_WAIT", "auto")
        self.polite_wait = policy in ("yield", "sleep") or (policy == "auto" and self.oversubscribed)
        self._sleep = policy == "sleep"
        self._shared: SharedSum | None = None

    def pin_blas_threads(self) -> int:
        """Give each rank its share of this host's cores for BLAS (at least one thread).

        Ranks that share cores and each start a full BLAS thread pool fight over
        them; im2col convolutions also got slower with more threads per rank.
        An explicit OMP_NUM_THREADS / OPENBLAS_NUM_THREADS from the user wins.
        """
        if any(v in os.environ for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")):
            return 0
        from threadpoolctl import threadpool_limits

        threads = max(1, _cores() // self.local_size)
        threadpool_limits(threads, user_api="blas")
        return threads

    # --- the step ---------------------------------------------------------
    def step_buffer(self, size: int, dtype) -> np.ndarray:
        """A zeroed buffer for the step's Allreduce. When every rank is on this host it lives
        in shared memory and `allreduce_sum_` sums it there (`SharedSum`); set
        DPCNN_ALLREDUCE=mpi to use MPI's Allreduce instead. Free it with `release`."""
        self.release()
        if self.size > 1 and self.local_size == self.size and os.environ.get("DPCNN_ALLREDUCE", "auto") != "mpi":
            self._shared = SharedSum(self.node, size, np.dtype(dtype), self._wait)
            return self._shared.buf
        return np.zeros(size, dtype)

    def release(self) -> None:
        """Free the shared step buffer, if any (collective)."""
        if self._shared is not None:
            self._shared.free()
            self._shared = None

    def allreduce_sum_(self, buf: np.ndarray) -> None:
        """In-place SUM over ranks of a contiguous float buffer (the step's one collective)."""
        if self.size == 1:
            return
        if self._shared is not None and buf is self._shared.buf:
            self._shared.sum_()
            return
        mpi_type = _MPI_DTYPES[buf.dtype]
        if not self.polite_wait:
            self.comm.Allreduce(MPI.IN_PLACE, [buf, mpi_type], op=MPI.SUM)
            return
        self._wait(self.comm.Iallreduce(MPI.IN_PLACE, [buf, mpi_type], op=MPI.SUM))

    def _wait(self, req) -> None:
        """Complete a request; with polite waits, poll it and give the core away between polls."""
        if not self.polite_wait:
            req.Wait()
            return
        while not req.Test():
            if self._sleep:
                time.sleep(20e-6)
            else:
                os.sched_yield()  # give the core to a rank that is still computing

    def broadcast_(self, buf: np.ndarray, root: int = 0) -> None:
        """Overwrite ``buf`` on every rank with root's copy."""
        if self.size > 1:
            self.comm.Bcast([buf, _MPI_DTYPES.get(buf.dtype, MPI.BYTE)], root=root)

    # --- small agreements ------------------------------------------------------
    def bcast(self, obj, root: int = 0):
        """Root's Python object on every rank (small things only: strings, dicts)."""
        return self.comm.bcast(obj, root=root) if self.size > 1 else obj

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj) if self.size > 1 else [obj]

    def barrier(self) -> None:
        if self.size > 1:
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


class SharedSum:
    """Allreduce(SUM) of one buffer among the ranks of a host, through an MPI-3 shared window.

    Every rank's buffer is a segment of one shared-memory window, so a rank can read the
    others' directly. A sum is two barriers: (1) all inputs are written; each rank adds its
    1/R slice of every input, in rank order, into the shared result; (2) all slices are
    summed; each rank copies the whole result into its own buffer. No rank writes its input
    again before the next sum's first barrier, which every rank passes only after this sum's
    second, so the inputs it reads are never overwritten under it. Memory traffic per rank is
    about three buffer lengths, against the copies through MPICH's shared-memory cells;
    bench/bench_allreduce.py has the figures.
    """

    def __init__(self, node, size: int, dtype: np.dtype, wait):
        self.node, self._wait = node, wait
        rank, ranks = node.Get_rank(), node.Get_size()
        item = dtype.itemsize
        # One window: each rank's input segment, and rank 0's segment also holds the result.
        self.win = MPI.Win.Allocate_shared(size * item * (2 if rank == 0 else 1), item, comm=node)
        self.inputs = [np.frombuffer(self.win.Shared_query(q)[0], dtype, size) for q in range(ranks)]
        self.result = np.frombuffer(self.win.Shared_query(0)[0], dtype, 2 * size)[size:]
        self.buf = self.inputs[rank]
        self.buf[:] = 0
        bounds = [q * size // ranks for q in range(ranks + 1)]
        self._mine = slice(bounds[rank], bounds[rank + 1])
        self._barrier()

    def _barrier(self) -> None:
        self._wait(self.node.Ibarrier())

    def sum_(self) -> None:
        self._barrier()
        mine, out = self._mine, self.result[self._mine]
        np.add(self.inputs[0][mine], self.inputs[1][mine], out=out)
        for other in self.inputs[2:]:
            out += other[mine]
        self._barrier()
        self.buf[:] = self.result

    def free(self) -> None:
        self.inputs = self.result = self.buf = None
        self.win.Free()


def world_rank_and_size() -> tuple[int, int]:
    """(rank, size) of COMM_WORLD."""
    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
