"""The figures of an epoch: running step totals, and the evaluation every rank shares."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import numpy as np

from . import faults, timeline
from .data import EpochSampler
from .dist import Dist
from .model import Model
from .resume import Position
from .timeline import StepClock


def eval_sums(model: Model, x: np.ndarray, y: np.ndarray, dist: Dist, batch_size: int) -> np.ndarray:
    """This rank's share of an evaluation: float64 ``[loss sum, correct]`` over its slice of (x, y)."""
    mine = EpochSampler.shard(np.arange(len(x)), dist.rank, dist.size)
    sums = np.zeros(2, np.float64)
    for i in range(0, len(mine), batch_size):
        idx = mine[i:i + batch_size]
        logits = model.forward(x[idx], train=False)
        sums[0] += model.loss.forward(logits, y[idx], denom=1)
        sums[1] += (logits.argmax(1) == y[idx]).sum()
    return sums


@dataclass
class EpochStats:
    """Running totals of one epoch's steps (global figures: every rank has the same)."""

    seen: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    step_time: float = 0.0
    comm_time: float = 0.0
    started: float = field(default_factory=time.perf_counter)  # wall clock at the epoch's first step
    clock: StepClock | None = None  # the step buffer's stamps, split at the end (dpcnn.timeline)

    def __post_init__(self):
        if self.clock is not None:
            self.clock.new_epoch()

    def add(self, batch: int, mean_loss: float, correct: int, step_time: float, comm_time: float) -> None:
        self.seen += batch
        self.loss_sum += mean_loss * batch
        self.correct += correct
        self.step_time += step_time
        self.comm_time += comm_time

    @property
    def img_per_s(self) -> float:
        return self.seen / self.step_time if self.step_time else 0.0

    def metrics(self) -> dict:
        """The epoch's figures. Two throughputs: ``img_per_s`` over the steps alone, ``wall_img_per_s`` over
        the epoch's wall clock up to now (everything between the steps and the evaluation included)."""
        wall = time.perf_counter() - self.started
        return {"train_loss": self.loss_sum / self.seen, "train_acc": self.correct / self.seen,
                "img_per_s": self.img_per_s, "wall_img_per_s": self.seen / wall if wall > 0 else 0.0,
                "allreduce_frac": self.comm_time / self.step_time, "step_time_s": self.step_time,
                "epoch_time_s": wall}


def evaluate_splits(model: Model, data, dist: Dist, batch_size: int, step: int = 0) -> dict:
    """test (and, with a validation split, val) loss and accuracy, and the largest rank's peak memory.

    Each rank scores its slice; an exception on any rank is agreed before the one reduction,
    so every rank raises it together (and rank 0 can mark the run FAILED) instead of hanging.
    """
    splits = {"test": data.test, **({"val": data.val} if data.val is not None else {})}

    def local() -> np.ndarray:
        faults.check("eval", dist.rank, step)
        return np.concatenate([eval_sums(model, x, y, dist, batch_size) for x, y in splits.values()]
                              + [[_peak_rss_mb()]])

    sums = dist.agree(local, what="evaluation")
    dist.allreduce_sum_(sums[:-1], what="evaluation")
    out = {"peak_rss_mb": max(dist.allgather(float(sums[-1]), "evaluation"))}
    for n, (name, (x, _)) in enumerate(splits.items()):
        out.update({f"{name}_loss": sums[2 * n] / len(x), f"{name}_acc": sums[2 * n + 1] / len(x)})
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def end_epoch(model: Model, data, dist: Dist, out, pos: Position, stats, started: float,
              eval_batch_size: int) -> dict:
    """Evaluate, append the epoch's metrics to the history, report them; returns the summary metrics."""
    evaluated = evaluate_splits(model, data, dist, eval_batch_size, pos.step)  # and peak_rss_mb: the largest rank's
    comm = timeline.epoch_comm(stats.clock, dist) if stats.clock is not None else {}  # waiting vs transfer
    if stats.clock is not None and out.cfg.trainer.profile:
        out.timeline(timeline.gather(stats.clock, dist), dist.hosts, pos)
    metrics = {"epoch": pos.epoch if pos.batch == 0 else pos.epoch + 1, "step": pos.step,
               **stats.metrics(),  # after the evaluation: the wall-clock figures include it
               **comm, **evaluated, "elapsed_s": time.perf_counter() - started}  # wall time of training so far
    pos.history.append(metrics)
    out.epoch(metrics, pos.step)
    return {k: v for k, v in metrics.items() if k.endswith(("_acc", "_loss"))}
