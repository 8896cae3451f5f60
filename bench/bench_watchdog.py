"""What the collective watchdog costs a training step.

Every rank runs the real step of `small` (forward, backward on its shard of a
global batch of 64, the step buffer's Allreduce) in interleaved windows:

* ``watchdog``: as dpcnn trains, every collective inside ``Watchdog.watch``;
* ``no watchdog``: the same step with the collectives unwatched (the watchdog
  thread still polls in the background, so its wake-ups are in both figures).

Prints ms per step (median of the windows) and the overhead in percent, and the
cost of one ``watch()`` by itself.

    mpirun -n 2 python bench/bench_watchdog.py [--windows 9] [--reps 30]

Writes bench/watchdog.json on rank 0.
"""

from __future__ import annotations

import argparse
import time

import common
import numpy as np

from dpcnn.dist import Dist
from dpcnn.step import StepBuffer, shard_start
from dpcnn.watchdog import NullWatchdog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=9)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    dist = Dist()
    model = common.Model.from_config(common.model_spec("small"), seed=0)
    step = StepBuffer(model)
    rng = np.random.default_rng(dist.rank)
    n = args.batch // dist.size
    x = rng.standard_normal((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, n)
    watched, unwatched = dist.watchdog, NullWatchdog()

    def run(watchdog) -> None:
        dist.watchdog = watchdog
        step.clear_slots()
        step.shard_gradient(x, y, args.batch, shard_start(args.batch, dist))
        step.reduce(dist)

    times = common.interleaved({"watchdog": lambda: run(watched), "no watchdog": lambda: run(unwatched)},
                               windows=args.windows, reps=args.reps)
    dist.watchdog = watched
    t0, calls = time.perf_counter(), 100_000
    for _ in range(calls):
        with watched.watch("step"):
            pass
    per_watch_us = (time.perf_counter() - t0) / calls * 1e6
    worst = max(dist.allgather(times["watchdog"] / times["no watchdog"] - 1))
    if dist.is_root:
        on, off = times["watchdog"] * 1e3, times["no watchdog"] * 1e3
        print(f"{dist.size} ranks, small, global batch {args.batch}, load {common.load_average():.1f}")
        print(f"step with watchdog {on:.3f} ms, without {off:.3f} ms: overhead {100 * (on / off - 1):+.2f} % "
              f"(largest rank {100 * worst:+.2f} %); one watch() {per_watch_us:.2f} us = "
              f"{100 * per_watch_us / (off * 1e3):.3f} % of a step")
        common.write_json("watchdog.json", {"machine": common.machine(), "ranks": dist.size, "batch": args.batch,
                                            "step_ms_watchdog": on, "step_ms_no_watchdog": off,
                                            "overhead_pct_largest_rank": 100 * worst, "watch_us": per_watch_us})


if __name__ == "__main__":
    main()
