"""One-channel stride-1 convolutions on a flat grid: LeNet-5's first layer, and any first
conv over a grey-scale image followed by ReLU and an average pool (or by ReLU alone).

The general path (`dpcnn.conv_kernels.im2col`, transposed for one channel) copies each of
the f*f kernel offsets out of the padded input as a strided view whose inner runs are
ow (or, with a pool, ow/k floats at stride k), and multiplies the (n, K) patch matrix by
the filters, a GEMM with only c_out columns. Here instead:

* The padded images lie on a grid of ``Hg x Wg`` (the padded size rounded up to the
  pool's k) one after the other in one flat array X. Computing the output at *every*
  grid position (garbage where the window hangs over the edge: at most
  ``Hg*Wg / (oh*ow)`` times the work, 1.31x for LeNet-5), kernel offset (i, j) of
  output p is X[p + i*Wg + j]: the whole patch matrix of a block of examples is one
  strided view ``(f, f, n*Hg*Wg)`` of X with contiguous rows, copied in a single call.
* The GEMM is channel-major, ``Z = Wm^T @ P`` ``(c_out, n*Hg*Wg)``: a wide output
  instead of a skinny one. ReLU and its mask run over Z contiguously; the average
  pool is a GEMM of Z's rows of windows ``(.., k*Wg)`` with a fixed ``(k*Wg, Wg/k)``
  matrix of 1/k^2 (no stride-k inner loops: NumPy runs loops of a few floats slowly).
* Backward mirrors it: the pooled gradient times that matrix's transpose is spread
  over its windows in Z's own layout, then one contiguous multiply by the ReLU mask;
  the garbage positions get a zero gradient (they are zero in the pooled gradient),
  so the filter gradient ``P @ dZ^T`` is exact. dx, when needed, is ``Wm @ dZ`` scattered
  back onto X with f*f contiguous adds.

Measured (bench/RESULTS.md, 2026-12-04, one thread, median of 15 interleaved windows): LeNet-5's
first conv + ReLU + 2x2 average pool at batch 128, forward 3.39 -> 1.73 ms, backward 2.06 ->
1.78 ms, 5.45 -> 3.52 ms in all; the whole LeNet-5 training step 1.20x (batch 64) and 1.24x
(batch 128). The patches are made again in backward rather than kept (keeping LeNet-5's 13.6 MB
cost the forward 0.8 ms and gained backward nothing). Blocks of about 512-768 KB (4-6 images of
LeNet-5) were fastest: 2 images 4.3 ms, 8 images 4.9 ms. Max pooling stays on the general
path: its masks in a channel-major layout need stride-k passes that took 2.3-2.5 ms against
the whole forward's 0.9 ms there (`small`'s first conv, batch 64).

The numbers are the general path's up to the order of float sums
(tests/test_flat_conv.py). `ConvReLU` in `dpcnn.fused` uses this path where `usable`
says so (``TUNING.flat_one_channel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import conv_kernels as ck
from .conv_kernels import TUNING, Workspace

__all__ = ["usable", "Grid", "grid", "load", "patches", "patch_buffer", "forward_block", "output_grad",
           "input_grad_block", "forward", "backward"]

#: Floats added to the row length of the patch buffer: with rows of a power of two bytes
#: (LeNet-5's 4 x 1024 floats) the rows alias in the cache. Measured on the conv1 step (fwd + bwd,
#: b128, alternating): 3.43 / 3.76 ms padded against 3.59 / 4.05 ms unpadded.
_ROW_PAD = 16


def usable(f: int, stride: int, c_in: int, pool_kind: str | None) -> bool:
    """Whether a conv + ReLU [+ pool] step runs here: one input channel, stride 1, an
    average pool or none, and ``TUNING.flat_one_channel``."""
    return TUNING.flat_one_channel and c_in == 1 and stride == 1 and f > 1 and pool_kind in (None, "avg")


@dataclass(frozen=True)
class Grid:
    """The geometry of the flat layout (`grid` makes one): m images ``h x w``, f x f filters,
    pads (top, bottom, left, right), a k x k pool (k = 1: none), the output ``oh x ow``, the
    grid ``Hg x Wg`` of each image (the padded size rounded up to a multiple of k; Wg is the
    row stride of X), S = Hg*Wg grid positions per image, and the zeros after the last image
    that its garbage outputs read (``tail``)."""

    m: int
    h: int
    w: int
    f: int
    pads: tuple
    k: int
    oh: int
    ow: int
    Hg: int
    Wg: int
    S: int
    K: int
    tail: int


def grid(m: int, h: int, w: int, f: int, pads: tuple, k: int) -> Grid:
    """The `Grid` of m images ``h x w`` under an f x f stride-1 conv with these pads and a k x k pool."""
    t, b, l, r = pads
    Hg, Wg = _round_up(h + t + b, k), _round_up(w + l + r, k)
    return Grid(m, h, w, f, pads, k, h + t + b - f + 1, w + l + r - f + 1, Hg, Wg, Hg * Wg, f * f,
                (f - 1) * Wg + f - 1)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def load(x: np.ndarray, g: Grid, ws: Workspace) -> np.ndarray:
    """x ``(m, h, w, 1)`` written into the reused flat grid X ``(m*S + tail,)`` (zeros around
    the images stay from its first use); X. One buffer per image geometry: two geometries can
    give X the same length, and the zeros of one are pixels of the other."""
    X = ws.get(f"flat_X {g.h}x{g.w} {g.pads} {g.k}", (g.m * g.S + g.tail,), x.dtype, ck._zero)
    t, _, l, _ = g.pads
    X[:g.m * g.S].reshape(g.m, g.Hg, g.Wg)[:, t:t + g.h, l:l + g.w] = x[..., 0]
    return X


def patches(X: np.ndarray, g: Grid, a: int, b: int, cs: np.ndarray) -> np.ndarray:
    """The transposed patch matrix of images a:b with a ones row (the folded bias):
    ``(K + 1, (b-a)*S)``, written into ``cs`` (a view of that shape with unit column stride);
    one copy of a strided view of X."""
    n = (b - a) * g.S
    it = X.itemsize
    view = as_strided(X[a * g.S:], shape=(g.f, g.f, n), strides=(g.Wg * it, it, it), writeable=False)
    np.copyto(cs[:g.K].reshape(g.f, g.f, n), view)
    return cs


def patch_buffer(g: Grid, cols: int, dtype, ws: Workspace) -> np.ndarray:
    """A ``(K + 1, cols)`` view with a ones last row, of a reused buffer whose rows are padded."""
    buf = ws.get("flat_cols", (g.K + 1, cols + _ROW_PAD), dtype, ck._ones_last_row)
    return buf[:, :cols]


def pool_matrix(g: Grid, dtype, ws: Workspace) -> np.ndarray:
    """``(k*Wg, Wg/k)``: the k x k average pool of one row of windows as a matrix. A row of
    the conv output viewed as ``(rows of windows, k*Wg)`` (k grid rows side by side) times it
    is the pooled row: entry ``(r*Wg + x, v)`` is 1/k^2 where x // k == v."""
    def init(P):
        P.fill(0)
        x = np.arange(g.k * g.Wg) % g.Wg
        P[np.arange(g.k * g.Wg), x // g.k] = 1.0 / (g.k * g.k)
    return ws.get("flat_pool", (g.k * g.Wg, g.Wg // g.k), dtype, init)


def forward_block(Wm: np.ndarray, cs: np.ndarray, g: Grid, masks: np.ndarray, y: np.ndarray,
                  ws: Workspace) -> None:
    """Conv + ReLU [+ average pool] of n images whose patches are ``cs`` ``(K + 1, n*S)``.

    Wm ``(K + 1, c)``: the filter matrix with the bias as its last row. ``masks`` ``(c, n*S)``
    gets ReLU's mask (z > 0); ``y`` ``(n, qh, qw, c)`` the output, NHWC.
    """
    (n, qh, qw, c), k = y.shape, g.k
    N = n * g.S
    Z = ws.flat("flat_Z", c * N, cs.dtype)[:c * N].reshape(c, N)  # contiguous: the pool GEMM below is 2-D
    ck.gemm(Wm.T, cs, out=Z)
    ck.relu_(Z)
    np.greater(Z, 0, out=masks)
    if k == 1:
        y[...] = Z.reshape(c, n, g.Hg, g.Wg)[:, :, :g.oh, :g.ow].transpose(1, 2, 3, 0)
        return
    # Pool: each row of k*Wg floats (a row of windows) times the pooling matrix, one GEMM.
    Yp = ws.flat("flat_Y", c * N // (k * k), cs.dtype)[:c * N // (k * k)].reshape(-1, g.Wg // k)
    ck.gemm(Z.reshape(-1, k * g.Wg), pool_matrix(g, cs.dtype, ws), out=Yp)
    y[...] = Yp.reshape(c, n, g.Hg // k, g.Wg // k)[:, :, :qh, :qw].transpose(1, 2, 3, 0)


def output_grad(dy: np.ndarray, g: Grid, masks: np.ndarray, ws: Workspace) -> np.ndarray:
    """d loss / d Z ``(c, n*S)`` of a block from dy ``(n, qh, qw, c)`` (the step's output gradient),
    through the pool and ReLU masks; zero at every garbage position."""
    n, qh, qw, c = dy.shape
    k, N = g.k, n * g.S
    dZ = ws.flat("flat_dZ", c * N, dy.dtype)[:c * N].reshape(c, N)
    # The gradient on the (pooled) grid, zero outside the valid outputs.
    D = ws.flat("flat_D", N // (k * k) * c, dy.dtype)[:N // (k * k) * c].reshape(c, n, g.Hg // k, g.Wg // k)
    D.fill(0)
    D[:, :, :qh, :qw] = dy.transpose(3, 0, 1, 2)
    if k == 1:
        np.multiply(D.reshape(c, N), masks, out=dZ)
        return dZ
    # Spread over each window (and / k^2) by the pooling matrix's transpose: dZ's own layout.
    ck.gemm(D.reshape(-1, g.Wg // k), pool_matrix(g, dy.dtype, ws).T, out=dZ.reshape(-1, k * g.Wg))
    np.multiply(dZ, masks, out=dZ)  # through the ReLU
    return dZ


def input_grad_block(Wm: np.ndarray, dZ: np.ndarray, g: Grid, a: int, dX: np.ndarray, ws: Workspace) -> None:
    """Adds the input gradient of images a, a+1, ... (dZ ``(c, n*S)``) into the flat dX: the
    patch gradient ``Wm[:K] @ dZ`` ``(K, n*S)``, each kernel offset's row added onto dX shifted."""
    N = dZ.shape[1]
    dP = ws.flat("flat_dP", g.K * N, dZ.dtype)[:g.K * N].reshape(g.K, N)
    ck.gemm(Wm[:g.K], dZ, out=dP)
    base = a * g.S
    for i in range(g.f):  # f*f adds of whole rows of the block (a loop over kernel offsets)
        for j in range(g.f):
            o = base + i * g.Wg + j
            dX[o:o + N] += dP[i * g.f + j]


def forward(x: np.ndarray, g: Grid, Wm: np.ndarray, y: np.ndarray, masks: np.ndarray, nb: int,
            ws: Workspace) -> SimpleNamespace:
    """A fused conv + ReLU [+ average pool] step's forward over x ``(m, h, w, 1)``, in blocks of nb
    images: y ``(m, qh*qw, c)`` and masks ``(m*S*c,)`` written; what `backward` needs returned.
    Wm ``(K + 1, c)``: the filter matrix with the bias as its last row (`conv_kernels.filter_matrix`)."""
    c = Wm.shape[1]
    f = SimpleNamespace(grid=g, X=load(x, g, ws), x_shape=x.shape, Wm=Wm, nb=nb, ws=ws,
                        blocks=[(a, min(a + nb, g.m)) for a in range(0, g.m, nb)],
                        block_masks=lambda a, b: masks[a * g.S * c:b * g.S * c].reshape(c, -1))
    yv = y.reshape(g.m, g.oh // g.k, g.ow // g.k, c)
    for a, b in f.blocks:
        forward_block(Wm, _block_patches(f, a, b), g, f.block_masks(a, b), yv[a:b], ws)
    return f


def _block_patches(f: SimpleNamespace, a: int, b: int) -> np.ndarray:
    """The patch matrix of images a:b, made now. Never kept for backward, which makes it again: one
    copy out of the small X (0.5 ms at LeNet-5's batch 128) costs less than writing the whole matrix
    out of cache and reading it back (13.6 MB there: forward 1.9 -> 2.7 ms, backward no faster)."""
    g = f.grid
    cs = patch_buffer(g, f.nb * g.S, f.X.dtype, f.ws)[:, :(b - a) * g.S]
    return patches(f.X, g, a, b, cs)


def backward(f: SimpleNamespace, dy: np.ndarray, dW: np.ndarray, db: np.ndarray, dx: np.ndarray | None,
             ws: Workspace, poll) -> np.ndarray | None:
    """The step's backward from `forward`'s ``f``: per block, dZ through the pool and ReLU, then the
    filter and bias gradients (``dW``, ``db``, written) and, if ``dx`` ``(m, h, w, 1)`` is given, the
    input gradient into it; ``poll()`` after each part. Returns dx."""
    g, c = f.grid, f.Wm.shape[1]
    dyv = dy.reshape(g.m, g.oh // g.k, g.ow // g.k, c)
    dX = None
    if dx is not None:
        dX = ws.get("flat_dX", f.X.shape, dy.dtype)
        dX.fill(0)
    for a, b in f.blocks:
        dZ = output_grad(dyv[a:b], g, f.block_masks(a, b), ws)
        # The filter gradient cs @ dZ^T (the bias as its last row): conv_kernels' with patches (n, K + 1).
        ck.param_grads(_block_patches(f, a, b).T, dZ.T, dW, db, True, ws, accumulate=a > 0)
        poll()
        if dX is not None:
            input_grad_block(f.Wm, dZ, g, a, dX, ws)
            poll()
    if dx is None:
        return None
    t, _, l, _ = g.pads
    dx[..., 0] = dX[:g.m * g.S].reshape(g.m, g.Hg, g.Wg)[:, t:t + g.h, l:l + g.w]
    return dx
