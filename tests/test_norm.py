"""Dropout and BatchNorm: finite differences (float64), the fused conv+batchnorm step against the
layers, where the running statistics live and how they move, and what a bad spec says."""

import numpy as np
import pytest

from dpcnn.errors import ConfigError
from dpcnn.conv_kernels import Workspace, im2col
from dpcnn.fused_bn import ConvBNReLU, gram, image_gram
from dpcnn.model import Model
from dpcnn.norm import BatchNorm, Dropout, dropout_scale

from test_layers import numeric_grad, rel_error

RNG = np.random.default_rng(19)
F64 = np.dtype(np.float64)


def check_grads(layer, x, params=()):
    """d(sum(y * r)) / d(x and each named parameter): analytic (backward) vs central differences."""
    r = RNG.standard_normal(layer.forward(x).shape)

    def f():
        return float(np.sum(layer.forward(x) * r))

    layer.forward(x)
    analytic = {"x": layer.backward(r), **{p: getattr(layer, "d" + p).copy() for p in params}}
    numeric = {"x": numeric_grad(f, x), **{p: numeric_grad(f, getattr(layer, p)) for p in params}}
    for k in analytic:
        assert rel_error(analytic[k], numeric[k]) < 1e-6, k


@pytest.mark.parametrize("shape", [(4, 5, 3, 6), (7, 9), (1, 2, 2, 3)])
def test_batchnorm_gradients_in_training(shape):
    bn = BatchNorm(shape[-1], dtype=np.float64)
    bn.gamma[...] = RNG.standard_normal(shape[-1])
    bn.beta[...] = RNG.standard_normal(shape[-1])
    x = RNG.standard_normal(shape) * 3 + 1
    check_grads(bn, x, params=("gamma", "beta"))


def test_batchnorm_forward_normalises_and_records_statistics():
    x = RNG.standard_normal((6, 4, 4, 3)) * [1, 2, 3] + [0, 5, -5]
    bn = BatchNorm(3, dtype=np.float64)
    y = bn.forward(x)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), x.var(axis=(0, 1, 2)) / (x.var(axis=(0, 1, 2)) + 1e-5))
    # m * (mean, unbiased variance): the Model divides by the global batch, the Allreduce sums.
    np.testing.assert_allclose(bn.batch_mean, 6 * x.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(bn.batch_var, 6 * x.reshape(-1, 3).var(axis=0, ddof=1))
    bn.update_running(bn.batch_mean / 6, bn.batch_var / 6)
    np.testing.assert_allclose(bn.running_mean, 0.1 * x.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * x.reshape(-1, 3).var(axis=0, ddof=1))


@pytest.mark.parametrize("shape", [(32, 128), (8, 6, 6, 16)])
def test_float32_batchnorm_is_accurate_for_features_far_from_zero(shape):
    """Training in float32 (the rows path computes in float32 since 2026-12-06) on features with a mean
    of 1e3 and a spread of 1: output, statistics and input gradient within float32 rounding of float64."""
    x = RNG.standard_normal(shape) + 1e3 + np.arange(shape[-1])
    dy = RNG.standard_normal(shape)
    out = {}
    for dt in (np.float32, np.float64):
        bn = BatchNorm(shape[-1], dtype=dt)
        bn.gamma[...], bn.beta[...] = 1.5, -0.5
        y = bn.forward(x.astype(dt))
        out[dt] = y, bn.backward(dy.astype(dt)), bn.batch_mean.copy(), bn.batch_var.copy(), bn.dgamma.copy()
    for a, b in zip(out[np.float32], out[np.float64]):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * np.abs(b).max())


def test_batchnorm_evaluation_uses_running_statistics():
    bn = BatchNorm(2, eps=1e-3, dtype=np.float64)
    bn.running_mean[...], bn.running_var[...] = [1, -1], [4, 0.25]
    bn.gamma[...], bn.beta[...] = [2, 3], [0.5, 0]
    x = RNG.standard_normal((5, 2))
    expected = (x - [1, -1]) / np.sqrt(np.array([4, 0.25]) + 1e-3) * [2, 3] + [0.5, 0]
    np.testing.assert_allclose(bn.forward(x, train=False), expected)
    np.testing.assert_allclose(bn.backward(np.ones((5, 2))), np.ones((5, 2)) * [2, 3] / np.sqrt([4.001, 0.251]))


