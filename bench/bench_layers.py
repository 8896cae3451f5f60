"""Issue 3: the seed's convolution vs ours, and training speed of the `small` model.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_layers.py

Prints, from ONE run (ratios are meaningful, absolute figures on a noisy
machine less so):

(a) forward time of the seed blog post's convolution -- ``scipy.ndimage.convolve``
    in three nested Python loops, example x filter x channel -- vs `Conv2D` on
    the seed-like shapes, and the speed-up;
(b) training img/s of conf/model/small.yaml at batch 64 on one BLAS thread:
    forward + backward + plain SGD on the flat parameter buffer;
(c) when torch is importable, the same model and step in PyTorch (one thread),
    NCHW as written and channels_last, and our ratio to each.

Writes bench/layers.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the BLAS thread variables before numpy loads)
from common import interleaved, median, model_spec  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from dpcnn.layers import Conv2D  # noqa: E402


def seed_conv_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The seed's convolution: one scipy.ndimage.convolve per example, filter and
    input channel, summed over channels ("same" zero padding, stride 1).

    ndimage.convolve flips the kernel; it is handed the flipped filter so the
    result is the cross-correlation that Conv2D (and every CNN library) computes.
    """
    m, h, w, c = x.shape
    n_filters = W.shape[3]
    out = np.zeros((m, h, w, n_filters), x.dtype)
    for i in range(m):
        for f in range(n_filters):
            acc = out[i, :, :, f]
            for ch in range(c):
                acc += ndimage.convolve(x[i, :, :, ch], W[::-1, ::-1, ch, f], mode="constant", cval=0.0)
            acc += b[f]
    return out


SHAPES = [  # (name, input shape, filters): the seed-like layers of the issue
    ("conv 64x28x28x1 -> 16 3x3", (64, 28, 28, 1), 16),
    ("conv 64x14x14x16 -> 32 3x3", (64, 14, 14, 16), 32),
]


def bench_seed_conv(windows: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for name, shape, k in SHAPES:
        x = rng.standard_normal(shape, dtype=np.float32)
        conv = Conv2D(shape[3], k, 3, 1, "same")
        conv.W[...] = rng.standard_normal(conv.W.shape, dtype=np.float32) * 0.1
        conv.b[...] = rng.standard_normal(k, dtype=np.float32) * 0.1
        ref = seed_conv_forward(x, conv.W, conv.b)
        np.testing.assert_allclose(conv.forward(x), ref, rtol=1e-4, atol=1e-4)
        # The seed loop takes 10-500 ms a call: a few single calls suffice.
        t = interleaved({"seed": lambda: seed_conv_forward(x, conv.W, conv.b),
                         "ours": lambda: conv.forward(x)},
                        warmup=1, windows=windows, reps=1)
        t_ours = median(common.time_windows(lambda: conv.forward(x), warmup=5, windows=windows, reps=20))
        rows.append({"layer": name, "seed_ms": t["seed"] * 1e3, "ours_ms": t_ours * 1e3,
                     "speedup": t["seed"] / t_ours})
    return rows


def bench_training(windows: int, reps: int, batch: int = 64, baseline: str | None = None) -> dict:
    torch = common.try_torch()
    specs = model_spec("small")
    fns = {"numpy": common.numpy_step_fn(specs, batch)}
    if baseline:
        fns["baseline"] = common.numpy_step_fn_for(common.baseline_model_class(baseline), specs, batch)
    if torch is not None:
        fns["torch"] = common.torch_step_fn(torch, specs, batch)
        fns["torch_cl"] = common.torch_step_fn(torch, specs, batch, channels_last=True)
    t = interleaved(fns, warmup=10, windows=windows, reps=reps)
    out = {"batch": batch, "img_per_s": {k: batch / v for k, v in t.items()},
           "torch": None if torch is None else torch.__version__}
    if torch is not None:
        out["ratio_vs_torch"] = t["torch"] / t["numpy"]
        out["ratio_vs_torch_channels_last"] = t["torch_cl"] / t["numpy"]
        out["ratio_vs_best_torch"] = min(t["torch"], t["torch_cl"]) / t["numpy"]
    if baseline:
        out["baseline_rev"] = baseline
        out["speedup_vs_baseline"] = t["baseline"] / t["numpy"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20, help="training steps per timed window")
    ap.add_argument("--baseline", metavar="GIT_REV", default=None,
                    help="also time dpcnn's layers/model as of this git revision, in the same run")
    args = ap.parse_args(argv)
    info = common.machine()
    print(f"{info.get('Model name', '?')}, {info['cpus']} CPUs, numpy {info['numpy']}, "
          f"load average {common.load_average():.2f} at start")

    print("\n(a) seed convolution (scipy.ndimage.convolve, loops over example x filter x channel) vs Conv2D, forward")
    conv_rows = bench_seed_conv(max(3, args.windows // 2))
    for r in conv_rows:
        print(f"    {r['layer']:<30} seed {r['seed_ms']:9.1f} ms   ours {r['ours_ms']:7.3f} ms   "
              f"speed-up {r['speedup']:7.0f}x")
    total_seed = sum(r["seed_ms"] for r in conv_rows)
    total_ours = sum(r["ours_ms"] for r in conv_rows)
    print(f"    {'both layers':<30} seed {total_seed:9.1f} ms   ours {total_ours:7.3f} ms   "
          f"speed-up {total_seed / total_ours:7.0f}x")

    print("\n(b, c) training step of `small` (fwd + bwd + SGD), batch 64, one thread")
    tr = bench_training(args.windows, args.reps, baseline=args.baseline)
    ips = tr["img_per_s"]
    print(f"    dpcnn (NumPy)              {ips['numpy']:8,.0f} img/s")
    if args.baseline:
        print(f"    dpcnn at {args.baseline[:12]:<12}      {ips['baseline']:8,.0f} img/s   speed-up "
              f"{tr['speedup_vs_baseline']:.2f}x")
    if tr["torch"] is None:
        print("    torch not installed: no PyTorch comparison (pip install torch==2.13.0)")
    else:
        print(f"    PyTorch {tr['torch']} NCHW     {ips['torch']:8,.0f} img/s   dpcnn/torch = "
              f"{tr['ratio_vs_torch']:.2f}x")
        print(f"    PyTorch channels_last      {ips['torch_cl']:8,.0f} img/s   dpcnn/torch = "
              f"{tr['ratio_vs_torch_channels_last']:.2f}x")
    print(f"\nload average {common.load_average():.2f} at end")
    path = common.write_json("layers.json", {"machine": info, "seed_conv": conv_rows,
                                             "seed_conv_both_layers_speedup": total_seed / total_ours,
                                             "train_small": tr})
    print(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
