"""Issue 8: training throughput of `small` and `lenet5`, NumPy vs PyTorch, one thread.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_train.py

For each model and batch size (32, 64, 128): img/s of one training step
(forward + loss + backward + plain SGD on the flat buffer) for dpcnn and, when
torch is installed, the same model and step in PyTorch (NCHW as written, and
channels_last), all in one run with their timed windows interleaved so a
burst of load hits every contender alike; figures are medians of the windows
after warm-up, ratios dpcnn / torch. ``--clock cpu`` times the windows by
this process's CPU time instead of the wall clock (a host busy with other jobs). Then the peak RSS (ru_maxrss) of a fresh
process that only trains `small` at batch 64 (numpy, and torch for
comparison), measured in subprocesses so the other contenders' memory does
not count. Also the direct-GEMM ceiling of issue 21: one thread's SGEMM GFLOP/s (1024^3, median
of 9) over the model's training FLOPs per image (`common.train_flops`), and dpcnn's share of
it. Prints a table and writes bench/train.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the BLAS thread variables before numpy loads)
from common import interleaved, model_spec  # noqa: E402

MODELS = ("small", "lenet5")
BATCHES = (32, 64, 128)

_RSS_CHILD = r"""
import json, resource, sys
sys.path.insert(0, {bench!r})
import common
which, batch, steps = {which!r}, {batch}, {steps}
specs = common.model_spec("small")
if which == "numpy":
    step = common.numpy_step_fn(specs, batch)
elif which.startswith("baseline:"):
    step = common.numpy_step_fn_for(common.baseline_model_class(which[9:]), specs, batch)
else:
    step = common.torch_step_fn(common.try_torch(), specs, batch, channels_last=(which == "torch_cl"))
for _ in range(steps):
    step()
hwm = None
try:  # peak RSS of this process image; ru_maxrss can carry the parent's peak over fork+exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
except OSError:
    pass
print(json.dumps({{"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "vmhwm_mb": hwm}}))
"""


def peak_rss(which: str, batch: int = 64, steps: int = 30) -> dict | None:
    """Peak resident set (MB) of a fresh process that imports what it needs and trains.

    Call it before this process grows: Linux carries the parent's ru_maxrss over
    fork+exec into the child's figure (VmHWM, also reported, is not affected).
    """
    code = _RSS_CHILD.format(bench=str(common.BENCH), which=which, batch=batch, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(common.ROOT)})
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.25, help="target length of one timed window")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time windows by the wall clock or by this process's CPU time (for a host "
                         "whose other jobs take the cores away in bursts)")
    ap.add_argument("--baseline", metavar="GIT_REV", default=None,
                    help="also time dpcnn's layers/model as of this git revision, in the same run")
    args = ap.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    info = common.machine()
    rss = {"numpy": peak_rss("numpy")}  # first, while this process is small
    if args.baseline:
        rss["baseline"] = peak_rss("baseline:" + args.baseline)
    if common.torch_available():
        rss["torch"] = peak_rss("torch")
    torch = common.try_torch()
    base_cls = common.baseline_model_class(args.baseline) if args.baseline else None
    print(f"{info.get('Model name', '?')}, {info['cpus']} CPUs, numpy {info['numpy']}, "
          f"torch {torch.__version__ if torch else 'not installed'}, load average {common.load_average():.2f}, "
          f"{args.windows} windows timed by {args.clock} clock, malloc: {info['malloc']}")
    gflops = common.sgemm_gflops()
    print(f"one-thread SGEMM 1024^3: {gflops:.1f} GFLOP/s; the direct-GEMM ceiling of a model is that over its "
          f"training FLOPs per image (forward, dx, dW)")
    rows = []
    for name in args.models:
        specs = model_spec(name)
        for batch in args.batches:
            fns = {"numpy": common.numpy_step_fn(specs, batch)}
            if base_cls is not None:
                fns["baseline"] = common.numpy_step_fn_for(base_cls, specs, batch)
            if torch is not None:
                fns["torch"] = common.torch_step_fn(torch, specs, batch)
                fns["torch_cl"] = common.torch_step_fn(torch, specs, batch, channels_last=True)
            # Steps per window: about args.seconds of the slowest contender.
            probe = interleaved(fns, warmup=5, windows=1, reps=3)
            reps = max(3, int(args.seconds / max(probe.values())))
            t = interleaved(fns, warmup=5, windows=args.windows, reps=reps, clock=clock)
            row = {"model": name, "batch": batch, "reps_per_window": reps,
                   "img_per_s": {k: batch / v for k, v in t.items()},
                   "ceiling_img_per_s": gflops * 1e9 / common.train_flops(specs)}
            row["of_ceiling"] = row["img_per_s"]["numpy"] / row["ceiling_img_per_s"]
            if torch is not None:
                row["ratio_vs_torch"] = t["torch"] / t["numpy"]
                row["ratio_vs_torch_channels_last"] = t["torch_cl"] / t["numpy"]
            if base_cls is not None:
                row["speedup_vs_baseline"] = t["baseline"] / t["numpy"]
            rows.append(row)
            print(f"  {name} batch {batch}: done (load {common.load_average():.2f})", flush=True)

    head = f"{'model':<8} {'batch':>5} {'dpcnn img/s':>12} {'ceiling':>8}"
    if base_cls is not None:
        head += f" {args.baseline[:10] + ' img/s':>17} {'x':>5}"
    if torch is not None:
        head += f" {'torch img/s':>12} {'ratio':>6} {'torch CL img/s':>15} {'ratio':>6}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        ips = r["img_per_s"]
        line = f"{r['model']:<8} {r['batch']:>5} {ips['numpy']:>12,.0f} {r['of_ceiling']:>7.0%}"
        if base_cls is not None:
            line += f" {ips['baseline']:>17,.0f} {r['speedup_vs_baseline']:>4.2f}x"
        if torch is not None:
            line += (f" {ips['torch']:>12,.0f} {r['ratio_vs_torch']:>5.2f}x"
                     f" {ips['torch_cl']:>15,.0f} {r['ratio_vs_torch_channels_last']:>5.2f}x")
        print(line)
    print("ceiling = dpcnn img/s / the direct-GEMM ceiling (SGEMM GFLOP/s / training FLOPs per image); "
          "ratio = dpcnn img/s / torch img/s, same run; torch CL = channels_last memory format"
          + (f"; x = speed-up over dpcnn at {args.baseline}" if base_cls else ""))

    print("\npeak RSS of a fresh process training `small` at batch 64 (ru_maxrss / VmHWM): "
          + ", ".join(f"{k} {v['maxrss_mb']:.0f} / {v['vmhwm_mb'] or 0:.0f} MB" if v else f"{k} ?"
                      for k, v in rss.items()))
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this benchmark process, every contender loaded: ru_maxrss {own:.0f} MB)")
    print(f"load average {common.load_average():.2f} at end")
    path = common.write_json("train.json", {"machine": info, "rows": rows, "peak_rss_mb_small_b64": rss,
                                            "clock": args.clock, "windows": args.windows,
                                            "bench_process_maxrss_mb": own,
                                            "torch": torch.__version__ if torch else None,
                                            "baseline_rev": args.baseline, "sgemm_gflops_one_thread": gflops})
    print(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