def test_dropout_gradient_with_a_fixed_mask():
    layer = Dropout(0.4, key=3)
    layer.seed, layer.step, layer.start = 5, 11, 7  # the mask is a function of these: fixed
    check_grads(layer, RNG.standard_normal((6, 3, 3, 4)))
    x = RNG.standard_normal((50, 40))
    assert layer.forward(x, train=False) is x and layer.backward(x) is x


def test_dropout_mask_depends_on_the_global_position_only():
    """A rank holding examples 3..6 of a global batch draws their rows of the whole batch's mask."""
    whole = dropout_scale(0, 4, 2, 0, (10, 6, 6, 3), 0.25, F64)
    for start, stop in ((3, 7), (0, 1), (9, 10), (1, 10)):
        part = dropout_scale(0, 4, 2, start, (stop - start, 6, 6, 3), 0.25, F64)
        np.testing.assert_array_equal(part, whole[start:stop])
    assert set(np.unique(whole)) == {0.0, 1 / 0.75}
    assert abs((whole == 0).mean() - 0.25) < 4 * (0.25 * 0.75 / whole.size) ** 0.5  # (4 standard deviations)
    for other in (dropout_scale(1, 4, 2, 0, whole.shape, 0.25, F64), dropout_scale(0, 5, 2, 0, whole.shape, 0.25, F64),
                  dropout_scale(0, 4, 3, 0, whole.shape, 0.25, F64)):  # seed, step, layer
        assert (other != whole).mean() > 0.2
    for rate in (0.25, 0.5):  # 100,000 units: a standard deviation of 0.0016 at most
        assert (dropout_scale(0, 0, 0, 0, (1000, 100), rate, F64) == 0).mean() == pytest.approx(rate, abs=0.01)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, True])
def test_dropout_rate_outside_zero_one_is_a_config_error(rate):
    layers = [{"type": "flatten"}, {"type": "dropout", "rate": rate}, {"type": "dense", "units": 10}]
    with pytest.raises(ConfigError, match=r"model layer 1 .*dropout rate must be in \[0, 1\)"):
        Model.from_config(layers, input_shape=(4, 4, 1))


@pytest.mark.parametrize("layers", [
    [{"type": "batchnorm"}, {"type": "conv", "filters": 2}, {"type": "flatten"}, {"type": "dense", "units": 10}],
    [{"type": "maxpool"}, {"type": "batchnorm"}, {"type": "flatten"}, {"type": "dense", "units": 10}],
])
def test_batchnorm_before_any_layer_with_features_is_a_config_error(layers):
    with pytest.raises(ConfigError, match="batchnorm needs a conv or dense layer before it"):
        Model.from_config(layers, input_shape=(4, 4, 1))


BN_NET = [{"type": "conv", "filters": 4, "kernel_size": 3}, {"type": "batchnorm"}, {"type": "relu"},
          {"type": "maxpool", "kernel_size": 2},
          {"type": "conv", "filters": 5, "kernel_size": 3, "stride": 2}, {"type": "batchnorm", "momentum": 0.2},
          {"type": "relu"}, {"type": "dropout", "rate": 0.3},
          {"type": "conv", "filters": 6, "kernel_size": 3}, {"type": "batchnorm"}, {"type": "relu"},
          {"type": "avgpool", "kernel_size": 2},
          {"type": "flatten"}, {"type": "dense", "units": 12}, {"type": "batchnorm"}, {"type": "relu"},
          {"type": "dropout", "rate": 0.5}, {"type": "dense", "units": 10}]
# A second conv with batch norm and a fused max pool: its backward sums over the pooled maxima.
BN_POOL_NET = [{"type": "conv", "filters": 4, "kernel_size": 3}, {"type": "batchnorm"}, {"type": "relu"},
               {"type": "maxpool", "kernel_size": 2},
               {"type": "conv", "filters": 6, "kernel_size": 3}, {"type": "batchnorm"}, {"type": "relu"},
               {"type": "maxpool", "kernel_size": 2}, {"type": "flatten"}, {"type": "dense", "units": 10}]

# A first conv without padding: its statistics from the Gram matrix of its patches (not `image_gram`).
BN_VALID_NET = [{"type": "conv", "filters": 4, "kernel_size": 3, "padding": "valid"}, {"type": "batchnorm"},
                {"type": "relu"}, {"type": "maxpool", "kernel_size": 2},
                {"type": "conv", "filters": 6, "kernel_size": 3}, {"type": "batchnorm"}, {"type": "relu"},
                {"type": "flatten"}, {"type": "dense", "units": 10}]


