"""SGD (momentum, Nesterov, weight decay) and Adam/AdamW on the flat parameter buffer; LR schedules.

Each update touches a few flat arrays (params, grads, the optimizer's state)
with vectorised in-place operations: no per-layer loop. Every optimizer has
``step(grads, lr)``, ``state()`` (the arrays a checkpoint keeps) and
``load_state(state)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from .errors import ConfigError


class SGD:
    """p <- p - lr * d, where (PyTorch's convention, so recipes carry over):

    g = grad + weight_decay * p
    v = momentum * v + g                  (if momentum > 0)
    d = g + momentum * v  (Nesterov)  or  v  (classical)  or  g (plain SGD)
    """

    def __init__(self, params: np.ndarray, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        if momentum < 0 or weight_decay < 0:
            raise ConfigError(f"momentum ({momentum}) and weight_decay ({weight_decay}) must be >= 0")
        if nesterov and momentum == 0:
            raise ConfigError("nesterov=true needs momentum > 0; set optimizer.momentum (e.g. 0.9)")
        self.params = params
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)
        self.velocity = np.zeros_like(params) if momentum else None

    def step(self, grads: np.ndarray, lr: float) -> None:
        """One update, in place. ``grads`` is used as scratch space (overwritten)."""
        g = grads
        if self.weight_decay:
            g += self.weight_decay * self.params
        if self.velocity is not None:
            v = self.velocity
            v *= self.momentum
            v += g
            if self.nesterov:
                g += self.momentum * v
            else:
                g = v
        self.params -= np.asarray(lr, self.params.dtype) * g

    def state(self) -> dict[str, np.ndarray]:
        """Arrays a resume needs (saved in the checkpoint)."""
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if self.velocity is None:
            return
        v = state.get("velocity")
        if v is None or v.shape != self.velocity.shape:
            raise ConfigError("the checkpoint has no matching momentum buffer; resume with the optimizer it was "
                              "trained with")
        self.velocity[:] = v


class Adam:
    """Adam (Kingma & Ba 2015) with PyTorch's conventions; ``decoupled=True`` is AdamW (Loshchilov & Hutter 2019).

    With t the number of steps taken (1 at the first), g = grad (+ weight_decay * p unless decoupled):

    m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2
    p <- p * (1 - lr * weight_decay)        (decoupled only)
    p <- p - lr / (1 - beta1**t) * m / (sqrt(v / (1 - beta2**t)) + eps)

    State: m and v (like params) and t (a 1-element int64 array), all in the checkpoint.
    """

    def __init__(self, params: np.ndarray, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled: bool = False):
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {list(betas)}; "
                              "e.g. optimizer.betas=[0.9,0.999]")
        if not eps > 0 or weight_decay < 0:
            raise ConfigError(f"optimizer.eps ({eps}) must be > 0 and optimizer.weight_decay ({weight_decay}) >= 0")
        self.params, self.betas, self.eps = params, betas, float(eps)
        self.weight_decay, self.decoupled = float(weight_decay), bool(decoupled)
        self.m, self.v = np.zeros_like(params), np.zeros_like(params)
        self.t = np.zeros(1, np.int64)
        self._tmp = np.empty_like(params)

    def step(self, grads: np.ndarray, lr: float) -> None:
        """One update, in place. ``grads`` is used as scratch space (overwritten)."""
        (b1, b2), p, g, tmp, dt = self.betas, self.params, grads, self._tmp, self.params.dtype.type
        self.t += 1
        t = int(self.t[0])
        if self.weight_decay and not self.decoupled:
            g += dt(self.weight_decay) * p
        self.m *= dt(b1)
        self.m += np.multiply(g, dt(1 - b1), out=tmp)
        self.v *= dt(b2)
        self.v += np.multiply(np.square(g, out=tmp), dt(1 - b2), out=tmp)
        if self.weight_decay and self.decoupled:
            p *= dt(1 - lr * self.weight_decay)
        denom = np.sqrt(self.v, out=tmp)
        denom *= dt(1 / math.sqrt(1 - b2 ** t))
        denom += dt(self.eps)
        np.divide(self.m, denom, out=g)
        g *= dt(lr / (1 - b1 ** t))
        p -= g

    def state(self) -> dict[str, np.ndarray]:
        """Arrays a resume needs (saved in the checkpoint); the live arrays, so a broadcast fills them."""
        return {"adam_m": self.m, "adam_v": self.v, "adam_t": self.t}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if any(state.get(k) is None or state[k].shape != a.shape for k, a in self.state().items()):
            raise ConfigError("the checkpoint has no matching Adam state (adam_m, adam_v, adam_t); resume with "
                              "the optimizer it was trained with")
        for k, a in self.state().items():
            a[...] = state[k]


#: ``optimizer.algorithm`` values.
ALGORITHMS = ("sgd", "adam")


def make_optimizer(params: np.ndarray, cfg: Mapping) -> SGD | Adam:
    """The optimizer of ``optimizer.algorithm`` (sgd: SGD with momentum/nesterov; adam: Adam, AdamW
    with ``decoupled``) over ``params`` (a model's ``trainable`` buffer)."""
    algorithm = cfg.get("algorithm", "sgd")
    if algorithm == "adam":
        return Adam(params, betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=cfg.get("eps", 1e-8),
                    weight_decay=cfg.get("weight_decay", 0.0), decoupled=cfg.get("decoupled", False))
    if algorithm != "sgd":
        raise ConfigError(f"unknown optimizer.algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    return SGD(params, momentum=cfg.get("momentum", 0.0), nesterov=cfg.get("nesterov", False),
               weight_decay=cfg.get("weight_decay", 0.0))


def make_schedule(cfg: Mapping, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """lr(step) for step = 0, 1, ...: linear warmup, then constant, step or cosine decay.

    cfg keys: lr, schedule (constant|step|cosine), warmup_steps, step_epochs and
    gamma (step: multiply by gamma every step_epochs epochs), min_lr (cosine floor).
    """
    base = float(cfg["lr"])
    if not base > 0 or not math.isfinite(base):
        raise ConfigError(f"optimizer.lr must be a positive number, got {cfg['lr']}; e.g. optimizer.lr=0.05")
    kind = cfg.get("schedule", "constant")
    warmup = int(cfg.get("warmup_steps", 0) or 0)
    min_lr = float(cfg.get("min_lr", 0.0) or 0.0)
    gamma = float(cfg.get("gamma", 0.1))
    step_epochs = int(cfg.get("step_epochs", 10) or 10)
    if kind not in ("constant", "step", "cosine"):
        raise ConfigError(f"unknown optimizer.schedule {kind!r}; use constant, step or cosine")

    def lr(step: int) -> float:
        if step < warmup:
            return base * (step + 1) / warmup
        if kind == "constant":
            return base
        if kind == "step":
            return base * gamma ** (step // (step_epochs * steps_per_epoch))
        span = max(total_steps - warmup, 1)
        t = min(step - warmup, span) / span
        return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t))

    return lr
