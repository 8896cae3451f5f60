"""The step buffer: one flat array that carries a whole training step across the ranks.

Layout: ``[gradients (num_params) | LOSS | CORRECT | STOP | ERROR]``. Each rank
writes (sum of its shard's gradients) / (global batch size) into the front and
its loss sum, correct count and flags into the slots; one in-place SUM
Allreduce (`StepBuffer.reduce`) makes the front the global-batch mean gradient
and the slots the global totals, on every rank. So a failure or a stop signal
on any rank is known to all of them at the same step, with no extra collective.

With ``micro_batch`` the buffer sums the micro-batches' gradients (see
`micro_slices`) in a way that does not depend on how the ranks share them,
which makes float32 runs bitwise identical at every world size (`sum_dtype`:
float64, or the model's dtype where a step has at most two micro-batches);
the optimizer then gets a separate gradient in the model's dtype. Where each
shard is one micro-batch, it is computed whole (`one_piece_a_rank`).

A model with batchnorm layers has running statistics at the end of its
parameters; the matching end of the gradients holds the step's batch
statistics (each micro-batch's, weighted by its share of the global batch),
so the same reduction averages them and every rank then moves the running
statistics the same way (`Model.update_running_stats`). The optimizer gets
the trainable part only.

The reduction runs in buckets (`dpcnn.buckets`): with ``overlap`` each starts
as soon as backward has written it, and the tail bucket (batch statistics and
slots) last, so it is still one logical reduction that every rank completes
at the same step. `clock` stamps the step for the timeline (`dpcnn.timeline`).
"""

from __future__ import annotations

import math
import sys
import time
import traceback

import numpy as np

from . import buckets, faults
from .data import EpochSampler
from .dist import Dist
from .model import Model
from .timeline import StepClock

# Slots after the gradients, summed over ranks by the step's Allreduce.
LOSS, CORRECT, STOP, ERROR = range(4)


