"""A ring Allreduce of 16-bit floats, by hand: MPI has no fast SUM for them.

Measured on 2 emulated hosts at 1 Gbit/s, 206,922 values (``bench/RESULTS.md``):
float32 ``Allreduce`` 7.1 ms; MPICH's own ``MPI_FLOAT16_T`` SUM 6.1 ms (it
converts element by element: 2.5 ms of arithmetic on shared memory); a bfloat16
SUM as a Python ``MPI.Op`` 8.4 ms; an integer SUM of the same 16-bit payload,
the wire's floor, 3.5 ms. So the 16-bit wire is summed here, with NumPy, in the
classic two passes over a ring of the P ranks (P chunks):

- reduce-scatter, P - 1 rounds: send one chunk to the right neighbour, receive
  another from the left, add it in float32 and round back to 16 bits; after it
  rank r holds the whole sum of chunk r + 1;
- all-gather, P - 1 rounds: pass the finished chunks around.

Each rank sends 2 (P - 1) / P of the payload, half of what float32 needs at
any P. A chunk's sum is computed on one rank, in one fixed order, and copied to
the others, so every rank ends with the same bits. At P = 2 the two rounds
are one exchange of the whole payload (the same bytes, one round trip instead
of two): each rank adds the two ranks' decoded payloads in float32, a + b on
one and b + a on the other, the same bits, and the sum is not rounded to 16
bits again. One whole reduction of `small`'s buckets, 2 ranks on one host
(``bench/bench_reduce.py``): fp16 1.35-1.52 -> 0.98-1.06 ms, bf16 0.86-0.94 ->
0.64-0.65 ms (float32's ``Iallreduce``: 0.19-0.20). Each round
needs the last one done: `Ring16.Test` moves it on as far as it can without
waiting (called between backward's layers, like MPI's own requests),
`dpcnn.dist.Dist.wait_sums_` until it is done; `Ring16.total` is the sum.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI


class Ring16:
    """One ring sum of ``q`` (uint16 bit patterns, which it may overwrite) on ``comm``, started at
    construction; `total` gives it once `Test` is True.

    ``decode(q) -> float32`` and ``encode(float32) -> uint16`` are the wire format's;
    ``tag`` keeps rings in flight at once apart (one per bucket).
    """

    def __init__(self, comm, q: np.ndarray, decode, encode, tag: int):
        self.comm, self.q, self.decode, self.encode, self.tag = comm, q, decode, encode, tag
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        cuts = np.linspace(0, len(q), self.size + 1).astype(int)
        self.chunks = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        self.pair = self.size == 2  # one exchange of the whole payload
        self.scratch = np.empty(len(q) if self.pair else max(b - a for a, b in zip(cuts[:-1], cuts[1:])), np.uint16)
        self.round, self.rounds = 0, 1 if self.pair else 2 * (self.size - 1)
        self.reqs: list = []
        self._post()

    def _chunks_of(self, k: int) -> tuple[slice, slice]:
        """(the chunk sent, the chunk received) in round k."""
        r, p = self.rank, self.size
        if k < p - 1:  # reduce-scatter
            return self.chunks[(r - k) % p], self.chunks[(r - k - 1) % p]
        s = k - (p - 1)  # all-gather: pass on the chunk finished (or received) last
        return self.chunks[(r + 1 - s) % p], self.chunks[(r - s) % p]

    def _post(self) -> None:
        if self.pair:
            other = 1 - self.rank
            self.reqs = [self.comm.Irecv([self.scratch, MPI.UINT16_T], source=other, tag=self.tag),
                         self.comm.Isend([self.q, MPI.UINT16_T], dest=other, tag=self.tag)]
            return
        send, recv = self._chunks_of(self.round)
        into = self.scratch[:recv.stop - recv.start] if self.round < self.size - 1 else self.q[recv]
        left, right = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        self.reqs = [self.comm.Irecv([into, MPI.UINT16_T], source=left, tag=self.tag),
                     self.comm.Isend([self.q[send], MPI.UINT16_T], dest=right, tag=self.tag)]

    def Test(self) -> bool:  # noqa: N802 - the MPI.Request spelling, so both kinds go in one list
        """Complete every round that has arrived and start the next; True once the sum is whole."""
        while self.round < self.rounds and MPI.Request.Testall(self.reqs):
            if self.round < self.size - 1 and not self.pair:
                _, recv = self._chunks_of(self.round)
                got = self.scratch[:recv.stop - recv.start]
                self.q[recv] = self.encode(self.decode(self.q[recv]) + self.decode(got))
            self.round += 1
            if self.round < self.rounds:
                self._post()
        return self.round >= self.rounds

    def total(self) -> np.ndarray:
        """The sum, decoded: float32 in ``decode``'s terms, the same bits on every rank (once `Test` is True)."""
        if not self.pair:
            return self.decode(self.q)
        mine = self.decode(self.q)
        mine += self.decode(self.scratch)
        return mine
