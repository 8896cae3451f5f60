"""SGD variants against their textbook formulas; LR schedules."""

import math

import numpy as np
import pytest

from dpcnn.errors import ConfigError
from dpcnn.optim import SGD, make_schedule


def reference(p, grads, lr, mu, nesterov, wd):
    """PyTorch's SGD written out step by step."""
    p, v = p.copy(), np.zeros_like(p)
    for g in grads:
        g = g + wd * p
        v = mu * v + g
        d = (g + mu * v if nesterov else v) if mu else g
        p = p - lr * d
    return p


@pytest.mark.parametrize("mu,nesterov,wd", [(0, False, 0), (0, False, 0.01), (0.9, False, 5e-4), (0.9, True, 5e-4)])
def test_sgd_matches_reference(mu, nesterov, wd):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) for _ in range(5)]
    p = p0.copy()
    opt = SGD(p, momentum=mu, nesterov=nesterov, weight_decay=wd)
    for g in grads:
        opt.step(g.copy(), 0.1)
    np.testing.assert_allclose(p, reference(p0, grads, 0.1, mu, nesterov, wd), rtol=1e-12)


def test_sgd_updates_in_place_and_state_roundtrip():
    p = np.ones(4)
    opt = SGD(p, momentum=0.5)
    opt.step(np.ones(4), 0.1)
    assert np.allclose(p, 0.9)
    other = SGD(np.ones(4), momentum=0.5)
    other.load_state(opt.state())
    np.testing.assert_array_equal(other.velocity, opt.velocity)


def test_bad_optimizer_settings():
    with pytest.raises(ConfigError, match="nesterov=true needs momentum"):
        SGD(np.ones(2), momentum=0, nesterov=True)
    with pytest.raises(ConfigError, match="optimizer.lr must be a positive number"):
        make_schedule({"lr": 0}, 10, 100)
    with pytest.raises(ConfigError, match="unknown optimizer.schedule"):
        make_schedule({"lr": 0.1, "schedule": "linear"}, 10, 100)


def test_schedules():
    const = make_schedule({"lr": 0.1}, 10, 100)
    assert const(0) == const(99) == 0.1
    step = make_schedule({"lr": 0.1, "schedule": "step", "step_epochs": 2, "gamma": 0.5}, 10, 100)
    assert step(19) == 0.1 and step(20) == 0.05 and step(40) == 0.025
    cos = make_schedule({"lr": 0.1, "schedule": "cosine", "min_lr": 0.01}, 10, 100)
    assert cos(0) == pytest.approx(0.1) and cos(50) == pytest.approx(0.055) and cos(100) == pytest.approx(0.01)
    warm = make_schedule({"lr": 0.1, "schedule": "cosine", "warmup_steps": 10}, 10, 110)
    assert warm(0) == pytest.approx(0.01) and warm(9) == pytest.approx(0.1) and warm(10) == pytest.approx(0.1)
    assert warm(60) == pytest.approx(0.05) and math.isclose(warm(110), 0, abs_tol=1e-12)