def micro_slices(start: int, length: int, micro: int) -> list[slice]:
    """A shard's micro-batches, as slices of the shard. The shard is global positions
    [start, start + length) of its batch; it is cut at the multiples of ``micro``, so where
    shards are whole micro-batches every world size computes the very same micro-batches.
    Summed and reduced in float64 (nearly exact, so the order of the additions no longer
    matters), they make the trajectory the same at every world size (README)."""
    cuts = [start, *range((start // micro + 1) * micro, start + length, micro), start + length]
    return [slice(a - start, b - start) for a, b in zip(cuts, cuts[1:]) if b > a]


def shard_pieces(global_batch: int, world_size: int, micro: int) -> list[int]:
    """How many pieces (`micro_slices`) each rank's shard of a step of ``global_batch`` examples is cut into."""
    ends = [EpochSampler.shard_start(global_batch, r, world_size) for r in range(world_size + 1)]
    return [len(micro_slices(a, b - a, micro)) for a, b in zip(ends, ends[1:])]


def sum_dtype(dtype, micro: int | None, step_batches, world_size: int) -> np.dtype:
    """The step buffer's dtype: the model's ``dtype``, but float64 for micro-batches whose sum must not
    depend on the world size, unless every step (of the global sizes ``step_batches``) has at most two
    pieces over all ranks. Two floats a + b are one correctly rounded, commutative addition: the same
    number as float64's (exact) a + b rounded to ``dtype``, whichever rank holds which, at half the
    bytes on the wire (small at 2 ranks, batch 64 in micro-batches of 32: float64 cost 9.9 % img/s)."""
    dtype = np.dtype(dtype)
    if not micro or (step_batches and all(sum(shard_pieces(b, world_size, micro)) <= 2 for b in step_batches)):
        return dtype
    return np.dtype(np.float64)


def one_piece_a_rank(micro: int | None, step_batches, world_size: int) -> bool:
    """Whether every shard of every step is one micro-batch: then the whole-shard path (the model writes
    the buffer itself, no sum) computes just what the micro-batch path would."""
    return bool(micro and step_batches and all(set(shard_pieces(b, world_size, micro)) == {1} for b in step_batches))


class StepBuffer:
    """The gradient view, the metric and flag slots, and the step's one reduction."""

    def __init__(self, model: Model, micro_batch: int | None = None, dist: Dist | None = None,
                 overlap: bool = False, bucket_bytes: int = 0, compression: str = "none",
                 step_batches: tuple[int, ...] = ()):
        """``step_batches``: the global batch sizes of the steps to come (`EpochSampler.batch_sizes`),
        which may let micro-batches sum in the model's dtype (`sum_dtype`; default float64)."""
        n = self.n = model.num_params
        self.world_size = dist.size if dist is not None else 1
        self.buf = np.zeros(n + 4, sum_dtype(model.dtype, micro_batch, step_batches, self.world_size))
        #: Micro-batches to cut shards into: None where every shard of the run is one (`one_piece_a_rank`).
        self.micro = None if one_piece_a_rank(micro_batch, step_batches, self.world_size) else micro_batch
        self._step_batches, self._asked = set(step_batches), micro_batch
        # What the model writes: the reduced buffer's front itself, or (micro-batches) a copy.
        model.bind_grads(np.zeros(n, model.dtype) if self.micro else self.buf[:n])
        #: What the optimizer reads: the trainable part (without the batch statistics).
        self.grad = model.grads[:model.num_trainable]
        self.model = model
        ranges = [r for r in model.grad_ranges() if r is not None]
        plan = buckets.plan(ranges, model.num_trainable, n + 4, bucket_bytes, self.buf.itemsize)
        self.reducer = buckets.Reducer(dist, self.buf, plan, model.num_trainable, compression,
                                       overlap) if dist is not None else None
        self.clock = StepClock(len(plan))
        model.on_forward_done = self.clock.forward_done
        self._accumulated = model.num_trainable  # micro-batches: grads[this:trainable] already added to buf
        self._step = None

    def shard_gradient(self, x: np.ndarray, y: np.ndarray, global_batch: int, shard_start: int,
                       step: int | None = None) -> None:
        """This rank's part of the step: gradient of (its loss sum / global batch) into the buffer.

        ``x`` (m, h, w, c), ``y`` (m,) is this rank's shard, starting at position
        ``shard_start`` of the global batch of ``global_batch`` examples; ``step``
        (the optimizer step about to be taken) and the positions fix the dropout masks.
        """
        if self._asked and self._step_batches and global_batch not in self._step_batches:
            raise ValueError(f"a step of {global_batch} examples, but this step buffer sums micro-batches for "
                             f"steps of {sorted(self._step_batches)}: give StepBuffer every batch size of the run")
        if self.reducer is not None:
            self.reducer.scale, self._step = global_batch, step
        try:
            self._shard_gradient(x, y, global_batch, shard_start, step)
        finally:
            self.model.on_grads_ready = self.model.on_progress = None  # (a later loss_and_grads outside a step)

    def _shard_gradient(self, x, y, global_batch: int, shard_start: int, step: int | None) -> None:
        if not self.micro:
            self.model.on_grads_ready = self._ready if self.reducer is not None and self.reducer.overlap else None
            self.model.on_progress = self.reducer.poll if self.model.on_grads_ready else None
            self.buf[self.n + LOSS], self.buf[self.n + CORRECT] = \
                self.model.loss_and_grads(x, y, denom=global_batch, step=step, start=shard_start)
            self.clock.backward_done()
            return
        self.buf[:self.n] = 0
        parts = micro_slices(shard_start, len(x), self.micro)
        for k, part in enumerate(parts):
            # The last micro-batch adds each layer's gradient as backward writes it, and its buckets start.
            last = k == len(parts) - 1 and self.reducer is not None and self.reducer.overlap
            self.model.on_grads_ready, self._accumulated = (self._ready if last else None), self.model.num_trainable
            self.model.on_progress = self.reducer.poll if last else None
            self.clock.part_start()
            loss, correct = self.model.loss_and_grads(x[part], y[part], denom=global_batch, step=step,
                                                      start=shard_start + part.start)
            self.buf[:self._accumulated] += self.model.grads[:self._accumulated]
            self.buf[self.model.num_trainable:self.n] += self.model.grads[self.model.num_trainable:]
            self.buf[self.n + LOSS] += loss
            self.buf[self.n + CORRECT] += correct
            self.clock.backward_done()

    def _ready(self, offset: int) -> None:
        """Backward wrote ``grads[offset:trainable]``: (micro-batches: add it to the sum, then) start its buckets."""
        if self.micro:
            self.buf[offset:self._accumulated] += self.model.grads[offset:self._accumulated]
            self._accumulated = offset
        self.reducer.ready(offset)
        if self.reducer.started:  # the failure tests: a rank that fails or stalls with a bucket in flight
            faults.check("backward", self.reducer.dist.rank, self._step)

    def clear_slots(self) -> None:
        """A step begins: zero the metric and flag slots, no bucket started, the clock running."""
        self.buf[self.n:] = 0
        self.clock.start()
        if self.reducer is not None:
            self.reducer.begin()

    def fail(self, rank: int, step: int) -> None:
        """Report this rank's exception (call from ``except``); every rank learns it at `reduce`."""
        print(f"dpcnn: rank {rank} failed at step {step}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        self.buf[self.n + ERROR] = 1

    def request_stop(self, stop: bool) -> None:
        self.buf[self.n + STOP] = bool(stop)

    def reduce(self, dist: Dist) -> None:
        """The step's one collective: mean gradient + metrics + flags, identical on every rank; then
        the batchnorm running statistics move (unless a rank failed or the loss is not finite)."""
        t0 = time.perf_counter()
        if self.reducer is None:
            dist.allreduce_sum_(self.buf)
        else:
            self.reducer.finish()
        r, none = self.reducer, [(math.nan, math.nan)] * ((self.clock.width - 6) // 2)
        self.clock.reduction(t0, time.perf_counter(), list(zip(r.start_times, r.done_times)) if r else none)
        if self.micro:
            self.model.grads[...] = self.buf[:self.n]
        if self.model.num_trainable < self.n and not self.error and math.isfinite(self.loss):
            self.model.update_running_stats(self.model.grads[self.model.num_trainable:])

    @property
    def loss(self) -> float:
        return float(self.buf[self.n + LOSS])

    @property
    def correct(self) -> int:
        return int(self.buf[self.n + CORRECT])

    @property
    def stop(self) -> bool:
        return bool(self.buf[self.n + STOP])

    @property
    def error(self) -> bool:
        return bool(self.buf[self.n + ERROR])


def shard_start(global_batch: int, dist: Dist) -> int:
    """Where this rank's shard starts in a global batch."""
    return EpochSampler.shard_start(global_batch, dist.rank, dist.size)
