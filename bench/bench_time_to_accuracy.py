"""Wall time to a target test accuracy: dpcnn on N ranks vs PyTorch in one process.

Same model (`small`), same recipe (SGD momentum 0.9, lr 0.05 cosine over the
epochs, weight decay 5e-4, global batch 64), same data (real MNIST from
DPCNN_DATA_DIR, normalised the same way), same initialisation scheme (dpcnn's
default `fan_in_uniform` is PyTorch's default). Test accuracy is measured after
every epoch; the figure is the training wall time (evaluation excluded for
both) at the first epoch that reaches the target.

PyTorch gets every core of the machine in its one process (torch's default
threads); dpcnn gets one BLAS thread per rank.

    DPCNN_DATA_DIR=../shared/data/mnist-5k python bench/bench_time_to_accuracy.py [--ranks 2] [--target 0.98]

Needs `pip install torch==2.13.0` (the `bench` extra). Prints a table, writes
bench/time_to_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpcnn import checkpoint  # noqa: E402
from dpcnn.data import EpochSampler, load_dataset  # noqa: E402


def dpcnn_curve(ranks: int, epochs: int) -> list[tuple[float, float]]:
    """[(train wall seconds so far, test acc)] per epoch, from the real `mpirun ... dpcnn.train`."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", str(ranks), sys.executable, "-m", "dpcnn.train",
               "experiment=mnist_small", f"trainer.epochs={epochs}", "tracking=none", "trainer.progress=false",
               f"hydra.run.dir={tmp}/run"]
        subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True)
        history = checkpoint.load(Path(tmp) / "run" / "checkpoints").meta["history"]
    # Training time only (the sum of the epochs' step times), as on the PyTorch side.
    out, t = [], 0.0
    for h in history:
        t += h["step_time_s"]
        out.append((t, h["test_acc"]))
    return out


def torch_curve(epochs: int, seed: int = 0) -> list[tuple[float, float]]:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    splits = load_dataset("mnist")
    (xtr, ytr), (xte, yte) = splits.train, splits.test
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # NHWC -> NCHW  # noqa: E731
    xtr_t, xte_t, ytr_t, yte_t = to_t(xtr), to_t(xte), torch.from_numpy(ytr), torch.from_numpy(yte)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(1568, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sampler = EpochSampler(len(xtr), 64, seed=seed)
    total = epochs * sampler.num_batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = nn.CrossEntropyLoss()
    out, t = [], 0.0
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        for k in range(sampler.num_batches):
            idx = torch.from_numpy(sampler.batch(epoch, k))
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xtr_t[idx]), ytr_t[idx]).backward()
            opt.step()
            sched.step()
        t += time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            acc = float((model(xte_t).argmax(1) == yte_t).float().mean())
        out.append((t, acc))
    return out


def first_reaching(curve, target):
    return next(((t, e + 1) for e, (t, acc) in enumerate(curve) if acc >= target), (float("nan"), None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--out", default=str(REPO / "bench" / "time_to_accuracy.json"))
    args = ap.parse_args()
    if not os.environ.get("DPCNN_DATA_DIR"):
        sys.exit("set DPCNN_DATA_DIR to a folder with MNIST (e.g. ../shared/data/mnist-5k)")
    ours = dpcnn_curve(args.ranks, args.epochs)
    theirs = torch_curve(args.epochs)
    (t_ours, e_ours), (t_torch, e_torch) = first_reaching(ours, args.target), first_reaching(theirs, args.target)
    print(f"time to {args.target:.1%} test accuracy, `small` on mnist, recipe of experiment=mnist_small")
    print(f"{'':<28}{'epoch':>6}{'train s':>9}{'final acc':>10}")
    print(f"{f'dpcnn, {args.ranks} ranks x 1 thread':<28}{e_ours or '-':>6}{t_ours:>9.1f}{ours[-1][1]:>10.2%}")
    print(f"{'PyTorch, 1 process':<28}{e_torch or '-':>6}{t_torch:>9.1f}{theirs[-1][1]:>10.2%}")
    print(f"ratio dpcnn / PyTorch: {t_ours / t_torch:.2f}x")
    Path(args.out).write_text(json.dumps({"target": args.target, "ranks": args.ranks, "dpcnn": ours,
                                          "torch": theirs, "ratio": t_ours / t_torch}, indent=1))


if __name__ == "__main__":
    main()
