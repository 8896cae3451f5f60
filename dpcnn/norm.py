"""Regularising layers: inverted dropout and batch normalisation, forward and backward.

Both are world-size invariant by construction, so data-parallel training
stays what a single process would do (README, "Dropout and BatchNorm"):

* `Dropout` draws its mask from (seed, step, layer, the example's position
  in its GLOBAL batch), never from the rank: 1, 2 or 4 ranks drop the same
  units of the same example.
* `BatchNorm` normalises with the statistics of the examples it is given in
  one forward pass. `dpcnn.step.StepBuffer` gives it fixed global
  micro-batches (``trainer.micro_batch``), the same at every world size. Its
  running statistics live in the model's statistics buffer (the tail of
  ``model.params``: checkpointed, broadcast and served with the weights);
  each forward writes the batch statistics, weighted by its share of the
  global batch, into the matching tail of the gradient buffer, so the
  step's one Allreduce also averages them, and every rank then updates the
  running statistics identically (`BatchNorm.update_running`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .conv_kernels import Workspace
from .layers import Layer

__all__ = ["Dropout", "BatchNorm", "BatchPass", "Cols", "dropout_scale", "affine_", "channelwise", "col_sums", "col_dots"]


def dropout_scale(seed: int, step: int, key: int, start: int, shape: tuple, rate: float, dtype) -> np.ndarray:
    """The multiplier of inverted dropout, ``(m, *units)``: 0 for a dropped unit, 1/(1 - rate) for a kept one.

    Row i belongs to the example at position ``start + i`` of its global batch.
    Every (``seed``, layer ``key``) has a PCG64 stream; step s reads it from
    number s * 2**64 on, as 16-bit numbers (four per 64-bit draw); example p's u
    units are numbers p*u ... p*u + u - 1 of the step's part, so any rank reads
    any run of examples by jumping ahead (``advance``) to its first draw,
    whatever the world size. A unit is kept when its number is >= rate * 2**16
    (the rate is rounded to a multiple of 2**-16).
    """
    m, units = shape[0], math.prod(shape[1:])
    first, count = start * units, m * units
    bits, state = _stream(seed, key)
    bits.state = state  # (setting a state and jumping: a tenth of the cost of seeding a new generator)
    bits.advance(step * 2**64 + first // 4)
    skip = first % 4
    raw = np.asarray(bits.random_raw(-(-(skip + count) // 4)), "<u8").view("<u2")[skip:skip + count]
    drop = min(round(rate * 65536), 65535)
    scale = (raw >= drop).astype(dtype)
    scale *= dtype.type(65536 / (65536 - drop))
    return scale.reshape(shape)


@functools.lru_cache(maxsize=64)
def _stream(seed: int, key: int) -> tuple[np.random.PCG64, dict]:
    """The generator of layer ``key``'s masks, and its initial state (`dropout_scale` resets it each call)."""
    bits = np.random.PCG64(np.random.SeedSequence([seed % 2**63, key]))
    return bits, bits.state


class Dropout(Layer):
    """Inverted dropout: x ``(m, ...)`` -> x * mask / (1 - rate) in training, x at evaluation.

    The mask comes from `dropout_scale` with the ``seed``, ``step`` and
    ``start`` (position of x[0] in the global batch) that the Model sets
    before each training pass; ``key`` (the layer's index) gives each dropout
    layer its own mask.
    """

    def __init__(self, rate: float = 0.5, key: int = 0):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate!r}; e.g. {{type: dropout, rate: 0.25}}")
        self.rate, self.key = float(rate), key
        self.seed = self.step = self.start = 0
        self._scale = None

    def forward(self, x, train=True):
        if not train or self.rate == 0:
            self._scale = None
            return x
        self._scale = dropout_scale(self.seed, self.step, self.key, self.start, x.shape, self.rate, x.dtype)
        return x * self._scale

    def backward(self, dy):
        return dy if self._scale is None else dy * self._scale

    def __repr__(self):
        return f"Dropout({self.rate:g})"


