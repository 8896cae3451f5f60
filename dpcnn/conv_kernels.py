"""The convolution kernels: im2col, col2im, the full correlation and the
parameter gradients, as functions of arrays.

Layout as in `dpcnn.layers`: activations NHWC ``(m, h, w, c)``, filters HWIO
``W (f, f, c_in, c_out)``; ``K = f*f*c_in`` is the length of one patch row, and
a convolution is the GEMM of the patch matrix A ``(m*oh*ow, K)`` with the filter
matrix ``(K, c_out)``. ``pads`` is always (top, bottom, left, right).

How a convolution runs: the input is copied into a reused zero-bordered buffer
(`pad`), its patches into a reused im2col matrix (`im2col`: one strided copy;
for one input channel, one copy per kernel offset into a transposed matrix),
then one GEMM with the bias folded in (a ones column, `filter_matrix`).
Backward: dW and db are one GEMM (`param_grads`); dx is either the "full"
correlation of dy with the flipped filters (`full_corr`: another im2col + GEMM,
in cache-sized blocks) or the GEMM dy @ W^T scattered back onto the input
(`col2im`), whichever suits the shape (`full_corr_ok`).

These functions keep no state. Their callers, `dpcnn.layers.Conv2D` and the
fused conv steps of `dpcnn.fused`, pass in the geometry, the parameters and a
`Workspace` of reused work arrays. `TUNING` holds the switches and sizes of
the fast paths; tests and benchmarks change them with ``TUNING.override(...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = [
    "Tuning",
    "TUNING",
    "Workspace",
    "conv_output_size",
    "same_padding",
    "gemm",
    "relu_",
    "adjacent",
    "rows_view",
    "patch_view",
    "filter_matrix",
    "pad",
    "im2col",
    "stored_cols",
    "param_grads",
    "full_corr_ok",
    "dy_padded",
    "full_corr_cols",
    "full_corr",
    "col2im",
    "col2im_hwn",
]


@dataclass
class Tuning:
    """The switches and sizes of the fast paths, read at every call (so a change
    applies to layers that already exist). All of them leave the numbers as
    they are, up to the order of float sums; tests/test_fastpaths.py checks
    each fast path against its general path by turning these.

    - ``fold_bias``: fold the bias into the convolution GEMM, a column of ones
      in the patches and the bias as the last row of the filter matrix. A
      broadcast bias add over (m*oh*ow, c_out) runs its inner loop c_out
      elements at a time and cost more than the whole first-layer GEMM; the
      extra GEMM column costs ~nothing.
    - ``one_channel_t``: one input channel, im2col into a transposed (K, n)
      matrix, one copy per kernel offset (see `im2col`). False: the generic
      (n, K) patch copy.
    - ``block_bytes``: target size of one block of patch rows where a GEMM is
      done block by block to stay in cache (about the L2 of one core).
    - ``fused_block_bytes``: the same for the blocks of examples of the fused
      conv steps (`dpcnn.fused.ConvReLU`).
    - ``store_cols_bytes``: a fused conv step keeps its whole patch matrix for
      backward when it is at most this big, else backward recomputes the
      patches block by block. ``store_cols_t_bytes``: the same for the transposed
      one-channel patches, whose f*f copies cost more to redo (LeNet-5's first conv
      at batch 128, 10.4 MB: 1.2x the step stored; `small`'s second, 7.3 MB: 0.94x).
    - ``winograd``: 3x3 stride-1 convs as Winograd F(2x2, 3x3) (`dpcnn.winograd`):
      "auto" where it is the faster path by shape (`dpcnn.winograd.chosen`),
      "always" wherever it applies, "never".
    - ``flat_one_channel``: a fused one-channel stride-1 conv + ReLU [+ average pool] runs on the
      flat grid of `dpcnn.flat_conv` (else as above), in blocks of ``flat_block_bytes``.
    """

    fold_bias: bool = True
    one_channel_t: bool = True
    block_bytes: int = 1 << 20
    fused_block_bytes: int = 3 << 20
    store_cols_bytes: int = 6 << 20
    store_cols_t_bytes: int = 16 << 20
    winograd: str = "auto"
    flat_one_channel: bool = True
    flat_block_bytes: int = 512 << 10

    @contextmanager
    def override(self, **changes) -> Iterator[Tuning]:
        """Set some fields inside a ``with`` block, restore them after it.

        An unknown field name raises TypeError (from `dataclasses.replace`).
        """
        saved = replace(self)
        vars(self).update(vars(replace(self, **changes)))
        try:
            yield self
        finally:
            vars(self).update(vars(saved))


#: The one tuning every layer and fused step reads.
TUNING = Tuning()


class Workspace:
    """Named work arrays of one owner (a layer or a fused step), reused across steps.

    Reusing work arrays spares the allocator and the page faults of fresh
    multi-megabyte arrays. Only the owner, and the kernels it hands the
    workspace to, ever see these arrays.
    """

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple, dtype, init: Callable | None = None) -> np.ndarray:
        """The array ``name``; a new one only when shape or dtype change.

        ``init(a)`` runs on a new array only: it sets what the users of the
        array never overwrite (a zero border, a ones column).
        """
        a = self._arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = np.empty(shape, dtype)
            if init is not None:
                init(a)
            self._arrays[name] = a
        return a

    def flat(self, name: str, size: int, dtype, init: Callable | None = None) -> np.ndarray:
        """A 1-D array ``name`` of at least ``size`` elements, new only when it must grow (or the
        dtype changes): for work arrays whose size varies from block to block."""
        a = self._arrays.get(name)
        if a is None or a.dtype != dtype or a.size < size:
            a = self.get(name, (size,), dtype, init)
        return a

    def __getitem__(self, name: str) -> np.ndarray:
        """The array ``name`` as last made by `get`."""
        return self._arrays[name]


def _zero(a: np.ndarray) -> None:
    a.fill(0)


def _ones(a: np.ndarray) -> None:
    a.fill(1)


def _ones_last_col(a: np.ndarray) -> None:
    a[..., -1] = 1


def _ones_last_row(a: np.ndarray) -> None:
    a[-1] = 1


def conv_output_size(size: int, kernel: int, stride: int, pad_total: int) -> int:
    """Output length of a window sliding over ``size + pad_total`` positions."""
    return (size + pad_total - kernel) // stride + 1


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding so that output = ceil(size / stride).

    When the total is odd the extra row/column goes after (bottom/right), as in
    TensorFlow and PyTorch's ``padding="same"``.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


#: Every GEMM of the convolutions goes through this name: bench/profile_layers.py
#: replaces it to time them. Call it as ``conv_kernels.gemm`` from other modules
#: (a from-import would keep the unwrapped function). NumPy, not scipy.linalg.blas:
#: NumPy already hands transposed views and ``out=`` to BLAS without copies, and
#: scipy's own OpenBLAS (0.3.30, vs NumPy's 0.3.31) measured 1.3-1.5x slower on the
#: A^T dz filter-gradient GEMMs (915-1,042 vs 689-700 us, `small`'s second conv, one block)
#: and no faster elsewhere, ``beta=1`` included (bench/bench_blas.py, RESULTS.md).
gemm = np.matmul


_ZEROS: dict = {}  # per dtype, for relu_: grown to the largest array seen, never written


def relu_(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """max(a, 0) into ``out`` (default: a itself); returns it. Against an array of zeros, not the
    scalar 0: NumPy 2.4.6's ``maximum`` with a scalar skips its SIMD loop, 3.5-4x slower (14.0 vs
    3.7 us for 24,576 float32, AMD EPYC with AVX-512, 2026-12-04); same results, NaN included."""
    z = _ZEROS.get(a.dtype)
    if z is None or z.size < a.size:
        z = _ZEROS[a.dtype] = np.zeros(max(a.size, 1 << 16), a.dtype)
        z.flags.writeable = False
    return np.maximum(a, z[:a.size].reshape(a.shape), out=a if out is None else out)


def adjacent(a: np.ndarray, b: np.ndarray) -> bool:
    """True when b starts right where a ends, both C-contiguous and of one dtype."""
    return (a.flags.c_contiguous and b.flags.c_contiguous and a.dtype == b.dtype
            and b.__array_interface__["data"][0] == a.__array_interface__["data"][0] + a.nbytes)


def rows_view(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The (rows, cols) C-ordered matrix that starts at a's first element (may run past a)."""
    return as_strided(a, shape=(rows, cols), strides=(cols * a.itemsize, a.itemsize))


