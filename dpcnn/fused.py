"""The Model's fast paths: conv-relu[-pool] and dense-relu run as one fused
step each, and the plan that puts them in place of the layers.

The fused steps give the same numbers as the layers one by one (up to the
order of float sums; tests/test_fastpaths.py) and never write their caller's
arrays. They share the layers' parameter views and the conv layer's workspace,
and run the convolution through `dpcnn.conv_kernels`, or `dpcnn.winograd` where
`dpcnn.winograd.chosen` says so for the conv's shape (with a fused 2x2 pool).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from . import conv_kernels as ck
from . import flat_conv as fc
from . import winograd as wg
from .col2im import scratch
from .conv_kernels import TUNING, Workspace
from .layers import AvgPool2D, Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU
from .norm import BatchNorm, Dropout

__all__ = ["ConvReLU", "DenseReLU", "FUSED_POOLS", "fused_plan"]


class ConvReLU:
    """Model-internal fusion of ``Conv2D -> ReLU [-> MaxPool2D | AvgPool2D]``; the
    same numbers as the separate layers (up to the order of float sums).

    Not a layer of the model specs: `dpcnn.model.Model` builds these over its own
    layers (sharing their parameter views) where the pattern occurs, and owns
    every array passed between them. What the fusion saves:

    * Blocks of examples: im2col, GEMM, pooling and ReLU of one block run while
      its patch matrix is still in cache, and only 1-byte masks are kept for
      backward (not the conv output). Backward recomputes each block's patches
      (a cheap copy) instead of reading back a multi-megabyte patch matrix,
      unless the whole matrix is small (``TUNING.store_cols_bytes``). A block is
      about ``TUNING.fused_block_bytes`` of patch and output rows: a loop of a
      few iterations for cache blocking, not a loop over examples.
    * With a ``k x k``/``k`` pool that tiles the conv output, a block's im2col
      rows are ordered pool slot by pool slot (`conv_kernels.patch_view`), so
      pooling is k*k - 1 elementwise ops on contiguous blocks, and its backward
      one multiply by the stored masks, never the strided passes (inner loop =
      c_out floats) of a separate pool layer.
    * Winograd F(2x2, 3x3) (3x3 stride-1 convs with a 2x2 pool, chosen by shape): its output comes in
      tile-slot order, which is the pool-slot order, and it keeps the transformed input tiles
      (``(16, m*oh*ow/4, c_in)``, 4/9 of the patch matrix) for backward instead of any patches.
    * One input channel, stride 1, an average pool or none (LeNet-5's first layer): the flat grid of
      `dpcnn.flat_conv`, channel-major, where the whole patch matrix of a block is one copy.
    * Max pool: ReLU commutes with max, so it runs on the pooled (k*k times
      smaller) array. The stored mask of slot s is "z_s is the window's first
      maximum and that maximum is > 0", the product of the max-pool routing and
      the ReLU mask of the unfused layers (if the maximum is <= 0, relu(z) ties
      at 0 and the unfused ReLU backward zeroes the gradient anyway).
    """

    #: Whether this step may take the flat-grid path of `dpcnn.flat_conv` (ConvBNReLU: no, its batch
    #: statistics are taken on the general path's blocks).
    flat_ok = True

    def __init__(self, conv: Conv2D, relu: ReLU, pool: MaxPool2D | AvgPool2D | None = None):
        self.conv, self.relu, self.pool = conv, relu, pool
        self.k = pool.kernel_size if pool is not None else 1
        self.avg = isinstance(pool, AvgPool2D)
        #: The Model sets this False on its last step: the output is then a fresh array.
        self.reuse_output = True
        #: Called inside backward between its long parts (the Model's `on_progress`: the step's reduction
        #: tests the buckets in flight, which MPI moves only inside MPI calls).
        self.poll = _nothing
        self.layers = (conv, relu) if pool is None else (conv, relu, pool)
        self.workspace = Workspace()

    @property
    def needs_input_grad(self):
        return self.conv.needs_input_grad

    def _block(self, m: int, oh: int, ow: int, K: int, itemsize: int, size: int | None = None) -> int:
        """Examples per block: about ``size`` (default ``TUNING.fused_block_bytes``) of patch and output rows."""
        per_example = oh * ow * (K + self.conv.out_channels) * itemsize
        nb = max(1, min(m, (size or TUNING.fused_block_bytes) // per_example))
        return -(-m // -(-m // nb))  # as many blocks, evened out: 64 by <= 25 -> 22, 22, 20

    def forward(self, x, train=True):
        grid = self._flat_grid(x)
        if grid is not None:
            return self._flat_forward(x, grid, *self._weights(train))
        f = self._start(x, *self._weights(train))
        for a, b in f.blocks:  # cache blocking, see the class docstring
            yb = f.y[a:b].reshape(-1, f.c_out)
            zb = self._conv_block(f, a, b, out=yb if self.k == 1 else None)  # no pool: the GEMM writes y
            self._pool_relu(zb.reshape(f.kk, -1, f.c_out), yb, f.block_masks(a, b))
        return self._finish(f)

    def _weights(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """The filters ``(f, f, c_in, c_out)`` and bias ``(c_out,)`` the forward pass convolves with."""
        return self.conv.W, self.conv.b

    def _start(self, x: np.ndarray, W: np.ndarray, bias: np.ndarray) -> SimpleNamespace:
        """What a forward pass over x ``(m, h, w, c_in)`` needs: the geometry, the filter matrix, the
        padded input, the output ``(m, qh*qw, c_out)``, the masks and the blocks of examples."""
        conv, k, m, (h, w) = self.conv, self.k, x.shape[0], x.shape[1:3]
        oh, ow, c_out = conv.output_shape(x.shape[1:])
        fold = TUNING.fold_bias
        Wm = ck.filter_matrix(W, bias, fold)
        # Winograd with a fused 2x2 pool only: its slot order is then the pool-slot order.
        wino = k == 2 and wg.chosen(conv.kernel_size, conv.stride, conv.in_channels, c_out)
        pads = wg.tile_pads(conv.pads(h, w), oh, ow) if wino else conv.pads(h, w)
        # A private copy even without padding: backward recomputes patches from it. (Winograd: column planes.)
        xp = wg.pad_planes(x, pads, conv.workspace) if wino else ck.pad(x, pads, conv.workspace, copy=True)
        nb = self._block(m, oh, ow, Wm.shape[0], x.itemsize)
        shape = (m, (oh // k) * (ow // k), c_out)
        y = self.workspace.get("y", shape, x.dtype) if self.reuse_output else np.empty(shape, x.dtype)
        # (Kept in eval mode too: a backward after forward(train=False) works, as for the layers.)
        masks = self.workspace.get("masks", (m * oh * ow * c_out,), np.bool_)
        # Keep every block's patches for backward when they are small, else recompute them.
        limit = TUNING.store_cols_t_bytes if conv.transposed_cols else TUNING.store_cols_bytes
        store = m * oh * ow * Wm.shape[0] * x.itemsize <= limit
        rows = oh * ow
        U = wg.filters(W) if wino else None
        V = conv.workspace.get("wino_V", (16, m * rows // 4, conv.in_channels), x.dtype) if wino else None
        return SimpleNamespace(grid=None, wino=wino, U=U, V=V,
            x_shape=x.shape, xp=xp, fold=fold, Wm=Wm, bias=bias, oh=oh, ow=ow, c_out=c_out, kk=k * k, nb=nb,
            y=y, masks=masks, store=store, rows=rows, blocks=[(a, min(a + nb, m)) for a in range(0, m, nb)],
            block_masks=lambda a, b: masks[a * rows * c_out:b * rows * c_out].reshape(k * k, -1, c_out))

    def _cols(self, f: SimpleNamespace, a: int, b: int, fresh: bool = False) -> np.ndarray:
        """The patch matrix of examples a:b: made now (``fresh``, and kept if ``f.store``), else the
        kept one or made again."""
        if fresh:
            cap = f.x_shape[0] * f.rows if f.store else f.nb * f.rows
            return self._patches(f.xp[a:b], f.oh, f.ow, f.fold, cap, row0=a * f.rows if f.store else 0)
        if f.store:
            return ck.stored_cols(self.conv.workspace, self.conv.transposed_cols, a * f.rows, (b - a) * f.rows)
        return self._patches(f.xp[a:b], f.oh, f.ow, f.fold, cap=f.nb * f.rows)  # recomputed

    def _conv_block(self, f: SimpleNamespace, a: int, b: int, out: np.ndarray | None = None,
                    fresh: bool = True, Wm: np.ndarray | None = None) -> np.ndarray:
        """Conv output ``((b-a)*oh*ow, c_out)`` of examples a:b, rows in pool-slot order, into ``out``
        (default: this step's block buffer); ``fresh``: see `_cols`; ``Wm``: the filter matrix (default f.Wm)."""
        if out is None:
            out = self.workspace.get("z", (f.nb * f.rows, f.c_out), f.xp.dtype)[:(b - a) * f.rows]
        if f.wino:  # V of the block, kept for backward; the output in (pool-)slot order
            V = self._tiles(f, a, b)
            if fresh:
                wg.transform_input(f.xp[:, a:b], V, self.conv.workspace)
            return wg.conv_slots(V, f.U, f.bias, out, self.conv.workspace)
        A = self._cols(f, a, b, fresh)
        ck.gemm(A, f.Wm if Wm is None else Wm, out=out)
        if not f.fold:
            out += f.bias
        return out

    @staticmethod
    def _tiles(f: SimpleNamespace, a: int, b: int) -> np.ndarray:
        """Winograd's transformed input tiles of examples a:b, ``(16, (b-a)*oh*ow/4, c_in)`` (a view of f.V)."""
        t = f.rows // 4
        return f.V[:, a * t:b * t]

    def _finish(self, f: SimpleNamespace) -> np.ndarray:
        """Keep what backward needs; the output as ``(m, qh, qw, c_out)``."""
        self._cache = f
        k = self.k
        return f.y.reshape(f.x_shape[0], f.oh // k, f.ow // k, f.c_out)

    def _patches(self, xp: np.ndarray, oh: int, ow: int, fold: bool, cap: int, row0: int = 0) -> np.ndarray:
        """The patch matrix ``(n*oh*ow, K [+ 1])`` of the padded block xp
        ``(n, hp, wp, c_in)``, rows in pool-slot order when a pool follows
        (`conv_kernels.im2col` into the conv's workspace)."""
        conv = self.conv
        return ck.im2col(xp, conv.kernel_size, conv.stride, oh, ow, conv.workspace, self.k, fold,
                         conv.transposed_cols, cap, row0)

    def _pool_relu(self, zs: np.ndarray, y: np.ndarray, masks: np.ndarray, after_max=None) -> None:
        """One block: ``zs`` (k*k, rows, c_out) conv output by pool slot -> ``y`` (rows, c_out);
        ``masks`` (shaped like zs) gets which z pass their gradient on (for average
        pooling, times 1/(k*k), which backward applies). Max pooling only:
        ``after_max(y)`` maps the window maxima in place before the ReLU (an
        increasing per-channel map, which commutes with the max)."""
        kk = zs.shape[0]
        if kk == 1:  # ReLU only; zs[0] is y
            np.greater(y, 0, out=masks[0])
            ck.relu_(y)
            return
        if self.avg:
            ck.relu_(zs)
            np.greater(zs, 0, out=masks)
            np.add(zs[0], zs[1], out=y)
            for s in range(2, kk):
                y += zs[s]
            np.true_divide(y, kk, out=y)
            return
        np.maximum(zs[0], zs[1], out=y)
        for s in range(2, kk):
            np.maximum(y, zs[s], out=y)
        # Slot s takes the window's gradient if z_s equals the max, no earlier
        # slot took it, and the max is > 0: "taken" starts as (max <= 0).
        # For bools, a > b is a & ~b.
        np.equal(zs, y, out=masks)  # y broadcasts over the slot axis
        if after_max is not None:
            after_max(y)
        taken = self.workspace.get("taken", y.shape, np.bool_)
        np.less_equal(y, 0, out=taken)
        for s in range(kk):
            np.greater(masks[s], taken, out=masks[s])
            if s < kk - 1:
                np.logical_or(taken, masks[s], out=taken)
        ck.relu_(y)

    def backward(self, dy):
        f = self._cache
        if f.grid is not None:
            return self._flat_backward(f, dy)
        g = self._start_backward(f)
        dz = self.workspace.get("dz", (f.nb * f.rows, f.c_out), f.xp.dtype)
        for a, b in f.blocks:  # the forward's blocks
            dzb = self._masked_grad(f, dy, a, b, out=dz[:(b - a) * f.rows])
            self._block_backward(f, g, a, b, dzb)
        return g.dx

    def _masked_grad(self, f: SimpleNamespace, dy: np.ndarray, a: int, b: int, out: np.ndarray) -> np.ndarray:
        """d loss / d (conv output) of examples a:b, rows in pool-slot order: dy through the pool and
        ReLU masks (times 1/(k*k) for average pooling), into ``out`` ``((b-a)*oh*ow, c_out)``."""
        g = dy.reshape(f.x_shape[0], -1, f.c_out)[a:b].reshape(-1, f.c_out)
        if self.avg:
            g = g * (1.0 / f.kk)
        # g broadcasts over the slot axis, the outermost: contiguous passes.
        np.multiply(g, f.block_masks(a, b), out=out.reshape(f.kk, -1, f.c_out))
        return out

    def _start_backward(self, f: SimpleNamespace) -> SimpleNamespace:
        """The input gradient's buffers: dx ``(m, h, w, c_in)`` (None for a first layer) and the padded
        dz of the full correlation (col2im and Winograd need no buffer here)."""
        conv = self.conv
        g = SimpleNamespace(dx=None)
        if conv.needs_input_grad:
            m, h, w, _ = f.x_shape
            g.pads = conv.pads(h, w)
            g.full = ck.full_corr_ok(conv.kernel_size, conv.stride, g.pads, h, w, f.oh, f.ow)
            # Reused: within a Model dx only ever goes to the step below's backward.
            g.dx = self.workspace.get("dx", f.x_shape, f.xp.dtype)
            if f.wino:
                g.full = False
            elif g.full:
                g.dyp, g.inner = ck.dy_padded(conv.W, f.nb, f.oh, f.ow, g.pads, conv.workspace)
        return g

    def _block_backward(self, f: SimpleNamespace, g: SimpleNamespace, a: int, b: int, dzb: np.ndarray) -> None:
        """Parameter gradients (accumulated over the blocks) and dx of examples a:b from their dz; `poll`
        after each of the two (a block's backward is a millisecond or more)."""
        if f.wino:
            self._wino_backward(f, g, a, b, dzb)
        else:
            self._direct_backward(f, g, a, b, dzb)
        self.poll()

    def _direct_backward(self, f: SimpleNamespace, g: SimpleNamespace, a: int, b: int, dzb: np.ndarray) -> None:
        conv, n, oh, ow = self.conv, b - a, f.oh, f.ow
        ck.param_grads(self._cols(f, a, b), dzb, conv.dW, conv.db, f.fold, conv.workspace, accumulate=a > 0)
        if g.dx is None:
            return
        self.poll()
        _, h, w, c = f.x_shape
        if g.full:
            self._to_nhwc(dzb, g.inner[:n], n, oh, ow)
            ck.full_corr(g.dyp[:n], conv.W, (n, h, w, c), conv.workspace, TUNING.block_bytes, out=g.dx[a:b])
        else:
            dzp = scratch(conv.workspace, "dz_hwn", (oh, ow, n, f.c_out), dzb.dtype)
            self._to_nhwc(dzb, dzp.transpose(2, 0, 1, 3), n, oh, ow)  # (examples innermost: see col2im_hwn)
            ck.col2im_hwn(dzp, conv.W, (n, h, w, c), conv.stride, g.pads, conv.workspace, out=g.dx[a:b])

    def _wino_backward(self, f: SimpleNamespace, g: SimpleNamespace, a: int, b: int, dzb: np.ndarray) -> None:
        """`_block_backward` of a Winograd step: dz ``((b-a)*oh*ow, c_out)`` is in slot order already."""
        conv, ws = self.conv, self.conv.workspace
        dz = dzb.reshape(4, -1, f.c_out)
        dYt = wg.transform_grad(dz, ws)
        wg.filter_grads(self._tiles(f, a, b), dYt, dz, conv.dW, conv.db, ws, accumulate=a > 0)
        if g.dx is not None:
            self.poll()
            planes = wg.input_grad(dYt, f.U, b - a, f.oh // 2, f.ow // 2, ws)
            wg.crop_planes(planes, g.pads, g.dx[a:b])

    def _flat_grid(self, x: np.ndarray) -> fc.Grid | None:
        """The flat layout of `dpcnn.flat_conv` for input x, or None where that path does not apply."""
        conv = self.conv
        kind = None if self.pool is None else "avg" if self.avg else "max"
        if not (self.flat_ok and fc.usable(conv.kernel_size, conv.stride, conv.in_channels, kind)):
            return None
        m, h, w, _ = x.shape
        return fc.grid(m, h, w, conv.kernel_size, conv.pads(h, w), self.k)

    def _flat_forward(self, x: np.ndarray, g: fc.Grid, W: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """`forward` on the flat grid (`dpcnn.flat_conv.forward`), into this step's output and masks."""
        c, k = self.conv.out_channels, self.k
        shape = (g.m, (g.oh // k) * (g.ow // k), c)
        y = self.workspace.get("y", shape, x.dtype) if self.reuse_output else np.empty(shape, x.dtype)
        masks = self.workspace.get("masks", (g.m * g.S * c,), np.bool_)
        nb = self._block(g.m, g.Hg, g.Wg, g.K + 1, x.itemsize, TUNING.flat_block_bytes)
        self._cache = fc.forward(x, g, ck.filter_matrix(W, bias, True), y, masks, nb, self.conv.workspace)
        return y.reshape(g.m, g.oh // k, g.ow // k, c)

    def _flat_backward(self, f: SimpleNamespace, dy: np.ndarray) -> np.ndarray | None:
        """`backward` on the flat grid (`dpcnn.flat_conv.backward`); dx into this step's buffer."""
        conv = self.conv
        dx = self.workspace.get("dx", f.x_shape, f.X.dtype) if conv.needs_input_grad else None
        return fc.backward(f, dy, conv.dW, conv.db, dx, conv.workspace, self.poll)

    def _to_nhwc(self, dz: np.ndarray, out: np.ndarray, m: int, oh: int, ow: int) -> None:
        """Write dz (rows in pool-slot order when k > 1) into the NHWC array (or view) ``out``."""
        k, c_out = self.k, self.conv.out_channels
        if k == 1:
            out[...] = dz.reshape(m, oh, ow, c_out)
            return
        dzs = dz.reshape(k, k, m, oh // k, ow // k, c_out)
        for pi in range(k):
            for pj in range(k):
                out[:, pi::k, pj::k, :] = dzs[pi, pj]

    def __repr__(self):
        return "+".join(repr(layer) for layer in self.layers)


def _nothing() -> None:
    pass


class DenseReLU:
    """Model-internal fusion of ``Dense -> ReLU``: the ReLU runs in place on the
    Dense output and its mask multiplies dy on the way back."""

    def __init__(self, dense: Dense, relu: ReLU):
        self.dense, self.relu = dense, relu
        self.layers = (dense, relu)

    @property
    def needs_input_grad(self):
        return self.dense.needs_input_grad

    def forward(self, x, train=True):
        y = self.dense.forward(x, train)  # a fresh array (so also fine as the logits): ours to change
        ck.relu_(y)
        self._y = y
        return y

    def backward(self, dy):
        return self.dense.backward(dy * (self._y > 0))

    def __repr__(self):
        return f"{self.dense!r}+{self.relu!r}"


#: Pools fused into the preceding conv + ReLU (k x k windows with stride k that tile
#: the conv output). The fused max pool makes `small` ~25 % faster; its gradients match
#: the separate layers' to float rounding (tests/test_fastpaths.py).
FUSED_POOLS: tuple = (AvgPool2D, MaxPool2D)


def fused_plan(layers: list[Layer], shapes: list[tuple]) -> list:
    """The layers with fusable runs replaced by fused steps: conv [batchnorm] relu [pool], dense relu.

    ``shapes[i]`` is the input shape of ``layers[i]``. Exact types only: a
    subclass may change what a layer computes. Every step but the last may hand
    the next one a reused buffer; the last returns a fresh array (the logits
    belong to the caller).
    """
    from .fused_bn import ConvBNReLU  # (it builds on ConvReLU, so it lives in a module that imports this one)

    plan, i, n = [], 0, len(layers)
    at = lambda j: layers[j] if j < n else None  # noqa: E731
    while i < n:
        layer = layers[i]
        bn = at(i + 1) if type(at(i + 1)) is BatchNorm and type(layer) is Conv2D else None
        j = i + 1 + (bn is not None)  # where a ReLU would be
        if type(layer) is Conv2D and type(at(j)) is ReLU:
            oh, ow, _ = shapes[i + 1]
            pool = at(j + 1)
            if not (type(pool) in FUSED_POOLS and pool.kernel_size == pool.stride > 1
                    and oh % pool.kernel_size == 0 and ow % pool.kernel_size == 0):
                pool = None
            plan.append(ConvBNReLU(layer, bn, at(j), pool) if bn else ConvReLU(layer, at(j), pool))
            i = j + 1 + (pool is not None)
        elif type(layer) is Dense and type(at(i + 1)) is ReLU:
            plan.append(DenseReLU(layer, at(i + 1)))
            i += 2
        else:
            plan.append(layer)
            i += 1
    for step in reversed(plan):  # the step whose output becomes the logits (Flatten only reshapes)
        if hasattr(step, "reuse_output"):
            step.reuse_output = False
        if type(step) not in (Flatten, Dropout):  # (Dropout at evaluation passes its input on)
            break
    return plan
