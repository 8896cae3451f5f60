"""The flat-grid path of one-channel convolutions (dpcnn.flat_conv) against the general path and
against finite differences, and the zero-array ReLU (conv_kernels.relu_).

The flat path computes garbage outputs where windows hang over the grid's edge and relies on
their gradient being exactly zero; every shape below has such positions (pads, odd sizes, a 3x3
pool, blocks of one image whose garbage reads the next image)."""

import numpy as np
import pytest

import dpcnn.conv_kernels as ck
from dpcnn.conv_kernels import TUNING
from dpcnn.fused import ConvReLU
from dpcnn.fused_bn import ConvBNReLU
from dpcnn.layers import AvgPool2D, Conv2D, MaxPool2D, ReLU
from dpcnn.model import Model
from dpcnn.norm import BatchNorm
from test_layers import numeric_grad, rel_error


def make_step(f, padding, c_out, pool, needs_input_grad, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    conv = Conv2D(1, c_out, f, 1, padding, dtype=dtype)
    conv.W[...] = rng.standard_normal(conv.W.shape)
    conv.b[...] = 0.3 * rng.standard_normal(conv.b.shape)
    conv.needs_input_grad = needs_input_grad
    step = ConvReLU(conv, ReLU(), AvgPool2D(pool) if pool else None)
    step.reuse_output = False
    return step


def run(step, x, dy=None, **tuning):
    with TUNING.override(**tuning):
        y = step.forward(x).copy()
        if dy is None:
            dy = np.random.default_rng(3).standard_normal(y.shape)
        dx = step.backward(dy)
        took_flat = step._cache.grid is not None
    return y, None if dx is None else dx.copy(), step.conv.dW.copy(), step.conv.db.copy(), took_flat


SHAPES = [  # (f, padding, pool, h, w)
    (5, 2, 2, 28, 28),        # LeNet-5's first layer
    (3, "same", 2, 12, 12),
    (3, "same", None, 9, 7),  # no pool, odd sizes
    (5, "valid", 2, 14, 14),  # no padding: a 10x10 output on a 14x14 grid
    (2, "same", None, 8, 8),  # even filter: asymmetric "same" pads (0, 1)
    (4, "same", 3, 9, 9),     # 3x3 average pool
    (3, 1, 3, 9, 6),          # padded 11x8: the grid rounds up to 12x9
]


@pytest.mark.parametrize("f,padding,pool,h,w", SHAPES)
@pytest.mark.parametrize("needs_input_grad", [False, True])
@pytest.mark.parametrize("block_bytes", [1 << 40, 200_000, 1])
def test_flat_path_matches_general_path(f, padding, pool, h, w, needs_input_grad, block_bytes):
    """Same output, filter/bias gradient and input gradient (float64, to rounding); one block,
    blocks with a remainder, or one image per block."""
    step = make_step(f, padding, 3, pool, needs_input_grad)
    x = np.random.default_rng(1).standard_normal((5, h, w, 1))
    x[0, : h // 2] = 0  # a flat region: zero conv outputs where the bias is <= 0
    general = run(step, x, flat_one_channel=False)
    flat = run(step, x, flat_block_bytes=block_bytes)
    assert flat[-1] and not general[-1]
    for a, b in zip(general[:4], flat[:4]):
        if a is None or b is None:
            assert a is None and b is None
        else:
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * np.abs(a).max())


def test_one_step_fed_other_image_sizes_and_batches_matches_fresh_steps():
    """The reused grids (zero borders kept from their first use) never leak one geometry's pixels
    into another's: 2 images 12x12 and 4 images 8x8 give the flat X the same length
    (2 * 14*14 + 30 = 4 * 10*10 + 22), and every change of size or batch matches a fresh step."""
    step = make_step(3, "same", 2, 2, True)
    rng = np.random.default_rng(9)
    for shape in [(2, 12, 12, 1), (4, 8, 8, 1), (2, 12, 12, 1), (5, 8, 8, 1), (4, 8, 8, 1)]:
        x = rng.standard_normal(shape)
        fresh = make_step(3, "same", 2, 2, True)
        for a, b in zip(run(step, x)[:4], run(fresh, x)[:4]):
            np.testing.assert_array_equal(a, b)


def test_flat_path_float32_stays_within_rounding_of_the_general_path():
    step = make_step(5, 2, 6, 2, False, dtype=np.float32)
    x = np.random.default_rng(2).standard_normal((9, 28, 28, 1)).astype(np.float32)
    general, flat = run(step, x, flat_one_channel=False), run(step, x)
    for a, b in zip(general[:4:2], flat[:4:2]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("pool,needs_input_grad", [(2, True), (None, True), (3, False)])
def test_flat_path_gradients_match_finite_differences(pool, needs_input_grad):
    """d sum(y * dy) by central differences in float64: filters, bias and (if asked) the input."""
    step = make_step(3, "same" if pool != 3 else 1, 2, pool, needs_input_grad, seed=4)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 6, 1)) if pool != 3 else rng.standard_normal((2, 7, 7, 1))
    y, dx, dW, db, took_flat = run(step, x)
    assert took_flat
    dy = np.random.default_rng(3).standard_normal(y.shape)

    def loss():
        return float(np.sum(step.forward(x) * dy))

    conv = step.conv
    assert rel_error(numeric_grad(loss, conv.W), dW) < 1e-7
    assert rel_error(numeric_grad(loss, conv.b), db) < 1e-7
    if needs_input_grad:
        assert rel_error(numeric_grad(loss, x), dx) < 1e-7


