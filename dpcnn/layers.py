"""The layers of a CNN, forward and backward, in NumPy.

Layout: activations are NHWC, ``(m, h, w, c)``; convolution filters are HWIO,
``(f, f, c_in, c_out)``. With that layout a convolution is one matrix product:
gather every ``f x f x c_in`` input patch into a row (im2col), multiply by the
filters reshaped to ``(f*f*c_in, c_out)``.

Every layer has ``forward(x)``, which keeps what its backward pass needs, and
``backward(dy) -> dx``, which also writes the layer's parameter gradients.
Parametric layers expose ``W``, ``b``, ``dW`` and ``db``; `dpcnn.model.Model`
points them at views of one flat parameter buffer and one flat gradient buffer,
so a backward pass writes the gradients straight into the buffer that the
allreduce and the optimizer use.

Speed (bench/RESULTS.md): the conv kernels live in `dpcnn.conv_kernels` (and
`dpcnn.winograd`), layers reuse work arrays across steps, the Model runs fused
steps (`dpcnn.fused`, the same numbers); layers never write their caller's arrays.
"""

from __future__ import annotations

import math

import numpy as np

from . import conv_kernels as ck
from . import winograd as wg
from .conv_kernels import TUNING, Workspace, conv_output_size, same_padding

__all__ = ["Layer", "Conv2D", "ReLU", "MaxPool2D", "AvgPool2D", "Flatten", "Dense", "SoftmaxCrossEntropy",
           "softmax", "log_softmax", "conv_output_size", "same_padding"]


class Layer:
    """A layer with no parameters. Subclasses override forward and backward."""

    #: (name, shape) of each parameter array; filled by parametric layers.
    param_shapes: tuple = ()

    def output_shape(self, input_shape: tuple) -> tuple:
        """Shape of one example's output given one example's input shape."""
        return input_shape

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__ + "()"


class Conv2D(Layer):
    """2-D convolution (cross-correlation) with bias.

    x ``(m, h, w, c_in)`` -> y ``(m, oh, ow, c_out)``; ``W`` ``(f, f, c_in, c_out)``,
    ``b`` ``(c_out,)``. ``padding`` is ``"same"`` (oh = ceil(h / stride)),
    ``"valid"`` (no padding) or a non-negative int (that many zeros on every side).

    How it runs: im2col and one GEMM, see `dpcnn.conv_kernels`, with work
    arrays reused in ``workspace``. The Model runs conv-relu[-pool] fused
    (`dpcnn.fused.ConvReLU`) over this layer's parameters and workspace.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, padding: str | int = "same", dtype=np.float32):
        if not (isinstance(kernel_size, int) and kernel_size >= 1):
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        if not (isinstance(stride, int) and stride >= 1):
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if not (padding in ("same", "valid") or (isinstance(padding, int) and padding >= 0)):
            raise ValueError(f"padding must be 'same', 'valid' or an int >= 0, got {padding!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.param_shapes = (("W", (kernel_size, kernel_size, in_channels, out_channels)),
                             ("b", (out_channels,)))
        self.W = np.zeros(self.param_shapes[0][1], dtype)
        self.b = np.zeros(out_channels, dtype)
        self.dW = np.zeros_like(self.W)
        self.db = np.zeros_like(self.b)
        # The first layer of a model has no use for d loss / d input; skipping it
        # saves a GEMM and the col2im scatter.
        self.needs_input_grad = True
        # Work arrays reused across steps; the Model's fused step over this layer uses them too.
        self.workspace = Workspace()

    def fan_in(self) -> int:
        return self.kernel_size * self.kernel_size * self.in_channels

    def pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding for an ``h x w`` input."""
        f, s = self.kernel_size, self.stride
        if self.padding == "same":
            return (*same_padding(h, f, s), *same_padding(w, f, s))
        p = 0 if self.padding == "valid" else self.padding
        return p, p, p, p

    def output_shape(self, input_shape):
        h, w, c = input_shape
        if c != self.in_channels:
            raise ValueError(f"expects {self.in_channels} input channels, got {c}")
        t, btm, l, r = self.pads(h, w)
        f = self.kernel_size
        if h + t + btm < f or w + l + r < f:
            raise ValueError(f"kernel {f}x{f} is larger than its (padded) input "
                             f"{h + t + btm}x{w + l + r}")
        return (conv_output_size(h, f, self.stride, t + btm),
                conv_output_size(w, f, self.stride, l + r), self.out_channels)

    @property
    def transposed_cols(self) -> bool:
        """Whether im2col builds the transposed (K, n) patch matrix (one input channel)."""
        return self.in_channels == 1 and self.kernel_size > 1 and TUNING.one_channel_t

    def forward(self, x, train=True):
        m, h, w, c = x.shape
        oh, ow, _ = self.output_shape((h, w, c))
        if wg.chosen(self.kernel_size, self.stride, c, self.out_channels):  # F(2x2, 3x3), dpcnn.winograd
            y, wino = wg.layer_forward(x, self.W, self.b, self.pads(h, w), self.workspace)
            self._cache = (x.shape, wino, None, (oh, ow))
            return y
        fold = TUNING.fold_bias
        Wm = ck.filter_matrix(self.W, self.b, fold)
        xp = ck.pad(x, self.pads(h, w), self.workspace)
        A = ck.im2col(xp, self.kernel_size, self.stride, oh, ow, self.workspace, fold=fold,
                      transposed=self.transposed_cols)
        y = ck.gemm(A, Wm)
        if not fold:
            y += self.b
        self._cache = (x.shape, A, fold, (oh, ow))
        return y.reshape(m, oh, ow, self.out_channels)

    def backward(self, dy):
        x_shape, A, fold, (oh, ow) = self._cache
        if fold is None:  # the forward ran as Winograd: A is its cache
            return wg.layer_backward(A, dy, x_shape, self.dW, self.db, self.needs_input_grad, self.workspace)
        m, h, w, _ = x_shape
        dy2 = dy.reshape(-1, self.out_channels)
        ck.param_grads(A, dy2, self.dW, self.db, fold, self.workspace)
        if not self.needs_input_grad:
            return None
        pads = self.pads(h, w)
        if ck.full_corr_ok(self.kernel_size, self.stride, pads, h, w, oh, ow):
            # Stride 1: dx is the "full" correlation of dy with the flipped filters (im2col + GEMM).
            dyp, interior = ck.dy_padded(self.W, m, oh, ow, pads, self.workspace)
            interior[...] = dy
            return ck.full_corr(dyp, self.W, x_shape, self.workspace, TUNING.block_bytes)
        return ck.col2im(dy2, self.W, x_shape, self.stride, pads, oh, ow, self.workspace)

    def __repr__(self):
        return (f"Conv2D({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r})")


