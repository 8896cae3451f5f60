"""Every fast path against its general/reference path on the same inputs.

The fast paths (dpcnn.layers, conv_kernels, fused) are: the bias folded into
the conv GEMM, the transposed one-channel im2col, reused work buffers, the
blocked full-correlation conv input gradient and the run-by-run col2im, the
pooling reshape paths, and the Model's fused steps (conv-relu[-max|avg pool]
in blocks of examples with stored or recomputed patches, dense-relu). Fused vs
unfused differ only in the order of float sums, so those compare in float64 at
~1e-12; paths with the same arithmetic compare exactly. No timing here: speed
is measured by bench/, correctness here.
"""

from pathlib import Path

import numpy as np
import pytest
import yaml

import dpcnn.conv_kernels as ck
from dpcnn.conv_kernels import TUNING
from dpcnn.fused import ConvReLU, DenseReLU
from dpcnn.layers import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU
from dpcnn.model import Model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
RNG = np.random.default_rng(7)


def spec(name):
    return yaml.safe_load((CONF / f"{name}.yaml").read_text())["layers"]


def make_conv(cin, cout, k, stride=1, padding="same", dtype=np.float64):
    conv = Conv2D(cin, cout, k, stride, padding, dtype=dtype)
    conv.W[...] = RNG.standard_normal(conv.W.shape)
    conv.b[...] = RNG.standard_normal(conv.b.shape)
    return conv


def conv_pass(conv, x, dy=None):
    y = conv.forward(x)
    if dy is None:
        dy = np.random.default_rng(1).standard_normal(y.shape).astype(x.dtype)
    dx = conv.backward(dy)
    return y.copy(), None if dx is None else np.array(dx), conv.dW.copy(), conv.db.copy()


def assert_passes_close(a, b, rtol=1e-12, atol=1e-12):
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None
        else:
            np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


# -- convolution --------------------------------------------------------------

@pytest.mark.parametrize("k,stride,padding", [(3, 1, "same"), (5, 1, 2), (3, 2, "same"), (1, 1, "valid"),
                                              (4, 1, "same")])
def test_one_channel_transposed_im2col_matches_generic(k, stride, padding):
    conv = make_conv(1, 5, k, stride, padding)
    x = RNG.standard_normal((3, 9, 10, 1))
    fast = conv_pass(conv, x)
    with TUNING.override(one_channel_t=False):
        general = conv_pass(conv, x)
    assert_passes_close(fast, general)


@pytest.mark.parametrize("f, pool, padding, hw", [(3, 2, "same", (8, 10)), (5, 2, 2, (12, 8)), (2, 2, "valid", (9, 7)),
                                                (3, 3, "same", (9, 12)), (5, 2, 1, (11, 9)), (4, 2, 1, (9, 9))])
def test_one_channel_slot_ordered_im2col_matches_generic(f, pool, padding, hw):
    """The parity-plane copies of the transposed one-channel im2col in pool-slot order (odd padded sizes too)."""
    conv = make_conv(1, 2, f, 1, padding)
    x = RNG.standard_normal((3, *hw, 1))
    oh, ow, _ = conv.output_shape(x.shape[1:])
    oh, ow = oh - oh % pool, ow - ow % pool  # whole pool windows
    xp = ck.pad(x, conv.pads(*hw), ck.Workspace(), copy=True)[:, :oh + f - 1, :ow + f - 1]
    fast = ck.im2col(xp, f, 1, oh, ow, ck.Workspace(), pool, fold=True, transposed=True)
    general = ck.im2col(xp, f, 1, oh, ow, ck.Workspace(), pool, fold=True, transposed=False)
    np.testing.assert_array_equal(fast, general)
    cap = ck.im2col(xp, f, 1, oh, ow, ck.Workspace(), pool, fold=True, transposed=True, cap=5 * oh * ow,
                    row0=2 * oh * ow)  # rows of a bigger buffer, as the fused step keeps them
    np.testing.assert_array_equal(cap, general)


@pytest.mark.parametrize("cin", [1, 3])
def test_folded_bias_matches_separate_bias_add(cin):
    conv = make_conv(cin, 4, 3)
    x = RNG.standard_normal((2, 7, 6, cin))
    folded = conv_pass(conv, x)
    with TUNING.override(fold_bias=False):
        plain = conv_pass(conv, x)
    assert_passes_close(folded, plain)