def patch_view(xp: np.ndarray, f: int, stride: int, oh: int, ow: int, k: int = 1) -> np.ndarray:
    """Read-only strided view of every ``f x f`` window of ``xp``, ``(..., f, f, c)``.

    ``k == 1``: ``(m, oh, ow, f, f, c)``, output pixels in NHWC order.
    ``k > 1`` (a ``k x k``/``k`` max pool follows): ``(k, k, m, oh/k, ow/k, f, f, c)``;
    output pixel ``(k*qy + pi, k*qx + pj)`` sits at ``[pi, pj, :, qy, qx]``, so
    each of the k*k pooling-window slots is one contiguous block of rows and the
    pool is k*k - 1 elementwise maxima of whole blocks.
    """
    m, _, _, c = xp.shape
    sm, sh, sw, sc = xp.strides
    if k == 1:
        return as_strided(xp, shape=(m, oh, ow, f, f, c),
                          strides=(sm, sh * stride, sw * stride, sh, sw, sc), writeable=False)
    return as_strided(xp, shape=(k, k, m, oh // k, ow // k, f, f, c),
                      strides=(sh * stride, sw * stride, sm, sh * stride * k, sw * stride * k, sh, sw, sc),
                      writeable=False)


def filter_matrix(W: np.ndarray, b: np.ndarray, fold: bool) -> np.ndarray:
    """W ``(f, f, c_in, c_out)`` as the GEMM's ``(K, c_out)`` matrix, or with
    ``fold`` as ``(K + 1, c_out)`` with b ``(c_out,)`` as its last row.

    When W and b lie next to each other in one buffer (as `dpcnn.model.Model`
    lays them out) the folded matrix is a view, else a small copy.
    """
    k = W.shape[-1]
    K = W.size // k
    if not fold:
        return W.reshape(K, k)
    if adjacent(W, b):
        return rows_view(W, K + 1, k)
    return np.concatenate([W.reshape(K, k), b.reshape(1, k)])


def pad(x: np.ndarray, pads: tuple, ws: Workspace, copy: bool = False) -> np.ndarray:
    """x ``(m, h, w, c)`` zero-padded into ws's ``(m, h + t + b, w + l + r, c)``
    array "xp"; x itself when there is no padding, unless ``copy``."""
    m, h, w, c = x.shape
    t, btm, l, r = pads
    if not (t or btm or l or r or copy):
        return x
    # Only the interior changes from step to step; the border stays zero.
    xp = ws.get("xp", (m, h + t + btm, w + l + r, c), x.dtype, _zero)
    xp[:, t:t + h, l:l + w, :] = x
    return xp


def im2col(xp: np.ndarray, f: int, stride: int, oh: int, ow: int, ws: Workspace, k: int = 1,
           fold: bool = False, transposed: bool = False, cap: int | None = None, row0: int = 0) -> np.ndarray:
    """The patch matrix A ``(m*oh*ow, K [+ 1])`` of the padded input xp ``(m, hp, wp, c)``.

    Rows in NHWC output order, or in pool-slot order when ``k > 1`` (see
    `patch_view`); a last column of ones when ``fold``. ``transposed`` (for
    one input channel) builds A^T ``(K [+ 1], m*oh*ow)`` and returns its
    transpose. A is rows ``row0:row0 + m*oh*ow`` of a reused workspace buffer of
    ``cap`` rows (default: exactly A's) and stays valid until the buffer is
    written there again (`stored_cols` reads it back).
    """
    m, _, _, c = xp.shape
    view = patch_view(xp, f, stride, oh, ow, k)
    K, n, extra = f * f * c, m * oh * ow, int(fold)
    cap = n if cap is None else cap
    rows = slice(row0, row0 + n)
    if transposed:
        # One channel: the NHWC patch copy would move f floats per inner loop.
        # Copy offset by offset into a transposed (K, n) matrix instead: each
        # copy moves whole image rows, and BLAS reads A = cols^T as is.
        colsT = ws.get("colsT", (K + extra, cap), xp.dtype, _ones_last_row if fold else None)
        for i in range(f):
            for j in range(f):
                np.copyto(colsT[i * f + j, rows].reshape(view.shape[:-3]), view[..., i, j, 0])
        return colsT[:, rows].T
    cols = ws.get("cols", (cap, K + extra), xp.dtype, _ones_last_col if fold else None)
    np.copyto(np.reshape(cols[rows, :K], view.shape, copy=False), view)
    return cols[rows]


def stored_cols(ws: Workspace, transposed: bool, row0: int, n: int) -> np.ndarray:
    """Rows ``row0:row0 + n`` of the patch matrix that `im2col` wrote last into ``ws``."""
    if transposed:
        return ws["colsT"][:, row0:row0 + n].T
    return ws["cols"][row0:row0 + n]


def param_grads(A: np.ndarray, dz: np.ndarray, dW: np.ndarray, db: np.ndarray, fold: bool,
                ws: Workspace, accumulate: bool = False) -> None:
    """dW ``(f, f, c_in, c_out)`` and db ``(c_out,)`` from the forward patches A
    ``(n, K [+ 1])`` and d loss / d conv output dz ``(n, c_out)``, written in place.

    ``fold`` says A has the ones column of a folded bias. ``accumulate`` adds
    to dW and db (a later block of examples) instead of overwriting them.
    """
    k = dz.shape[1]
    if fold and not adjacent(dW, db):  # the stacked gradient, then copied out
        g = gemm(A.T, dz)
        dWm = dW.reshape(-1, k)
        if accumulate:
            dWm += g[:-1]
            db += g[-1]
        else:
            dWm[...], db[...] = g[:-1], g[-1]
        return
    target = rows_view(dW, dW.size // k + 1, k) if fold else dW.reshape(-1, k)
    if accumulate:
        target += gemm(A.T, dz)
    else:
        gemm(A.T, dz, out=target)
    if not fold:
        # A GEMV: far faster than dz.sum(axis=0), whose inner loop is c_out long.
        ones = ws.get("ones", (dz.shape[0],), dz.dtype, _ones)
        if accumulate:
            db += gemm(ones[:dz.shape[0]], dz)
        else:
            gemm(ones, dz, out=db)


def full_corr_ok(f: int, stride: int, pads: tuple, h: int, w: int, oh: int, ow: int) -> bool:
    """Whether dx goes by the full correlation (`full_corr`), else by `col2im`.

    Stride 1 only, and only when the output is about as large as the input
    ("same"-like padding): the full correlation computes its GEMM over every
    input pixel from a zero-padded dy, so for a "valid" 5x5 conv on 14x14 it
    does twice the work of col2im, in a GEMM with only c_in columns.
    Measured: full correlation 1.8x faster on the `small` model's second
    conv, col2im 1.8x faster on LeNet-5's.
    """
    return stride == 1 and max(pads) <= f - 1 and h * w <= 1.25 * oh * ow


def dy_padded(W: np.ndarray, m: int, oh: int, ow: int, pads: tuple, ws: Workspace):
    """(dyp, interior): ws's zero-bordered buffer of the full correlation,
    ``(m, oh + f-1-t + f-1-b, ow + f-1-l + f-1-r, c_out)``, and the
    ``(m, oh, ow, c_out)`` view of it where d loss / d output goes."""
    f, k = W.shape[0], W.shape[3]
    t, btm, l, r = pads
    pt, pb, pl, pr = f - 1 - t, f - 1 - btm, f - 1 - l, f - 1 - r
    dyp = ws.get("dyp", (m, oh + pt + pb, ow + pl + pr, k), W.dtype, _zero)
    return dyp, dyp[:, pt:pt + oh, pl:pl + ow, :]


def full_corr_cols(view: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy patches ``view`` (examples, h, w, f, f, c_out) into the first rows of
    ``out`` ``(rows, f*f*c_out)``: the im2col of the padded dy for `full_corr`."""
    dcols = out[:math.prod(view.shape[:3])]
    np.copyto(dcols.reshape(view.shape), view)
    return dcols


def full_corr(dyp: np.ndarray, W: np.ndarray, x_shape: tuple, ws: Workspace, block_bytes: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """dx ``x_shape = (m, h, w, c_in)`` of a stride-1 conv: the "full" correlation
    of the padded dy (`dy_padded`) with the flipped filters W ``(f, f, c_in, c_out)``.

    The GEMM has only c_in output columns and streams its (m*h*w, f*f*c_out)
    operand once, so it is memory bound: done in blocks of examples whose
    patch matrix fits in ``block_bytes`` (one reused block buffer), im2col +
    GEMM of a block run on data still in cache (measured 30 % faster than one
    big im2col then one GEMM for the `small` model's second conv). Written
    into ``out`` when given.
    """
    m, h, w, c = x_shape
    f, k = W.shape[0], W.shape[3]
    w_flip = W[::-1, ::-1].transpose(0, 1, 3, 2).reshape(f * f * k, c)
    view = patch_view(dyp, f, 1, h, w)
    row_bytes = h * w * f * f * k * dyp.itemsize
    nb = max(1, min(m, block_bytes // row_bytes))
    buf = ws.get("dcols", (nb * h * w, f * f * k), dyp.dtype)
    dx = np.empty((m * h * w, c), dyp.dtype) if out is None else out.reshape(m * h * w, c)
    for a in range(0, m, nb):  # cache blocking: ceil(m / nb) blocks of examples
        dcols = full_corr_cols(view[a:a + nb], buf)
        gemm(dcols, w_flip, out=dx[a * h * w:(a + nb) * h * w])
    return dx.reshape(x_shape)


# col2im lives in its own module (it outgrew this one); it is part of this module's interface.
from .col2im import col2im, col2im_hwn  # noqa: E402