class ReLU(Layer):
    """max(x, 0), elementwise. The gradient at exactly 0 is taken as 0."""

    def forward(self, x, train=True):
        self._mask = x > 0
        return ck.relu_(x, out=np.empty_like(x))

    def backward(self, dy):
        return dy * self._mask


class _Pool2D(Layer):
    """Shared shape logic of the pooling layers (no padding; windows must fit)."""

    def __init__(self, kernel_size: int = 2, stride: int | None = None):
        stride = kernel_size if stride is None else stride
        if not (isinstance(kernel_size, int) and kernel_size >= 1):
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        if not (isinstance(stride, int) and stride >= 1):
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        self.kernel_size, self.stride = kernel_size, stride

    def output_shape(self, input_shape):
        h, w, c = input_shape
        k, s = self.kernel_size, self.stride
        if h < k or w < k:
            raise ValueError(f"pool window {k}x{k} does not fit its input {h}x{w}")
        return conv_output_size(h, k, s, 0), conv_output_size(w, k, s, 0), c

    def _disjoint(self) -> bool:
        """True when no input pixel lies in two windows (stride >= kernel)."""
        return self.stride >= self.kernel_size

    def _tiles(self, h: int, w: int) -> bool:
        """True when the windows are disjoint and cover the input exactly: pool via a reshape."""
        return self.kernel_size == self.stride and h % self.stride == 0 and w % self.stride == 0

    def _offsets(self, oh, ow):
        """Slices of the input read by each kernel offset (i, j), in row-major order."""
        k, s = self.kernel_size, self.stride
        for i in range(k):
            for j in range(k):
                yield i * k + j, (slice(None), slice(i, i + s * oh, s), slice(j, j + s * ow, s))

    def __repr__(self):
        return f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride})"


class MaxPool2D(_Pool2D):
    """Max over each ``k x k`` window.

    Backward routes each window's gradient to exactly one input: the first
    maximum in row-major window order. Ties are not double counted.
    """

    def forward(self, x, train=True):
        m, h, w, c = x.shape
        oh, ow, _ = self.output_shape((h, w, c))
        if self._tiles(h, w):
            # Fast path (e.g. 2x2/2): max over the k window rows first, where each
            # row of the reshape is one contiguous run of w*c values, then over
            # the k columns of what is left.
            k = self.kernel_size
            xr = x.reshape(m * oh, k, w * c)
            r = xr[:, 0].copy()
            for i in range(1, k):
                np.maximum(r, xr[:, i], out=r)
            r = r.reshape(m * oh, ow, k, c)
            y = r[:, :, 0].copy()
            for j in range(1, k):
                np.maximum(y, r[:, :, j], out=y)
            y = y.reshape(m, oh, ow, c)
            self._cache = (x, y, None, (oh, ow))
            return y
        if self._disjoint():
            # Disjoint windows: elementwise maxima of the k*k offset views.
            y = None
            for _, sl in self._offsets(oh, ow):
                y = x[sl].copy() if y is None else np.maximum(y, x[sl], out=y)
            self._cache = (x, y, None, (oh, ow))
            return y
        # Overlapping windows: a running max that also records which offset won.
        # Strict ">" keeps the first maximum.
        y = idx = None
        for t, sl in self._offsets(oh, ow):
            v = x[sl]
            if y is None:
                y, idx = v.copy(), np.zeros(v.shape, np.uint16)
            else:
                better = v > y
                np.copyto(y, v, where=better)
                idx[better] = t
        self._cache = (x, y, idx, (oh, ow))
        return y

    def backward(self, dy):
        x, y, idx, (oh, ow) = self._cache
        h, w = x.shape[1:3]
        # Tiling windows write every input below: no need to zero dx first.
        dx = np.empty(x.shape, dy.dtype) if self._tiles(h, w) else np.zeros(x.shape, dy.dtype)
        if idx is None:
            # Each input belongs to at most one window: the first offset whose
            # value equals the window max takes the gradient, later ties do not.
            # (For bools, hit > taken is hit & ~taken.)
            taken = hit = None
            for t, sl in self._offsets(oh, ow):
                hit = np.equal(x[sl], y, out=hit)
                if t:
                    np.greater(hit, taken, out=hit)
                np.multiply(dy, hit, out=dx[sl])
                taken = hit.copy() if taken is None else np.logical_or(taken, hit, out=taken)
            return dx
        for t, sl in self._offsets(oh, ow):
            dx[sl] += dy * (idx == t)
        return dx


