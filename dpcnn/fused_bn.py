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
  is one small GEMM per block, pass 2 recomputes the conv output, and the
  backward pass is the plain ConvReLU's with Q in place of the filter gradient.
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
        self._statistics(f, bp)
        bn.record(*bp.finish(bn.gamma, bn.beta), m * f.rows, m)
        self._normalise(f, bp)
        return self._finish(f)

    def _statistics(self, f: SimpleNamespace, bp: BatchPass) -> None:
        """Pass 1: the sums of zc and zc**2 over all rows, from G or from the stored zc."""
        if f.gram:
            f.G = sum(self._gram(f, a, b) for a, b in f.blocks)
            W = f.Wm.astype(np.float64)
            bp.n, bp.sums[0], bp.sums[1] = f.x_shape[0] * f.rows, f.G[-1] @ W, np.sum(W * (f.G @ W), axis=0)
            return
        f.zc = self.workspace.get("zc", (f.x_shape[0] * f.rows, f.c_out), f.xp.dtype)
        for a, b in f.blocks:  # while the block is in cache
            bp.sums_(self._conv_block(f, a, b, out=f.zc[a * f.rows:b * f.rows]))

    def _gram(self, f: SimpleNamespace, a: int, b: int) -> np.ndarray:
        """P^T P of the patches of examples a:b (made now, kept if they fit), float64 ``(K+1, K+1)``."""
        A = self._cols(f, a, b, fresh=True)
        return (A.T @ A).astype(np.float64)

    def _normalise(self, f: SimpleNamespace, bp: BatchPass) -> None:
        """Pass 2: y = pool(relu(zc * scale + shift)) block by block, or relu(scale * max(zc) + shift)."""
        scale, shift = bp.affine
        pool_first = self.k > 1 and not self.avg and bool(np.all(scale.v > 0))
        tmp = None if f.gram else self._tmp(f)
        # Pool first (not the Gram path): keep the window maxima of zc and where y > 0 for backward.
        f.pooled, pr = pool_first and not f.gram, f.rows // f.kk
        if f.pooled:
            shape = (f.y.size // f.c_out, f.c_out)
            f.zmax, f.pos = self.workspace.get("zmax", shape, f.y.dtype), self.workspace.get("pos", shape, np.bool_)

        def after_max(p, a, b):  # p: the window maxima of zc of examples a:b -> their scale and shift, in place
            if f.pooled:
                f.zmax[a * pr:b * pr] = p
            return affine_(p, scale, shift, out=p)

        for a, b in f.blocks:
            yb = f.y[a:b].reshape(-1, f.c_out)
            if f.gram:  # zc again, from the kept (or remade) patches
                zb = self._conv_block(f, a, b, out=yb if self.k == 1 else None, fresh=False)
            else:
                zb = f.zc[a * f.rows:b * f.rows]
            if pool_first:
                self._pool_relu(zb.reshape(f.kk, -1, f.c_out), yb, f.block_masks(a, b),
                                after_max=lambda p: after_max(p, a, b))
                if f.pooled:
                    np.greater(yb, 0, out=f.pos[a * pr:b * pr])
                continue
            u = affine_(zb, scale, shift, out=yb if self.k == 1 else zb if f.gram else tmp[:len(zb)])
            self._pool_relu(u.reshape(f.kk, -1, f.c_out), yb, f.block_masks(a, b))

    def backward(self, dy):
        if self._pass is None:
            raise RuntimeError("the fused conv + batchnorm step has no batch statistics to differentiate: "
                               "backward needs a forward with train=True")
        f, bp, rows = self._cache, self._pass, self._cache.rows
        dz = self.workspace.get("dz", (f.nb * rows, f.c_out), f.xp.dtype)
        if f.gram:
            return self._gram_backward(f, bp, dy, dz)
        g = self._start_backward(f)
        zc, tmp = f.zc, self._tmp(f)
        if f.pooled:
            return self._pooled_backward(f, bp, g, dy, dz)
        for a, b in f.blocks:  # the sums of dy and dy * zc ...
            n = (b - a) * rows
            bp.grad_sums_(self._masked_grad(f, dy, a, b, out=dz[:n]), zc[a * rows:b * rows])
        self.bn.dgamma[...], self.bn.dbeta[...] = bp.finish_backward()
        for a, b in f.blocks:  # ... then dz block by block (the masked dy again: cheaper than keeping it)
            n = (b - a) * rows
            dzb = self._masked_grad(f, dy, a, b, out=dz[:n])
            bp.input_grad_(dzb, zc[a * rows:b * rows], tmp[:n])
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
            bp.input_grad_(dzb, f.zc[a * rows:b * rows], self._tmp(f)[:n], scaled=True)
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
