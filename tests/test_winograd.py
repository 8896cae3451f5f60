"""Winograd F(2x2, 3x3) (dpcnn.winograd) as tested as the direct path: finite differences in float64
for the forward, dx, dW and db; equality to the direct path (float64 to ~1e-12, float32 within float32
rounding); the fused steps and whole models with it on and off; the choice as a function of shape."""

import numpy as np
import pytest
from test_layers import check_layer, make_conv, naive_conv

import dpcnn.winograd as wg
from dpcnn.conv_kernels import TUNING
from dpcnn.fused import ConvReLU
from dpcnn.layers import AvgPool2D, Conv2D, MaxPool2D, ReLU
from dpcnn.model import Model

RNG = np.random.default_rng(21)
SMALL = [{"type": "conv", "filters": 4, "kernel_size": 3}, {"type": "relu"}, {"type": "maxpool"},
         {"type": "conv", "filters": 6, "kernel_size": 3}, {"type": "relu"}, {"type": "maxpool"},
         {"type": "flatten"}, {"type": "dense", "units": 10}]
SMALL_BN = [{"type": "conv", "filters": 4, "kernel_size": 3}, {"type": "batchnorm"}, {"type": "relu"},
            {"type": "maxpool"}, {"type": "conv", "filters": 6, "kernel_size": 3}, {"type": "batchnorm"},
            {"type": "relu"}, {"type": "maxpool"}, {"type": "flatten"}, {"type": "dense", "units": 10}]


@pytest.mark.parametrize("padding", ["same", "valid", 2])
@pytest.mark.parametrize("hw", [(6, 6), (7, 5)])  # even and odd outputs (odd: a zero tile row / column)
def test_winograd_conv_gradients_finite_differences(padding, hw):
    conv = make_conv(2, 3, 3, 1, padding)
    with TUNING.override(winograd="always"):
        check_layer(conv, RNG.standard_normal((2, *hw, 2)))


@pytest.mark.parametrize("padding", ["same", "valid", 1, 2])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_winograd_layer_matches_direct(padding, dtype, tol):
    conv = Conv2D(5, 7, 3, 1, padding, dtype=dtype)
    conv.W[...] = RNG.standard_normal(conv.W.shape)
    conv.b[...] = RNG.standard_normal(conv.b.shape)
    x = RNG.standard_normal((3, 9, 8, 5)).astype(dtype)
    dy = None
    out = {}
    for mode in ("never", "always"):
        with TUNING.override(winograd=mode):
            y = conv.forward(x)
            dy = RNG.standard_normal(y.shape).astype(dtype) if dy is None else dy
            dx = conv.backward(dy)
            out[mode] = (y, dx, conv.dW.copy(), conv.db.copy())
    np.testing.assert_allclose(out["never"][0], naive_conv(x, conv.W, conv.b, 1, conv.pads(9, 8)),
                               rtol=0, atol=tol * 10)
    for direct, wino in zip(out["never"], out["always"]):
        assert wino.dtype == dtype
        # Within a few roundings of the largest term: the transforms' coefficients are 0, +-1, 1/2.
        np.testing.assert_allclose(wino, direct, rtol=0, atol=tol * np.abs(direct).max())


@pytest.mark.parametrize("pool_cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("block_bytes", [1, 1 << 40])  # one example per block; one block
def test_fused_winograd_step_matches_direct(pool_cls, block_bytes):
    x = RNG.standard_normal((5, 8, 10, 3))
    dy = RNG.standard_normal((5, 4, 5, 6))
    out = {}
    for mode in ("never", "always"):
        conv = Conv2D(3, 6, 3, 1, "same", dtype=np.float64)
        conv.W[...] = np.random.default_rng(1).standard_normal(conv.W.shape)
        conv.b[...] = np.random.default_rng(2).standard_normal(conv.b.shape)
        step = ConvReLU(conv, ReLU(), pool_cls(2))
        with TUNING.override(winograd=mode, fused_block_bytes=block_bytes):
            y = step.forward(x).copy()
            dx = step.backward(dy).copy()
        out[mode] = (y, dx, conv.dW.copy(), conv.db.copy())
    for direct, wino in zip(out["never"], out["always"]):
        np.testing.assert_allclose(wino, direct, rtol=1e-11, atol=1e-12 * np.abs(direct).max())


@pytest.mark.parametrize("layers", [SMALL, SMALL_BN], ids=["small", "small_bn"])
def test_model_gradients_with_winograd_match_direct(layers):
    x = RNG.standard_normal((6, 12, 12, 1))
    y = RNG.integers(0, 10, 6)
    res = {}
    for mode in ("never", "always"):
        with TUNING.override(winograd=mode, fused_block_bytes=50_000):  # several blocks
            model = Model.from_config(layers, input_shape=(12, 12, 1), dtype=np.float64, seed=3)
            loss, _ = model.loss_and_grads(x, y)
            res[mode] = (loss, model.grads.copy())
    assert res["always"][0] == pytest.approx(res["never"][0], rel=1e-12)
    g = res["never"][1]
    np.testing.assert_allclose(res["always"][1], g, rtol=1e-9, atol=1e-12 * np.abs(g).max())


def test_winograd_float32_training_step_stays_within_rounding_of_direct():
    x = RNG.standard_normal((8, 12, 12, 1)).astype(np.float32)
    y = RNG.integers(0, 10, 8)
    grads = {}
    for mode in ("never", "always"):
        with TUNING.override(winograd=mode):
            model = Model.from_config(SMALL, input_shape=(12, 12, 1), seed=4)
            model.loss_and_grads(x, y)
            grads[mode] = model.grads.copy()
    g = grads["never"]
    assert np.abs(grads["always"] - g).max() <= 1e-5 * np.abs(g).max()


def test_choice_is_a_function_of_the_shape_only():
    with TUNING.override(winograd="auto"):
        assert wg.chosen(3, 1, 16, 32)  # `small`'s second conv: measured faster (bench_winograd.py)
        assert not wg.chosen(3, 1, 1, 16)  # a first conv: K = 1 position GEMMs, 5x slower
        assert not wg.chosen(3, 1, 8, 32)
        assert wg.chosen(3, 1, 64, 64)
        assert wg.chosen(3, 1, 64, 64) == wg.chosen(3, 1, 64, 64)
    with TUNING.override(winograd="always"):
        assert wg.chosen(3, 1, 1, 16) and not wg.chosen(3, 2, 16, 16) and not wg.chosen(5, 1, 16, 16)
    with TUNING.override(winograd="never"):
        assert not wg.chosen(3, 1, 64, 64)
    with TUNING.override(winograd="sometimes"), pytest.raises(ValueError):
        wg.chosen(3, 1, 64, 64)


def test_winograd_reuses_its_buffers_across_block_sizes():
    """The blocks of a step differ in size; scratch buffers grow once and later results stay right."""
    conv = make_conv(2, 3, 3, 1, "same")
    with TUNING.override(winograd="always"):
        for m in (4, 2, 3):
            x = RNG.standard_normal((m, 6, 6, 2))
            np.testing.assert_allclose(conv.forward(x), naive_conv(x, conv.W, conv.b, 1, conv.pads(6, 6)),
                                       rtol=1e-12, atol=1e-12)
