"""Issue 21: NumPy's ``@`` against scipy's BLAS (``scipy.linalg.blas.sgemm``) on the GEMMs of a training step.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/bench_blas.py [--windows 15]

For each shape: the product written into an existing array (NumPy ``matmul(..., out=)``
against scipy ``?gemm`` with ``beta=0``) and accumulated into one (NumPy ``c += a @ b``
against ``beta=1``), windows interleaved, medians; prints microseconds and which
library each BLAS is (threadpoolctl: both must report one thread).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the BLAS thread variables before numpy loads)

import numpy as np  # noqa: E402

from scipy.linalg import blas as sblas  # noqa: E402


def gemm_into(a: np.ndarray, b: np.ndarray, c: np.ndarray, trans_a: bool = False, beta: float = 1.0) -> None:
    """c ``(m, n)`` = op(a) @ b + beta * c in place through scipy's sgemm; all C-contiguous float32.

    scipy's wrappers are Fortran-ordered: the C-ordered c = op(a) b is the Fortran c^T = b^T op(a)^T,
    and the transpose of a C-contiguous array is a Fortran-contiguous one, so ``b.T, a.T, c=c.T``
    (transpose flags swapped) run in place with no copy.
    """
    out = sblas.sgemm(1.0, b.T, a.T, beta=beta, c=c.T, overwrite_c=1, trans_b=int(trans_a))
    assert np.shares_memory(out, c), "scipy copied c: an operand was not contiguous"

#: (what, m, k, n, trans_a): c (m, n) = op(a) (m, k) @ b (k, n); a is stored (k, m) when trans_a.
SHAPES = (
    ("small conv2 dW, one block of 22 (A^T dz)", 145, 22 * 196, 32, True),
    ("small conv2 forward, one block", 22 * 196, 145, 32, False),
    ("small conv2 dx (full corr), one block of 5", 5 * 196, 288, 16, False),
    ("LeNet-5 conv2 dW, one block", 151, 64 * 100, 16, True),
    ("small dense1 dW (x^T dy)", 1568, 64, 128, True),
    ("small dense1 forward", 64, 1568, 128, False),
    ("Winograd dW = G^T dU G (16 -> 32)", 9, 16, 512, False),
)


def contenders(a: np.ndarray, b: np.ndarray, c: np.ndarray, ta: bool) -> dict:
    """The four ways of c = op(a) @ b (+ c) timed for one shape."""
    op = a.T if ta else a

    def np_add():
        c.__iadd__(op @ b)
    return {"np_out": lambda: np.matmul(op, b, out=c),
            "sp_b0": lambda: gemm_into(a, b, c, trans_a=ta, beta=0.0),
            "np_add": np_add,
            "sp_b1": lambda: gemm_into(a, b, c, trans_a=ta, beta=1.0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=15)
    args = ap.parse_args(argv)
    info = common.machine()
    print(f"load average {common.load_average():.2f}; BLAS: {info.get('blas')}")
    print(f"{'shape':<44} {'np out=':>8} {'scipy b=0':>10} {'np +=':>8} {'scipy b=1':>10}  (us)")
    rng = np.random.default_rng(0)
    for what, m, k, n, ta in SHAPES:
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = np.zeros((m, n), np.float32)
        fns = contenders(a, b, c, ta)
        probe = common.interleaved(fns, warmup=2, windows=1, reps=3)
        reps = max(5, int(0.02 / max(probe.values())))
        t = common.interleaved(fns, warmup=3, windows=args.windows, reps=reps)
        print(f"{what:<44} {t['np_out'] * 1e6:>8.0f} {t['sp_b0'] * 1e6:>10.0f} {t['np_add'] * 1e6:>8.0f} "
              f"{t['sp_b1'] * 1e6:>10.0f}", flush=True)
    print(f"load average {common.load_average():.2f} at end")


if __name__ == "__main__":
    main()
