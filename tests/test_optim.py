"""SGD variants and Adam/AdamW against their textbook formulas; LR schedules."""

import math

import numpy as np
import pytest

from dpcnn.errors import ConfigError
from dpcnn.optim import SGD, Adam, make_optimizer, make_schedule


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


def adam_paper(p, grads, lrs, b1, b2, eps, wd, decoupled):
    """Algorithm 1 of Kingma & Ba (2015), line by line, with L2 (Adam) or decoupled (AdamW, Loshchilov &
    Hutter 2019, Algorithm 2 with schedule multiplier 1 and decay scaled by the lr, as in PyTorch) weight decay."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if not decoupled:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        if decoupled:
            p = p - lr * wd * p
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("b1,b2,eps,wd,decoupled", [(0.9, 0.999, 1e-8, 0, False), (0.8, 0.99, 1e-3, 0.01, False),
                                                    (0.9, 0.999, 1e-8, 0.05, True), (0.0, 0.5, 1e-6, 0.1, True)])
def test_adam_and_adamw_match_the_papers_update_for_10_steps(b1, b2, eps, wd, decoupled):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(40)
    grads = [rng.standard_normal(40) * 10 ** rng.uniform(-3, 1) for _ in range(10)]
    lrs = [0.01 * (1 + k % 3) for k in range(10)]  # the lr may change every step (schedules)
    p = p0.copy()
    opt = make_optimizer(p, {"algorithm": "adam", "betas": [b1, b2], "eps": eps, "weight_decay": wd,
                             "decoupled": decoupled})
    for g, lr in zip(grads, lrs):
        opt.step(g.copy(), lr)
    np.testing.assert_allclose(p, adam_paper(p0, grads, lrs, b1, b2, eps, wd, decoupled), rtol=1e-12, atol=1e-14)
    assert int(opt.t[0]) == 10


def test_adam_state_roundtrip_continues_bitwise():
    """Save after 4 steps, load into a fresh optimizer, take 4 more: the same as 8 straight steps (float32)."""
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(30).astype(np.float32) for _ in range(8)]
    p_straight = np.ones(30, np.float32)
    straight = Adam(p_straight, weight_decay=0.01, decoupled=True)
    for g in grads:
        straight.step(g.copy(), 1e-2)
    p = np.ones(30, np.float32)
    first = Adam(p, weight_decay=0.01, decoupled=True)
    for g in grads[:4]:
        first.step(g.copy(), 1e-2)
    saved = {k: v.copy() for k, v in first.state().items()}
    resumed_p = p.copy()
    resumed = Adam(resumed_p, weight_decay=0.01, decoupled=True)
    resumed.load_state(saved)
    for g in grads[4:]:
        resumed.step(g.copy(), 1e-2)
    np.testing.assert_array_equal(resumed_p, p_straight)
    with pytest.raises(ConfigError, match="no matching Adam state"):
        Adam(np.ones(30)).load_state(SGD(np.ones(30), momentum=0.9).state())


@pytest.mark.parametrize("betas", [(0.9, 1.0), (-0.1, 0.999), (0.9,)])
def test_adam_betas_outside_zero_one_are_config_errors(betas):
    with pytest.raises(ConfigError, match=r"optimizer.betas must be two numbers in \[0, 1\)"):
        Adam(np.ones(2), betas=betas)
    with pytest.raises(ConfigError, match="unknown optimizer.algorithm"):
        make_optimizer(np.ones(2), {"algorithm": "lion"})