def test_folded_bias_through_model_views_matches_standalone_copy():
    """In a Model W and b are adjacent (the (K+1, c_out) matrix is a view); alone they are not."""
    model = Model.from_config([{"type": "conv", "filters": 4, "kernel_size": 3}, {"type": "relu"},
                               {"type": "conv", "filters": 3, "kernel_size": 3}, {"type": "flatten"},
                               {"type": "dense", "units": 10}], input_shape=(6, 6, 2), dtype=np.float64)
    inner = model.layers[2]
    inner.b[...] = RNG.standard_normal(3)
    alone = Conv2D(4, 3, 3, dtype=np.float64)
    alone.W[...], alone.b[...] = inner.W, inner.b
    assert ck.adjacent(inner.W, inner.b) and not ck.adjacent(alone.W, alone.b)
    x = RNG.standard_normal((2, 6, 6, 4))
    assert_passes_close(conv_pass(inner, x), conv_pass(alone, x))


@pytest.mark.parametrize("k,padding", [(3, "same"), (5, "same"), (3, "valid"), (2, "same"), (3, 1), (1, "same")])
def test_conv_input_grad_full_correlation_matches_col2im(k, padding):
    conv = make_conv(3, 4, k, 1, padding)
    x = RNG.standard_normal((2, 8, 7, 3))
    y = conv.forward(x)
    dy = RNG.standard_normal(y.shape)
    pads, (oh, ow) = conv.pads(8, 7), y.shape[1:3]
    dyp, inner = ck.dy_padded(conv.W, 2, oh, ow, pads, conv.workspace)
    inner[...] = dy
    dx_fc = ck.full_corr(dyp, conv.W, x.shape, conv.workspace, TUNING.block_bytes)
    dx_c2i = ck.col2im(dy.reshape(-1, 4), conv.W, x.shape, 1, pads, oh, ow)
    np.testing.assert_allclose(dx_fc, dx_c2i, rtol=1e-12, atol=1e-12)
    # backward takes one of the two
    expect = dx_fc if ck.full_corr_ok(k, 1, pads, 8, 7, oh, ow) else dx_c2i
    np.testing.assert_array_equal(conv.backward(dy), expect)


@pytest.mark.parametrize("block_bytes", [1, 3000, 1 << 30])
def test_blocked_full_correlation_matches_col2im(block_bytes):
    """Blocks of 1 example, a block size that leaves a remainder block, one block."""
    conv = make_conv(2, 3, 3, 1, "same")
    x = RNG.standard_normal((5, 6, 5, 2))
    with TUNING.override(block_bytes=block_bytes):
        y = conv.forward(x)
        dy = RNG.standard_normal(y.shape)
        dx = conv.backward(dy)
    expect = ck.col2im(dy.reshape(-1, 3), conv.W, x.shape, 1, conv.pads(6, 5), 6, 5)
    np.testing.assert_allclose(dx, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,stride,padding", [(3, 1, "same"), (5, 1, "valid"), (3, 2, "same"), (4, 3, 1),
                                              (2, 2, "valid"), (1, 2, "same"), (5, 2, 2)])
def test_col2im_runs_match_per_offset_scatter(k, stride, padding):
    conv = make_conv(3, 4, k, stride, padding)
    x = RNG.standard_normal((2, 11, 9, 3))
    y = conv.forward(x)
    m, oh, ow, _ = y.shape
    dy = RNG.standard_normal(y.shape)
    t, btm, l, r = pads = conv.pads(11, 9)
    dcols = (dy.reshape(-1, 4) @ conv.W.reshape(-1, 4).T).reshape(m, oh, ow, k, k, 3)
    dxp = np.zeros((m, 11 + t + btm, 9 + l + r, 3))
    for i in range(k):  # the reference: one += per kernel offset
        for j in range(k):
            dxp[:, i:i + stride * oh:stride, j:j + stride * ow:stride] += dcols[:, :, :, i, j]
    np.testing.assert_allclose(ck.col2im(dy.reshape(-1, 4), conv.W, x.shape, stride, pads, oh, ow),
                               dxp[:, t:t + 11, l:l + 9], rtol=1e-12, atol=1e-12)