@pytest.mark.parametrize("case", ["max pool", "stride 2", "three channels", "switched off"])
def test_flat_path_is_taken_only_where_it_applies(case):
    rng = np.random.default_rng(0)
    c_in = 3 if case == "three channels" else 1
    conv = Conv2D(c_in, 2, 3, 2 if case == "stride 2" else 1, "same")
    pool = MaxPool2D(2) if case == "max pool" else AvgPool2D(2)
    step = ConvReLU(conv, ReLU(), pool)
    with TUNING.override(flat_one_channel=case != "switched off"):
        step.forward(rng.standard_normal((2, 8, 8, c_in)).astype(np.float32))
    assert step._cache.grid is None


def test_batch_norm_step_keeps_the_general_path():
    conv = Conv2D(1, 2, 3, 1, "same")
    step = ConvBNReLU(conv, BatchNorm(2), ReLU(), AvgPool2D(2))
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
    for train in (True, False):
        step.forward(x, train)
        assert step._cache.grid is None


def test_lenet5_trains_the_same_on_the_flat_path():
    """The whole model, float32, a few SGD steps: the weights stay within float32 rounding of the
    general path's (the flat path only reorders sums)."""
    from pathlib import Path

    import yaml
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf/model/lenet5.yaml").read_text())["layers"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 32)

    def train(flat):
        with TUNING.override(flat_one_channel=flat):
            model = Model.from_config(spec, seed=1)
            for _ in range(5):
                model.loss_and_grads(x, y)
                assert (model._plan[0]._cache.grid is not None) == flat
                model.params -= 0.05 * model.grads
        return model.params.copy()

    np.testing.assert_allclose(train(True), train(False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_against_zeros_is_numpys_maximum(dtype):
    a = np.array([-1.5, -0.0, 0.0, 2.0, np.nan, -np.inf, np.inf], dtype)
    np.testing.assert_array_equal(ck.relu_(a.copy()), np.maximum(a, 0))
    assert np.signbit(ck.relu_(a.copy())).tolist() == np.signbit(np.maximum(a, 0)).tolist()
    big = np.random.default_rng(0).standard_normal((300, 301)).astype(dtype)[:, ::2]  # strided, > 65,536
    out = np.empty(big.shape, dtype)
    assert ck.relu_(big, out=out) is out
    np.testing.assert_array_equal(out, np.maximum(big, 0))
