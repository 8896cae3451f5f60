"""Would overlapping the gradient Allreduce with backward pay on one machine?

Two (or more) ranks each run a stand-in for the backward pass (GEMMs in chunks
of ~0.6 ms, ~5 ms in all, about `small`'s backward at batch 32) and sum a
buffer the size of `small`'s gradient (206,922 floats + 4 slots):

* blocking: all the work, then one ``Allreduce`` (what dpcnn does);
* overlapped: half the work, an ``Iallreduce`` of the last layers' part (97 %
  of the buffer, as `small`'s dense layer is), the other half with an
  ``MPI_Test`` after every chunk to drive progress, then an ``Iallreduce`` of
  the rest and ``Waitall``;
* overlapped without the ``MPI_Test`` calls.

Prints ms per iteration (median of interleaved rounds) and the work alone.

    mpirun -n 2 python bench/bench_overlap.py [--rounds 7] [--iters 100]

Writes bench/overlap.json on rank 0.
"""

from __future__ import annotations

import argparse
import json
import time

import common  # noqa: F401  (one BLAS thread, before numpy)
import numpy as np
from mpi4py import MPI

COMM = MPI.COMM_WORLD
N_GRAD, SLOTS, FIRST_LAYERS = 206_922, 4, 4_800  # small: conv1 + conv2 parameters come first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--size", type=int, default=320, help="GEMM side of one work chunk")
    ap.add_argument("--out", default=str(common.BENCH / "overlap.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(COMM.rank)
    a, b = (rng.random((args.size, args.size), dtype=np.float32) for _ in range(2))
    buf = rng.random(N_GRAD + SLOTS, dtype=np.float32)
    late, early = buf[:SLOTS + FIRST_LAYERS], buf[SLOTS + FIRST_LAYERS:]

    def work(chunks: int, progress=None) -> None:
        for _ in range(chunks):
            a @ b
            if progress is not None:
                progress()

    def blocking() -> None:
        work(8)
        COMM.Allreduce(MPI.IN_PLACE, buf)

    def overlapped(test: bool) -> None:
        work(4)
        req = COMM.Iallreduce(MPI.IN_PLACE, early)
        work(4, req.Test if test else None)
        MPI.Request.Waitall([req, COMM.Iallreduce(MPI.IN_PLACE, late)])

    contenders = {"blocking Allreduce": blocking, "overlapped, MPI_Test per chunk": lambda: overlapped(True),
                  "overlapped, no MPI_Test": lambda: overlapped(False), "work alone": lambda: work(8)}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            COMM.Barrier()
            for _ in range(5):
                fn()
            COMM.Barrier()
            t = time.perf_counter()
            for _ in range(args.iters):
                fn()
            COMM.Barrier()
            times[name].append((time.perf_counter() - t) / args.iters)
    if COMM.rank == 0:
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        print(f"{COMM.size} ranks, buffer {N_GRAD + SLOTS:,} floats, median of {args.rounds} rounds "
              f"x {args.iters} iterations")
        for name, ms in med.items():
            extra = "" if name == "work alone" else f"   (+{ms - med['work alone']:.3f} ms over the work)"
            print(f"  {name:<32} {ms:7.3f} ms{extra}")
        with open(args.out, "w") as f:
            json.dump({"ranks": COMM.size, "ms_per_iteration": med, "load": common.load_average()}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