def test_buffer_reuse_across_batch_sizes_matches_fresh_layers():
    conv = make_conv(2, 3, 3, dtype=np.float32)
    xs = [RNG.standard_normal((n, 6, 5, 2)).astype(np.float32) for n in (4, 7, 4)]
    for x in xs:
        fresh = Conv2D(2, 3, 3)
        fresh.W[...], fresh.b[...] = conv.W, conv.b
        for a, b in zip(conv_pass(conv, x), conv_pass(fresh, x)):
            np.testing.assert_array_equal(a, b)


def test_model_buffer_reuse_across_batch_sizes_matches_fresh_model():
    model = Model.from_config(spec("small"), seed=2)
    data = np.random.default_rng(3)
    for n in (8, 5, 8):
        x = data.random((n, 28, 28, 1), dtype=np.float32)
        y = data.integers(0, 10, n)
        fresh = Model.from_config(spec("small"), seed=2)
        assert model.loss_and_grads(x, y) == fresh.loss_and_grads(x, y)
        np.testing.assert_array_equal(model.grads, fresh.grads)


def test_cached_patches_survive_a_forward_of_another_layer():
    """Two layers never share work buffers: backward of one after the other's forward is intact."""
    a, b = make_conv(1, 2, 3), make_conv(1, 2, 3)
    b.W[...], b.b[...] = a.W, a.b
    x1, x2 = RNG.standard_normal((2, 5, 5, 1)), RNG.standard_normal((2, 5, 5, 1))
    expect = conv_pass(a, x1)
    a.forward(x1)
    b.forward(x2)
    dy = np.random.default_rng(1).standard_normal((2, 5, 5, 2))
    a.backward(dy)
    np.testing.assert_array_equal(a.dW, expect[2])


