"""Data-parallel scaling of the real training loop, against the machine's own ceiling.

For each world size N it runs ``mpirun -n N python -m dpcnn.train`` (tracking
off, a few epochs of real MNIST) and reads the loop's own figures from the
checkpoint (median over the epochs after the first): aggregate img/s and the
share of step time spent in the Allreduce (which includes waiting for the
slowest rank). The ceiling is N
*independent* single-process trainers started together, each doing the same
per-rank work (batch B/N) with no communication: what the cores and memory
bandwidth allow when nothing is shared. Efficiency = data-parallel / ceiling.

With more ranks than cores, ranks that spin inside MPI while waiting steal
the core a computing rank needs; dpcnn polls a non-blocking Allreduce and
sleeps between polls instead (``DPCNN_MPI_WAIT=auto``, the default). The
``spin`` rows show what that saves.

    python bench/bench_scaling.py [--ranks 1 2 4] [--batch 64] [--repeats 3] [--epochs 4] [--waits ...]

Prints a table and writes bench/scaling.json. Needs the data: set
DPCNN_DATA_DIR (e.g. ../shared/data/mnist-5k).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpcnn import checkpoint  # noqa: E402

MPIRUN = Path(sys.executable).parent / "mpirun"


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(extra)
    return e


def train_args(run_dir: Path, model: str, batch: int, epochs: int) -> list[str]:
    return ["-m", "dpcnn.train", f"model={model}", f"trainer.batch_size={batch}", f"trainer.epochs={epochs}",
            "tracking=none", "trainer.progress=false", "trainer.checkpoint=true", f"hydra.run.dir={run_dir}"]


def steady(run_dir: Path) -> dict:
    """Median img/s and allreduce share over the epochs after the first (warm-up: first-touch
    page faults, BLAS buffers, the first epoch's data copies)."""
    history = checkpoint.load(run_dir / "checkpoints").meta["history"]
    epochs = history[1:] or history
    return {k: median(e[k] for e in epochs) for k in ("img_per_s", "allreduce_frac")}


def data_parallel(n: int, model: str, batch: int, epochs: int, wait: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [str(MPIRUN), "-n", str(n), sys.executable, *train_args(run_dir, model, batch, epochs)]
        subprocess.run(cmd, cwd=tmp, env=env(DPCNN_MPI_WAIT=wait), check=True, capture_output=True)
        return steady(run_dir)


def independent(n: int, model: str, batch: int, epochs: int) -> dict:
    """n single-process trainers at once, each with the per-rank batch; summed img/s."""
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(tmp) / f"p{i}" for i in range(n)]
        procs = [subprocess.Popen([sys.executable, *train_args(d, model, batch // n, epochs)], cwd=tmp,
                                  env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for d in dirs]
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(p.stderr.read().decode()[-2000:])
        return {"img_per_s": sum(steady(d)["img_per_s"] for d in dirs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--waits", nargs="+", default=["spin"], choices=["spin", "yield", "sleep"],
                    help="DPCNN_MPI_WAIT policies to compare with auto when ranks outnumber cores")
    ap.add_argument("--out", default=str(REPO / "bench" / "scaling.json"))
    args = ap.parse_args()
    if not os.environ.get("DPCNN_DATA_DIR"):
        sys.exit("set DPCNN_DATA_DIR to a folder with MNIST (e.g. ../shared/data/mnist-5k)")

    cores = len(os.sched_getaffinity(0))
    rows = []
    for n in args.ranks:
        waits = ["auto", *[w for w in args.waits if w != "auto"]] if n > cores else ["auto"]
        for wait in waits:
            # Interleaved (dp, ceiling, dp, ceiling, ...): a slow spell of a shared machine hits both.
            dp, ceiling = [], []
            for _ in range(args.repeats):
                dp.append(data_parallel(n, args.model, args.batch, args.epochs, wait))
                if wait == "auto":
                    ceiling.append(independent(n, args.model, args.batch, args.epochs))
            row = {"ranks": n, "wait": wait, "img_per_s": median(r["img_per_s"] for r in dp),
                   "allreduce_frac": median(r["allreduce_frac"] for r in dp)}
            if ceiling:
                row["independent_img_per_s"] = median(c["img_per_s"] for c in ceiling)
                row["efficiency_vs_independent"] = row["img_per_s"] / row["independent_img_per_s"]
            rows.append(row)
    one = next((r["img_per_s"] for r in rows if r["ranks"] == 1), None)
    two = next((r["img_per_s"] for r in rows if r["ranks"] == 2 and r["wait"] == "auto"), None)
    print(f"{args.model}, global batch {args.batch}, {cores} cores, 1 BLAS thread per rank, "
          f"median of {args.repeats}")
    print(f"{'ranks':>5} {'wait':>5} {'img/s':>9} {'allreduce':>9} {'indep. img/s':>12} {'eff. vs indep.':>14} "
          f"{'vs 1 rank':>9} {'vs 2 ranks':>10}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['wait']:>5} {r['img_per_s']:>9,.0f} {r['allreduce_frac']:>9.1%} "
              f"{r.get('independent_img_per_s', float('nan')):>12,.0f} "
              f"{r.get('efficiency_vs_independent', float('nan')):>14.1%} "
              f"{r['img_per_s'] / one if one else float('nan'):>9.2f} "
              f"{r['img_per_s'] / two if two else float('nan'):>10.2f}")
    Path(args.out).write_text(json.dumps({"model": args.model, "batch": args.batch, "cores": cores,
                                          "repeats": args.repeats, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
