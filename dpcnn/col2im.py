"""dx of a convolution in general (any stride and padding): the GEMM dy @ W^T scattered back onto the
input pixels (col2im), with the layout of `dpcnn.conv_kernels` (NHWC activations, HWIO filters).

Re-exported by `dpcnn.conv_kernels`; `dpcnn.conv_kernels.full_corr` is the stride-1 alternative.
"""

from __future__ import annotations

import math

import numpy as np

from . import conv_kernels as ck

__all__ = ["col2im", "col2im_hwn", "scratch"]


def scratch(ws: ck.Workspace, name: str, shape: tuple, dtype) -> np.ndarray:
    """A C-contiguous ``shape`` view of ws's flat array ``name``, which only grows: the blocks of
    examples of one step differ in size (22, 22, 20) and must not reallocate it."""
    size = math.prod(shape)
    return ws.flat(name, size, dtype)[:size].reshape(shape)


def col2im(dy2: np.ndarray, W: np.ndarray, x_shape: tuple, stride: int, pads: tuple,
           oh: int, ow: int, ws: ck.Workspace | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """dx ``x_shape = (m, h, w, c_in)`` in general, from dy2 ``(m*oh*ow, c_out)`` in NHWC row order:
    `col2im_hwn` after one copy of dy2 into its (oh, ow, m, c_out) order."""
    ws = ck.Workspace() if ws is None else ws
    m, k = x_shape[0], W.shape[3]
    dzp = scratch(ws, "dz_hwn", (oh, ow, m, k), dy2.dtype)
    np.copyto(dzp, dy2.reshape(m, oh, ow, k).transpose(1, 2, 0, 3))
    return col2im_hwn(dzp, W, x_shape, stride, pads, ws, out)


def col2im_hwn(dzp: np.ndarray, W: np.ndarray, x_shape: tuple, stride: int, pads: tuple, ws: ck.Workspace,
               out: np.ndarray | None = None) -> np.ndarray:
    """dx ``x_shape = (m, h, w, c_in)`` from dzp ``(oh, ow, m, c_out)``: D = W^T-by-rows @ dzp^T, one GEMM
    giving ``(f, f, c_in, oh, ow*m)``, scattered back onto the input pixels, into ``out`` when given.

    Why examples innermost: the f*f scatter-adds then move runs of ow*m (stride 1) or m floats
    into a (c_in, hp, wp, m) buffer, where NHWC runs are f*c_in floats at best: 2.1x faster on
    LeNet-5's second conv at batch 128 (3.7 vs 7.7 ms, bench/RESULTS.md). One transposed copy
    brings dx back to NHWC.
    """
    m, h, w, c = x_shape
    oh, ow, _, k = dzp.shape
    f, s = W.shape[0], stride
    t, btm, l, r = pads
    D = scratch(ws, "c2i_D", (f, f, c, oh, ow * m), dzp.dtype)
    ck.gemm(W.reshape(f * f * c, k), dzp.reshape(-1, k).T, out=D.reshape(f * f * c, -1))
    dxT = scratch(ws, "c2i_dxT", (c, h + t + btm, w + l + r, m), dzp.dtype)
    dxT.fill(0)
    for i in range(f):  # f*f whole-array adds (loops over kernel offsets, not pixels)
        for j in range(f):
            dxT[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :] += D[i, j].reshape(c, oh, ow, m)
    dx = np.empty(x_shape, dzp.dtype) if out is None else out
    np.copyto(dx, dxT[:, t:t + h, l:l + w, :].transpose(3, 1, 2, 0))
    return dx
