"""The step's reduction in buckets: each starts while backward is still computing the layers below it.

Backward produces the gradients from the last layer to the first, so the flat
gradient buffer (laid out in layer order) fills from its end towards its
front. `plan` cuts it, at the boundaries of the model's steps, into buckets of
at least ``bucket_bytes`` counted from the end; the last bucket is the buffer's
tail, the batch-norm statistics and the metric/flag slots, which are known
only once the whole shard is done (and so still carry the stop and error flags
to every rank at the same step). `Reducer` starts each bucket's non-blocking
Allreduce as soon as backward has written it (`Reducer.ready`, called by
`Model.backward` between its steps, which also tests the requests in flight:
MPICH moves a non-blocking collective only inside MPI calls; `Reducer.poll`
tests them inside a convolution's backward too, between its blocks and its
GEMMs) and waits for all of them before the optimizer step (`Reducer.finish`).
The buckets are started in the same order on every rank, so they match; each is
one MPI SUM, whose result is the same on every rank, as the single Allreduce's was.

Compression (``trainer.grad_compression=fp16|bf16``): the trainable part
crosses the wire as 16-bit floats, summed by `dpcnn.ring` (MPI has no fast SUM
for them). Each rank adds its rounding residual of the previous step before
rounding (error feedback: what one step did not send, a later step does), so
nothing is lost for good; the residuals are in the checkpoint. fp16 carries
the gradient scaled by the global batch size (the per-rank sums of
per-example gradients: inside its range, away from the values below its
smallest normal, which are flushed to the residual); a gradient that
overflows fp16 becomes inf, and the step's finiteness check stops the run as
diverged before any weight changes. bf16 has float32's range and 8 bits of
mantissa. The slots and batch statistics stay in full precision. Rounding
the sums on the ring's hops is not fed back: at P ranks a value is rounded
P - 1 more times (bench/RESULTS.md has the accuracy this costs).
"""

from __future__ import annotations

import time

import numpy as np

#: ``trainer.grad_compression`` values.
WIRES = ("none", "fp16", "bf16")


def half_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bit patterns (uint16), rounded to nearest even; beyond 65504 inf.

    Integer arithmetic on the float32 bits, in place: NumPy's own ``astype(np.float16)``
    converts one element at a time (1.2 ms for 206,922 floats, and 10 ms when many of them
    overflow, against 0.46 ms for this on the AVX-512 EPYC of 2026-12-02). Values below half's
    smallest normal, 2**-14, become zero (for a gradient, error feedback carries them to a
    later step). The zeroing is a multiply by the bool mask and the sign is or-ed in before
    the one narrowing cast: 0.99 -> 0.46 ms against a masked assignment and a uint16 sign pass.
    """
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    a = u & np.uint32(0x7FFFFFFF)
    h = a >> 13
    h &= np.uint32(1)
    h += np.uint32(0xFFF)
    h += a
    h >>= 13  # the mantissa rounded to 10 bits, ties to even
    h -= np.uint32(112 << 10)  # exponent bias 127 -> 15 (wraps below half's range: zeroed next)
    np.minimum(h, np.uint32(0x7C00), out=h)  # overflow -> inf (NaN too: the step fails either way)
    h *= a >= np.uint32(113 << 23)
    sign = u >> 16
    sign &= np.uint32(0x8000)
    h |= sign
    return h.astype(np.uint16)


def half_decode(q: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """IEEE half bit patterns -> float32 divided by ``scale``, exactly for a power of two
    (0.3 ms here against ``astype``'s 0.6)."""
    u = q.astype(np.uint32)
    em = u & np.uint32(0x7FFF)
    em <<= 13
    f = em.view(np.float32)
    inf = em >= np.uint32(0x7C00 << 13)
    f *= np.float32(2.0 ** 112 / scale)  # exponent bias 15 -> 127 (subnormal halves too), and the scale
    f[inf] = np.inf
    u &= np.uint32(0x8000)
    u <<= 16
    em |= u
    return f


def fp16_encode(x: np.ndarray, scale: float) -> np.ndarray:
    """``x * scale`` as half floats (uint16 bit patterns); beyond 65504 it is inf."""
    return half_encode(x * np.float32(scale))


def fp16_decode(q: np.ndarray, scale: float) -> np.ndarray:
    return half_decode(q, scale)


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)


def bf16_decode(q: np.ndarray) -> np.ndarray:
    return (q.astype(np.uint32) << 16).view(np.float32)


#: What the ring (`dpcnn.ring`) adds with: (decode to float32, encode to the wire) of each 16-bit format.
CODECS = {"fp16": (half_decode, half_encode), "bf16": (bf16_decode, bf16_encode)}


def plan(step_ranges: list[tuple[int, int]], trainable: int, total: int, bucket_bytes: int,
         itemsize: int) -> list[tuple[int, int]]:
    """Buckets ``(lo, hi)`` of the buffer in the order they are started.

    ``step_ranges``: the gradient range of every model step that has parameters, in layer
    order (backward writes them last to first). Steps are gathered from the end until a
    bucket holds at least ``bucket_bytes``; a step is never split (its gradient is written
    at once). ``bucket_bytes=0``: a bucket per step. The last bucket is ``[trainable, total)``:
    batch statistics and slots.
    """
    buckets, hi = [], trainable
    for lo, _ in reversed(step_ranges):
        if (hi - lo) * itemsize >= bucket_bytes:
            buckets.append((lo, hi))
            hi = lo
    if hi > 0:
        buckets.append((0, hi))
    return buckets + [(trainable, total)]