def bn_models(net=BN_NET):
    fused = Model.from_config(net, input_shape=(12, 12, 1), dtype=np.float64, seed=2)
    plain = Model.from_config(net, input_shape=(12, 12, 1), dtype=np.float64, seed=2)
    plain._fuse = False
    fused.trainable[:] += 0.1 * RNG.standard_normal(fused.num_trainable)
    plain.params[:] = fused.params
    return fused, plain


def test_model_lays_out_running_statistics_after_the_trainable_parameters():
    model, _ = bn_models()
    # (the 3x3 output of the third conv does not tile by 2: its pool stays a layer)
    assert [type(s).__name__ for s in model._plan] == ["ConvBNReLU", "ConvBNReLU", "Dropout", "ConvBNReLU",
                                                       "AvgPool2D", "Flatten", "Dense", "BatchNorm", "ReLU",
                                                       "Dropout", "Dense"]
    bns = model.batchnorms
    assert model.num_params - model.num_trainable == 2 * sum(bn.num_features for bn in bns) == 54
    assert np.shares_memory(bns[0].running_mean, model.params[model.num_trainable:])
    assert np.shares_memory(bns[0].batch_var, model.grads[model.num_trainable:])
    assert np.shares_memory(bns[0].gamma, model.trainable) and np.shares_memory(bns[0].dgamma, model.grads)
    fresh = Model.from_config(BN_NET, input_shape=(12, 12, 1), seed=2)
    assert all((bn.gamma == 1).all() and (bn.running_var == 1).all() and (bn.running_mean == 0).all()
               for bn in fresh.batchnorms)
    # Batchnorm draws nothing at initialisation: the convs' weights are those of the net without it.
    plain = Model.from_config([s for s in BN_NET if s["type"] != "batchnorm"], input_shape=(12, 12, 1), seed=2)
    np.testing.assert_array_equal(fresh.layers[0].W, plain.layers[0].W)
    assert "(+ 54 running statistics)" in fresh.summary()


NOT_KEPT = {"fused_block_bytes": 1, "store_cols_bytes": 0, "store_cols_t_bytes": 0}  # patches made again in backward


@pytest.mark.parametrize("tuning,negative_gamma", [({}, False), ({}, True), ({"fused_block_bytes": 1}, False),
                                                  (NOT_KEPT, True), ({"fold_bias": False}, False)])