class Cols:
    """A per-column vector v ``(c,)`` for `channelwise`, with its tiled copies made once per width.

    NumPy runs ``a * v`` over a ``(n, c)`` array with an inner loop of c values
    (16 to 64 here), several times slower than an elementwise product. Seen as
    ``(n/r, r*c)`` with v tiled r times, the inner loop is ~512 values long.
    """

    def __init__(self, v: np.ndarray, dtype=None):
        """``dtype``: that of the tiles (default v's); v may be a float64 vector for float32 arrays."""
        self.v, self.dtype, self._tiles = v, np.dtype(dtype or v.dtype), {}

    def wide(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """a ``(n, c)`` as ``(n/r, r*c)`` and v tiled r times."""
        n, c = a.shape
        r = math.gcd(n, max(1, 512 // c))
        t = self._tiles.get(r)
        if t is None:  # (an assignment that broadcasts and casts: a tenth of np.tile's overhead)
            t = self._tiles[r] = np.empty((r, c), self.dtype)
            t[...] = self.v
            t.shape = (r * c,)
        return a.reshape(n // r, r * c), t


def channelwise(op, a: np.ndarray, v: Cols | np.ndarray, out: np.ndarray) -> np.ndarray:
    """``op(a, v, out=out)`` with v ``(c,)`` broadcast over the rows of a ``(n, c)``; out may be a."""
    wa, wv = (v if isinstance(v, Cols) else Cols(v)).wide(a)
    return op(wa, wv, out=out.reshape(wa.shape)).reshape(a.shape)


def col_sums(a: np.ndarray) -> np.ndarray:
    """Column sums of a ``(n, c)``, as one matrix-vector product (a reduction over axis 0 of a few
    columns is an order of magnitude slower in NumPy)."""
    return np.ones(a.shape[0], a.dtype) @ a


def col_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column sums of a * b ``(n, c)``, float64 ``(c,)``: one einsum over the `Cols` wide view (no
    product array; 0.5-0.7x the time of the product and `col_sums`, measured on batch norm's shapes)."""
    n, c = a.shape
    r = math.gcd(n, max(1, 512 // c))
    wide = np.einsum("ij,ij->j", a.reshape(n // r, r * c), b.reshape(n // r, r * c))
    return wide.reshape(r, c).sum(axis=0, dtype=np.float64)


def affine_(x: np.ndarray, s: Cols | np.ndarray, t: Cols | np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = x * s + t per column: x, out ``(n, c)``, s and t ``(c,)``."""
    channelwise(np.multiply, x, s, out=out)
    return channelwise(np.add, out, t, out=out)


class BatchPass:
    """The arithmetic of one training pass of batch norm over n rows ``(n, c)``, which may come in blocks.

    Works on zc = z - shift, with a shift near the batch mean (the layer uses
    the mean itself, the fused conv step the running mean, which it folds into
    the conv bias): zc keeps float32 sums of squares accurate. Forward:
    `sums_` of each block's zc (added up in float64), `finish` (the mean and
    biased variance), then y = zc * a + c per block (``affine``, `Cols`).
    Backward: `grad_sums_` of each block's dy, `finish_backward`, then
    `input_grad_` of each block. Every pass takes one block at a time, so a
    caller can keep each block in cache (`dpcnn.fused.ConvBNReLU`).
    """

    def __init__(self, shift: np.ndarray, eps: float):
        self.shift, self.eps = shift, eps
        self.n, self.sums, self.grads = 0, np.zeros((2, len(shift))), np.zeros((2, len(shift)))

    def sums_(self, zc: np.ndarray) -> None:
        """Add up the column sums and sums of squares of zc ``(rows, c)``."""
        self.n += zc.shape[0]
        self.sums[0] += col_sums(zc)
        self.sums[1] += col_dots(zc, zc)

    def finish(self, gamma: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The batch's (mean, biased variance), ``(c,)`` each; sets ``affine`` = (a, c) of y = zc * a + c."""
        dt = self.shift.dtype
        self.delta, var = self.sums / max(self.n, 1)  # mean - shift, and the mean of zc**2 ...
        var -= self.delta * self.delta  # ... minus delta**2 (a view of a fresh array: ours)
        np.maximum(var, 0, out=var)
        self.inv = (var + self.eps) ** -0.5
        self.k = gamma * self.inv  # (float64)
        self.affine = Cols(self.k, dt), Cols(beta - self.delta * self.k, dt)
        return (self.shift + self.delta).astype(dt), var.astype(dt)

    def grad_sums_(self, d: np.ndarray, zc: np.ndarray) -> None:
        """Add up the column sums of dy and of dy * zc, ``(rows, c)`` each."""
        self.grads[0] += col_sums(d)
        self.grads[1] += col_dots(d, zc)

    def finish_backward(self) -> tuple[np.ndarray, np.ndarray]:
        """(dgamma, dbeta), ``(c,)`` each; sets dz = dy * A + zc * B + C, which is the batch-norm backward
        k * (dy - mean(dy) - x_hat * mean(dy * x_hat)), k = gamma / sqrt(var + eps), x_hat = (zc - delta) * inv."""
        dbeta, n, dt = self.grads[0], max(self.n, 1), self.shift.dtype
        dgamma = self.inv * (self.grads[1] - self.delta * dbeta)
        b = -self.k * self.inv * dgamma / n
        self.input_map64 = (self.k, b, -b * self.delta - self.k * dbeta / n)
        self.input_map = tuple(Cols(v, dt) for v in self.input_map64)
        return dgamma.astype(dt), dbeta.astype(dt)

    def input_grad_(self, d: np.ndarray, zc: np.ndarray, tmp: np.ndarray, scaled: bool = False) -> None:
        """d ``(rows, c)`` = dL/dy -> dL/dz, in place (``scaled``: d is dL/dy * A already); ``tmp`` is scratch
        of zc's shape, and may be zc itself when zc is not needed again."""
        A, B, C = self.input_map
        if not scaled:
            channelwise(np.multiply, d, A, out=d)
        d += channelwise(np.multiply, zc, B, out=tmp)
        channelwise(np.add, d, C, out=d)


class BatchNorm(Layer):
    """Batch normalisation of the last axis: x ``(m, h, w, c)`` (statistics over m, h, w) or ``(m, c)``.

    Training: y = gamma * (x - mean) / sqrt(var + eps) + beta with the mean and
    biased variance of this x; evaluation: with ``running_mean`` and
    ``running_var``. ``gamma``/``beta`` ``(c,)`` are parameters (views of the
    flat parameter buffer, gradients ``dgamma``/``dbeta``);
    ``running_mean``/``running_var`` ``(c,)`` are statistics (the model's
    statistics buffer, see `stat_shapes`), and each training forward writes
    m * (batch mean, unbiased batch variance) into ``batch_mean``/``batch_var``
    (views of the gradient buffer's statistics part), which the Model scales
    by 1 / (global batch) and the step's Allreduce sums.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5, dtype=np.float32):
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"batchnorm momentum must be in [0, 1], got {momentum!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"batchnorm eps must be > 0, got {eps!r}")
        self.num_features, self.momentum, self.eps = num_features, float(momentum), float(eps)
        c = (num_features,)
        self.param_shapes = (("gamma", c), ("beta", c))
        #: Statistics: bound by the Model as running_<name> (parameter side) and batch_<name> (gradient side).
        self.stat_shapes = (("mean", c), ("var", c))
        self.gamma, self.beta = np.ones(c, dtype), np.zeros(c, dtype)
        self.dgamma, self.dbeta = np.zeros(c, dtype), np.zeros(c, dtype)
        self.running_mean, self.running_var = np.zeros(c, dtype), np.ones(c, dtype)
        self.batch_mean, self.batch_var = np.zeros(c, dtype), np.zeros(c, dtype)
        self.needs_input_grad = True
        self.workspace = Workspace()
        self._pass = self._rows = None

    def reset(self) -> None:
        """Initial values: gamma 1, beta 0, running mean 0, running variance 1."""
        self.gamma[...], self.beta[...] = 1, 0
        self.running_mean[...], self.running_var[...] = 0, 1

    def output_shape(self, input_shape):
        if input_shape[-1] != self.num_features:
            raise ValueError(f"expects {self.num_features} features, got {input_shape[-1]}")
        return input_shape

    def record(self, mean: np.ndarray, var: np.ndarray, n: int, m: int) -> None:
        """Write this pass's statistics (over n values per feature, from m examples) for the step's sum."""
        np.multiply(mean, m, out=self.batch_mean)
        np.multiply(var, m * n / max(n - 1, 1), out=self.batch_var)

    def update_running(self, mean: np.ndarray, var: np.ndarray) -> None:
        """running <- (1 - momentum) * running + momentum * (the step's mean, unbiased variance)."""
        for run, new in ((self.running_mean, mean), (self.running_var, var)):
            run *= 1 - self.momentum
            run += self.momentum * new

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """The evaluation transform as y = x * s + t, ``(c,)`` each."""
        s = self.gamma / np.sqrt(self.running_var + self.running_var.dtype.type(self.eps))
        return s, self.beta - self.running_mean * s

    def forward(self, x, train=True):
        c = self.num_features
        x2 = x.reshape(-1, c)
        self._pass = self._rows = None
        if not train:
            return affine_(x2, *self.scale_shift(), out=np.empty_like(x2)).reshape(x.shape)
        if x.ndim == 2:
            return self._forward_rows(x)
        self._pass = bp = BatchPass(col_sums(x2) / x.dtype.type(max(len(x2), 1)), self.eps)
        zc = channelwise(np.subtract, x2, bp.shift, out=self.workspace.get("zc", x2.shape, x.dtype))
        bp.sums_(zc)
        self.record(*bp.finish(self.gamma, self.beta), len(x2), x.shape[0])
        return affine_(zc, *bp.affine, out=np.empty_like(x2)).reshape(x.shape)

    def _forward_rows(self, x: np.ndarray) -> np.ndarray:
        """Training on x ``(m, features)``: the mean, then the variance of x - mean (two passes, so x's own
        float32 is accurate), in a dozen small operations. (`BatchPass`'s blocked passes pay on conv outputs
        of m*h*w rows; on `small_bn`'s dense layer these take half its time.)"""
        m = len(x)
        mean = np.add.reduce(x, axis=0) / m
        z = x - mean
        var = np.einsum("ij,ij->j", z, z) / m
        inv = (var + x.dtype.type(self.eps)) ** -0.5
        z *= inv  # x_hat
        self._rows = z, inv
        self.record(mean, var, m, m)
        y = z * self.gamma
        y += self.beta
        return y

    def _backward_rows(self, dy: np.ndarray) -> np.ndarray:
        """dx = gamma * inv * (dy - mean(dy) - x_hat * mean(dy * x_hat))."""
        xhat, inv = self._rows
        m = len(dy)
        dbeta, dgamma = np.add.reduce(dy, axis=0), np.einsum("ij,ij->j", dy, xhat)
        self.dgamma[...], self.dbeta[...] = dgamma, dbeta
        d = dy - dbeta / m
        d -= xhat * (dgamma / m)
        d *= self.gamma * inv
        return d

    def backward(self, dy):
        if self._rows is not None:
            return self._backward_rows(dy)
        bp = self._pass
        if bp is None:  # after an evaluation forward: the fixed map x * s + t
            return dy * self.scale_shift()[0]
        d = dy.reshape(-1, self.num_features).copy()
        zc, tmp = self.workspace["zc"], self.workspace.get("tmp", d.shape, d.dtype)
        bp.grad_sums_(d, zc)
        self.dgamma[...], self.dbeta[...] = bp.finish_backward()
        bp.input_grad_(d, zc, tmp)
        return d.reshape(dy.shape)

    def __repr__(self):
        return f"BatchNorm({self.num_features}, momentum={self.momentum:g}, eps={self.eps:g})"