class AvgPool2D(_Pool2D):
    """Mean over each ``k x k`` window."""

    def forward(self, x, train=True):
        m, h, w, c = x.shape
        oh, ow, _ = self.output_shape((h, w, c))
        k = self.kernel_size
        self._cache = (x.shape, (oh, ow))
        if self._tiles(h, w):
            # As in MaxPool2D: sum the k window rows first (contiguous runs of
            # w*c values), then the k columns; a mean over axes (2, 4) of the
            # 6-D reshape ran its inner loop c values at a time.
            xr = x.reshape(m * oh, k, w * c)
            r = xr[:, 0].copy()
            for i in range(1, k):
                r += xr[:, i]
            r = r.reshape(m * oh, ow, k, c)
            y = r[:, :, 0].copy()
            for j in range(1, k):
                y += r[:, :, j]
            np.true_divide(y, k * k, out=y)
            return y.reshape(m, oh, ow, c)
        y = np.zeros((m, oh, ow, c), x.dtype)
        for _, sl in self._offsets(oh, ow):
            y += x[sl]
        y *= 1.0 / (k * k)
        return y

    def backward(self, dy):
        x_shape, (oh, ow) = self._cache
        m, h, w, c = x_shape
        k = self.kernel_size
        g = dy * (1.0 / (k * k))
        if self._tiles(h, w):
            return np.broadcast_to(g[:, :, None, :, None, :], (m, oh, k, ow, k, c)).reshape(x_shape)
        dx = np.zeros(x_shape, dy.dtype)
        for _, sl in self._offsets(oh, ow):
            dx[sl] += g
        return dx


class Flatten(Layer):
    """(m, h, w, c) -> (m, h*w*c), row-major (channels fastest)."""

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def forward(self, x, train=True):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self._shape)


class Dense(Layer):
    """Fully connected: y = x @ W + b, ``W`` ``(in, out)``. No activation inside."""

    def __init__(self, in_features: int, out_features: int, dtype=np.float32):
        self.in_features, self.out_features = in_features, out_features
        self.param_shapes = (("W", (in_features, out_features)), ("b", (out_features,)))
        self.W = np.zeros((in_features, out_features), dtype)
        self.b = np.zeros(out_features, dtype)
        self.dW = np.zeros_like(self.W)
        self.db = np.zeros_like(self.b)
        self.needs_input_grad = True

    def fan_in(self) -> int:
        return self.in_features

    def output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"expects a flat input (add a flatten layer before it), got shape {input_shape}")
        if input_shape[0] != self.in_features:
            raise ValueError(f"expects {self.in_features} input features, got {input_shape[0]}")
        return (self.out_features,)

    def forward(self, x, train=True):
        self._x = x
        y = x @ self.W
        y += self.b
        return y

    def backward(self, dy):
        np.matmul(self._x.T, dy, out=self.dW)
        np.sum(dy, axis=0, out=self.db)
        if not self.needs_input_grad:
            return None
        return dy @ self.W.T

    def __repr__(self):
        return f"Dense({self.in_features}, {self.out_features})"


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax along the last axis, computed stably (log-sum-exp)."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    """Class probabilities along the last axis; never overflows."""
    return np.exp(log_softmax(z))


class SoftmaxCrossEntropy:
    """Softmax followed by cross-entropy with integer labels, fused.

    ``forward(logits, labels)`` returns the mean of -log p[label]. In
    data-parallel training each rank passes ``denom=global_batch_size`` so it
    returns (and its backward differentiates) its share of the global mean:
    the allreduced SUM over ranks is then exactly the global-batch mean.
    """

    def forward(self, logits: np.ndarray, labels: np.ndarray, denom: int | None = None) -> float:
        n = logits.shape[0]
        denom = n if denom is None else denom
        logp = log_softmax(logits)
        self._cache = (logp, labels, denom)
        return float(-logp[np.arange(n), labels].sum() / denom) if n else 0.0

    def backward(self) -> np.ndarray:
        logp, labels, denom = self._cache
        d = np.exp(logp)
        d[np.arange(len(labels)), labels] -= 1
        d *= 1.0 / denom
        return d