# -- pooling ------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3])
def test_avgpool_reshape_path_matches_offset_path(k):
    x = RNG.standard_normal((3, 4 * k, 4 * k, 5))
    fast, general = AvgPool2D(k, k), AvgPool2D(k, k)
    y1 = fast.forward(x)
    y2 = general.forward(x[:, :4 * k - 1, :4 * k - 1])
    n = y2.shape[1]
    np.testing.assert_allclose(y1[:, :n, :n], y2, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("k", [2, 3])
def test_maxpool_reshape_path_matches_offset_path_with_ties(k):
    x = RNG.integers(0, 3, (3, 4 * k, 4 * k, 5)).astype(np.float32)  # many ties
    fast, general = MaxPool2D(k, k), MaxPool2D(k, k)
    y1 = fast.forward(x)
    y2 = general.forward(x[:, :4 * k - 1, :4 * k - 1])  # does not tile: the offset path, same first windows
    n = 4 * k // k - 1
    np.testing.assert_array_equal(y1[:, :n, :n], y2[:, :n, :n])
    dy = RNG.standard_normal(y1.shape).astype(np.float32)
    dx1 = fast.backward(dy)
    dx2 = general.backward(dy[:, :y2.shape[1], :y2.shape[2]])
    np.testing.assert_array_equal(dx1[:, :n * k, :n * k], dx2[:, :n * k, :n * k])


# -- fused steps ----------------------------------------------------------------

def unfused_pass(layers, x, dy):
    a = x
    for layer in layers:
        a = layer.forward(a)
    d = dy
    for layer in reversed(layers):
        d = layer.backward(d)
    return a, d


@pytest.mark.parametrize("k,stride,pool", [(3, 1, 2), (3, 1, None), (3, 2, 2), (5, 1, 3), (1, 1, 2)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("pool_cls", [MaxPool2D, AvgPool2D])
def test_fused_conv_relu_pool_matches_layers(k, stride, pool, ties, pool_cls):
    conv = make_conv(3, 4, k, stride)
    relu = ReLU()
    layers = [conv, relu] + ([pool_cls(pool)] if pool else [])
    x = RNG.standard_normal((2, 12, 12, 3))
    if ties:  # zero input and zero filters in channel 0: equal outputs everywhere there
        x[:, :6] = 0
        conv.W[..., 0] = 0
        conv.b[0] = 0.5
    a = x
    for layer in layers:
        a = layer.forward(a)
    dy = RNG.standard_normal(a.shape)
    y_ref, dx_ref = unfused_pass(layers, x, dy)
    dW_ref, db_ref = conv.dW.copy(), conv.db.copy()
    step = ConvReLU(conv, relu, layers[2] if pool else None)
    y = step.forward(x)
    dx = step.backward(dy)
    np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.dW, dW_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.db, db_ref, rtol=1e-12, atol=1e-12)


def test_fused_pool_routes_tied_gradient_exactly_like_layers():
    """Exact equality of the routed gradient when the conv is the identity (no GEMM rounding)."""
    conv = Conv2D(1, 1, 1, 1, "valid", dtype=np.float64)
    conv.W[...] = 1.0
    x = RNG.integers(-1, 3, (2, 8, 8, 1)).astype(np.float64)  # ties, zeros and negatives
    layers = [conv, ReLU(), MaxPool2D(2)]
    dy = RNG.standard_normal((2, 4, 4, 1))
    y_ref, dx_ref = unfused_pass(layers, x, dy)  # dx = the routed gradient times W = 1: no rounding
    step = ConvReLU(*layers)
    np.testing.assert_array_equal(step.forward(x), y_ref)
    np.testing.assert_array_equal(step.backward(dy), dx_ref)
    assert np.count_nonzero(dx_ref) > 0


def test_fused_dense_relu_matches_layers():
    dense = Dense(6, 5, dtype=np.float64)
    dense.W[...] = RNG.standard_normal(dense.W.shape)
    dense.b[...] = RNG.standard_normal(5)
    x = RNG.standard_normal((4, 6))
    dy = RNG.standard_normal((4, 5))
    y_ref, dx_ref = unfused_pass([dense, ReLU()], x, dy)
    dW_ref = dense.dW.copy()
    step = DenseReLU(dense, ReLU())
    np.testing.assert_array_equal(step.forward(x), y_ref)
    np.testing.assert_array_equal(step.backward(dy), dx_ref)
    np.testing.assert_array_equal(dense.dW, dW_ref)


STRIDED = [{"type": "conv", "filters": 4, "kernel_size": 3}, {"type": "relu"},
           {"type": "conv", "filters": 6, "kernel_size": 3, "stride": 2}, {"type": "relu"},
           {"type": "maxpool", "kernel_size": 2}, {"type": "flatten"}, {"type": "dense", "units": 10}]
POOL3 = [{"type": "conv", "filters": 3, "kernel_size": 3}, {"type": "relu"},
         {"type": "conv", "filters": 5, "kernel_size": 3}, {"type": "relu"},
         {"type": "maxpool", "kernel_size": 3}, {"type": "conv", "filters": 4, "kernel_size": 3},
         {"type": "relu"}, {"type": "maxpool", "kernel_size": 2}, {"type": "flatten"},
         {"type": "dense", "units": 10}]


@pytest.mark.parametrize("layers,input_shape", [(spec("small"), (28, 28, 1)), (spec("seed"), (28, 28, 1)),
                                                (spec("lenet5"), (28, 28, 1)), (spec("tiny"), (28, 28, 1)),
                                                (STRIDED, (28, 28, 1)), (POOL3, (12, 12, 2))])
def test_fused_model_gradients_match_unfused(layers, input_shape):
    fused = Model.from_config(layers, input_shape=input_shape, dtype=np.float64, seed=4)
    plain = Model.from_config(layers, input_shape=input_shape, dtype=np.float64, seed=4)
    plain._fuse = False
    rng = np.random.default_rng(5)
    fused.params += 0.05 * rng.standard_normal(fused.num_params)
    plain.params[:] = fused.params
    x = rng.standard_normal((5, *input_shape))
    x[:, : input_shape[0] // 3] = 0  # flat regions: tied maxima
    y = rng.integers(0, 10, 5)
    x_before = x.copy()
    lf, cf = fused.loss_and_grads(x, y)
    lp, cp = plain.loss_and_grads(x, y)
    assert cf == cp and abs(lf - lp) <= 1e-13 * abs(lp)
    np.testing.assert_allclose(fused.grads, plain.grads, rtol=1e-11, atol=1e-13 * np.abs(plain.grads).max())
    np.testing.assert_array_equal(x, x_before)  # the caller's input is never written


def test_plan_fuses_what_it_should():
    kinds = [type(s).__name__ for s in Model.from_config(spec("small"))._plan]
    assert kinds == ["ConvReLU", "ConvReLU", "Flatten", "DenseReLU", "Dense"]
    lenet = Model.from_config(spec("lenet5"))._plan
    assert [type(s).__name__ for s in lenet][:2] == ["ConvReLU", "ConvReLU"] and lenet[0].avg
    assert lenet[0].k == 2 and Model.from_config(spec("small"))._plan[0].k == 2
    # 7x7 conv output does not tile by 2: conv+relu fuse, the pool stays a layer.
    odd = Model.from_config([{"type": "conv", "filters": 2, "kernel_size": 3, "padding": "valid"},
                             {"type": "relu"}, {"type": "maxpool", "kernel_size": 2}, {"type": "flatten"},
                             {"type": "dense", "units": 10}], input_shape=(9, 9, 1))
    assert [type(s).__name__ for s in odd._plan] == ["ConvReLU", "MaxPool2D", "Flatten", "Dense"]
    assert odd._plan[0].k == 1


def test_logits_are_fresh_arrays_even_when_a_fused_step_comes_last():
    layers = [{"type": "conv", "filters": 10, "kernel_size": 3}, {"type": "relu"},
              {"type": "maxpool", "kernel_size": 4}, {"type": "flatten"}]
    model = Model.from_config(layers, input_shape=(4, 4, 1))
    x = np.random.default_rng(0).random((3, 4, 4, 1), dtype=np.float32)
    a = model.forward(x)
    a_copy = a.copy()
    model.forward(x[::-1].copy())
    np.testing.assert_array_equal(a, a_copy)


def test_layer_forward_does_not_write_its_input():
    x = RNG.standard_normal((2, 6, 6, 1)).astype(np.float32)
    x0 = x.copy()
    for layer in (Conv2D(1, 3, 3), ReLU(), MaxPool2D(2), Flatten()):
        y = layer.forward(x)
        layer.backward(np.ones_like(y))
        np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("name", ["small", "lenet5", "seed"])
def test_fused_blocks_and_stored_patches_match_one_block(name):
    """Blocks of examples (with a remainder block), stored or recomputed patches: same gradients."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((7, 28, 28, 1))
    y = rng.integers(0, 10, 7)

    def grads(block_bytes, store_bytes):
        with TUNING.override(fused_block_bytes=block_bytes, flat_block_bytes=block_bytes,
                             store_cols_bytes=store_bytes, store_cols_t_bytes=store_bytes):
            model = Model.from_config(spec(name), dtype=np.float64, seed=8)
            loss, _ = model.loss_and_grads(x, y)
        return loss, model.grads.copy()

    one_loss, one = grads(1 << 40, 0)
    for block_bytes in (1, 200_000):  # one example per block; blocks of 2-3 with a remainder
        for store_bytes in (0, 1 << 40):
            loss, g = grads(block_bytes, store_bytes)
            assert loss == one_loss
            np.testing.assert_allclose(g, one, rtol=1e-11, atol=1e-14 * np.abs(one).max())
    np.testing.assert_array_equal(grads(200_000, 0)[1], grads(200_000, 1 << 40)[1])


def test_inplace_relu_fusion_gives_bitwise_identical_gradients():
    """Without pooling and in one block, the fused steps do the unfused arithmetic exactly (the
    general path: the flat grid of dpcnn.flat_conv sums in another order, tests/test_flat_conv.py)."""
    layers = [{"type": "conv", "filters": 4, "kernel_size": 3}, {"type": "relu"},
              {"type": "conv", "filters": 5, "kernel_size": 3, "stride": 2}, {"type": "relu"},
              {"type": "flatten"}, {"type": "dense", "units": 12}, {"type": "relu"},
              {"type": "dense", "units": 10}]
    with TUNING.override(fused_block_bytes=1 << 40, flat_one_channel=False):
        for dtype in (np.float32, np.float64):
            fused = Model.from_config(layers, input_shape=(10, 10, 1), dtype=dtype, seed=9)
            plain = Model.from_config(layers, input_shape=(10, 10, 1), dtype=dtype, seed=9)
            plain._fuse = False
            assert [type(s).__name__ for s in fused._plan] == ["ConvReLU", "ConvReLU", "Flatten", "DenseReLU", "Dense"]
            x = np.random.default_rng(1).standard_normal((6, 10, 10, 1)).astype(dtype)
            y = np.arange(6)
            assert fused.loss_and_grads(x, y) == plain.loss_and_grads(x, y)
            np.testing.assert_array_equal(fused.grads, plain.grads)
            np.testing.assert_array_equal(fused.forward(x), plain.forward(x))
