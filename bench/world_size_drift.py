"""How far float32 runs at different world sizes drift apart, and why micro-batches stop it.

Simulates R ranks in one process (R shards of each global batch, their gradients
summed as the Allreduce would) for S steps of SGD with momentum, for several
seeds, with the fused engine and with the layer-by-layer one, and prints the
largest difference of the final weights from the 1-shard run. Data-parallel
gradients differ only in the order of float additions; the figures show how
often that rounding tips a ReLU / max-pool near-tie within S steps (a seed
with a large figure), and that summing fixed micro-batches in float64
(`trainer.micro_batch`) removes the drift.

    python bench/world_size_drift.py [--seeds 12] [--steps 20] [--batch 60] [--micro 5]

Needs DPCNN_DATA_DIR (e.g. ../shared/data/mnist-5k). Writes bench/world_size_drift.json.
"""

from __future__ import annotations

import argparse
import json

import common  # noqa: F401  (one BLAS thread, before numpy)
import numpy as np

from dpcnn.data import load_dataset
from dpcnn.model import Model
from dpcnn.optim import SGD
from dpcnn.step import micro_slices


def run(x, y, seed: int, shards: int, fused: bool, steps: int, batch: int, micro: int | None) -> np.ndarray:
    model = Model.from_config(common.model_spec("small"), seed=seed)
    model._fuse = fused
    opt = SGD(model.params, momentum=0.9, weight_decay=5e-4)
    order = np.random.default_rng(seed).permutation(len(x))
    total = np.zeros(model.num_params, np.float64 if micro else np.float32)
    grad = np.zeros(model.num_params, np.float32)
    for s in range(steps):
        batch_idx = order[s * batch:(s + 1) * batch]
        total[:] = 0
        for part in np.array_split(np.arange(batch), shards):
            pieces = micro_slices(int(part[0]), len(part), micro) if micro else [slice(0, len(part))]
            for piece in pieces:
                idx = batch_idx[part][piece]
                model.loss_and_grads(x[idx], y[idx], denom=batch)
                total += model.grads
        grad[:] = total
        opt.step(grad, 0.05)
    return model.params.copy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--micro", type=int, default=5)
    ap.add_argument("--out", default=str(common.BENCH / "world_size_drift.json"))
    args = ap.parse_args()
    x, y = load_dataset("mnist").train
    rows = {}
    for label, fused, micro in (("layer by layer", False, None), ("fused", True, None),
                                (f"fused, micro_batch={args.micro}", True, args.micro)):
        drift = []
        for seed in range(args.seeds):
            ref = run(x, y, seed, 1, fused, args.steps, args.batch, micro)
            drift.append(max(float(np.abs(run(x, y, seed, r, fused, args.steps, args.batch, micro) - ref).max())
                             for r in (2, 3, 4)))
        rows[label] = drift
        print(f"{label:<24} " + " ".join(f"{d:7.0e}" for d in drift)
              + f"   seeds > 1e-4: {sum(d > 1e-4 for d in drift)} of {len(drift)}")
    json.dump({"steps": args.steps, "batch": args.batch, "max_abs_diff_vs_1_shard": rows}, open(args.out, "w"),
              indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
