"""Winograd F(2x2, 3x3): 3x3 stride-1 convolutions with 2.25x fewer multiplications.

Per 4x4 input tile d (stride 2 over the padded input) and filter g ``(3, 3)``,
the 2x2 output tile is ``Y = A^T [(G g G^T) * (B^T d B)] A`` (Lavin & Gray
2015). Over channels the elementwise product becomes, for each of the 16
tile positions p, one GEMM ``M[p] = V[p] @ U[p]``: V ``(16, T, c_in)`` the
transformed input tiles, U ``(16, c_in, c_out)`` the transformed filters,
T = examples * tiles. Backward is the exact adjoint of that computation:
``dYt = A dY A^T`` per tile, then ``dU[p] = V[p]^T dYt[p]`` (dW = G^T dU G)
and ``dV[p] = dYt[p] U[p]^T`` (dx = B dV B^T, overlapping tiles added up).

Layouts. The output comes in *slot order* ``(4, T, c_out)``: slot 2i + j holds
output pixel (2ty + i, 2tx + j) of every tile, i.e. the pool-slot order of a
fused 2x2/2 pool (`dpcnn.conv_kernels.patch_view` with k = 2), so the fused
step pools it as it pools the direct path's output. Tiles run over
(example, ty, tx). The padded input must be ``(n, 2ty + 2, 2tx + 2, c_in)``;
`tile_pads` adds the extra bottom/right zeros when the output size is odd.

Accuracy: the transforms' coefficients are 0, +-1 and 1/2, so float32 results
stay within a few float32 roundings of the direct path's (tests/test_winograd.py);
F(4x4, 3x3) would lose about a digit, and is not used.

Which layers: `chosen` (by shape, see `AUTO_MIN_CHANNELS`), or every eligible one
with ``TUNING.winograd = "always"``, none with "never".
"""

from __future__ import annotations

import numpy as np

from . import conv_kernels as ck
from .col2im import scratch
from .conv_kernels import TUNING, Workspace

__all__ = ["eligible", "chosen", "tile_pads", "tiles", "filters", "pad_planes", "crop_planes",
           "transform_input", "conv_slots", "transform_grad", "filter_grads", "input_grad",
           "layer_forward", "layer_backward", "slots_to_nhwc", "nhwc_to_slots"]

_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
#: Position-flattened transforms (p = 4a + b): U = _GK @ g (16, 9), Y = _AK @ M (4, 16).
_GK, _AK = np.kron(_G, _G), np.kron(_AT, _AT)

#: Measured (bench/bench_winograd.py, 2026-12-01, one thread, batch 64, the fused conv + ReLU + 2x2
#: max-pool step, forward + backward): Winograd wins once the 16 per-position GEMMs have some channels:
#: 16 -> 32 on 14x14 (`small`'s second conv) 1.04x, on 28x28 1.32x; 32 -> 32 1.22x; 32 -> 64 1.46x;
#: 64 -> 64 1.31x; 64 -> 128 on 8x8 1.55x. In the whole `small` step (bench note in RESULTS.md) 1.04-1.16x
#: at batch 16-128 (one run of seven at 0.92x); `wide_bn` 1.19x. A 1 -> 16 first conv loses 5x: its
#: position GEMMs have K = 1. So: both channel counts >= this.
AUTO_MIN_CHANNELS = 16


def eligible(f: int, stride: int) -> bool:
    """Whether a conv can run as F(2x2, 3x3) at all: 3x3 filters, stride 1."""
    return f == 3 and stride == 1


def chosen(f: int, stride: int, c_in: int, c_out: int) -> bool:
    """Whether a conv of this shape runs as Winograd: a function of the shape and ``TUNING.winograd``
    only (never of timings taken at run time: every rank must pick the same path)."""
    mode = TUNING.winograd
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"TUNING.winograd must be 'auto', 'always' or 'never', got {mode!r}")
    if mode == "never" or not eligible(f, stride):
        return False
    return mode == "always" or min(c_in, c_out) >= AUTO_MIN_CHANNELS


def tile_pads(pads: tuple, oh: int, ow: int) -> tuple:
    """The conv's (top, bottom, left, right) pads plus a zero row / column where oh / ow is odd."""
    t, b, l, r = pads
    return t, b + oh % 2, l, r + ow % 2


