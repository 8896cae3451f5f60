"""Issue 21: Winograd F(2x2, 3x3) against the direct (im2col + GEMM) path, per conv shape, one thread.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/bench_winograd.py [--batch 64] [--windows 9]

For each shape (c_in -> c_out on an h x w input, 3x3 "same", stride 1): the
fused conv + ReLU + 2x2 max-pool step of the Model (`dpcnn.fused.ConvReLU`),
forward + backward with the input gradient, with ``TUNING.winograd`` "never"
and "always", windows interleaved; prints ms per step and the speed-up. The
shape rule of `dpcnn.winograd.chosen` is set from these figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the BLAS thread variables before numpy loads)

import numpy as np  # noqa: E402

from dpcnn.conv_kernels import TUNING  # noqa: E402
from dpcnn.fused import ConvReLU  # noqa: E402
from dpcnn.layers import Conv2D, MaxPool2D, ReLU  # noqa: E402

SHAPES = ((1, 16, 28), (16, 32, 14), (32, 32, 14), (32, 64, 14), (64, 64, 14), (16, 32, 28), (64, 128, 8))


def step_fn(c_in: int, c_out: int, hw: int, batch: int, mode: str, first: bool = False):
    """Forward + backward of one fused conv-relu-maxpool step under ``TUNING.winograd = mode``."""
    rng = np.random.default_rng(0)
    conv = Conv2D(c_in, c_out, 3, 1, "same")
    conv.W[...] = rng.standard_normal(conv.W.shape) * (2 / (9 * c_in)) ** 0.5
    conv.needs_input_grad = not first
    step = ConvReLU(conv, ReLU(), MaxPool2D(2))
    x = rng.standard_normal((batch, hw, hw, c_in)).astype(np.float32)
    dy = rng.standard_normal((batch, hw // 2, hw // 2, c_out)).astype(np.float32)

    def run():
        with TUNING.override(winograd=mode):
            step.forward(x)
            step.backward(dy)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--windows", type=int, default=9)
    args = ap.parse_args(argv)
    print(f"batch {args.batch}, {args.windows} interleaved windows, load average {common.load_average():.2f}")
    print(f"{'c_in':>5} {'c_out':>6} {'hw':>4} {'direct ms':>10} {'winograd ms':>12} {'speed-up':>9}")
    for c_in, c_out, hw in SHAPES:
        fns = {mode: step_fn(c_in, c_out, hw, args.batch, mode, first=c_in == 1) for mode in ("never", "always")}
        probe = common.interleaved(fns, warmup=2, windows=1, reps=2)
        reps = max(3, int(0.2 / max(probe.values())))
        t = common.interleaved(fns, warmup=3, windows=args.windows, reps=reps)
        print(f"{c_in:>5} {c_out:>6} {hw:>4} {t['never'] * 1e3:>10.3f} {t['always'] * 1e3:>12.3f} "
              f"{t['never'] / t['always']:>8.2f}x", flush=True)
    print(f"load average {common.load_average():.2f} at end; blas: {common.machine().get('blas')}")


if __name__ == "__main__":
    main()
