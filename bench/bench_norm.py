"""What BatchNorm and Dropout cost: training img/s of `small` vs `small_bn`, one thread.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/bench_norm.py [--batch 64] [--micro 32]

One training step as the trainer runs it on one rank (`dpcnn.step.StepBuffer`:
forward, loss, backward, the running-statistics update, an SGD step), on a
whole shard in one pass and in micro-batches of ``--micro`` (batch norm
needs ``trainer.micro_batch``; with 2 ranks, batch 64 and micro-batches of
32 each rank's shard is one micro-batch). Windows of the contenders are
interleaved; each figure is the median over windows of img/s by CPU time of
this thread (steady on a shared machine) and by wall time. Also the
evaluation img/s (batch 1000), where batch norm is folded into the conv.
Prints a table and writes bench/norm.json.

    python bench/bench_norm.py --ranks 2 [--rounds 3 --epochs 6]

The same comparison as users train: ``mpirun -n 2 python -m dpcnn.train`` on
mnist-5k (``DPCNN_DATA_DIR`` or ../shared/data/mnist-5k), `small` as it
trains by default, `small` with ``trainer.micro_batch=32`` and `small_bn`
(which needs it) with the same, the runs interleaved over ``--rounds``; each
figure is the median over rounds and epochs (the first of each run left out)
of the trainer's img/s in steps. Writes bench/norm_ranks.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the BLAS thread variables before numpy loads)
from common import machine, model_spec, write_json  # noqa: E402

import numpy as np  # noqa: E402

from dpcnn import checkpoint  # noqa: E402
from dpcnn.model import Model  # noqa: E402
from dpcnn.optim import SGD  # noqa: E402
from dpcnn.step import StepBuffer  # noqa: E402


def train_step(name: str, batch: int, micro: int | None):
    """A closure: one trainer step of model ``name`` on a fixed random shard of ``batch`` examples."""
    model = Model.from_config(model_spec(name), seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.random((batch, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, batch)
    buf, opt, count = StepBuffer(model, micro, step_batches=(batch,)), SGD(model.trainable, momentum=0.9), [0]

    def step():
        buf.shard_gradient(x, y, batch, 0, count[0])
        buf.clear_slots()
        buf.reduce(_OneRank)  # no other rank: the copy-out and the running-statistics update
        opt.step(buf.grad, 0.01)
        count[0] += 1
    return step


class _OneRank:
    """The `dpcnn.dist.Dist` of a single process, as far as `StepBuffer.reduce` needs one."""

    @staticmethod
    def allreduce_sum_(buf):
        return None


def eval_step(name: str):
    model = Model.from_config(model_spec(name), seed=0)
    x = np.random.default_rng(1).random((1000, 28, 28, 1), dtype=np.float32)
    return lambda: model.forward(x, train=False)


def measure(fns: dict, per_call: dict, windows: int = 9, reps: int = 8) -> dict:
    """Median img/s by thread CPU time and by wall time, windows interleaved."""
    cpu, wall = {k: [] for k in fns}, {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    for _ in range(windows):
        for k, fn in fns.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            for _ in range(reps):
                fn()
            cpu[k].append(per_call[k] * reps / (time.thread_time() - c0))
            wall[k].append(per_call[k] * reps / (time.perf_counter() - w0))
    return {k: {"cpu_img_s": statistics.median(cpu[k]), "wall_img_s": statistics.median(wall[k])} for k in fns}


RANK_VARIANTS = {"small": ["model=small"], "small micro 32": ["model=small", "trainer.micro_batch=32"],
                 "small_bn micro 32": ["model=small_bn", "trainer.micro_batch=32"]}


def train_img_s(ranks: int, overrides: list[str], epochs: int) -> list[float]:
    """img/s in steps of each epoch after the first, from the run's final checkpoint."""
    root = Path(__file__).resolve().parent.parent
    data = os.environ.get("DPCNN_DATA_DIR", str(root.parent / "shared" / "data" / "mnist-5k"))
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", DPCNN_DATA_DIR=data)
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", str(ranks), sys.executable, "-m", "dpcnn.train",
               *overrides, f"trainer.epochs={epochs}", "tracking=none", "trainer.progress=false",
               f"hydra.run.dir={tmp}/run"]
        subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True)
        history = checkpoint.load(Path(tmp) / "run" / "checkpoints").meta["history"]
    return [h["img_per_s"] for h in history[1:]]


def main_ranks(args) -> None:
    got = {k: [] for k in RANK_VARIANTS}
    for r in range(args.rounds):
        for k, overrides in RANK_VARIANTS.items():
            got[k] += train_img_s(args.ranks, overrides, args.epochs)
            print(f"round {r + 1}: {k:<20} {statistics.median(got[k]):>8,.0f} img/s so far", flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"\n{args.ranks} ranks, batch 64, mnist-5k: {'img/s':>8}  vs small  vs small micro 32")
    for k, v in med.items():
        print(f"{k:<32}{v:>8,.0f}{v / med['small'] - 1:>+10.1%}{v / med['small micro 32'] - 1:>+18.1%}")
    path = write_json("norm_ranks.json", {"machine": machine(), "ranks": args.ranks, "epochs": args.epochs,
                                          "rounds": args.rounds, "img_s": got, "median": med})
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--ranks", type=int, default=None, help="train with mpirun on this many ranks instead")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    if args.ranks:
        return main_ranks(args)
    fns, per_call = {}, {}
    for name in ("small", "small_bn"):
        for micro in (None, args.micro):
            key = f"train {name} {'whole shard' if micro is None else f'micro {micro}'}"
            fns[key], per_call[key] = train_step(name, args.batch, micro), args.batch
        fns[f"eval {name}"], per_call[f"eval {name}"] = eval_step(name), 1000
    res = measure(fns, per_call)
    print(f"{'':<34}{'img/s (CPU time)':>18}{'img/s (wall)':>14}{'vs small':>10}")
    for k, r in res.items():
        base = res[k.replace("small_bn", "small")]["cpu_img_s"]
        print(f"{k:<34}{r['cpu_img_s']:>18,.0f}{r['wall_img_s']:>14,.0f}{r['cpu_img_s'] / base - 1:>+10.1%}")
    path = write_json("norm.json", {"machine": machine(), "batch": args.batch, "micro": args.micro, "results": res})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
