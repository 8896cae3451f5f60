"""The step's reduction alone: what each wire format costs a rank, with no compute to hide behind.

    mpirun -n 2 python bench/bench_reduce.py [--model small] [--rounds 5] [--iters 60]

Every rank builds the trainer's `dpcnn.step.StepBuffer` (overlap on, the default
buckets) for each ``trainer.grad_compression`` (none, fp16, bf16) and times,
after a barrier, one whole reduction of a gradient of the model's size: the
buckets started as backward would start them (``Reducer.ready``: fp16/bf16
encode here, with error feedback), then ``Reducer.finish`` (the wire, the
sums, the decode into the buffer). Rounds of the three are interleaved; each
figure is the median over rounds of the median step, in milliseconds, rank 0's.
On one host this is the formats' CPU cost (the wire is shared memory); across
emulated hosts (``launch/emulated-cluster.sh run``) the link's too. Writes
bench/reduce.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the BLAS thread variables before numpy loads)
from common import machine, model_spec, write_json  # noqa: E402

import numpy as np  # noqa: E402

from dpcnn.buckets import WIRES  # noqa: E402
from dpcnn.dist import Dist  # noqa: E402
from dpcnn.model import Model  # noqa: E402
from dpcnn.step import StepBuffer  # noqa: E402


def timed(dist: Dist, step: StepBuffer, grad: np.ndarray, iters: int, batch: int) -> tuple[list, list]:
    """ms of the buckets' start (encode) and of the rest, per reduction."""
    start, rest, r = [], [], step.reducer
    for _ in range(iters):
        step.model.grads[:len(grad)] = grad  # (a fresh gradient: the last sum is no input)
        dist.comm.Barrier()
        t0 = time.perf_counter()
        r.begin(batch)
        r.ready(0)
        t1 = time.perf_counter()
        r.finish()
        t2 = time.perf_counter()
        start.append((t1 - t0) * 1e3)
        rest.append((t2 - t1) * 1e3)
    return start, rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=64, help="global batch (fp16's scale)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--bucket-bytes", type=int, default=262144)
    args = ap.parse_args()
    dist = Dist()
    steps = {}
    for wire in WIRES:
        model = Model.from_config(model_spec(args.model), seed=0)
        steps[wire] = StepBuffer(model, None, dist, overlap=True, bucket_bytes=args.bucket_bytes, compression=wire)
    n = steps["none"].model.num_trainable
    grad = (np.random.default_rng(dist.rank).standard_normal(n) * 1e-3).astype(np.float32)
    got = {w: {"start": [], "rest": []} for w in WIRES}
    for _ in range(args.rounds):
        for wire, step in steps.items():
            start, rest = timed(dist, step, grad, args.iters, args.batch)
            got[wire]["start"].append(statistics.median(start[5:]))
            got[wire]["rest"].append(statistics.median(rest[5:]))
    if not dist.is_root:
        return
    print(f"{args.model}: {n:,} gradient values, {dist.size} ranks, buckets of >= {args.bucket_bytes:,} bytes; "
          f"ms per reduction, median of {args.rounds} rounds (range)")
    print(f"{'wire':<6}{'start (encode)':>22}{'finish (wire, sum)':>24}{'total':>8}")
    med = {}
    for wire, g in got.items():
        s, r = statistics.median(g["start"]), statistics.median(g["rest"])
        med[wire] = {"start_ms": s, "finish_ms": r, "total_ms": s + r}
        span = [f"{min(v):.2f}-{max(v):.2f}" for v in (g["start"], g["rest"])]
        print(f"{wire:<6}{s:>9.2f} ({span[0]:>11}){r:>11.2f} ({span[1]:>11}){s + r:>8.2f}")
    path = write_json("reduce.json", {"machine": machine(), "ranks": dist.size, "model": args.model,
                                      "rounds": args.rounds, "iters": args.iters, "ms": got, "median": med})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
