"""Where each rank's step goes: forward, backward, waiting for the slowest rank, transfer.

Every rank stamps each step (`StepClock`: a row of perf_counter times, a few
microseconds a step). At the end of an epoch `epoch_comm` splits the time the
ranks spent in the step's reduction, with two small collectives:

- a rank that reached the reduction last waited only for the data to move, so
  per step the *transfer* is the shortest time any rank spent in it (an MPI MIN
  over the epoch's steps);
- what a rank spent there beyond that was *waiting* for the slowest rank.

No clocks are compared across ranks for that. With ``trainer.profile=true``
rank 0 also gathers the rows and writes a Chrome trace (``timeline.json``, one
process per rank: open it in chrome://tracing or ui.perfetto.dev) and a PNG of
per-rank stacked bars; both are logged to MLflow under ``timeline/``. Ranks'
clocks are aligned by the moment they leave the same reduction (all of them
leave it within a message latency of each other), so hosts need no common clock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

# Columns of a row: start, forward s, backward s, reduction start, reduction end, step end, then per bucket
# (start, seen complete).
START, FWD, BWD, RED0, RED1, END = range(6)


class StepClock:
    """This rank's step stamps for the current epoch."""

    def __init__(self, num_buckets: int):
        self.width = 6 + 2 * num_buckets
        self.rows: list[np.ndarray] = []
        self.row = np.zeros(self.width)
        self._mark = 0.0

    def new_epoch(self) -> None:
        self.rows = []

    def start(self) -> None:
        self.row = np.zeros(self.width)
        self.row[START] = self._mark = time.perf_counter()

    def forward_done(self) -> None:
        now = time.perf_counter()
        self.row[FWD] += now - self._mark
        self._mark = now

    def backward_done(self) -> None:
        now = time.perf_counter()
        self.row[BWD] += now - self._mark
        self._mark = now

    def part_start(self) -> None:
        """A micro-batch begins (its forward is timed from here)."""
        self._mark = time.perf_counter()

    def reduction(self, started: float, ended: float, buckets: list[tuple[float, float]]) -> None:
        self.row[RED0], self.row[RED1] = started, ended
        self.row[6:] = np.ravel(buckets)

    def end(self) -> tuple[float, float]:
        """The step is over: keep its row; returns (step seconds, seconds in the reduction)."""
        self.row[END] = time.perf_counter()
        self.rows.append(self.row)
        return self.row[END] - self.row[START], self.row[RED1] - self.row[RED0]

    def table(self) -> np.ndarray:
        return np.array(self.rows) if self.rows else np.zeros((0, self.width))


def epoch_comm(clock: StepClock, dist) -> dict:
    """The epoch's reduction time split into waiting and transfer, as shares of the step (every rank
    gets the same figures): ``allreduce_frac = comm_wait_frac + comm_transfer_frac`` (means over ranks)."""
    t = clock.table()
    exposed = t[:, RED1] - t[:, RED0]
    transfer = exposed.copy()
    dist.allreduce_(transfer, op="min", what="evaluation")
    totals = np.array([exposed.sum(), (t[:, END] - t[:, START]).sum(), (t[:, FWD] + t[:, BWD]).sum()])
    dist.allreduce_(totals, what="evaluation")
    step_total = totals[1] or 1.0
    moved = dist.size * transfer.sum()
    return {"allreduce_frac": totals[0] / step_total, "comm_wait_frac": (totals[0] - moved) / step_total,
            "comm_transfer_frac": moved / step_total}


def gather(clock: StepClock, dist) -> np.ndarray | None:
    """Every rank's rows ``(size, steps, width)`` on rank 0 (``trainer.profile``)."""
    return dist.gather_rows(clock.table(), what="evaluation")


