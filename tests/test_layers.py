"""Every layer against finite differences (float64) and against naive loop references."""

import numpy as np
import pytest

from dpcnn.layers import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU, SoftmaxCrossEntropy, softmax

RNG = np.random.default_rng(1234)


def numeric_grad(f, x, eps=1e-6):
    """Central differences of scalar f() w.r.t. every entry of x (modified in place)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def rel_error(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)) + np.max(np.abs(b)), 1e-12)


def check_layer(layer, x):
    """d(sum(y * r))/d(x, W, b) analytically vs numerically, for a random r."""
    y = layer.forward(x)
    r = RNG.standard_normal(y.shape)

    def f():
        return float(np.sum(layer.forward(x) * r))

    layer.forward(x)
    dx = layer.backward(r)
    analytic = {"x": dx}
    if hasattr(layer, "W"):
        analytic["W"], analytic["b"] = layer.dW.copy(), layer.db.copy()
    numeric = {"x": numeric_grad(f, x)}
    if hasattr(layer, "W"):
        numeric["W"], numeric["b"] = numeric_grad(f, layer.W), numeric_grad(f, layer.b)
    for k in analytic:
        assert analytic[k].shape == numeric[k].shape
        assert rel_error(analytic[k], numeric[k]) < 1e-6, k


def make_conv(cin, cout, k, stride, padding):
    conv = Conv2D(cin, cout, k, stride, padding, dtype=np.float64)
    conv.W[...] = RNG.standard_normal(conv.W.shape)
    conv.b[...] = RNG.standard_normal(conv.b.shape)
    return conv


def naive_conv(x, W, b, stride, pads):
    t, btm, l, r = pads
    xp = np.pad(x, ((0, 0), (t, btm), (l, r), (0, 0)))
    f = W.shape[0]
    oh = (xp.shape[1] - f) // stride + 1
    ow = (xp.shape[2] - f) // stride + 1
    y = np.zeros((x.shape[0], oh, ow, W.shape[3]))
    for n in range(x.shape[0]):
        for i in range(oh):
            for j in range(ow):
                patch = xp[n, i * stride:i * stride + f, j * stride:j * stride + f, :]
                for o in range(W.shape[3]):
                    y[n, i, j, o] = np.sum(patch * W[:, :, :, o]) + b[o]
    return y


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", ["same", "valid", 1])
def test_conv_gradients(k, stride, padding):
    size = 9 if k == 7 else 7
    conv = make_conv(2, 3, k, stride, padding)
    x = RNG.standard_normal((2, size, size + 1, 2))
    check_layer(conv, x)


@pytest.mark.parametrize("cin,cout", [(1, 1), (1, 4), (3, 2), (5, 6)])
def test_conv_gradients_channels(cin, cout):
    check_layer(make_conv(cin, cout, 3, 1, "same"), RNG.standard_normal((3, 6, 5, cin)))


@pytest.mark.parametrize("k,stride,padding", [(1, 1, "same"), (3, 1, "same"), (3, 2, "same"), (4, 2, "same"),
                                              (5, 1, "valid"), (5, 3, "valid"), (7, 2, 3), (2, 1, "same")])
def test_conv_forward_matches_naive(k, stride, padding):
    conv = make_conv(3, 4, k, stride, padding)
    x = RNG.standard_normal((2, 11, 10, 3))
    y = conv.forward(x)
    expect = naive_conv(x, conv.W, conv.b, stride, conv.pads(11, 10))
    assert y.shape == expect.shape
    np.testing.assert_allclose(y, expect, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size,k,stride", [(28, 3, 1), (28, 3, 2), (7, 2, 2), (28, 5, 3), (8, 4, 1), (8, 2, 2)])
def test_same_padding_output_is_ceil(size, k, stride):
    conv = Conv2D(1, 1, k, stride, "same")
    oh, ow, _ = conv.output_shape((size, size, 1))
    assert oh == ow == -(-size // stride)


def test_same_padding_even_kernel_pads_bottom_right():
    conv = Conv2D(1, 1, 2, 1, "same")
    assert conv.pads(5, 5) == (0, 1, 0, 1)
    conv = Conv2D(1, 1, 4, 1, "same")
    assert conv.pads(6, 6) == (1, 2, 1, 2)


def test_first_layer_skips_input_gradient_but_keeps_weight_gradients():
    conv = make_conv(1, 2, 3, 1, "same")
    x = RNG.standard_normal((2, 5, 5, 1))
    y = conv.forward(x)
    conv.backward(np.ones_like(y))
    dW = conv.dW.copy()
    conv.needs_input_grad = False
    conv.forward(x)
    assert conv.backward(np.ones_like(y)) is None
    np.testing.assert_array_equal(conv.dW, dW)


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("k,stride,size", [(2, 2, 6), (2, 2, 7), (3, 3, 9), (3, 2, 7), (3, 1, 5), (2, 1, 5), (2, 3, 8)])
def test_pool_gradients(cls, k, stride, size):
    x = RNG.standard_normal((2, size, size + 1, 3))  # distinct values: max is unique
    check_layer(cls(k, stride), x)


def naive_pool(x, k, s, op):
    m, h, w, c = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y = np.zeros((m, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            y[:, i, j, :] = op(x[:, i * s:i * s + k, j * s:j * s + k, :], axis=(1, 2))
    return y


@pytest.mark.parametrize("k,stride,size", [(2, 2, 8), (2, 2, 7), (3, 2, 9), (3, 1, 6), (4, 4, 12)])
def test_pool_forward_matches_naive(k, stride, size):
    x = RNG.standard_normal((3, size, size, 2))
    np.testing.assert_allclose(MaxPool2D(k, stride).forward(x), naive_pool(x, k, stride, np.max))
    np.testing.assert_allclose(AvgPool2D(k, stride).forward(x), naive_pool(x, k, stride, np.mean))


@pytest.mark.parametrize("k,stride", [(2, 2), (3, 3), (3, 2), (2, 1)])
def test_maxpool_ties_pass_gradient_once_to_first_max(k, stride):
    x = np.ones((1, 6, 6, 2))
    pool = MaxPool2D(k, stride)
    y = pool.forward(x)
    dx = pool.backward(np.ones_like(y))
    # Total gradient equals the number of windows: nothing double counted.
    assert dx.sum() == y.size
    # Each window's gradient lands on its top-left (first) element.
    expect = np.zeros_like(x)
    for i in range(y.shape[1]):
        for j in range(y.shape[2]):
            expect[0, i * stride, j * stride, :] += 1
    np.testing.assert_array_equal(dx, expect)


def test_maxpool_fast_path_matches_general_path():
    """The 2x2/2 reshape path and the disjoint-offset path agree on ties and values."""
    x = RNG.integers(0, 3, (4, 8, 8, 3)).astype(np.float64)  # many ties
    fast, general = MaxPool2D(2, 2), MaxPool2D(2, 2)
    y1 = fast.forward(x)
    y2 = general.forward(x[:, :7, :7])  # 7 does not tile: general path over the same windows
    np.testing.assert_array_equal(y1[:, :3, :3], y2)
    dy = RNG.standard_normal(y1.shape)
    dx1 = fast.backward(dy)
    dx2 = general.backward(dy[:, :3, :3])
    np.testing.assert_array_equal(dx1[:, :6, :6], dx2[:, :6, :6])


def test_avgpool_averages_over_window_not_channels():
    x = np.zeros((1, 2, 2, 2))
    x[0, :, :, 0] = [[1, 2], [3, 4]]
    x[0, :, :, 1] = 10
    y = AvgPool2D(2, 2).forward(x)
    np.testing.assert_allclose(y[0, 0, 0], [2.5, 10])


def test_relu_and_flatten_and_dense_gradients():
    check_layer(ReLU(), RNG.standard_normal((4, 3, 3, 2)) + 0.01)
    check_layer(Flatten(), RNG.standard_normal((2, 3, 4, 5)))
    dense = Dense(6, 4, dtype=np.float64)
    dense.W[...] = RNG.standard_normal(dense.W.shape)
    dense.b[...] = RNG.standard_normal(4)
    check_layer(dense, RNG.standard_normal((5, 6)))


def test_flatten_order_is_row_major_nhwc():
    x = np.arange(2 * 2 * 3 * 4).reshape(2, 2, 3, 4)
    np.testing.assert_array_equal(Flatten().forward(x)[1], x[1].ravel())


def test_softmax_cross_entropy_gradient():
    loss = SoftmaxCrossEntropy()
    z = RNG.standard_normal((5, 4))
    y = RNG.integers(0, 4, 5)
    loss.forward(z, y)
    g = loss.backward()
    np.testing.assert_allclose(g, numeric_grad(lambda: loss.forward(z, y), z), rtol=1e-6, atol=1e-9)


def test_softmax_cross_entropy_is_minus_log_p():
    z = RNG.standard_normal((6, 3))
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert np.isclose(SoftmaxCrossEntropy().forward(z, y), -np.mean(np.log(p[np.arange(6), y])))


def test_softmax_cross_entropy_extreme_logits():
    loss = SoftmaxCrossEntropy()
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], dtype=np.float32)
    assert loss.forward(z, np.array([0, 1])) == 0.0
    big = loss.forward(z, np.array([1, 0]))
    assert np.isfinite(big) and np.isclose(big, 2e4, rtol=1e-6)
    assert np.all(np.isfinite(loss.backward()))
    p = softmax(z)
    assert np.all(np.isfinite(p)) and np.allclose(p.sum(1), 1)


def test_softmax_cross_entropy_global_denominator():
    """With denom = global batch, the shards' losses and gradients sum to the full batch's."""
    loss = SoftmaxCrossEntropy()
    z = RNG.standard_normal((8, 5))
    y = RNG.integers(0, 5, 8)
    full = loss.forward(z, y)
    g_full = loss.backward()
    parts = [loss.forward(z[s], y[s], denom=8) for s in (slice(0, 3), slice(3, 8))]
    assert np.isclose(sum(parts), full)
    np.testing.assert_allclose(loss.backward(), g_full[3:8])
