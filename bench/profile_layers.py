"""Per-layer forward/backward time of a model's training step, and for every
convolution the split im2col / GEMM / rest, so the next optimisation is chosen
from data.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        python bench/profile_layers.py [--model small] [--batch 64] [--iters 40] [--windows 5]

Two tables: the steps the Model actually runs (conv+relu+maxpool and
dense+relu fused, see dpcnn.fused), then the plain layers one by one
(Model._fuse = False). Each figure is the median over windows of the mean over
``--iters`` steps, in milliseconds per training step. "im2col" is the padding
copy plus the patch copies (forward: of x; backward: of x again in the fused
steps, which recompute patches block by block, and of the padded dy for the
full correlation); "GEMM" every matrix product of the conv; "rest" the
remainder of the step (bias, ReLU, pooling, scatters).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the BLAS thread variables before numpy loads)
from common import median, model_spec  # noqa: E402

import numpy as np  # noqa: E402

from dpcnn import conv_kernels, winograd  # noqa: E402
from dpcnn.layers import Conv2D  # noqa: E402
from dpcnn.model import Model  # noqa: E402


#: The conv kernels timed, by the column they count in. "pad" and "im2col" copy x
#: (padding, patches), "full_corr_cols" the padded dy's patches of the full correlation.
PROBES = {"gemm": "gemm", "pad": "im2col", "im2col": "im2col", "full_corr_cols": "im2col"}
#: The same for the Winograd path (its GEMMs go through ``conv_kernels.gemm``): the input
#: tiles' padding and transform count as "im2col".
WINO_PROBES = {"pad_planes": "im2col", "transform_input": "im2col"}


class _Clock:
    """Accumulates the seconds spent in wrapped calls under the current phase and step."""

    def __init__(self):
        self.phase = None
        self.step = None
        self.acc: dict = {}

    def wrap(self, fn, label):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = (self.phase, (self.step, label))
                self.acc[key] = self.acc.get(key, 0.0) + time.perf_counter() - t0
        return timed


def _convs(step):
    layers = getattr(step, "layers", (step,))
    return [layer for layer in layers if isinstance(layer, Conv2D)]


def profile(model: Model, x, y, iters: int, windows: int):
    steps = model._steps()
    clock = _Clock()
    # The layers call the kernels through the module (`conv_kernels.gemm`, ...),
    # so wrapping the module's functions times every call; `clock.step` says whose.
    originals = {(mod, name): getattr(mod, name) for mod, probes in ((conv_kernels, PROBES), (winograd, WINO_PROBES))
                 for name in probes}
    for (mod, name), fn in originals.items():
        setattr(mod, name, clock.wrap(fn, {**PROBES, **WINO_PROBES}[name]))

    def run(n):
        clock.acc.clear()
        fw, bw = np.zeros(len(steps)), np.zeros(len(steps))
        for _ in range(n):
            a = x
            clock.phase = "fwd"
            for i, step in enumerate(steps):
                clock.step = i
                t0 = time.perf_counter()
                a = step.forward(a, True)
                fw[i] += time.perf_counter() - t0
            model.loss.forward(a, y)
            d = model.loss.backward()
            clock.phase = "bwd"
            for i in reversed(range(len(steps))):
                clock.step = i
                t0 = time.perf_counter()
                d = steps[i].backward(d)
                bw[i] += time.perf_counter() - t0
                if d is None:
                    break
        parts = {k: v / n for k, v in clock.acc.items()}
        return fw / n, bw / n, parts

    try:
        run(5)
        results = [run(iters) for _ in range(windows)]
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)
    fw = np.median([r[0] for r in results], axis=0)
    bw = np.median([r[1] for r in results], axis=0)
    keys = set().union(*(r[2] for r in results))
    parts = {k: median([r[2].get(k, 0.0) for r in results]) for k in keys}
    return steps, fw, bw, parts


def table(steps, fw, bw, parts, batch) -> str:
    ms = 1e3
    head = f"{'step':<58} {'fwd ms':>7} {'bwd ms':>7} {'total':>7} {'%':>5}   conv split fwd | bwd (im2col/GEMM/rest ms)"
    lines = [head, "-" * len(head)]
    total = fw.sum() + bw.sum()
    for i, step in enumerate(steps):
        split = ""
        if _convs(step):
            def part(phase, label):
                return parts.get((phase, (i, label)), 0.0) * ms
            fi, fg = part("fwd", "im2col"), part("fwd", "gemm")
            bi, bg = part("bwd", "im2col"), part("bwd", "gemm")
            split = (f"{fi:5.2f}/{fg:5.2f}/{fw[i] * ms - fi - fg:5.2f} | "
                     f"{bi:5.2f}/{bg:5.2f}/{bw[i] * ms - bi - bg:5.2f}")
        t = fw[i] + bw[i]
        lines.append(f"{repr(step)[:58]:<58} {fw[i] * ms:7.3f} {bw[i] * ms:7.3f} {t * ms:7.3f} "
                     f"{100 * t / total:5.1f}   {split}")
    lines.append(f"{'sum of steps':<58} {fw.sum() * ms:7.3f} {bw.sum() * ms:7.3f} {total * ms:7.3f}   "
                 f"-> {batch / total:,.0f} img/s (layers only: no loss, no SGD update)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--only", choices=["fused", "plain"], default=None)
    ap.add_argument("--winograd", choices=["auto", "always", "never"], default="auto",
                    help="TUNING.winograd: which 3x3 stride-1 convs run as Winograd F(2x2, 3x3)")
    args = ap.parse_args(argv)
    conv_kernels.TUNING.winograd = args.winograd
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    print(f"model {args.model}, batch {args.batch}, winograd {args.winograd}, "
          f"load average {common.load_average():.2f}")
    for fuse in (True, False):
        if args.only and args.only != ("fused" if fuse else "plain"):
            continue
        model = Model.from_config(model_spec(args.model), seed=0)
        model._fuse = fuse
        print("\n" + ("fused steps (what Model runs)" if fuse else "plain layers (Model._fuse = False)"))
        print(table(*profile(model, x, y, args.iters, args.windows), args.batch))


if __name__ == "__main__":
    main()