def tiles(oh: int, ow: int) -> tuple[int, int]:
    """Tile rows and columns (ty, tx) of an oh x ow output."""
    return -(-oh // 2), -(-ow // 2)


def filters(W: np.ndarray) -> np.ndarray:
    """U = G g G^T of every filter: W ``(3, 3, c_in, c_out)`` -> ``(16, c_in, c_out)``."""
    c_in, c_out = W.shape[2:]
    return (_GK.astype(W.dtype) @ W.reshape(9, -1)).reshape(16, c_in, c_out)


def pad_planes(x: np.ndarray, pads: tuple, ws: Workspace) -> np.ndarray:
    """x ``(n, h, w, c)`` zero-padded by ``pads`` (`tile_pads`) and split by column parity: ws's
    ``(2, n, hp, wp // 2, c)``, plane q holding padded columns q, q + 2, ...

    Why planes: every tile reads columns 2tx .. 2tx + 3, i.e. columns tx and tx + 1 of both
    planes, so the transforms slice whole rows of ``(tx, c)`` floats instead of runs of c.
    """
    n, h, w, c = x.shape
    t, b, l, r = pads
    hp, wp = h + t + b, w + l + r
    P = ws.get("wino_planes", (2, n, hp, wp // 2, c), x.dtype, lambda a: a.fill(0))
    for q in range(2):  # the two column parities
        j0 = (q - l) % 2
        u0, cnt = (j0 + l) // 2, len(range(j0, w, 2))
        P[q, :, t:t + h, u0:u0 + cnt] = x[:, :, j0::2]
    return P


def crop_planes(P: np.ndarray, pads: tuple, out: np.ndarray) -> np.ndarray:
    """The inverse of `pad_planes`: out ``(n, h, w, c)`` = the interior of planes P ``(2, n, hp, wp // 2, c)``."""
    _, h, w, _ = out.shape
    t, _, l, _ = pads
    for q in range(2):
        j0 = (q - l) % 2
        u0, cnt = (j0 + l) // 2, len(range(j0, w, 2))
        out[:, :, j0::2] = P[q, :, t:t + h, u0:u0 + cnt]
    return out


def transform_input(P: np.ndarray, out: np.ndarray, ws: Workspace) -> np.ndarray:
    """V = B^T d B of every 4x4 tile of the padded input, given as planes P ``(2, n, 2ty+2, tx+1, c)``
    (`pad_planes`), into out ``(16, n*ty*tx, c)``. Columns first (the smaller input), then rows."""
    _, n, hp, tp, c = P.shape
    ty, tx = (hp - 2) // 2, tp - 1
    C = scratch(ws, "wino_cols", (4, n, hp, tx, c), P.dtype)
    x0, x1, x2, x3 = P[0, :, :, :tx], P[1, :, :, :tx], P[0, :, :, 1:], P[1, :, :, 1:]
    np.subtract(x0, x2, out=C[0])
    np.add(x1, x2, out=C[1])
    np.subtract(x2, x1, out=C[2])
    np.subtract(x1, x3, out=C[3])
    O = out.reshape(4, 4, n, ty, tx, c)
    r0, r1, r2, r3 = (C[:, :, i:i + 2 * ty:2] for i in range(4))
    np.subtract(r0, r2, out=O[0])
    np.add(r1, r2, out=O[1])
    np.subtract(r2, r1, out=O[2])
    np.subtract(r1, r3, out=O[3])
    return out


def conv_slots(V: np.ndarray, U: np.ndarray, bias: np.ndarray | None, out: np.ndarray, ws: Workspace) -> np.ndarray:
    """The conv output in slot order, out ``(4, T, c_out)``, from V ``(16, T, c_in)`` and U ``(16, c_in, c_out)``.

    16 GEMMs (one stacked matmul), then Y = A^T M A as one (4, 16) GEMM over M.
    The bias goes onto M's position (1, 1), whose coefficient is 1 in all four
    output pixels: a quarter of the broadcast add over the output.
    """
    T, c_out = V.shape[1], U.shape[2]
    M = scratch(ws, "wino_M", (16, T, c_out), V.dtype)
    ck.gemm(V, U, out=M)
    if bias is not None:
        M[5] += bias
    ck.gemm(_AK.astype(V.dtype), M.reshape(16, -1), out=out.reshape(4, -1))
    return out


def transform_grad(dz: np.ndarray, ws: Workspace) -> np.ndarray:
    """dYt = A dY A^T of every tile: dz ``(4, T, c_out)`` in slot order -> ws's ``(16, T, c_out)``.

    With A's rows (1, 0), (1, 1), (1, -1), (0, -1): rows 0 and 3 of dYt are the columns of
    slot rows 0 and -1, and rows 1, 2 their sum and difference. Elementwise rather than a
    (16, 4) GEMM: K = 4 runs that GEMM far from BLAS speed (0.79 vs 0.98 ms, one block of 22).
    """
    o = scratch(ws, "wino_dYt", (4, 4) + dz.shape[1:], dz.dtype)
    y00, y01, y10, y11 = dz
    np.copyto(o[0, 0], y00)
    np.add(y00, y01, out=o[0, 1])
    np.subtract(y00, y01, out=o[0, 2])
    np.negative(y01, out=o[0, 3])
    np.negative(y10, out=o[3, 0])
    np.add(y10, y11, out=o[3, 1])
    np.negative(o[3, 1], out=o[3, 1])
    np.subtract(y11, y10, out=o[3, 2])
    np.copyto(o[3, 3], y11)
    np.subtract(o[0], o[3], out=o[1])
    np.add(o[0], o[3], out=o[2])
    return o.reshape((16,) + dz.shape[1:])


def filter_grads(V: np.ndarray, dYt: np.ndarray, dz: np.ndarray, dW: np.ndarray, db: np.ndarray,
                 ws: Workspace, accumulate: bool = False) -> None:
    """dW ``(3, 3, c_in, c_out)`` and db ``(c_out,)`` from V ``(16, T, c_in)``, dYt ``(16, T, c_out)`` and
    dz ``(4, T, c_out)``, written in place (``accumulate``: added, for a later block of examples)."""
    c_in, c_out = V.shape[2], dYt.shape[2]
    dU = scratch(ws, "wino_dU", (16, c_in, c_out), V.dtype)
    ck.gemm(V.transpose(0, 2, 1), dYt, out=dU)
    n = dz.shape[0] * dz.shape[1]
    ones = ws.flat("wino_ones", n, dz.dtype, lambda a: a.fill(1))[:n]
    GkT = _GK.T.astype(V.dtype)
    if accumulate:
        dW.reshape(9, -1)[...] += ck.gemm(GkT, dU.reshape(16, -1))
        db += ck.gemm(ones, dz.reshape(-1, c_out))
    else:
        ck.gemm(GkT, dU.reshape(16, -1), out=dW.reshape(9, -1))
        ck.gemm(ones, dz.reshape(-1, c_out), out=db)


def input_grad(dYt: np.ndarray, U: np.ndarray, n: int, ty: int, tx: int, ws: Workspace) -> np.ndarray:
    """d loss / d padded input as column planes (see `pad_planes`), ws's ``(2, n, 2ty+2, tx+1, c_in)``:
    dV = dYt U^T per position, then dd = B dV B^T per tile with the overlapping tiles summed
    (stride 2: each pass writes the first half-tile and adds the shifted second half)."""
    c = U.shape[1]
    dt = dYt.dtype
    dV = scratch(ws, "wino_dV", (16, n * ty * tx, c), dt)
    ck.gemm(dYt, U.transpose(0, 2, 1), out=dV)
    v = dV.reshape(4, 4, n, ty, tx, c)
    # Columns: tile column b of tile tx is padded column 2tx + b = plane b % 2, column tx + b // 2.
    cols = scratch(ws, "wino_dcols", (2, 4, n, ty, tx + 1, c), dt)
    tmp = scratch(ws, "wino_dtmp", (4, n, ty, tx, c), dt)
    _adjoint_pass(v[:, 0], v[:, 1], v[:, 2], v[:, 3], cols[0], cols[1], tmp, axis=3)
    # Rows, on whole plane rows of (tx + 1) * c floats: tile row a is padded row 2ty + a.
    P = scratch(ws, "wino_dplanes", (2, n, ty + 1, 2, tx + 1, c), dt)
    tmp = scratch(ws, "wino_dtmp2", (n, ty, tx + 1, c), dt)
    for q in range(2):  # the two column planes
        w = cols[q]
        _adjoint_pass(w[0], w[1], w[2], w[3], P[q, :, :, 0], P[q, :, :, 1], tmp, axis=1)
    return P.reshape(2, n, 2 * ty + 2, tx + 1, c)


def _adjoint_pass(v0, v1, v2, v3, even, odd, tmp, axis: int) -> None:
    """One dimension of dd = B dV B^T with overlap-add: the B columns are dd0 = v0, dd1 = v1 - v2 + v3,
    dd2 = v1 + v2 - v0, dd3 = -v3; tile q's dd0, dd1 land at (q, even / odd) and its dd2, dd3 at
    (q + 1, even / odd). ``even`` and ``odd`` have one more entry than v along ``axis``."""
    head = (slice(None),) * axis
    first, shifted = head + (slice(0, -1),), head + (slice(1, None),)
    start, end = head + (slice(0, 1),), head + (slice(-1, None),)
    np.add(v1, v2, out=tmp)
    np.subtract(tmp, v0, out=even[shifted])  # dd2 of tile q - 1 ...
    even[start] = 0
    even[first] += v0  # ... plus dd0 of tile q
    np.subtract(v1, v2, out=odd[first])
    odd[first] += v3  # dd1 of tile q ...
    odd[end] = 0
    odd[shifted] -= v3  # ... plus dd3 of tile q - 1


def layer_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray, pads: tuple, ws: Workspace):
    """`dpcnn.layers.Conv2D.forward` as Winograd: y ``(m, oh, ow, c_out)`` (a new array) and what
    `layer_backward` needs. x ``(m, h, w, c_in)``, W ``(3, 3, c_in, c_out)``, b ``(c_out,)``."""
    m, h, w, c = x.shape
    oh, ow = h + pads[0] + pads[1] - 2, w + pads[2] + pads[3] - 2
    tp = tile_pads(pads, oh, ow)
    ty, tx = tiles(oh, ow)
    V = ws.get("wino_V", (16, m * ty * tx, c), x.dtype)
    transform_input(pad_planes(x, tp, ws), V, ws)
    U = filters(W)
    z = conv_slots(V, U, b, np.empty((4, m * ty * tx, W.shape[3]), x.dtype), ws)
    return slots_to_nhwc(z, m, oh, ow), (V, U, tp)


def layer_backward(cache: tuple, dy: np.ndarray, x_shape: tuple, dW: np.ndarray, db: np.ndarray,
                   need_dx: bool, ws: Workspace) -> np.ndarray | None:
    """`dpcnn.layers.Conv2D.backward` as Winograd: writes dW, db; dx ``x_shape`` (new) when ``need_dx``."""
    V, U, tp = cache
    m, oh, ow, _ = dy.shape
    dz = nhwc_to_slots(dy, ws)
    dYt = transform_grad(dz, ws)
    filter_grads(V, dYt, dz, dW, db, ws)
    if not need_dx:
        return None
    return crop_planes(input_grad(dYt, U, m, *tiles(oh, ow), ws), tp, np.empty(x_shape, dy.dtype))


def slots_to_nhwc(z: np.ndarray, n: int, oh: int, ow: int) -> np.ndarray:
    """Slot-order z ``(4, n*ty*tx, c)`` as a new NHWC array ``(n, oh, ow, c)`` (odd sizes cropped)."""
    ty, tx = tiles(oh, ow)
    c = z.shape[-1]
    y = z.reshape(2, 2, n, ty, tx, c).transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * ty, 2 * tx, c)
    return np.ascontiguousarray(y[:, :oh, :ow])


def nhwc_to_slots(dy: np.ndarray, ws: Workspace) -> np.ndarray:
    """NHWC dy ``(n, oh, ow, c)`` in slot order, ws's ``(4, n*ty*tx, c)`` (zeros past an odd edge)."""
    n, oh, ow, c = dy.shape
    ty, tx = tiles(oh, ow)
    z = ws.get("wino_slots", (4, n * ty * tx, c), dy.dtype, lambda a: a.fill(0))
    v = z.reshape(2, 2, n, ty, tx, c)
    for i in range(2):
        for j in range(2):
            src = dy[:, i::2, j::2]
            v[i, j, :, :src.shape[1], :src.shape[2]] = src
    return z
