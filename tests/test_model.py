"""Model building from specs, the flat buffers, end-to-end gradients, config errors."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from dpcnn.errors import ConfigError
from dpcnn.model import Model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def spec(name):
    return yaml.safe_load((CONF / f"{name}.yaml").read_text())["layers"]


@pytest.mark.parametrize("name", ["small", "seed", "lenet5", "tiny"])
def test_shipped_models_build_and_step(name):
    model = Model.from_config(spec(name))
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    loss, correct = model.loss_and_grads(x, np.array([0, 1, 2, 3]))
    assert np.isfinite(loss) and 0 <= correct <= 4
    assert model.params.dtype == np.float32 and model.grads.dtype == np.float32
    assert np.any(model.grads != 0)


def test_small_is_the_reference_model():
    model = Model.from_config(spec("small"))
    assert model.num_params == 206_922
    assert model.shapes[-1] == (10,)
    assert "total parameters: 206,922" in model.summary()


def test_layer_params_are_views_of_the_flat_buffers():
    model = Model.from_config(spec("small"))
    conv = model.layers[0]
    assert np.shares_memory(conv.W, model.params) and np.shares_memory(conv.dW, model.grads)
    model.params[:] = 0.5
    assert np.all(conv.W == 0.5) and np.all(model.layers[-1].b == 0.5)
    x = np.ones((2, 28, 28, 1), np.float32)
    model.loss_and_grads(x, np.array([1, 2]))
    assert np.all(model.grads[: conv.W.size] == conv.dW.ravel())


def test_init_is_seeded():
    a, b, c = (Model.from_config(spec("small"), seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)


def test_default_init_is_fan_in_uniform():
    dense = Model.from_config(spec("small")).layers[7]  # dense 1568 -> 128
    bound = 1 / np.sqrt(1568)
    assert np.abs(dense.W).max() <= bound and np.abs(dense.b).max() <= bound
    assert abs(dense.W.std() - bound / np.sqrt(3)) < 0.02 * bound  # std of U(-a, a) is a / sqrt(3)
    assert np.any(dense.b != 0)


def test_he_normal_init():
    dense = Model.from_config(spec("small"), init="he_normal").layers[7]
    assert abs(dense.W.std() - np.sqrt(2 / 1568)) < 0.05 * np.sqrt(2 / 1568)
    assert np.all(dense.b == 0)
    with pytest.raises(ConfigError, match="unknown model.init 'xavier'"):
        Model.from_config(spec("small"), init="xavier")


def _numeric_grads(model, x, y, idx, eps=1e-6):
    out = []
    for i in idx:
        old = model.params[i]
        model.params[i] = old + eps
        lp = model.loss.forward(model.forward(x), y)
        model.params[i] = old - eps
        lm = model.loss.forward(model.forward(x), y)
        model.params[i] = old
        out.append((lp - lm) / (2 * eps))
    return np.array(out)


@pytest.mark.parametrize("name", ["small", "seed", "lenet5", "tiny"])
def test_end_to_end_gradient_float64(name):
    model = Model.from_config(spec(name), dtype=np.float64, seed=3)
    rng = np.random.default_rng(0)
    model.params += 0.01 * rng.standard_normal(model.num_params)  # nonzero biases
    x = rng.standard_normal((3, 28, 28, 1))
    y = np.array([1, 5, 9])
    model.loss_and_grads(x, y)
    analytic = model.grads.copy()
    # Every parameter of every layer would be slow; check a random sample that
    # covers every layer's W and b.
    idx = []
    offset = 0
    for layer in model.layers:
        for _, shape in layer.param_shapes:
            n = int(np.prod(shape))
            idx += list(offset + rng.choice(n, size=min(n, 6), replace=False))
            offset += n
    numeric = _numeric_grads(model, x, y, idx)
    # Relative to the gradient's scale: elementwise relative error is meaningless
    # for entries that are themselves ~1e-7.
    a = analytic[idx]
    assert np.abs(a - numeric).max() / np.abs(numeric).max() < 1e-6
    assert np.linalg.norm(a - numeric) / np.linalg.norm(a + numeric) < 1e-6


def test_predict_in_batches_matches_forward():
    model = Model.from_config(spec("tiny"))
    x = np.random.default_rng(0).random((25, 28, 28, 1), dtype=np.float32)
    np.testing.assert_array_equal(model.predict(x, batch_size=7), model.forward(x).argmax(1))
    p = model.predict_proba(x, batch_size=10)
    assert p.shape == (25, 10) and np.allclose(p.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("layers,message", [
    ([{"type": "conv", "filters": 4, "kernel_size": 3}, {"type": "bogus"}],
     "model layer 1 ({type: bogus}) with input (28, 28, 4): unknown layer type 'bogus'"),
    ([{"type": "conv", "filters": 4, "kernel_size": 30, "padding": "valid"}],
     "model layer 0 ({type: conv, filters: 4, kernel_size: 30, padding: valid}) with input (28, 28, 1): "
     "kernel 30x30 is larger than its (padded) input 28x28"),
    ([{"type": "maxpool", "kernel_size": 2}] * 5 + [{"type": "maxpool", "kernel_size": 2}],
     "model layer 4 ({type: maxpool, kernel_size: 2}) with input (1, 1, 1): pool window 2x2 does not fit its input 1x1"),
    ([{"type": "dense", "units": 10}],
     "model layer 0 ({type: dense, units: 10}) with input (28, 28, 1): dense needs a flat input"),
    ([{"type": "flatten"}, {"type": "dense", "units": 7}],
     "model output shape is (7) but the data has 10 classes"),
    ([{"type": "conv", "filter": 4}],
     "unknown key(s) filter for a conv layer"),
    ([{"type": "conv", "filters": 4, "stride": 0}], "stride must be a positive int"),
    ([{"type": "conv", "filters": 4, "padding": "full"}], "padding must be 'same', 'valid' or an int"),
    ([], "model has no layers"),
])
def test_config_errors_name_layer_and_shapes(layers, message):
    with pytest.raises(ValueError) as exc:
        Model.from_config(layers)
    assert isinstance(exc.value, ConfigError)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)
