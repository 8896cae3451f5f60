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

import math

import numpy as np

from .conv_kernels import Workspace
from .layers import Layer

__all__ = ["Dropout", "BatchNorm", "dropout_scale", "normalize_", "bn_backward_", "affine_"]


def dropout_scale(seed: int, step: int, key: int, start: int, shape: tuple, rate: float, dtype) -> np.ndarray:
    """The multiplier of inverted dropout, ``(m, *units)``: 0 for a dropped unit, 1/(1 - rate) for a kept one.

    Row i belongs to the example at position ``start + i`` of its global batch.
    Every (step, layer ``key``) has its own PCG64 stream, seeded from ``seed``,
    read as 16-bit numbers (four per 64-bit draw); example p's u units are
    numbers p*u ... p*u + u - 1 of it, so any rank reads any run of examples by
    jumping ahead (``advance``) to its first draw, whatever the world size. A
    unit is kept when its number is >= rate * 2**16 (the rate is rounded to a
    multiple of 2**-16).
    """
    m, units = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    first, count = start * units, m * units
    bits = np.random.PCG64(np.random.SeedSequence([seed % 2**63, step, key]))
    bits.advance(first // 4)
    skip = first % 4
    raw = np.asarray(bits.random_raw(-(-(skip + count) // 4)), "<u8").view("<u2")[skip:skip + count]
    drop = min(round(rate * 65536), 65535)
    scale = (raw >= drop).astype(dtype)
    scale *= dtype.type(65536 / (65536 - drop))
    return scale.reshape(shape)


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


def _wide(a: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a ``(n, c)`` and a per-column v ``(c,)`` as a ``(n/r, r*c)`` view and v tiled r times.

    The same elementwise operation, but NumPy's inner loop runs over ~512
    values instead of c (16 to 64 here), several times faster.
    """
    n, c = a.shape
    r = math.gcd(n, max(1, 512 // c))
    return a.reshape(n // r, r * c), np.tile(v, r)


def _col_sums(a: np.ndarray) -> np.ndarray:
    """Column sums of a ``(n, c)``, as one matrix-vector product (a reduction over axis 0 of a few
    columns is an order of magnitude slower in NumPy)."""
    return np.ones(a.shape[0], a.dtype) @ a


def _channelwise(op, a: np.ndarray, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``op(a, v)`` with v ``(c,)`` broadcast over the rows of a ``(n, c)``, into ``out`` (may be a)."""
    wa, wv = _wide(a, v)
    res = op(wa, wv, out=None if out is None else out.reshape(wa.shape))
    return res.reshape(a.shape)


def normalize_(z: np.ndarray, eps: float, tmp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z ``(n, c)`` -> x_hat = (z - mean) / sqrt(var + eps), IN PLACE, per column.

    Returns (mean, biased var), each ``(c,)``. ``tmp`` (like z) is scratch space.
    """
    n = z.dtype.type(max(z.shape[0], 1))
    mean = _col_sums(z) / n
    _channelwise(np.subtract, z, mean, out=z)
    var = _col_sums(np.multiply(z, z, out=tmp)) / n
    _channelwise(np.multiply, z, 1 / np.sqrt(var + z.dtype.type(eps)), out=z)
    return mean, var


def bn_backward_(d: np.ndarray, xhat: np.ndarray, gamma: np.ndarray, var: np.ndarray, eps: float,
                 tmp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d ``(n, c)`` = dL/dy -> dL/dz IN PLACE, for y = gamma * x_hat + beta with batch statistics.

    dz = gamma / sqrt(var + eps) * (d - mean(d) - x_hat * mean(d * x_hat)), the
    usual batch-norm backward. Returns (dgamma, dbeta), each ``(c,)``. ``tmp``
    (like d) is scratch space.
    """
    n = d.dtype.type(d.shape[0])
    dbeta = _col_sums(d)
    dgamma = _col_sums(np.multiply(d, xhat, out=tmp))
    k = gamma / np.sqrt(var + d.dtype.type(eps))
    _channelwise(np.multiply, d, k, out=d)
    _channelwise(np.subtract, d, k * dbeta / n, out=d)
    d -= _channelwise(np.multiply, xhat, k * dgamma / n, out=tmp)
    return dgamma, dbeta


def affine_(x: np.ndarray, s: np.ndarray, t: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = x * s + t per column: x, out ``(n, c)``, s and t ``(c,)``."""
    _channelwise(np.multiply, x, s, out=out)
    return _channelwise(np.add, out, t, out=out)


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
        if not train:
            self._cache = None
            return affine_(x2, *self.scale_shift(), out=np.empty_like(x2)).reshape(x.shape)
        xhat = self.workspace.get("xhat", x2.shape, x.dtype)
        xhat[...] = x2
        mean, var = normalize_(xhat, self.eps, self.workspace.get("tmp", x2.shape, x.dtype))
        self.record(mean, var, x2.shape[0], x.shape[0])
        self._cache = (x.shape, var)
        return affine_(xhat, self.gamma, self.beta, out=np.empty_like(x2)).reshape(x.shape)

    def backward(self, dy):
        if self._cache is None:  # after an evaluation forward: the fixed map x * s + t
            return dy * self.scale_shift()[0]
        shape, var = self._cache
        d = dy.reshape(-1, self.num_features).copy()
        dgamma, dbeta = bn_backward_(d, self.workspace["xhat"], self.gamma, var, self.eps, self.workspace["tmp"])
        self.dgamma[...], self.dbeta[...] = dgamma, dbeta
        return d.reshape(shape)

    def __repr__(self):
        return f"BatchNorm({self.num_features}, momentum={self.momentum:g}, eps={self.eps:g})"