def _aligned(rows: np.ndarray) -> np.ndarray:
    """Each rank's stamps on rank 0's clock: shifted by the median gap at the reduction's end."""
    out = rows.copy()
    if rows.shape[1]:
        offsets = np.median(rows[:, :, RED1] - rows[0][None, :, RED1], axis=1)
        stamps = [START, RED0, RED1, END, *range(6, rows.shape[2])]
        out[:, :, stamps] -= offsets[:, None, None]
    return out


def trace_events(rows: np.ndarray, hosts: list[str], first_step: int, t0: float) -> list[dict]:
    """Chrome trace events (``ph: X``, microseconds from ``t0``) of one epoch: pid = rank, tid 0 the
    compute, tid 1 the buckets in flight."""
    rows, events = _aligned(rows), []
    us = lambda t: round((t - t0) * 1e6, 1)  # noqa: E731
    for rank, table in enumerate(rows):
        for k, r in enumerate(table):
            step = {"step": first_step + k}
            fwd_end = r[START] + r[FWD]
            spans = [("forward", r[START], fwd_end), ("backward", fwd_end, fwd_end + r[BWD]),
                     ("allreduce (wait + transfer)", r[RED0], r[RED1]), ("optimizer", r[RED1], r[END])]
            events += [{"name": n, "ph": "X", "pid": rank, "tid": 0, "ts": us(a), "dur": us(b) - us(a),
                        "args": step} for n, a, b in spans if b > a]
            for b, (a, z) in enumerate(r[6:].reshape(-1, 2)):
                if np.isfinite(a) and np.isfinite(z):
                    events.append({"name": f"bucket {b}", "ph": "X", "pid": rank, "tid": 1, "ts": us(a),
                                   "dur": max(us(z) - us(a), 0.0), "args": step})
    return events


def trace_metadata(hosts: list[str]) -> list[dict]:
    meta = []
    for rank, host in enumerate(hosts):
        meta.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank} ({host})"}})
        meta.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        meta += [{"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}}
                 for tid, name in ((0, "compute"), (1, "buckets in flight"))]
    return meta


def per_rank_ms(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Mean ms per step of each rank: compute (forward + backward), waiting, transfer, the rest."""
    exposed = rows[:, :, RED1] - rows[:, :, RED0]
    transfer = exposed.min(axis=0, keepdims=True)
    step = rows[:, :, END] - rows[:, :, START]
    compute = rows[:, :, FWD] + rows[:, :, BWD]
    parts = {"compute": compute, "waiting": exposed - transfer, "transfer": np.broadcast_to(transfer, exposed.shape),
             "other": step - compute - exposed}
    return {k: 1e3 * v.mean(axis=1) for k, v in parts.items()}


def write(directory: Path, events: list[dict], rows: np.ndarray, hosts: list[str], epoch: int) -> list[Path]:
    """``timeline.json`` (every epoch so far) and ``timeline.png`` (this epoch's bars); returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    trace = directory / "timeline.json"
    tmp = trace.with_suffix(".tmp")
    tmp.write_text(json.dumps({"traceEvents": trace_metadata(hosts) + events, "displayTimeUnit": "ms"}))
    tmp.replace(trace)
    png = directory / "timeline.png"
    _bars(per_rank_ms(rows), hosts, epoch, png)
    return [trace, png]


def _bars(ms: dict[str, np.ndarray], hosts: list[str], epoch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = np.arange(len(hosts))
    slowest = int(np.argmax(ms["compute"]))
    fig, ax = plt.subplots(figsize=(7, 1.6 + 0.45 * len(hosts)))
    left = np.zeros(len(hosts))
    for (name, vals), colour in zip(ms.items(), ("#4c72b0", "#dd8452", "#c44e52", "#8c8c8c")):
        ax.barh(ranks, vals, left=left, color=colour, label=name)
        left += vals
    ax.set_yticks(ranks, [f"rank {r} ({h}){'  ← slowest' if r == slowest else ''}" for r, h in enumerate(hosts)])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (mean)")
    ax.set_title(f"epoch {epoch}: where each rank's step goes")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45 if len(hosts) < 4 else -0.2), fontsize="small",
              ncols=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
