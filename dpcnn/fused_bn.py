"""The Model's fused ``Conv2D -> BatchNorm -> ReLU [-> pool]`` step.

Evaluation: batch norm with its running statistics is the per-channel map
z * s + t, folded into the filters and bias (W * s, b * s + t) before the
plain `dpcnn.fused.ConvReLU` pass: at inference it costs nothing.

Training needs the statistics of the whole conv output before any of it can
be normalised, so the blocks of examples run twice (`dpcnn.norm.BatchPass`
holds the arithmetic). The conv's bias carries minus the running mean, so
the GEMM yields zc = z - running mean, a well-centred input for float32 sums.

* Pass 1, per block: the conv output into one ``(m*oh*ow, c_out)`` array
  and its sums while the block is in cache. Pass 2, per block: scale and
  shift, pool, ReLU. With max pooling and a map that increases in every
  channel (gamma > 0, the usual case), pooling comes first and the map runs
  on the k*k times smaller maxima.
* A first layer (no input gradient) with the bias folded into the GEMM
  skips the big array: every statistic and gradient of batch norm is a
  small product with the patches' Gram matrix G = P^T P ``(K+1, K+1)``.
  With zc = P Wm: sum(zc) = G[-1] Wm, sum(zc**2) = colsum(Wm * G Wm), and
  from Q = P^T dy: sum(dy) = Q[-1], sum(dy * zc) = colsum(Wm * Q), and the
  filter gradient P^T (dy*k + zc*b + c) = Q*k + (G Wm)*b + G[-1] c^T. Pass 1
  is G (for a 3x3 'same' conv of one channel, `image_gram`: from the image's
  lags, without the patches), pass 2 one GEMM with the map folded into the
  filters (zc * a + c = P (Wm * a), c added to the bias row), then pool and
  ReLU, and the backward pass is the plain ConvReLU's with Q in place of the
  filter gradient.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from .fused import ConvReLU
from .layers import AvgPool2D, Conv2D, MaxPool2D, ReLU
from .norm import BatchNorm, BatchPass, affine_, channelwise, col_dots, col_sums

__all__ = ["ConvBNReLU"]


class ConvBNReLU(ConvReLU):
    """Model-internal fusion of ``Conv2D -> BatchNorm -> ReLU [-> pool]`` (see the module docstring); the
    layers' numbers up to the order of float sums (tests/test_norm.py)."""

    flat_ok = False  # training takes its batch statistics on the general path's blocks

    def __init__(self, conv: Conv2D, bn: BatchNorm, relu: ReLU, pool: MaxPool2D | AvgPool2D | None = None):
        super().__init__(conv, relu, pool)
        self.bn = bn
        self.layers = (conv, bn, *self.layers[1:])
        self._pass = None

    def _weights(self, train):
        if train:
            return self.conv.W, self.conv.b
        s, t = self.bn.scale_shift()
        return self.conv.W * s, self.conv.b * s + t

    def forward(self, x, train=True):
        self._pass = None
        if not train:
            return super().forward(x, train)
        conv, bn, m = self.conv, self.bn, x.shape[0]
        self._pass = bp = BatchPass(bn.running_mean.copy(), bn.eps)
        f = self._start(x, conv.W, conv.b - bp.shift)  # the GEMM gives zc = z - running mean
        f.gram = f.fold and not conv.needs_input_grad and not f.wino  # (Winograd has no patches)
        f.image = f.gram and image_gram_ok(conv, conv.pads(*x.shape[1:3]))  # G without the patches
        self._statistics(f, bp)
        bn.record(*bp.finish(bn.gamma, bn.beta), m * f.rows, m)
        self._normalise(f, bp)
        return self._finish(f)

    def _statistics(self, f: SimpleNamespace, bp: BatchPass) -> None:
        """Pass 1: the sums of zc and zc**2 over all rows, from G or from the stored zc."""
        if f.gram:
            f.G = image_gram(f.xp) if f.image else sum(self._gram(f, a, b) for a, b in f.blocks)
            W = f.Wm.astype(np.float64)
            bp.n, bp.sums[0], bp.sums[1] = f.x_shape[0] * f.rows, f.G[-1] @ W, np.sum(W * (f.G @ W), axis=0)
            return
        f.zc = self.workspace.get("zc", (f.x_shape[0] * f.rows, f.c_out), f.xp.dtype)
        for a, b in f.blocks:  # while the block is in cache
            bp.sums_(self._conv_block(f, a, b, out=f.zc[a * f.rows:b * f.rows]))

    def _gram(self, f: SimpleNamespace, a: int, b: int) -> np.ndarray:
        """P^T P of the patches of examples a:b (made now, kept if they fit), float64 ``(K+1, K+1)``."""
        return gram(self._cols(f, a, b, fresh=True))

    def _normalise(self, f: SimpleNamespace, bp: BatchPass) -> None:
        """Pass 2: y = pool(relu(zc * scale + shift)) block by block, or relu(scale * max(zc) + shift)."""
        if f.gram:
            return self._gram_normalise(f, bp)
        scale, shift = bp.affine
        pool_first = self.k > 1 and not self.avg and bool(np.all(scale.v > 0))
        tmp = self._tmp(f)
        # Pool first: keep the window maxima of zc and where y > 0 for backward.
        f.pooled, pr = pool_first, f.rows // f.kk
        if f.pooled:
            shape = (f.y.size // f.c_out, f.c_out)
            f.zmax, f.pos = self.workspace.get("zmax", shape, f.y.dtype), self.workspace.get("pos", shape, np.bool_)

        def after_max(p, a, b):  # p: the window maxima of zc of examples a:b -> their scale and shift, in place
            f.zmax[a * pr:b * pr] = p
            return affine_(p, scale, shift, out=p)

        for a, b in f.blocks:
            yb = f.y[a:b].reshape(-1, f.c_out)
            zb = f.zc[a * f.rows:b * f.rows]
            if pool_first:
                self._pool_relu(zb.reshape(f.kk, -1, f.c_out), yb, f.block_masks(a, b),
                                after_max=lambda p: after_max(p, a, b))
                np.greater(yb, 0, out=f.pos[a * pr:b * pr])
                continue
            u = affine_(zb, scale, shift, out=yb if self.k == 1 else tmp[:len(zb)])
            self._pool_relu(u.reshape(f.kk, -1, f.c_out), yb, f.block_masks(a, b))

    def _gram_normalise(self, f: SimpleNamespace, bp: BatchPass) -> None:
        """Pass 2 of a first layer: zc * scale + shift straight from the GEMM, with the map folded into the
        filter matrix (Wm * scale, shift added to its bias row), then pooling and ReLU as in ConvReLU: no
        pass over the output for the map, and any sign of gamma."""
        scale, shift = bp.affine
        Wn = f.Wm * scale.v  # (float64)
        Wn[-1] += shift.v
        Wn, f.pooled = Wn.astype(f.Wm.dtype), False
        for a, b in f.blocks:  # (image_gram made no patches in pass 1: make them now)
            yb = f.y[a:b].reshape(-1, f.c_out)
            zb = self._conv_block(f, a, b, out=yb if self.k == 1 else None, fresh=f.image, Wm=Wn)
            self._pool_relu(zb.reshape(f.kk, -1, f.c_out), yb, f.block_masks(a, b))

    def backward(self, dy):
        if self._pass is None:
            raise RuntimeError("the fused conv + batchnorm step has no batch statistics to differentiate: "
                               "backward needs a forward with train=True, once per forward")
        f, bp, rows = self._cache, self._pass, self._cache.rows
        self._pass = None  # (backward overwrites the forward's zc: once per forward)
        dz = self.workspace.get("dz", (f.nb * rows, f.c_out), f.xp.dtype)
        if f.gram:
            return self._gram_backward(f, bp, dy, dz)
        g = self._start_backward(f)
        zc = f.zc
        if f.pooled:
            return self._pooled_backward(f, bp, g, dy, dz)
        for a, b in f.blocks:  # the sums of dy and dy * zc ...
            n = (b - a) * rows
            bp.grad_sums_(self._masked_grad(f, dy, a, b, out=dz[:n]), zc[a * rows:b * rows])
        self.bn.dgamma[...], self.bn.dbeta[...] = bp.finish_backward()
        for a, b in f.blocks:  # ... then dz block by block (the masked dy again: cheaper than keeping it)
            n = (b - a) * rows
            dzb = self._masked_grad(f, dy, a, b, out=dz[:n])
            bp.input_grad_(dzb, zc[a * rows:b * rows], zc[a * rows:b * rows])  # (see _pooled_backward)
            self._block_backward(f, g, a, b, dzb)
        return g.dx

    def _tmp(self, f: SimpleNamespace) -> np.ndarray:
        """Scratch of a block's conv output ``(block rows, c_out)``."""
        return self.workspace.get("tmp", (f.nb * f.rows, f.c_out), f.xp.dtype)

    def _pooled_backward(self, f: SimpleNamespace, bp: BatchPass, g: SimpleNamespace, dy: np.ndarray,
                         dz: np.ndarray) -> np.ndarray | None:
        """Max pooled first: of the conv output only the window maxima that are > 0 after the map get dy,
        so the sums of dy and dy * zc are sums over the k*k times smaller pooled arrays, and dy * A is
        made there too before it is routed to the maxima; only dz += zc * B + C runs at full size."""
        rows, c = f.rows, f.c_out
        d = np.multiply(dy.reshape(-1, c), f.pos, out=self.workspace.get("dpool", f.pos.shape, f.zmax.dtype))
        bp.grads[0] += col_sums(d)
        bp.grads[1] += col_dots(d, f.zmax)
        self.bn.dgamma[...], self.bn.dbeta[...] = bp.finish_backward()
        channelwise(np.multiply, d, bp.input_map[0], out=d)
        for a, b in f.blocks:
            n = (b - a) * rows
            dzb = self._masked_grad(f, d, a, b, out=dz[:n])
            zb = f.zc[a * rows:b * rows]
            bp.input_grad_(dzb, zb, zb, scaled=True)  # (zc is not needed after this: its block is the scratch)
            self._block_backward(f, g, a, b, dzb)
        return g.dx

    def _gram_backward(self, f: SimpleNamespace, bp: BatchPass, dy: np.ndarray, dz: np.ndarray) -> None:
        """A first layer: Q = P^T dy block by block, then batch norm's and the filters' gradients from Q and G."""
        Q = 0
        for a, b in f.blocks:
            Q = Q + (self._cols(f, a, b).T @ self._masked_grad(f, dy, a, b, out=dz[:(b - a) * f.rows]))
        Q, W = np.asarray(Q, np.float64), f.Wm.astype(np.float64)
        bp.grads[0], bp.grads[1] = Q[-1], np.sum(W * Q, axis=0)
        self.bn.dgamma[...], self.bn.dbeta[...] = bp.finish_backward()
        k, b, c = bp.input_map64
        dWm = Q * k + (f.G @ W) * b + np.outer(f.G[-1], c)
        conv = self.conv
        conv.dW[...], conv.db[...] = dWm[:-1].reshape(conv.dW.shape), dWm[-1]
        return None


def gram(A: np.ndarray) -> np.ndarray:
    """A^T A, float64 ``(K, K)``, of a patch matrix A ``(n, K)`` (either layout of `conv_kernels.im2col`).

    Where A (or A^T) is one contiguous block and n is even, it is the sum of the two diagonal blocks of
    the Gram matrix of A seen as ``(n/2, 2K)``: a (2K, 2K) product is ~30 % faster than the (K, K) one
    on `small`'s first conv (25,088 x 10 patches: 200 against 286 us transposed, 118 against 154 us
    row-major, one thread, this EPYC), the skinny output being what slows OpenBLAS down.
    """
    n, K = A.shape
    if n % 2 == 0 and A.T.flags.c_contiguous:  # A^T (K, n): row 2i is A[:n/2, i], row 2i + 1 is A[n/2:, i]
        B = A.T.reshape(2 * K, n // 2)
        return (B @ B.T).reshape(K, 2, K, 2).diagonal(axis1=1, axis2=3).sum(axis=-1, dtype=np.float64)
    if n % 2 == 0 and A.flags.c_contiguous:  # row p of (n/2, 2K) is A[2p], A[2p + 1]
        B = A.reshape(n // 2, 2 * K)
        return (B.T @ B).reshape(2, K, 2, K).diagonal(axis1=0, axis2=2).sum(axis=-1, dtype=np.float64)
    return (A.T @ A).astype(np.float64)


def _image_gram_tables() -> tuple:
    """Index tables of `image_gram` for the pairs (i, j) of a 3x3 kernel's taps (a, b), in patch-column order
    a * 3 + b: where G[i, j] finds F(o_j - o_i) in F ``(25,)``, and its corrections in the vector v of
    in-row lags of the first and last row, in-column lags of the first and last column (3 each: |lag| 0,
    1, 2), the 4 corners' squares and a 0 (index 16); the same for the ones column's sums (u: 2 rows, 2
    columns, 4 corners, a 0 at index 8). A tap of the kernel's first row never sees the last input row
    (it is row 1 of the edges), one of its last row never the first (row 0); columns alike."""
    a, b = np.divmod(np.arange(9), 3)
    dr, dc = a[None, :] - a[:, None], b[None, :] - b[:, None]
    er, ec = np.array([1, -1, 0])[a][:, None], np.array([1, -1, 0])[b][:, None]
    row, col = (er >= 0) & (dr == 0), (ec >= 0) & (dc == 0)
    G = ((dr + 2) * 5 + dc + 2, np.where(row, er * 3 + abs(dc), 16), np.where(col, (2 + ec) * 3 + abs(dr), 16),
         np.where(row & col, 12 + er * 2 + ec, 16))
    er, ec = er[:, 0], ec[:, 0]
    ones = (np.where(er >= 0, er, 8), np.where(ec >= 0, 2 + ec, 8), np.where((er >= 0) & (ec >= 0), 4 + er * 2 + ec, 8))
    return G, ones


_GRAM_TABLES = _image_gram_tables()


def image_gram_ok(conv: Conv2D, pads: tuple) -> bool:
    """Whether `image_gram` applies: one input channel, a 3x3 kernel, stride 1, one pixel of zeros all round."""
    return conv.in_channels == 1 and conv.kernel_size == 3 and conv.stride == 1 and tuple(pads) == (1, 1, 1, 1)


def image_gram(xp: np.ndarray) -> np.ndarray:
    """P^T P, float64 ``(10, 10)``, of the patches [9 taps | 1] of a 3x3 stride-1 conv of one channel with one
    pixel of zero padding, from its padded input xp ``(m, h + 2, w + 2, 1)``, without making the patches.

    G[i, j] = sum over the outputs p of x(p + o_i) x(p + o_j) is the batch's autocorrelation at the lag
    d = o_j - o_i, F(d) (13 dot products over the flat padded batch: with a zero border of one pixel, a lag
    of up to two rows and two columns pairs a pixel only with zeros across rows and images), minus the
    products at the input pixels tap i never sees: the last row for the taps of the kernel's first row, the
    first row for its last row, and the same for columns. Of those, only lags within the excluded row
    (dr = 0), within the excluded column (dc = 0) and the corner pixel itself (d = 0) reach inside the
    image. The ones column: the sum of x over each tap's window.
    """
    m, hp, wp, _ = xp.shape
    h, w, X = hp - 2, wp - 2, xp.reshape(-1)
    n, F = X.size, np.empty(25)  # F[(dr + 2) * 5 + dc + 2]
    for dr in range(3):  # (a loop over the 13 lags of a 3x3 kernel, each one dot over the whole batch)
        for dc in range(-2, 3) if dr else range(3):
            s = dr * wp + dc
            F[(dr + 2) * 5 + dc + 2] = F[(2 - dr) * 5 + 2 - dc] = np.dot(X[:n - s], X[s:])
    x = xp[:, 1:-1, 1:-1, 0]
    e = np.zeros((4, m, max(h, w) + 2), xp.dtype)  # first and last row, first and last column; 2 zeros after each
    e[:2, :, :w], e[2:, :, :h] = x[:, [0, -1], :].transpose(1, 0, 2), x[:, :, [0, -1]].transpose(2, 0, 1)
    E, v = e.reshape(4, -1), np.zeros(17)
    for k in range(3):  # in-edge lags 0, 1, 2
        v[k:12:3] = np.einsum("ij,ij->i", E[:, :E.shape[1] - k], E[:, k:])
    corners = x[:, [0, -1], :][:, :, [0, -1]].reshape(m, 4)
    v[12:16] = np.einsum("mi,mi->i", corners, corners)
    (f, row, col, cor), (urow, ucol, ucor) = _GRAM_TABLES
    u = np.concatenate((E.sum(axis=1, dtype=np.float64), corners.sum(axis=0, dtype=np.float64), [0.0]))
    G = np.empty((10, 10))
    G[:9, :9] = F[f] - v[row] - v[col] + v[cor]
    G[9, :9] = G[:9, 9] = X.sum(dtype=np.float64) - u[urow] - u[ucol] + u[ucor]
    G[9, 9] = m * h * w
    return G