@pytest.mark.parametrize("net", [BN_NET, BN_POOL_NET, BN_VALID_NET], ids=["bn_net", "bn_pool_net", "bn_valid_net"])
def test_fused_conv_batchnorm_relu_matches_layers(tuning, negative_gamma, net):
    """Training (batch statistics, dropout) and evaluation (BN folded into the filters): the fused
    plan gives the layers' numbers, in one block or in blocks of one example, with the first layer's
    statistics from the patches' Gram matrix (bias folded) or not, pooling before or after the
    batch-norm map (a negative gamma)."""
    from dpcnn.conv_kernels import TUNING

    fused, plain = bn_models(net)
    if negative_gamma:
        for model in (fused, plain):
            model.batchnorms[0].gamma[1] = model.batchnorms[1].gamma[0] = -0.5
    x, y = RNG.standard_normal((6, 12, 12, 1)), RNG.integers(0, 10, 6)
    with TUNING.override(**tuning):
        lf = fused.loss_and_grads(x, y, denom=9, step=3, start=2)
        lp = plain.loss_and_grads(x, y, denom=9, step=3, start=2)
        assert lf[1] == lp[1] and lf[0] == pytest.approx(lp[0], rel=1e-13)
        np.testing.assert_allclose(fused.grads, plain.grads, rtol=1e-10, atol=1e-13)
        for step in fused._plan:  # backward reuses the forward's conv output as scratch: once per forward
            if isinstance(step, ConvBNReLU):
                with pytest.raises(RuntimeError, match="once per forward"):
                    step.backward(np.zeros(1))
        for model in (fused, plain):
            model.update_running_stats(model.grads[model.num_trainable:])
        np.testing.assert_allclose(fused.params, plain.params, rtol=1e-12)
        np.testing.assert_allclose(fused.forward(x, train=False), plain.forward(x, train=False), rtol=1e-10)
    with pytest.raises(RuntimeError, match="needs a forward with train=True"):
        fused._plan[0].backward(np.zeros((6, 6, 6, 4)))


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1, 1), (1, 2, 3), (4, 7, 2), (5, 28, 28)])
def test_image_gram_is_the_patch_matrix_gram(shape):
    """A first 3x3 'same' conv of one channel takes P^T P from its padded input's lags and edges, not from
    its patches: the same matrix at every size (1x1 and non-square images included), and `gram`'s
    half-height product on either patch layout, contiguous or not, as well."""
    m, h, w = shape
    xp = np.zeros((m, h + 2, w + 2, 1))
    xp[:, 1:-1, 1:-1] = RNG.standard_normal((m, h, w, 1))
    P = im2col(xp, 3, 1, h, w, Workspace(), fold=True)
    ref = P.T @ P
    np.testing.assert_allclose(image_gram(xp), ref, rtol=1e-12, atol=1e-13 * np.abs(ref).max())
    PT = im2col(xp, 3, 1, h, w, Workspace(), fold=True, transposed=True, cap=P.shape[0] + 3, row0=1)
    for A in (P, np.ascontiguousarray(P.T).T, PT):
        np.testing.assert_allclose(gram(A), ref, rtol=1e-12, atol=1e-13 * np.abs(ref).max())
    x32 = xp.astype(np.float32)
    np.testing.assert_allclose(image_gram(x32), ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("net", [BN_NET, BN_POOL_NET], ids=["bn_net", "bn_pool_net"])
def test_model_gradient_with_batchnorm_and_dropout_float64(net):
    """The whole network against finite differences of its loss (dropout fixed by step and start)."""
    model, _ = bn_models(net)
    x, y = RNG.standard_normal((4, 12, 12, 1)), RNG.integers(0, 10, 4)
    model.loss_and_grads(x, y, step=1, start=5)
    analytic = model.grads[:model.num_trainable].copy()
    pick = RNG.choice(model.num_trainable, 60, replace=False)
    numeric = []
    for i in pick:
        old = model.params[i]
        losses = []
        for v in (old + 1e-6, old - 1e-6):
            model.params[i] = v
            losses.append(model.loss.forward(model.forward(x, train=True), y))
        model.params[i] = old
        numeric.append((losses[0] - losses[1]) / 2e-6)
    # (forward re-draws the same masks: the dropout layers still hold step 1, start 5)
    assert rel_error(analytic[pick], np.array(numeric)) < 1e-6


def test_running_statistics_are_the_global_batch_average_of_micro_batches():
    """Two micro-batches of 3 with denominator 6, summed (as the Allreduce does): the running mean
    moves towards the mean of the 6 examples, the variance towards the average unbiased variance."""
    layers = [{"type": "flatten"}, {"type": "dense", "units": 3}, {"type": "batchnorm", "momentum": 0.5},
              {"type": "dense", "units": 10}]
    model = Model.from_config(layers, input_shape=(2, 2, 1), dtype=np.float64, seed=0)
    x, y = RNG.standard_normal((6, 2, 2, 1)), np.arange(6)
    total = np.zeros(model.num_params)
    z = []
    for part in (slice(0, 3), slice(3, 6)):
        model.loss_and_grads(x[part], y[part], denom=6)
        total += model.grads
        z.append(x[part].reshape(3, -1) @ model.layers[1].W + model.layers[1].b)
    model.update_running_stats(total[model.num_trainable:])
    bn = model.batchnorms[0]
    np.testing.assert_allclose(bn.running_mean, 0.5 * np.concatenate(z).mean(axis=0))
    np.testing.assert_allclose(bn.running_var, 0.5 + 0.5 * (z[0].var(axis=0, ddof=1) + z[1].var(axis=0, ddof=1)) / 2)


def test_fused_step_is_used_for_conv_batchnorm_relu_only():
    layers = [{"type": "conv", "filters": 2}, {"type": "batchnorm"}, {"type": "flatten"},
              {"type": "dense", "units": 10}]
    assert [type(s).__name__ for s in Model.from_config(layers, input_shape=(4, 4, 1))._plan] == \
        ["Conv2D", "BatchNorm", "Flatten", "Dense"]
    assert isinstance(bn_models()[0]._plan[1], ConvBNReLU) and bn_models()[0]._plan[1].pool is None
