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
per-example gradients: inside its range, above most of its subnormals,
which keep fewer bits); a gradient that
overflows fp16 becomes inf, and the step's finiteness check stops the run as
diverged before any weight changes. bf16 has float32's range and 8 bits of
mantissa. The slots and batch statistics stay in full precision. Rounding
the sums on the ring's hops is not fed back: at P >= 3 ranks a value is rounded
P - 1 more times (at 2 the sum is float32; bench/RESULTS.md has the accuracy).
"""

from __future__ import annotations

import time

import numpy as np

#: ``trainer.grad_compression`` values.
WIRES = ("none", "fp16", "bf16")


#: x * 2**-112 puts a half float's exponent in float32's low 5 exponent bits (bias 127 -> 15):
#: half's subnormals become float32's, and a half's bit pattern is the float32's bits >> 13.
_DOWN = 2.0 ** -112
#: Between the largest finite half (65504) and inf (whose bits read 65536), `_DOWN`-scaled.
_RAW_INF = np.float32(65520.0 * _DOWN)


def _half_round(y: np.ndarray) -> np.ndarray:
    """``y`` (float32 of `_DOWN`-scaled values, changed in place) rounded to half's 10-bit mantissa,
    ties to even: its uint32 bits, still a float32 (the value on the wire, for the residual)."""
    u = y.view(np.uint32)
    odd = u >> 13
    odd &= np.uint32(1)
    u += odd
    u += np.uint32(0xFFF)
    u &= np.uint32(0xFFFFE000)
    return u


def _half_pack(u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`_half_round`'s bits -> IEEE half bit patterns (uint16); beyond 65504 (and NaN) inf."""
    m = u >> 13
    sign = m >> 3
    sign &= np.uint32(0x8000)
    m &= np.uint32(0x3FFFF)
    np.minimum(m, np.uint32(0x7C00), out=m)
    m |= sign
    if out is None:
        return m.astype(np.uint16)
    np.copyto(out, m, casting="unsafe")
    return out


def _half_from_raw(y: np.ndarray) -> np.ndarray:
    """`_DOWN`-scaled float32 (changed in place) -> IEEE half bit patterns (uint16)."""
    return _half_pack(_half_round(y))


def _half_to_raw(q: np.ndarray) -> np.ndarray:
    """IEEE half bit patterns -> float32 of the `_DOWN`-scaled values: no multiply, the bits shifted
    and the sign kept by the int16 -> int32 widening. inf and NaN (which would come out as finite
    numbers there) are found by the array's max and min and set, the rare fix-up only when there are
    any, so a sum that holds an inf stays inf."""
    i = q.view(np.int16).astype(np.int32)
    i <<= 13
    u = i.view(np.uint32)
    u &= np.uint32(0x8FFFFFFF)
    f = u.view(np.float32)
    if f.size and (f.max() >= _RAW_INF or f.min() <= -_RAW_INF):
        big = np.abs(f) >= _RAW_INF
        f[big] = np.where(q[big] & np.uint16(0x3FF), np.float32(np.nan), np.copysign(np.float32(np.inf), f[big]))
    return f


def half_encode(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``x * scale`` (float32) -> IEEE half bit patterns (uint16), rounded to nearest, ties to even;
    beyond 65504 inf.

    One float multiply moves the exponent (and makes half's subnormals float32's), then integer
    passes round and pack. For small's 206,922 floats on the AVX-512 EPYC of 2026-12-03, encoding
    a step's gradient with its error-feedback residual: 0.34-0.49 ms against 0.63-0.71 ms for the
    codec before it (integer rebias, a masked inf fix-up, the residual through a full decode),
    freed memory kept (`dpcnn.memory`). With glibc's defaults, which map temporaries anew on
    every call in some heap states, the old codec took 3.1-3.8 ms and this one 0.45-0.54 (or
    1.7-2.3 in another heap state). NumPy's own ``astype(np.float16)`` alone takes 1.7 ms (one
    element at a time). The same bits as ``astype`` on half's normal range; its subnormals are
    rounded twice (in the multiply, then to 10 bits), so 4 in 144,520 land one unit off (error
    feedback carries the difference).
    """
    return _half_from_raw(np.multiply(x, np.float32(scale * _DOWN), dtype=np.float32))


def half_decode(q: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """IEEE half bit patterns -> float32 divided by ``scale`` (exactly, for a power of two), inf and NaN kept."""
    return _half_unscale_(_half_to_raw(q), scale)


def _half_unscale_(f: np.ndarray, scale: float) -> np.ndarray:
    """`_DOWN`-scaled float32 (half's values, or a sum of them) -> the values divided by ``scale``, in place."""
    f *= np.float32(1.0 / (scale * _DOWN))
    return f


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)


def bf16_decode(q: np.ndarray) -> np.ndarray:
    return (q.astype(np.uint32) << 16).view(np.float32)


#: What the ring (`dpcnn.ring`) adds with: (decode, encode) between each 16-bit format and the float32
#: numbers it sums. fp16's are the `_DOWN`-scaled values, so a hop multiplies nothing (decode, add and
#: encode of half of small's gradient: 0.33-0.46 -> 0.30 ms, memory kept; the sum's rounding is the
#: same but in half's subnormals, where it can round twice); bf16's are the values themselves.
CODECS = {"fp16": (_half_to_raw, _half_from_raw), "bf16": (bf16_decode, bf16_encode)}


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
                total = self.reqs[i].total()  # (fp16: `_DOWN`-scaled, as the ring adds them)
                self.buf[lo:hi] = _half_unscale_(total, self.scale) if self.wire == "fp16" else total

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
        if self.wire == "fp16":  # the rounded value is at hand: the residual without a decode
            sent = _half_round(np.multiply(v, np.float32(self.scale * _DOWN), dtype=np.float32))
            _half_pack(sent, out=q)
            # = half_decode(q), but for inf (the step fails then)
            sent = _half_unscale_(sent.view(np.float32), self.scale)
        else:
            q[...] = bf16_encode(v)
            sent = bf16_decode(q)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf on overflow: the step fails as diverged anyway
            np.subtract(v, sent, out=self.residual[lo:hi])
        return q

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