class Reducer:
    """Starts, drives and completes the buckets of one step's reduction (see the module docstring).

    ``buf`` is the step buffer (gradients then slots), ``trainable`` the length of its
    compressible front, ``wire`` one of `WIRES`, ``overlap`` whether buckets start during
    backward (else all start at `finish`). ``start_times`` / ``done_times`` keep this step's
    bucket stamps for the timeline.
    """

    def __init__(self, dist, buf: np.ndarray, buckets: list[tuple[int, int]], trainable: int,
                 wire: str = "none", overlap: bool = True):
        self.dist, self.buf, self.buckets, self.trainable = dist, buf, buckets, trainable
        self.overlap = overlap and dist.size > 1
        self.wire = wire if wire != "none" and dist.size > 1 else None
        #: Each rank's rounding residual (error feedback): part of the resume state.
        self.residual = np.zeros(trainable, np.float32) if self.wire else None
        self._wires = [np.empty(hi - lo, np.uint16) for lo, hi in buckets] if self.wire else None
        self.comm = dist.side_comm() if self.wire else None  # the rings' own (every rank builds a Reducer)
        self.begin()

    def begin(self, scale: float = 1.0) -> None:
        """A new step: nothing started. ``scale``: the global batch size (fp16's scaling)."""
        self.started, self.reqs, self.scale = 0, [], float(scale)
        self.start_times = [np.nan] * len(self.buckets)
        self.done_times = [np.nan] * len(self.buckets)

    def ready(self, offset: int) -> None:
        """Backward has written ``buf[offset:trainable]``: start the buckets that lie in it, test the rest."""
        if not self.overlap:
            return
        while self.started < len(self.buckets) - 1 and self.buckets[self.started][0] >= offset:
            self._start(self.started)
        self._test()

    def poll(self) -> None:
        """Inside a long backward step: test the buckets in flight (a no-op before the first starts)."""
        if self.started:
            self._test()

    def finish(self) -> None:
        """Start every bucket not yet started (the tail last), wait for all, write the sums into ``buf``."""
        while self.started < len(self.buckets):
            self._start(self.started)
        self._test()
        self.dist.wait_sums_(self.reqs)
        now = time.perf_counter()
        self.done_times = [now if np.isnan(t) else t for t in self.done_times]
        if self.wire:
            for i, (lo, hi) in enumerate(self.buckets[:-1]):
                self.buf[lo:hi] = self._decode(self._wires[i])

    def _start(self, i: int) -> None:
        lo, hi = self.buckets[i]
        data = self.buf[lo:hi]
        if self.wire and i < len(self.buckets) - 1:
            data = self._encode(i, lo, hi)
        wire = self.wire if data.dtype == np.uint16 else None
        self.reqs.append(self.dist.start_sum_(data, wire, self.comm, tag=i))
        self.start_times[i] = time.perf_counter()
        self.started += 1

    def _encode(self, i: int, lo: int, hi: int) -> np.ndarray:
        """This rank's part of bucket i, with last step's residual, as 16 bits; the new residual kept."""
        v = np.add(self.buf[lo:hi], self.residual[lo:hi], dtype=np.float32)
        q = self._wires[i]
        q[...] = fp16_encode(v, self.scale) if self.wire == "fp16" else bf16_encode(v)
        with np.errstate(invalid="ignore"):  # inf - inf on overflow: the step fails as diverged anyway
            self.residual[lo:hi] = v - self._decode(q)
        return q

    def _decode(self, q: np.ndarray) -> np.ndarray:
        return fp16_decode(q, self.scale) if self.wire == "fp16" else bf16_decode(q)

    def _test(self) -> None:
        """Drive MPI's progress; note when each bucket is seen complete."""
        for i, req in enumerate(self.reqs):
            if req is not None and np.isnan(self.done_times[i]) and req.Test():
                self.done_times[i] = time.perf_counter()

    # --- resume ----------------------------------------------------------------------
    def state(self, dist) -> dict[str, np.ndarray]:
        """The error-feedback residuals of every rank ``(size, trainable)`` on rank 0, for the
        checkpoint (a collective: every rank calls it). Empty without compression."""
        if self.residual is None:
            return {}
        rows = dist.gather_rows(self.residual)
        return {"grad_residual": rows} if dist.is_root else {}

    def load_state(self, rows: np.ndarray | None, dist) -> str | None:
        """Give rank r its residual row of a checkpoint (``rows`` on rank 0; every rank calls this).
        Returns a warning for rank 0 to print when the rows could not be used as they are."""
        if self.residual is None:
            return "the checkpoint's gradient-compression residual is dropped (this run sends no 16-bit gradients)" \
                if rows is not None else None
        shape = dist.bcast(None if rows is None else rows.shape)
        if shape is None:
            return None
        note = None
        if dist.is_root and (shape[0] != dist.size or shape[1] != self.trainable):
            if shape[1] != self.trainable:
                rows, note = np.zeros((dist.size, self.trainable), np.float32), "does not fit this model: zeroed"
            else:  # another world size: the sum of what is still unsent is kept, on rank 0
                total, rows = rows.sum(axis=0), np.zeros((dist.size, self.trainable), np.float32)
                rows[0], note = total, f"was written by {shape[0]} ranks: its sum goes on with rank 0"
        dist.scatter_rows(rows if dist.is_root else None, self.residual)
        return f"the checkpoint's gradient-compression residual {note}" if note else None
